"""Background prefetch of a RAFS mount's chunks into its blob cache.

What to fetch: the files named at mount time (`prefetch_files`, `--prefetch-files`;
a directory means everything below it), the bootstrap's prefetch table, or the
whole image with `prefetch_all`. Chunks already cached are skipped; adjacent
missing chunks of one blob are fetched in one backend request of up to
`batch_size` bytes, then split and stored like on-demand fills. Prefetch runs
in its own threads and calls the backend directly, not through the backend
actors that serve on-demand misses, so it never queues in front of them; a
token bucket keeps it under `bandwidth_limit`. `stop()` ends it between requests.
"""

from __future__ import annotations

import logging
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from nydus_actors.exceptions import NydusError
from nydus_actors.rafs import ChunkInfo, RafsImage
from nydus_actors.storage.cache import BlobcacheMetrics, CachedChunkSource
from nydus_actors.storage.cache.source import close_runs

logger = logging.getLogger(__name__)


def files_to_nids(image: RafsImage, paths: Sequence[str]) -> list[int]:
    """Resolve absolute paths inside the image to nids; missing paths are skipped."""
    nids = []
    for path in paths:
        nid: int | None = image.root_nid
        for part in (p for p in path.split("/") if p):
            nid = image.lookup(nid, part.encode()) if nid is not None else None
        if nid is None:
            logger.info("prefetch: %s is not in the image", path)
        else:
            nids.append(nid)
    return nids


def table_nids(image: RafsImage) -> list[int]:
    """The nids of the bootstrap's prefetch table (u32 each)."""
    sb = image.superblock
    if not sb.prefetch_table_size:
        return []
    with open(image.path, "rb") as f:
        f.seek(sb.prefetch_table_offset)
        raw = f.read(sb.prefetch_table_size)
    return [nid for (nid,) in struct.iter_unpack("<I", raw[: len(raw) // 4 * 4]) if nid]


def _walk(image: RafsImage, nid: int, seen: set[int]) -> Iterator[int]:
    """Regular files at or below `nid` (each once)."""
    stack = [nid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        mode = image.inode(current).mode
        if stat.S_ISREG(mode):
            yield current
        elif stat.S_ISDIR(mode):
            stack.extend(e.nid for e in image.readdir(current) if e.name not in (b".", b".."))


def chunks_of(image: RafsImage, nids: Sequence[int]) -> list[ChunkInfo]:
    """The distinct chunks of the files at or below `nids`, in blob order."""
    seen_nodes: set[int] = set()
    chunks: dict[tuple[int, int, int], ChunkInfo] = {}
    for nid in nids:
        for file_nid in _walk(image, nid, seen_nodes):
            size = image.inode(file_nid).size
            for extent in image.chunk_extents(file_nid, 0, size):
                if extent.chunk is not None:
                    c = extent.chunk
                    chunks.setdefault((c.blob_index, c.compressed_offset, c.index), c)
    return sorted(chunks.values(), key=lambda c: (c.blob_index, c.compressed_offset))


def batches(chunks: Sequence[ChunkInfo], batch_size: int) -> list[list[ChunkInfo]]:
    """Group chunks of one blob that lie close together into requests of at most `batch_size`."""
    return close_runs(chunks, lambda chunk: chunk, batch_size)


class Prefetcher:
    """Prefetch workers of one mount."""

    def __init__(
        self,
        name: str,
        image: RafsImage,
        source: CachedChunkSource,
        read_raw: Callable[[str, int, int], bytes],
        chunks: Sequence[ChunkInfo],
        *,
        threads: int,
        batch_size: int,
        bandwidth_limit: int,
        metrics: BlobcacheMetrics | None = None,
    ) -> None:
        self._name = name
        self._image = image
        self._source = source
        self._read_raw = read_raw
        self._batches = batches(chunks, max(batch_size, 1))
        self._threads = max(1, min(threads, 64))
        self._bandwidth = bandwidth_limit
        self._metrics = metrics
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._budget_at = time.monotonic()
        self._workers: list[threading.Thread] = []
        self._remaining = 0

    def start(self) -> None:
        """Start the workers (they end by themselves when everything is fetched)."""
        if not self._batches:
            return
        if self._metrics is not None:
            self._metrics.prefetch_begin(self._threads)
        self._remaining = self._threads
        for i in range(self._threads):
            worker = threading.Thread(target=self._run, name=f"prefetch-{self._name}-{i}")
            self._workers.append(worker)
            worker.start()
        logger.info("prefetch of %s: %d requests, %d threads", self._name, len(self._batches), self._threads)

    def stop(self) -> None:
        """Stop between requests and wait for the workers."""
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the workers are done; True if they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in self._workers)

    def _take(self) -> list[ChunkInfo] | None:
        with self._lock:
            if self._next >= len(self._batches):
                return None
            batch = self._batches[self._next]
            self._next += 1
            return batch

    def _throttle(self, size: int) -> None:
        """A token bucket over all workers: sleep until `size` bytes fit the bandwidth limit."""
        if self._bandwidth <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._budget_at, now)
            self._budget_at = start + size / self._bandwidth
            delay = start - now
        if delay > 0:
            self._stop.wait(delay)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._take()
                if batch is None:
                    return
                self._fetch(batch)
        finally:
            with self._lock:
                self._remaining -= 1
                last = self._remaining == 0
            if last and self._metrics is not None:
                self._metrics.prefetch_end()

    def _fetch(self, batch: list[ChunkInfo]) -> None:
        missing = [c for c in batch if not self._source.is_ready(c)]
        if not missing:
            return
        size = _span(missing)
        self._throttle(size)
        if self._stop.is_set():
            return
        started = time.perf_counter()
        try:
            self._source.fill_many(missing, self._read_raw)
        except NydusError as ex:
            # on-demand reads fetch these chunks again; prefetch goes on with the rest
            logger.warning("prefetch of %s: failed to fetch %d bytes: %s", self._name, size, ex)
            return
        if self._metrics is not None:
            self._metrics.record_prefetch(size, len(missing), int((time.perf_counter() - started) * 1000))


def _span(chunks: Sequence[ChunkInfo]) -> int:
    return chunks[-1].compressed_offset + chunks[-1].compressed_size - chunks[0].compressed_offset
