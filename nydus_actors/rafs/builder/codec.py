"""Chunk compressors and digesters by their nydus-image names, with their on-disk codes.

Codes are those of the RAFS v6 extended superblock flags and the blob table entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import lz4.block
import zstandard


@dataclass(frozen=True)
class Compressor:
    name: str
    #: extended-superblock flag bit
    sb_flag: int
    #: `compression_algo` in the blob table entry
    blob_algo: int
    #: makes a compress function for one (single-threaded) user; None: chunks are stored as is
    new_compressor: Callable[[], Callable[[bytes], bytes]] | None
    decompress: Callable[[bytes, int], bytes] | None


@dataclass(frozen=True)
class Digester:
    name: str
    sb_flag: int
    blob_algo: int
    digest: Callable[[bytes], bytes]


def _zstd_compressor() -> Callable[[bytes], bytes]:
    # One context per blob writer: reusing it saves its setup on every chunk; it is not thread-safe.
    return zstandard.ZstdCompressor(level=3).compress


def _zstd_decompress(data: bytes, size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


def _lz4_compress(data: bytes) -> bytes:
    # Nydus's lz4_block chunks are bare blocks; the chunk table carries the uncompressed size.
    return lz4.block.compress(data, store_size=False)


def _lz4_compressor() -> Callable[[bytes], bytes]:
    return _lz4_compress


def _lz4_decompress(data: bytes, size: int) -> bytes:
    return lz4.block.decompress(data, uncompressed_size=size)


COMPRESSORS: dict[str, Compressor] = {
    "none": Compressor("none", 0x1, 0, None, None),
    "lz4_block": Compressor("lz4_block", 0x2, 1, _lz4_compressor, _lz4_decompress),
    "zstd": Compressor("zstd", 0x80, 3, _zstd_compressor, _zstd_decompress),
}

DIGESTERS: dict[str, Digester] = {
    "blake3": Digester("blake3", 0x4, 0, lambda data: blake3.blake3(data).digest()),
    "sha256": Digester("sha256", 0x8, 1, lambda data: hashlib.sha256(data).digest()),
}
