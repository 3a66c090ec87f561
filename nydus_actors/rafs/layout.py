"""Where an inode's bytes live: flat, tail-packed and chunk-based layouts mapped onto devices.

Format doc §3-§4. The result is a list of pieces (device, byte address or None for a hole, length).
"""

from __future__ import annotations

import struct

from nydus_actors.rafs.errors import RafsError
from nydus_actors.rafs.inode import (
    CHUNK_FORMAT_BLKBITS_MASK,
    CHUNK_FORMAT_INDEXES,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    NULL_ADDR,
    Inode,
)
from nydus_actors.rafs.superblock import SuperBlock

_U32 = struct.Struct("<I")
_INDEX = struct.Struct("<HHI")

#: One mapped piece of a read: (device, byte offset or None for a hole, length).
Piece = tuple[int, int | None, int]


class Layout:
    """Maps byte ranges of inodes onto the devices of one image."""

    def __init__(self, buf: bytes | memoryview, file_size: int, sb: SuperBlock, path: str) -> None:
        self._buf = buf
        self._size = file_size
        self._bits = sb.blkszbits
        self._block_size = sb.block_size
        # nydusd indexes RAFS chunk arrays with the global chunk size, whatever the inode says.
        self._rafs_chunkbits = sb.chunk_size.bit_length() - 1 if sb.is_rafs else 0
        self._device_count = sb.extra_devices
        # The kernel masks index device ids to the next power of two above the device count.
        self._device_mask = (1 << sb.extra_devices.bit_length()) - 1
        self._path = path

    def _where(self, nid: int) -> str:
        return f"invalid rafs image {self._path}: inode {nid}"

    def map(self, inode: Inode, off: int, end: int) -> list[Piece]:
        """Map `[off, end)` (inside i_size) of an inode onto devices, merging contiguous pieces."""
        if inode.layout == LAYOUT_CHUNK_BASED:
            return self._map_chunks(inode, off, end)
        start_addr = inode.raw_u << self._bits
        if inode.layout != LAYOUT_FLAT_INLINE:
            # A FLAT_PLAIN start block of NULL_ADDR makes the whole body a hole (newer kernels).
            return [(0, None if inode.raw_u == NULL_ADDR else start_addr + off, end - off)]
        tail_start = ((inode.size - 1) >> self._bits) << self._bits
        pieces: list[Piece] = []
        if off < tail_start:
            pieces.append((0, start_addr + off, min(end, tail_start) - off))
        if end > tail_start:
            tail_len = inode.size - tail_start
            if (inode.inline_offset & (self._block_size - 1)) + tail_len > self._block_size:
                raise RafsError(f"{self._where(inode.nid)}: inline tail of {tail_len} bytes crosses a block")
            first = max(off, tail_start)
            pieces.append((0, inode.inline_offset + first - tail_start, end - first))
        return pieces

    def _map_chunks(self, inode: Inode, off: int, end: int) -> list[Piece]:
        fmt = inode.chunk_format
        chunkbits = self._rafs_chunkbits or self._bits + (fmt & CHUNK_FORMAT_BLKBITS_MASK)
        chunk = 1 << chunkbits
        indexes = bool(fmt & CHUNK_FORMAT_INDEXES)
        unit = 8 if indexes else 4
        base = (inode.inline_offset + unit - 1) & -unit
        count = (inode.size + chunk - 1) >> chunkbits
        if base + count * unit > self._size:
            raise RafsError(f"{self._where(inode.nid)}: {count} chunk entries run past the end of the file")
        buf = self._buf
        pieces: list[Piece] = []
        pos = off
        while pos < end:
            n = pos >> chunkbits
            inside = pos - (n << chunkbits)
            length = min(end - pos, chunk - inside)
            if indexes:
                _, device, blkaddr = _INDEX.unpack_from(buf, base + 8 * n)
                device &= self._device_mask
                if device > self._device_count and blkaddr != NULL_ADDR:
                    raise RafsError(f"{self._where(inode.nid)}: chunk {n} names missing device {device}")
            else:
                device, blkaddr = 0, _U32.unpack_from(buf, base + 4 * n)[0]
            if blkaddr == NULL_ADDR:
                _append(pieces, 0, None, length)
            else:
                _append(pieces, device, (blkaddr << self._bits) + inside, length)
            pos += length
        return pieces


def _append(pieces: list[Piece], device: int, addr: int | None, length: int) -> None:
    """Append a piece, extending the previous one when it continues it on the same device."""
    if pieces:
        last_device, last_addr, last_length = pieces[-1]
        if last_device == device and (
            (addr is None and last_addr is None)
            or (addr is not None and last_addr is not None and last_addr + last_length == addr)
        ):
            pieces[-1] = (device, last_addr, last_length + length)
            return
    pieces.append((device, addr, length))
