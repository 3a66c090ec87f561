"""The blobs an image reads from: the RAFS v6 blob table, or plain EROFS extra devices.

Format doc §10.4 (256-byte `RafsV6Blob` entries) and §5 (device slots).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from nydus_actors.rafs.errors import corrupt
from nydus_actors.rafs.superblock import RAFS_MAX_CHUNK_SIZE, RAFS_MIN_CHUNK_SIZE, SuperBlock

BLOB_ENTRY_SIZE = 256
COMPRESSORS = ("none", "lz4_block", "gzip", "zstd")
DIGESTERS = ("blake3", "sha256")

# Blob features the chunk path cannot serve from the chunk-info table alone.
BLOB_FEATURE_ZRAN = 0x8
BLOB_FEATURE_TARFS = 0x40
BLOB_FEATURE_BATCH = 0x80
BLOB_FEATURE_ENCRYPTED = 0x100

#: A blob id names a file in the blob directory, so it must not be able to leave it.
_BLOB_ID = re.compile(rb"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,63}")
_ENTRY = struct.Struct("<64sIIIIIIQQ")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob of the image (one extra device)."""

    index: int
    blob_id: str
    chunk_size: int
    chunk_count: int
    compressor: str
    digester: str
    compressed_size: int
    uncompressed_size: int
    features: int


def parse_blob_table(buf: bytes | memoryview, sb: SuperBlock, path: str) -> tuple[BlobInfo, ...]:
    """Decode the RAFS blob table, validating each entry like nydus `RafsV6Blob::validate`."""
    blobs = []
    for index in range(sb.blob_table_size // BLOB_ENTRY_SIZE):
        off = sb.blob_table_offset + index * BLOB_ENTRY_SIZE
        (raw_id, blob_index, chunk_size, chunk_count, compr, digest, features, csize, usize) = (
            _ENTRY.unpack_from(buf, off)
        )
        raw_id = raw_id.rstrip(b"\0")
        if not _BLOB_ID.fullmatch(raw_id):
            raise corrupt(path, f"blob {index} has an invalid blob id {raw_id[:64]!r}")
        if blob_index != index:
            raise corrupt(path, f"blob table entry {index} carries blob index {blob_index}")
        if chunk_size != sb.chunk_size or not RAFS_MIN_CHUNK_SIZE <= chunk_size <= RAFS_MAX_CHUNK_SIZE:
            raise corrupt(path, f"blob {index} has chunk size 0x{chunk_size:x}, image 0x{sb.chunk_size:x}")
        if compr >= len(COMPRESSORS):
            raise corrupt(path, f"blob {index} has unknown compression algorithm {compr}")
        if digest >= len(DIGESTERS):
            raise corrupt(path, f"blob {index} has unknown digest algorithm {digest}")
        blobs.append(
            BlobInfo(
                index=index,
                blob_id=raw_id.decode("ascii"),
                chunk_size=chunk_size,
                chunk_count=chunk_count,
                compressor=COMPRESSORS[compr],
                digester=DIGESTERS[digest],
                compressed_size=csize,
                uncompressed_size=usize,
                features=features,
            )
        )
    return tuple(blobs)


def device_blobs(sb: SuperBlock) -> tuple[BlobInfo, ...]:
    """Describe the extra devices of a plain EROFS image as uncompressed blobs."""
    blobs = []
    for index, slot in enumerate(sb.devices):
        tag = slot.tag.split(b"\0", 1)[0]
        size = slot.blocks * sb.block_size
        blobs.append(
            BlobInfo(
                index=index,
                # mkfs.erofs 1.5 leaves the tag empty; other tags are only kept when usable as file names.
                blob_id=tag.decode("ascii") if _BLOB_ID.fullmatch(tag) else "",
                chunk_size=0,
                chunk_count=0,
                compressor="none",
                digester="blake3",
                compressed_size=size,
                uncompressed_size=size,
                features=0,
            )
        )
    return tuple(blobs)
