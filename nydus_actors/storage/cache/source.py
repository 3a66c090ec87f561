"""The cached data path of one image: hits are a pread of the cache file, misses fetch, check and store.

`BlobCacheRegistry` shares one `CachedBlob` among the images of a work directory that use a blob.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from nydus_actors.exceptions import NydusError
from nydus_actors.rafs.blob import chunk_digest, decompress
from nydus_actors.rafs.blobtable import (
    BLOB_FEATURE_BATCH,
    BLOB_FEATURE_ENCRYPTED,
    BLOB_FEATURE_ZRAN,
    BlobInfo,
)
from nydus_actors.rafs.chunks import CHUNK_FLAG_BATCH, CHUNK_FLAG_ENCRYPTED, ChunkExtent, ChunkInfo
from nydus_actors.rafs.errors import RafsError
from nydus_actors.storage.cache.blob_file import DATA_SUFFIX, MAP_SUFFIX, CachedBlob, FillResult
from nydus_actors.storage.cache.metrics import BlobcacheMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

Fetch = Callable[[BlobInfo, ChunkInfo], bytes]

_UNSUPPORTED_FEATURES = {
    BLOB_FEATURE_ZRAN: "zran",
    BLOB_FEATURE_BATCH: "batch",
    BLOB_FEATURE_ENCRYPTED: "encrypted",
}
_UNSUPPORTED_FLAGS = CHUNK_FLAG_ENCRYPTED | CHUNK_FLAG_BATCH


#: Reads `size` raw bytes of a blob at `offset` from the backend.
FetchRange = Callable[[str, int, int], bytes]


class BlobCacheRegistry:
    """The open `CachedBlob`s of one work directory, reference-counted by blob id.

    One registry per work directory per process: two would each open the same files.
    """

    def __init__(self, work_dir: str) -> None:
        self.work_dir = os.path.abspath(work_dir)
        os.makedirs(self.work_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._blobs: dict[str, list] = {}  # blob id -> [CachedBlob, references]

    def acquire(self, blob: BlobInfo) -> CachedBlob:
        """Open (or share) the cache of `blob`; each call needs one `release`."""
        with self._lock:
            entry = self._blobs.get(blob.blob_id)
            if entry is None:
                entry = [CachedBlob(self.work_dir, blob, blob.chunk_count), 0]
                self._blobs[blob.blob_id] = entry
            cached = entry[0]
            if cached.size != blob.uncompressed_size or cached.chunk_count != blob.chunk_count:
                raise RafsError(
                    f"blob {blob.blob_id} is cached as {cached.chunk_count} chunks in {cached.size} bytes, "
                    f"an image declares {blob.chunk_count} chunks in {blob.uncompressed_size} bytes"
                )
            entry[1] += 1
            return cached

    def release(self, blob_id: str) -> None:
        """Drop one reference; the last one closes the files, which stay for the next user."""
        with self._lock:
            entry = self._blobs.get(blob_id)
            if entry is None:
                raise KeyError(f"blob {blob_id} is not held in {self.work_dir}")
            entry[1] -= 1
            if entry[1] == 0:
                del self._blobs[blob_id]
                entry[0].close()

    def referenced(self) -> set[str]:
        """The blob ids in use."""
        with self._lock:
            return set(self._blobs)

    def gc(self) -> list[str]:
        """Remove the cache files of every blob no longer referenced; return the paths removed."""
        removed = []
        # Under the lock, so that no acquire can open a file that is being removed.
        with self._lock:
            for name in sorted(os.listdir(self.work_dir)):
                for suffix in (DATA_SUFFIX, MAP_SUFFIX):
                    if name.endswith(suffix) and name[: -len(suffix)] not in self._blobs:
                        path = os.path.join(self.work_dir, name)
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            continue
                        removed.append(path)
        return removed


_shared: dict[str, BlobCacheRegistry] = {}
_shared_lock = threading.Lock()


def shared_registry(work_dir: str) -> BlobCacheRegistry:
    """The process-wide registry of `work_dir`."""
    key = os.path.realpath(work_dir)
    with _shared_lock:
        registry = _shared.get(key)
        if registry is None:
            registry = _shared[key] = BlobCacheRegistry(key)
        return registry


class CachedChunkSource:
    """A rafs `ChunkSource` over a local blob cache, filled through `fetch` on a miss.

    Args:
        blobs: the image's blob table, indexed by `ChunkInfo.blob_index`.
        work_dir: the cache directory (nydusd `cache.filecache.work_dir`).
        fetch: returns the raw (possibly compressed) bytes of a chunk from the backend.
        validate: check each fetched chunk's digest before it enters the cache.
        on_error: called with the line describing each data error found here (a chunk
            that fails to decode or verify, a cache write failure); fetch errors pass
            through unchanged, as the backend reports its own.
        registry: defaults to the process-wide registry of `work_dir`.
        metrics: defaults to a fresh set with an empty instance id.
    """

    def __init__(
        self,
        blobs: Sequence[BlobInfo],
        work_dir: str,
        fetch: Fetch,
        *,
        validate: bool,
        on_error: Callable[[str], None] | None = None,
        registry: BlobCacheRegistry | None = None,
        metrics: BlobcacheMetrics | None = None,
    ) -> None:
        self._registry = registry if registry is not None else shared_registry(work_dir)
        self._blobs = tuple(blobs)
        self._fetch = fetch
        self._validate = validate
        self._on_error = on_error
        self.metrics = metrics if metrics is not None else BlobcacheMetrics("", self._registry.work_dir)
        self._metrics_lock = threading.Lock()
        # Per blob index: its cache, or why its chunks cannot be served.
        self._cached: list[CachedBlob | None] = []
        self._refusals: dict[int, str] = {}
        self._held: list[str] = []
        try:
            for position, blob in enumerate(self._blobs):
                refusal = _refusal(blob)
                if refusal is not None:
                    self._refusals[position] = refusal
                    self._cached.append(None)
                    continue
                self._cached.append(self._registry.acquire(blob))
                self._held.append(blob.blob_id)
        except BaseException:
            self.close()
            raise
        self.metrics.add_files(c.data_path for c in self._cached if c is not None)
        self.refresh_metrics()

    def _cache_of(self, chunk: ChunkInfo) -> CachedBlob:
        if not 0 <= chunk.blob_index < len(self._cached):
            raise RafsError(f"chunk {chunk.index} names blob {chunk.blob_index}, which does not exist")
        cached = self._cached[chunk.blob_index]
        if cached is None:
            raise RafsError(self._refusals[chunk.blob_index])
        return cached

    def read_range(self, chunk: ChunkInfo, skip: int, length: int) -> bytes:
        """Return `length` bytes of the uncompressed `chunk` from byte `skip`."""
        data, hit = self._read(chunk, skip, length)
        self.metrics.record_read(1, int(hit))
        return data

    def read_chunk(self, chunk: ChunkInfo) -> bytes:
        """Return the whole uncompressed `chunk`."""
        return self.read_range(chunk, 0, chunk.uncompressed_size)

    def read_extents(self, extents: Sequence[ChunkExtent]) -> bytes:
        """Serve one file read made of `extents` (holes read as zeros), counted as one cache request.

        This is what gives `partial_hits` a meaning: a read some of whose chunks were cached.
        """
        parts: list[bytes] = []
        chunks = cached = 0
        for extent in extents:
            if extent.chunk is None:
                parts.append(bytes(extent.length))
                continue
            data, hit = self._read(extent.chunk, extent.skip, extent.length)
            chunks += 1
            cached += hit
            parts.append(data)
        self.metrics.record_read(chunks, cached)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_extents_cached(self, extents: Sequence[ChunkExtent]) -> bytes | None:
        """Serve a read only if every chunk it needs is cached, else return None without fetching.

        The FUSE loop calls this in its own thread: a hit is a few preads; a miss
        goes to a worker thread through `read_extents`.
        """
        parts: list[bytes] = []
        chunks = 0
        for extent in extents:
            if extent.chunk is None:
                parts.append(bytes(extent.length))
                continue
            chunk = extent.chunk
            if extent.skip < 0 or extent.length < 0 or extent.skip + extent.length > chunk.uncompressed_size:
                return None  # let the full path report it
            cached = self._cache_of(chunk)
            if self._validate and not cached.is_verified(chunk):
                return None  # its digest check is a worker thread's job
            data = cached.read(chunk, extent.skip, extent.length)
            if data is None:
                return None
            chunks += 1
            parts.append(data)
        self.metrics.record_read(chunks, chunks)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read(self, chunk: ChunkInfo, skip: int, length: int) -> tuple[bytes, bool]:
        if skip < 0 or length < 0 or skip + length > chunk.uncompressed_size:
            raise RafsError(
                f"read of {skip}+{length} bytes outside chunk {chunk.index} of "
                f"{chunk.uncompressed_size} bytes"
            )
        cached = self._cache_of(chunk)
        # A validating image checks cached bytes it has not checked yet whole, in `_fill`.
        if not self._validate or cached.is_verified(chunk):
            data = cached.read(chunk, skip, length)
            if data is not None:
                return data, True
        data, hit = self._fill(cached, chunk)
        if skip or length != len(data):
            data = data[skip : skip + length]
        return data, hit

    def _cached_bytes_match(self, cached: CachedBlob, chunk: ChunkInfo, data: bytes) -> bool:
        """Check cached bytes against the chunk's digest; a mismatch is logged, for a fetch to replace."""
        blob = self._blobs[chunk.blob_index]
        if chunk_digest(data, blob.digester) == chunk.digest:
            cached.mark_verified(chunk)
            return True
        logger.warning(
            "chunk %d of blob %s: cached bytes fail the %s digest check, fetching it again",
            chunk.index,
            blob.blob_id,
            blob.digester,
        )
        return False

    def _fill(self, cached: CachedBlob, chunk: ChunkInfo) -> tuple[bytes, bool]:
        """Bring a chunk into the cache, or wait for the fill already under way: (bytes, cache hit).

        A ready chunk comes here only unchecked, for a validating image: its cached
        bytes are checked, and fetched again over the bad ones if they fail.
        """
        blob = self._blobs[chunk.blob_index]
        future, owner = cached.begin_fill(chunk)
        if not owner:
            data, verified = future.result()
            # The fill may belong to an image that does not validate.
            if self._validate and not verified:
                self._verify(blob, chunk, data)
            return data, False
        try:
            # Also a fill that ended between our miss and begin_fill has stored the chunk.
            data = cached.read(chunk, 0, chunk.uncompressed_size)
            replace = data is not None
            if (
                data is not None
                and self._validate
                and not cached.is_verified(chunk)
                and not self._cached_bytes_match(cached, chunk, data)
            ):
                data = None
            result: FillResult
            if data is not None:
                result = (data, cached.is_verified(chunk))
            else:
                result = self._load(cached, blob, chunk, replace=replace)
        except BaseException as ex:
            future.set_exception(ex)
            raise
        else:
            future.set_result(result)
        finally:
            cached.end_fill(chunk, future)
        return result[0], data is not None

    def is_ready(self, chunk: ChunkInfo) -> bool:
        """Tell whether a chunk is in the cache."""
        return self._cache_of(chunk).is_ready(chunk)

    def _load(self, cached: CachedBlob, blob: BlobInfo, chunk: ChunkInfo, *, replace: bool) -> FillResult:
        """Fetch, decode, check and store one chunk (over its cached bytes with `replace`)."""
        where = f"chunk {chunk.index} of blob {blob.blob_id}"
        _precheck(where, chunk)
        cached.check(chunk)
        try:
            raw = self._fetch(blob, chunk)
        except NydusError:
            raise
        except Exception as ex:
            raise RafsError(f"failed to fetch {where}: {ex}") from ex
        data = self._decode(blob, chunk, raw)
        try:
            stored = cached.store(chunk, data, replace=replace)
            if self._validate and (stored or replace):
                cached.mark_verified(chunk)  # the bytes just written are the checked ones
            if stored:
                self.refresh_metrics()
        except OSError as ex:
            # The bytes are good; only keeping them failed. The read is served and the next
            # one fetches again.
            self._report(f"failed to write {where} to cache file {cached.data_path}: {ex.strerror}")
        return data, self._validate

    def _decode(self, blob: BlobInfo, chunk: ChunkInfo, raw: bytes) -> bytes:
        """Check the length, decompress and (with validation) verify one fetched chunk."""
        where = f"chunk {chunk.index} of blob {blob.blob_id}"
        if len(raw) != chunk.compressed_size:
            self._data_error(f"{where}: fetched {len(raw)} bytes, expected {chunk.compressed_size}")
        if chunk.compressed:
            try:
                data = decompress(raw, blob.compressor, chunk.uncompressed_size)
            except RafsError as ex:
                self._data_error(f"{where}: {ex.text}")
        else:
            data = bytes(raw)
        if self._validate:
            self._verify(blob, chunk, data)
        return data

    def fill_many(self, chunks: Sequence[ChunkInfo], fetch_range: FetchRange) -> int:
        """Bring several chunks of one blob in with merged fetches and one sync; return how many.

        `chunks` are in blob order and close together (see `prefetch.batches`).
        Each chunk is claimed BEFORE anything is fetched, so a concurrent miss of
        the same chunk waits for this fill instead of fetching it again; chunks
        already cached or claimed by another fill are left to it. A chunk that
        fails to decode or verify is reported and left out; the others are kept.
        """
        owned = []
        for chunk in chunks:
            cached = self._cache_of(chunk)
            if cached.is_ready(chunk):
                continue
            future, owner = cached.begin_fill(chunk)
            if owner:
                owned.append((cached, chunk, future))
        written = []
        try:
            for run in close_runs(owned, lambda item: item[1]):
                first, last = run[0][1], run[-1][1]
                blob = self._blobs[first.blob_index]
                start = first.compressed_offset
                raw = memoryview(
                    fetch_range(blob.blob_id, start, last.compressed_offset + last.compressed_size - start)
                )
                for cached, chunk, future in run:
                    try:
                        _precheck(f"chunk {chunk.index} of blob {blob.blob_id}", chunk)
                        cached.check(chunk)
                        offset = chunk.compressed_offset - start
                        data = self._decode(blob, chunk, raw[offset : offset + chunk.compressed_size])
                        ours = cached.write(chunk, data)
                    except RafsError as ex:
                        future.set_exception(ex)
                        continue
                    written.append((cached, chunk, data, future, ours))
            for cached in {id(c): c for c, *_ in written}.values():
                cached.sync()
            for cached, chunk, data, future, ours in written:
                cached.mark_ready(chunk)
                if ours and self._validate:
                    cached.mark_verified(chunk)
                future.set_result((data, self._validate))
        except BaseException as ex:
            for _, _, future in owned:
                if not future.done():
                    future.set_exception(ex)
            raise
        finally:
            for cached, chunk, future in owned:
                cached.end_fill(chunk, future)
        if written:
            self.refresh_metrics()
        return len(written)

    def _verify(self, blob: BlobInfo, chunk: ChunkInfo, data: bytes) -> None:
        if chunk_digest(data, blob.digester) != chunk.digest:
            self._data_error(f"chunk {chunk.index} of blob {blob.blob_id}: {blob.digester} digest mismatch")

    def _data_error(self, text: str) -> NoReturn:
        self._report(text)
        raise RafsError(text)

    def _report(self, text: str) -> None:
        logger.warning("%s", text)
        if self._on_error is not None:
            try:
                self._on_error(text)
            except Exception:
                # A failing report hook must not replace the error being reported.
                logger.exception("blob cache error hook failed")

    def refresh_metrics(self) -> None:
        """Recompute `entries_count` and `data_all_ready` from the chunk maps."""
        with self._metrics_lock:
            distinct = {id(c): c for c in self._cached if c is not None}.values()
            entries = sum(c.map.ready_count() for c in distinct)
            all_ready = not self._refusals and all(c.map.all_ready() for c in distinct)
            self.metrics.set_entries(entries, all_ready)

    def close(self) -> None:
        """Release this image's blobs; their files stay in the work directory."""
        held, self._held = self._held, []
        for blob_id in held:
            self._registry.release(blob_id)

    def __enter__(self) -> CachedChunkSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Gap between two chunks that one merged request may read and throw away.
