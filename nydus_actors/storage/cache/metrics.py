"""nydusd's `BlobcacheMetrics` (reference §3.8): one set per instance (the config `id`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable


class BlobcacheMetrics:
    """Counters with nydusd's field names; safe to update from several threads.

    The instance id keys the metrics in the API and is not serialized, as in nydusd.
    """

    def __init__(self, instance_id: str, store_path: str) -> None:
        self.instance_id = instance_id
        self.store_path = store_path
        self._lock = threading.Lock()
        self.underlying_files: set[str] = set()
        self.partial_hits = 0
        self.whole_hits = 0
        self.total = 0
        self.entries_count = 0
        self.prefetch_data_amount = 0
        self.prefetch_requests_count = 0
        self.prefetch_workers = 0
        self.prefetch_unmerged_chunks = 0
        self.prefetch_cumulative_time_millis = 0
        self.prefetch_begin_time_secs = 0
        self.prefetch_begin_time_millis = 0
        self.prefetch_end_time_secs = 0
        self.prefetch_end_time_millis = 0
        self.buffered_backend_size = 0
        self.data_all_ready = False

    def add_files(self, paths: Iterable[str]) -> None:
        """Record cache files in use."""
        with self._lock:
            self.underlying_files.update(paths)

    def record_read(self, chunks: int, cached: int) -> None:
        """Count one read request of `chunks` chunks, `cached` of which came from the cache."""
        with self._lock:
            self.total += 1
            if chunks and cached == chunks:
                self.whole_hits += 1
            elif cached:
                self.partial_hits += 1

    def set_entries(self, entries: int, all_ready: bool) -> None:
        """Record how many chunks the cache holds and whether that is all of them."""
        with self._lock:
            self.entries_count = entries
            self.data_all_ready = all_ready

    def prefetch_begin(self, workers: int) -> None:
        """Record the start of prefetch with `workers` threads."""
        secs, millis = _now()
        with self._lock:
            self.prefetch_workers = workers
            self.prefetch_begin_time_secs, self.prefetch_begin_time_millis = secs, millis

    def record_prefetch(self, amount: int, chunks: int, millis: int) -> None:
        """Count one prefetch request of `amount` bytes covering `chunks` chunks, taking `millis`."""
        with self._lock:
            self.prefetch_requests_count += 1
            self.prefetch_data_amount += amount
            self.prefetch_unmerged_chunks += chunks
            self.prefetch_cumulative_time_millis += millis

    def prefetch_end(self) -> None:
        """Record the end of prefetch."""
        secs, millis = _now()
        with self._lock:
            self.prefetch_end_time_secs, self.prefetch_end_time_millis = secs, millis

    def export(self) -> dict:
        """`GET /api/v1/metrics/blobcache`, fields in nydusd's order."""
        with self._lock:
            return {
                "underlying_files": sorted(self.underlying_files),
                "store_path": self.store_path,
                "partial_hits": self.partial_hits,
                "whole_hits": self.whole_hits,
                "total": self.total,
                "entries_count": self.entries_count,
                "prefetch_data_amount": self.prefetch_data_amount,
                "prefetch_requests_count": self.prefetch_requests_count,
                "prefetch_workers": self.prefetch_workers,
                "prefetch_unmerged_chunks": self.prefetch_unmerged_chunks,
                "prefetch_cumulative_time_millis": self.prefetch_cumulative_time_millis,
                "prefetch_begin_time_secs": self.prefetch_begin_time_secs,
                "prefetch_begin_time_millis": self.prefetch_begin_time_millis,
                "prefetch_end_time_secs": self.prefetch_end_time_secs,
                "prefetch_end_time_millis": self.prefetch_end_time_millis,
                "buffered_backend_size": self.buffered_backend_size,
                "data_all_ready": self.data_all_ready,
            }


def _now() -> tuple[int, int]:
    """Wall-clock time as nydusd stores it: whole seconds and the milliseconds within the second."""
    now = time.time()
    return int(now), int(now * 1000) % 1000
