"""DirectChunkSource: chunks fetched from a backend on every miss, with no cache on disk.

What nydusd does with cache type `""` or `dummycache`: each read goes to the
backend. The last few decoded chunks stay in memory, because a FUSE read is much
smaller than a chunk and sequential reads come back for the same chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from nydus_actors.rafs import BlobInfo, ChunkInfo, RafsError
from nydus_actors.rafs.blob import chunk_digest, decompress


class DirectChunkSource:
    """Implements the rafs `ChunkSource` over a raw-chunk fetch function."""

    def __init__(
        self,
        blobs: Sequence[BlobInfo],
        fetch: Callable[[BlobInfo, ChunkInfo], bytes],
        *,
        validate: bool,
        on_error: Callable[[str], None] | None = None,
        cached_chunks: int = 8,
    ) -> None:
        self._blobs = tuple(blobs)
        self._fetch = fetch
        self._validate = validate
        self._on_error = on_error
        self._recent: OrderedDict[ChunkInfo, bytes] = OrderedDict()
        self._size = cached_chunks
        self._lock = threading.Lock()

    def read_chunk(self, chunk: ChunkInfo) -> bytes:
        with self._lock:
            data = self._recent.get(chunk)
            if data is not None:
                self._recent.move_to_end(chunk)
                return data
        if not 0 <= chunk.blob_index < len(self._blobs):
            raise RafsError(f"chunk {chunk.index} names blob {chunk.blob_index}, which does not exist")
        blob = self._blobs[chunk.blob_index]
        raw = self._fetch(blob, chunk)
        if len(raw) != chunk.compressed_size:
            self._fail(f"chunk {chunk.index} of blob {blob.blob_id}: backend returned {len(raw)} bytes")
        try:
            data = decompress(raw, blob.compressor, chunk.uncompressed_size) if chunk.compressed else raw
        except RafsError as ex:
            self._fail(f"chunk {chunk.index} of blob {blob.blob_id}: {ex.text}")
        if self._validate and chunk_digest(data, blob.digester) != chunk.digest:
            self._fail(f"chunk {chunk.index} of blob {blob.blob_id}: {blob.digester} digest mismatch")
        with self._lock:
            self._recent[chunk] = data
            if len(self._recent) > self._size:
                self._recent.popitem(last=False)
        return data

    def read_range(self, chunk: ChunkInfo, skip: int, length: int) -> bytes:
        data = self.read_chunk(chunk)
        return data if (skip == 0 and length == len(data)) else data[skip : skip + length]

    def _fail(self, text: str) -> None:
        if self._on_error is not None:
            self._on_error(text)
        raise RafsError(text)

    def close(self) -> None:
        with self._lock:
            self._recent.clear()