MAX_GAP = 128 * 1024


def close_runs(
    items: Sequence[T], chunk_of: Callable[[T], ChunkInfo], max_span: int | None = None
) -> list[list[T]]:
    """Group items whose chunks lie close together in one blob; each group is one backend request.

    `items` are in blob order. A group breaks at another blob, at a gap over
    `MAX_GAP`, and where it would span more than `max_span` bytes.
    """
    runs: list[list[T]] = []
    for item in items:
        chunk = chunk_of(item)
        if runs:
            first, last = chunk_of(runs[-1][0]), chunk_of(runs[-1][-1])
            gap = chunk.compressed_offset - (last.compressed_offset + last.compressed_size)
            span = chunk.compressed_offset + chunk.compressed_size - first.compressed_offset
            if (
                chunk.blob_index == last.blob_index
                and 0 <= gap <= MAX_GAP
                and (max_span is None or span <= max_span)
            ):
                runs[-1].append(item)
                continue
        runs.append([item])
    return runs


def _precheck(where: str, chunk: ChunkInfo) -> None:
    """Refuse chunk kinds this cache cannot hold, before fetching them."""
    if chunk.flags & _UNSUPPORTED_FLAGS:
        raise RafsError(f"{where} has unsupported flags 0x{chunk.flags:x}")
    if not chunk.compressed and chunk.compressed_size != chunk.uncompressed_size:
        raise RafsError(
            f"uncompressed {where} has sizes {chunk.compressed_size} != {chunk.uncompressed_size}"
        )


def _refusal(blob: BlobInfo) -> str | None:
    """Why the chunks of `blob` cannot go through the cache, if they cannot."""
    if not blob.blob_id:
        return f"blob {blob.index} has no blob id to name its cache file"
    for bit, name in _UNSUPPORTED_FEATURES.items():
        if blob.features & bit:
            return f"blob {blob.blob_id} uses the unsupported {name} feature"
    return None
