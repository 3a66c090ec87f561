"""Read-ahead of a cached RAFS mount: a miss fetches a window, a sequential reader is kept ahead of.

A FUSE read is at most 1 MiB, and a registry answers 1 MiB range requests
several times slower per byte than 4 MiB ones. So, like the kernel's own
read-ahead:

- a miss fetches the chunks of the file's next `window` bytes that are not
  cached, in merged requests (the path prefetch uses), before the read is served;
- a file read sequentially has the windows after the reader's position fetched
  by background threads while the reader uses the cached ones, `DEPTH` windows
  ahead; the window starts at `rafs.batch_size` (nydusd's `amplify_io`) and
  doubles with each window up to `MAX_WINDOW`.

Without the second part a reader would catch up with each window as it is
fetched and wait for every one of them in turn. Read-ahead has its own way to
the backend (the mount's backend itself, as prefetch does), so that it never
queues in front of a miss.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from nydus_actors.exceptions import NydusError
from nydus_actors.rafs import RafsImage
from nydus_actors.storage.cache import CachedChunkSource
from nydus_actors.storage.cache.source import close_runs

logger = logging.getLogger(__name__)

#: The largest window one read-ahead step fetches.
MAX_WINDOW = 8 * 1024 * 1024
#: How many windows a sequential reader is kept ahead of; also the read-ahead threads.
DEPTH = 3
#: Streams remembered at most; past that the table starts again (a stream then restarts small).
MAX_STREAMS = 4096


@dataclass
class _Stream:
    """One file's sequential read position, as seen by the FUSE loop."""

    size: int  # the file's size: nothing is fetched past it
    end: int  # where the furthest read so far ended
    window: int  # the length of the next window
    frontier: int  # where the windows fetched or being fetched end

    def follows(self, off: int) -> bool:
        """Whether a read at `off` continues this stream.

        Reads in flight together may be handled out of order, hence the slack
        of one window on either side.
        """
        return self.end - self.window <= off <= self.end + self.window


class ReadAheadSource:
    """A cached chunk source with read amplification and sequential read-ahead; the rest is the source's.

    `note_read` is called by the FUSE loop for every read of a file (hit or
    miss); `fill_miss` by the fetch thread that serves a miss, before reading.
    """

    def __init__(
        self,
        image: RafsImage,
        source: CachedChunkSource,
        read_raw: Callable[[str, int, int], bytes],
        *,
        first_window: int,
        read_ahead_raw: Callable[[str, int, int], bytes] | None = None,
        ahead: Executor | None = None,
    ) -> None:
        """Misses fetch through `read_raw`; read-ahead through `read_ahead_raw` (default the same).

        Read-ahead runs in `ahead`, by default `DEPTH` threads of this source's own.
        """
        self._image = image
        self._source = source
        self._read_raw = read_raw
        self._read_ahead_raw = read_ahead_raw or read_raw
        self._first = max(first_window, 1)
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        self._ahead = ahead or ThreadPoolExecutor(max_workers=DEPTH, thread_name_prefix="read-ahead")
        self._closed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._source, name)

    def close(self) -> None:
        """Stop the read-ahead threads, then close the wrapped source."""
        self._closed = True
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._source.close()

    def note_read(self, nid: int, off: int, size: int) -> None:
        """Follow a file's reads; when they run sequentially, keep `DEPTH` windows fetched ahead of them."""
        with self._lock:
            stream = self._streams.get(nid)
            if stream is None or not stream.follows(off):
                if len(self._streams) >= MAX_STREAMS:
                    self._streams.clear()
                # The first read's own window is fetched by its miss, if it misses.
                self._streams[nid] = _Stream(
                    size=self._image.inode(nid).size,
                    end=off + size,
                    window=max(size, self._first),
                    frontier=off,
                )
                return
            stream.end = max(stream.end, off + size)
            target = min(stream.end + DEPTH * stream.window, stream.size)
            windows = []
            while stream.frontier < target:
                start = max(stream.frontier, stream.end)
                windows.append((start, stream.window))
                stream.frontier = start + stream.window
                stream.window = min(stream.window * 2, MAX_WINDOW)
        for start, length in windows:
            if self._closed:
                return
            with contextlib.suppress(RuntimeError):  # closing: the mount is going away
                self._ahead.submit(self._fill, nid, start, length, self._read_ahead_raw)

    def fill_miss(self, nid: int, off: int, size: int) -> None:
        """Before a missed read is served: fetch its window of the file in merged requests."""
        with self._lock:
            stream = self._streams.get(nid)
            if stream is not None and stream.follows(off):
                window = max(size, stream.window)
                stream.frontier = max(stream.frontier, off + window)
            else:
                window = max(size, self._first)
        self._fill(nid, off, window, self._read_raw)

    def _fill(self, nid: int, off: int, length: int, read_raw: Callable[[str, int, int], bytes]) -> None:
        """Bring the chunks of `[off, off + length)` of file `nid` into the cache; errors are the read's."""
        extents = self._image.chunk_extents(nid, off, length)
        chunks = {
            (e.chunk.blob_index, e.chunk.compressed_offset): e.chunk
            for e in extents
            if e.chunk is not None and not self._source.is_ready(e.chunk)
        }
        ordered = [chunks[key] for key in sorted(chunks)]
        if len(ordered) < 2:
            return  # a single chunk is fetched by the read itself
        for batch in close_runs(ordered, lambda chunk: chunk, max(length, 1)):
            try:
                self._source.fill_many(batch, read_raw)
            except NydusError as ex:
                logger.debug("read-ahead of inode %d failed: %s", nid, ex)
                return
