"""Nydus chunks: the 80-byte chunk-info table and the 8-byte inode chunk indexes.

Format doc §10.5-10.6. An index entry (blob index, ci index, block address) names one
table entry, which gives the chunk's compressed range in its blob.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nydus_actors.rafs.errors import corrupt

CHUNK_INFO_SIZE = 80
CHUNK_FLAG_COMPRESSED = 0x1
CHUNK_FLAG_HOLE = 0x2
CHUNK_FLAG_ENCRYPTED = 0x4
CHUNK_FLAG_BATCH = 0x8

_CHUNK_INFO = struct.Struct("<32sIIIIQQQI4x")
#: (blob index, ci index, block address) of a chunk-info entry, as nydusd keys its chunk map.
_KEY_FIELDS = struct.Struct("<32xI20xQ8xI4x")


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One data chunk: where its bytes sit in the blob, compressed and uncompressed."""

    blob_index: int
    index: int
    digest: bytes
    flags: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    file_offset: int

    @property
    def compressed(self) -> bool:
        """Whether the stored bytes need decompressing."""
        return bool(self.flags & CHUNK_FLAG_COMPRESSED)

    @property
    def hole(self) -> bool:
        """Whether the chunk reads as zeros."""
        return bool(self.flags & CHUNK_FLAG_HOLE)


@dataclass(frozen=True, slots=True)
class ChunkExtent:
    """A piece of a file read: `length` bytes from `skip` into the uncompressed chunk.

    `chunk` is None for a hole, which reads as zeros.
    """

    chunk: ChunkInfo | None
    skip: int
    length: int


def decode_index_entry(raw: int) -> tuple[int, int, int]:
    """Split an 8-byte index entry (as a little-endian u64) into (blob index + 1, ci index, blkaddr)."""
    blob_plus_one = (raw >> 16) & 0xFF
    ci_index = (raw & 0xFFFF) | ((raw >> 24) & 0xFF) << 16
    return blob_plus_one, ci_index, raw >> 32


class ChunkTable:
    """The image's chunk-info table, indexed lazily by (blob index, ci index, block address)."""

    def __init__(
        self, buf: bytes | memoryview, *, offset: int, size: int, block_size: int, chunk_size: int, path: str
    ) -> None:
        self._buf = buf
        self._offset = offset
        self._count = size // CHUNK_INFO_SIZE
        self._blkszbits = block_size.bit_length() - 1
        self._chunk_size = chunk_size
        self._path = path
        self._positions: dict[tuple[int, int, int], int] | None = None
        self._infos: dict[int, ChunkInfo] = {}

    def __len__(self) -> int:
        return self._count

    def _index(self) -> dict[tuple[int, int, int], int]:
        if self._positions is None:
            end = self._offset + self._count * CHUNK_INFO_SIZE
            shift = self._blkszbits
            # Filled in table order, so a duplicate key maps to its last entry, as in nydusd.
            self._positions = {
                (blob, ci, uoff >> shift): pos
                for pos, (blob, uoff, ci) in enumerate(_KEY_FIELDS.iter_unpack(self._buf[self._offset : end]))
            }
        return self._positions

    def find(self, blob_index: int, ci_index: int, blkaddr: int) -> ChunkInfo | None:
        """Return the chunk named by an inode's index entry, or None if the table lacks it."""
        pos = self._index().get((blob_index, ci_index, blkaddr))
        return None if pos is None else self.at(pos)

    def at(self, pos: int) -> ChunkInfo:
        """Decode table entry `pos`."""
        info = self._infos.get(pos)
        if info is None:
            (digest, blob, flags, csize, usize, coff, uoff, foff, ci) = _CHUNK_INFO.unpack_from(
                self._buf, self._offset + pos * CHUNK_INFO_SIZE
            )
            if usize > self._chunk_size:
                raise corrupt(self._path, f"chunk-info entry {pos} is {usize} bytes, over the chunk size")
            info = ChunkInfo(
                blob_index=blob,
                index=ci,
                digest=digest,
                flags=flags,
                compressed_offset=coff,
                compressed_size=csize,
                uncompressed_offset=uoff,
                uncompressed_size=usize,
                file_offset=foff,
            )
            self._infos[pos] = info
        return info
