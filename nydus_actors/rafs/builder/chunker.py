"""Split file contents into chunks, deduplicate them by digest and append them to one blob.

The blob is written sequentially to a temporary file and renamed to its sha256 (the blob id).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from nydus_actors.rafs.builder.codec import Compressor, Digester
from nydus_actors.rafs.builder.errors import BuildError

BLOCK_SIZE = 4096
#: chunk info flag: the stored bytes are compressed
CHUNK_COMPRESSED = 0x1
#: an index entry keeps 24 bits of the chunk's position in the chunk table (§10.6)
MAX_CHUNKS = 1 << 24

_ZEROS = bytes(BLOCK_SIZE)

#: progress callback: bytes just chunked
OnBytes = Callable[[int], None] | None


@dataclass(slots=True)
class Chunk:
    """One distinct chunk of the blob, i.e. one chunk-info table entry."""

    index: int
    digest: bytes
    flags: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    #: offset of this chunk in the first file that produced it
    file_offset: int


@dataclass(frozen=True)
class Blob:
    blob_id: str
    path: str
    chunks: list[Chunk]
    compressed_size: int
    #: the blob's uncompressed space, 4 KiB aligned: what the kernel sees as the device
    uncompressed_size: int


def _align(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def _read_full(reader: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, or fewer only at end of file (pipes and tar streams return short reads)."""
    data = reader.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = reader.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class BlobWriter:
    """Accumulates the chunks of every file into a single content-addressed blob."""

    def __init__(self, blob_dir: str, chunk_size: int, compressor: Compressor, digester: Digester) -> None:
        self.blob_dir = blob_dir
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self._compress = compressor.new_compressor() if compressor.new_compressor is not None else None
        self.chunks: list[Chunk] = []
        self._by_digest: dict[bytes, Chunk] = {}
        self._sha = hashlib.sha256()
        self._written = 0
        self._uncompressed = 0
        try:
            fd, self._tmp_path = tempfile.mkstemp(prefix=".blob-", dir=blob_dir)
        except OSError as ex:
            raise BuildError(f"cannot create a blob in {blob_dir}: {ex.strerror}") from None
        self._file = os.fdopen(fd, "wb")

    def add_file(self, reader: BinaryIO, on_bytes: OnBytes = None) -> tuple[int, list[Chunk]]:
        """Chunk everything `reader` yields; return the byte count and the file's chunk list.

        `on_bytes(n)` is called after each chunk for progress reporting.
        """
        chunks: list[Chunk] = []
        offset = 0
        while True:
            data = _read_full(reader, self.chunk_size)
            if not data:
                break
            chunks.append(self._add_chunk(data, offset))
            offset += len(data)
            if on_bytes is not None:
                on_bytes(len(data))
            if len(data) < self.chunk_size:
                break
        return offset, chunks

    def _add_chunk(self, data: bytes, file_offset: int) -> Chunk:
        digest = self.digester.digest(data)
        known = self._by_digest.get(digest)
        if known is not None:
            return known
        if len(self.chunks) >= MAX_CHUNKS:
            raise BuildError(f"more than {MAX_CHUNKS} distinct chunks: use a larger --chunk-size")
        stored, flags = data, 0
        if self._compress is not None:
            packed = self._compress(data)
            # A chunk that does not shrink is kept raw, so readers never inflate incompressible data.
            if len(packed) < len(data):
                stored, flags = packed, CHUNK_COMPRESSED
        else:
            # Uncompressed blob = the kernel's device: each chunk must start on a block boundary.
            self._pad_to(self._uncompressed)
        chunk = Chunk(
            index=len(self.chunks),
            digest=digest,
            flags=flags,
            compressed_offset=self._written,
            compressed_size=len(stored),
            uncompressed_offset=self._uncompressed,
            uncompressed_size=len(data),
            file_offset=file_offset,
        )
        self._write(stored)
        self._uncompressed = _align(self._uncompressed + len(data), BLOCK_SIZE)
        self.chunks.append(chunk)
        self._by_digest[digest] = chunk
        return chunk

    def _pad_to(self, offset: int) -> None:
        while self._written < offset:
            self._write(_ZEROS[: min(BLOCK_SIZE, offset - self._written)])

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as ex:
            raise BuildError(f"cannot write the blob in {self.blob_dir}: {ex.strerror}") from None
        self._sha.update(data)
        self._written += len(data)

    def seal(self) -> Blob:
        """End the blob (no more chunks) and describe it; `commit()` then gives it its name."""
        if self._compress is None:
            # The whole file is the device: end it on a block boundary too.
            self._pad_to(self._uncompressed)
        blob_id = self._sha.hexdigest()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as ex:
            raise BuildError(f"cannot write the blob in {self.blob_dir}: {ex.strerror}") from None
        path = os.path.join(self.blob_dir, blob_id)
        return Blob(blob_id, path, self.chunks, self._written, self._uncompressed)

    def commit(self, blob: Blob) -> None:
        """Rename the sealed blob to its id (replacing an identical earlier copy)."""
        try:
            os.chmod(self._tmp_path, 0o644)
            os.replace(self._tmp_path, blob.path)
        except OSError as ex:
            raise BuildError(f"cannot store the blob {blob.path}: {ex.strerror}") from None

    def abort(self) -> None:
        """Drop the partial blob."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp_path)
