"""The RAFS data path: chunks read from blob files, decompressed and checked.

`LocalBlobSource` is nydusd's `localfs` backend without a cache; `read_file` turns
a file read into chunk reads.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from typing import Protocol

import blake3
import lz4.block
import zstandard

from nydus_actors.rafs.blobtable import (
    BLOB_FEATURE_BATCH,
    BLOB_FEATURE_ENCRYPTED,
    BLOB_FEATURE_ZRAN,
    BlobInfo,
)
from nydus_actors.rafs.chunks import CHUNK_FLAG_BATCH, CHUNK_FLAG_ENCRYPTED, ChunkInfo
from nydus_actors.rafs.errors import RafsError
from nydus_actors.rafs.image import RafsImage

_UNSUPPORTED_FEATURES = {
    BLOB_FEATURE_ZRAN: "zran",
    BLOB_FEATURE_BATCH: "batch",
    BLOB_FEATURE_ENCRYPTED: "encrypted",
}
_UNSUPPORTED_FLAGS = CHUNK_FLAG_ENCRYPTED | CHUNK_FLAG_BATCH
_DECODE_ERRORS = (lz4.block.LZ4BlockError, zstandard.ZstdError, zlib.error, ValueError, EOFError)


class ChunkSource(Protocol):
    """Supplies uncompressed chunk data: the one interface between a RAFS file and its blobs."""

    def read_chunk(self, chunk: ChunkInfo) -> bytes:
        """Return the `chunk.uncompressed_size` bytes of `chunk`."""
        ...

    def read_range(self, chunk: ChunkInfo, skip: int, length: int) -> bytes:
        """Return `length` bytes of the uncompressed `chunk` from byte `skip`."""
        ...


def decompress(data: bytes, compressor: str, size: int) -> bytes:
    """Decompress one chunk known to expand to `size` bytes, never producing more.

    Raises:
        RafsError: the data does not decode, or not to exactly `size` bytes.
    """
    try:
        if compressor == "zstd":
            # Check the frame header first: decompress() would allocate whatever it claims.
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, size):
                raise RafsError(f"zstd frame declares {declared} bytes, expected {size}")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif compressor == "lz4_block":
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif compressor == "gzip":
            out = zlib.decompressobj(wbits=31).decompress(data, size)
        elif compressor == "none":
            out = data
        else:
            raise RafsError(f"unknown compressor {compressor}")
    except _DECODE_ERRORS as ex:
        raise RafsError(f"failed to decompress {compressor} chunk: {ex}") from ex
    if len(out) != size:
        raise RafsError(f"{compressor} chunk decompressed to {len(out)} bytes, expected {size}")
    return out


def chunk_digest(data: bytes, digester: str) -> bytes:
    """Return the Nydus chunk digest of uncompressed `data`."""
    if digester == "sha256":
        return hashlib.sha256(data).digest()
    return blake3.blake3(data).digest()


class LocalBlobSource:
    """Reads chunks from blob files named by blob id, as nydusd's `localfs` backend.

    Args:
        image: the opened image whose blob table names the blobs.
        blob_dir: a directory holding `<blob_id>` files.
        blob_files: explicit blob id -> path entries, tried before `blob_dir`.
        validate: check each chunk's digest (nydusd `digest_validate`).
        cached_chunks: how many decoded chunks to keep, so that the several FUSE
            reads that fall into one chunk decompress (and verify) it once.
    """

    def __init__(
        self,
        image: RafsImage,
        blob_dir: str | None = None,
        blob_files: dict[str, str] | None = None,
        *,
        validate: bool = False,
        cached_chunks: int = 4,
    ) -> None:
        self._blobs = image.blobs
        self._blob_dir = blob_dir
        self._blob_files = dict(blob_files or {})
        self._validate = validate
        self._open: dict[int, tuple[int, int]] = {}
        self._cache: OrderedDict[ChunkInfo, bytes] = OrderedDict()
        self._cache_size = max(cached_chunks, 0)
        # Uncompressed chunks whose digest was checked once: later reads take just their range.
        self._verified: set[ChunkInfo] = set()
        # Prefetch workers may share a source with the FUSE thread; reads run unlocked.
        self._lock = threading.Lock()

    def _blob_path(self, blob: BlobInfo) -> str:
        path = self._blob_files.get(blob.blob_id)
        if path is None and self._blob_dir is not None and blob.blob_id:
            path = os.path.join(self._blob_dir, blob.blob_id)
        if path is None:
            raise RafsError(f"no file is configured for blob {blob.blob_id or blob.index}")
        return path

    def _fd(self, blob: BlobInfo) -> tuple[int, int]:
        with self._lock:
            entry = self._open.get(blob.index)
            if entry is None:
                path = self._blob_path(blob)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as ex:
                    raise RafsError(f"failed to open blob {blob.blob_id} at {path}: {ex.strerror}") from ex
                entry = (fd, os.fstat(fd).st_size)
                self._open[blob.index] = entry
            return entry

    def read_chunk(self, chunk: ChunkInfo) -> bytes:
        """Read, decompress and optionally verify one chunk."""
        # Keyed by the whole ChunkInfo, digest included, so a hit was verified for this very chunk.
        with self._lock:
            data = self._cache.get(chunk)
            if data is not None:
                self._cache.move_to_end(chunk)
                return data
        data = self._load_chunk(chunk)
        if self._cache_size:
            with self._lock:
                self._cache[chunk] = data
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return data

    def read_range(self, chunk: ChunkInfo, skip: int, length: int) -> bytes:
        """Read part of a chunk; an uncompressed chunk is read in place, without the rest of it.

        A FUSE read is usually much smaller than a chunk (128 KiB against 1 MiB),
        so reading only the range is what keeps sequential and random reads fast.
        A chunk that must be decompressed, or verified for the first time, is read
        whole (and kept in the small cache of decoded chunks).
        """
        if skip < 0 or length < 0 or skip + length > chunk.uncompressed_size:
            raise RafsError(
                f"read of {skip}+{length} bytes outside chunk {chunk.index} of "
                f"{chunk.uncompressed_size} bytes"
            )
        if chunk.compressed or (self._validate and chunk not in self._verified):
            data = self.read_chunk(chunk)
            if not chunk.compressed:
                with self._lock:
                    self._verified.add(chunk)
            return data[skip : skip + length] if (skip or length != len(data)) else data
        blob, fd = self._checked(chunk)
        try:
            data = os.pread(fd, length, chunk.compressed_offset + skip)
        except OSError as ex:
            raise RafsError(f"failed to read blob {blob.blob_id}: {ex.strerror}") from ex
        if len(data) != length:
            raise RafsError(f"short read of chunk {chunk.index} from blob {blob.blob_id}")
        return data

    def _checked(self, chunk: ChunkInfo) -> tuple[BlobInfo, int]:
        """Check a chunk against its blob; return the blob and the blob file's fd."""
        if chunk.blob_index >= len(self._blobs):
            raise RafsError(f"chunk {chunk.index} names blob {chunk.blob_index}, which does not exist")
        blob = self._blobs[chunk.blob_index]
        for bit, name in _UNSUPPORTED_FEATURES.items():
            if blob.features & bit:
                raise RafsError(f"blob {blob.blob_id} uses the unsupported {name} feature")
        if chunk.flags & _UNSUPPORTED_FLAGS:
            raise RafsError(
                f"chunk {chunk.index} of blob {blob.blob_id} has unsupported flags 0x{chunk.flags:x}"
            )
        if not chunk.compressed and chunk.compressed_size != chunk.uncompressed_size:
            raise RafsError(
                f"uncompressed chunk {chunk.index} of blob {blob.blob_id} has sizes "
                f"{chunk.compressed_size} != {chunk.uncompressed_size}"
            )
        fd, blob_size = self._fd(blob)
        end = chunk.compressed_offset + chunk.compressed_size
        if end > blob_size:
            raise RafsError(
                f"chunk {chunk.index} at {chunk.compressed_offset}+{chunk.compressed_size} "
                f"lies past the end of blob {blob.blob_id} ({blob_size} bytes)"
            )
        return blob, fd

    def _load_chunk(self, chunk: ChunkInfo) -> bytes:
        blob, fd = self._checked(chunk)
        try:
            raw = os.pread(fd, chunk.compressed_size, chunk.compressed_offset)
        except OSError as ex:
            raise RafsError(f"failed to read blob {blob.blob_id}: {ex.strerror}") from ex
        if len(raw) != chunk.compressed_size:
            raise RafsError(f"short read of chunk {chunk.index} from blob {blob.blob_id}")
        try:
            data = decompress(raw, blob.compressor, chunk.uncompressed_size) if chunk.compressed else raw
        except RafsError as ex:
            raise RafsError(f"chunk {chunk.index} of blob {blob.blob_id}: {ex.text}") from ex
        if self._validate and chunk_digest(data, blob.digester) != chunk.digest:
            raise RafsError(f"chunk {chunk.index} of blob {blob.blob_id}: {blob.digester} digest mismatch")
        return data

    def close(self) -> None:
        """Close the blob files opened so far."""
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()
            self._cache.clear()

    def __enter__(self) -> LocalBlobSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_file(image: RafsImage, nid: int, off: int, size: int, source: ChunkSource) -> bytes:
    """Read up to `size` bytes at `off` of a RAFS regular file through `source`; holes read as zeros."""
    parts: list[bytes | memoryview] = []
    for extent in image.chunk_extents(nid, off, size):
        if extent.chunk is None:
            parts.append(bytes(extent.length))
            continue
        data = source.read_range(extent.chunk, extent.skip, extent.length)
        if len(data) != extent.length:
            raise RafsError(
                f"chunk {extent.chunk.index} of blob {extent.chunk.blob_index} returned {len(data)} bytes, "
                f"the read needs {extent.length}"
            )
        parts.append(data)
    if len(parts) == 1:
        return bytes(parts[0])
    return b"".join(parts)
