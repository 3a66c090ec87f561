"""The backend interface, its retry policy and nydusd's backend metrics (reference §3.7).

A backend reads byte ranges of blobs by blob id. Concrete backends implement
`_blob_size` and `_read_range` and say which errors are temporary;
`BlobBackend.read_range` adds retries with jittered backoff, metrics and the
"exhausted retries" report that feeds the daemon's events ring.
"""

from __future__ import annotations

import abc
import logging
import random
import threading
import time
from collections.abc import Callable

from nydus_actors.exceptions import OtherError
from nydus_actors.metrics import BLOCK_BUCKETS, size_index

logger = logging.getLogger(__name__)

#: Latency buckets of backend reads, in milliseconds: ≤1, ≤20, ≤50, ≤100, ≤500, ≤1000, ≤2000, >2000.
LATENCY_BUCKETS_MS = (1, 20, 50, 100, 500, 1000, 2000)


class BackendError(OtherError):
    """A backend request failed; `temporary` ones are retried."""

    def __init__(self, text: str, *, temporary: bool = False) -> None:
        super().__init__(text)
        self.temporary = temporary


def latency_index_ms(millis: int) -> int:
    """Bucket of a backend read latency."""
    for index, bound in enumerate(LATENCY_BUCKETS_MS):
        if millis <= bound:
            return index
    return 7


class BackendMetrics:
    """Counters with nydusd's `BackendMetrics` field names; safe to update from several threads."""

    def __init__(self, backend_type: str) -> None:
        self.backend_type = backend_type
        self._lock = threading.Lock()
        self.read_count = 0
        self.read_errors = 0
        self.read_amount_total = 0
        self.read_cumulative_latency_millis_total = 0
        self.read_cumulative_latency_millis_dist = [0] * BLOCK_BUCKETS
        self.read_count_block_size_dist = [0] * BLOCK_BUCKETS
        self.read_latency_sizes_dist = [[0] * 8 for _ in range(BLOCK_BUCKETS)]

    def record(self, size: int, started: float, *, ok: bool) -> None:
        """Count one finished read of `size` bytes (`started` from `time.perf_counter()`)."""
        millis = int((time.perf_counter() - started) * 1000)
        with self._lock:
            if not ok:
                self.read_errors += 1
                return
            bucket = size_index(size)
            self.read_count += 1
            self.read_amount_total += size
            self.read_cumulative_latency_millis_total += millis
            self.read_cumulative_latency_millis_dist[bucket] += millis
            self.read_count_block_size_dist[bucket] += 1
            self.read_latency_sizes_dist[bucket][latency_index_ms(millis)] += 1

    def export(self) -> dict:
        """`GET /api/v1/metrics/backend` (the id is not serialized, as in nydusd)."""
        with self._lock:
            return {
                "backend_type": self.backend_type,
                "read_count": self.read_count,
                "read_errors": self.read_errors,
                "read_amount_total": self.read_amount_total,
                "read_cumulative_latency_millis_total": self.read_cumulative_latency_millis_total,
                "read_cumulative_latency_millis_dist": list(self.read_cumulative_latency_millis_dist),
                "read_count_block_size_dist": list(self.read_count_block_size_dist),
                "read_latency_sizes_dist": [list(row) for row in self.read_latency_sizes_dist],
            }


class BlobBackend(abc.ABC):
    """Reads blobs by id. Thread-safe: several fetches may run at once.

    Args:
        backend_id: the id the metrics are keyed by (the mountpoint for RAFS mounts).
        retry_limit: how many times a temporary failure is retried (nydusd `retry_limit`).
        on_failure: called with one line when a read exhausts its retries (the events ring).
    """

    #: nydusd's name in metrics: `localfs`, `registry`, `http-proxy`, `oss` (also for S3).
    backend_type: str = ""

    def __init__(
        self, backend_id: str, *, retry_limit: int = 0, on_failure: Callable[[str], None] | None = None
    ) -> None:
        self.backend_id = backend_id
        self.retry_limit = max(0, retry_limit)
        self.metrics = BackendMetrics(self.backend_type)
        self._on_failure = on_failure

    @abc.abstractmethod
    def _blob_size(self, blob_id: str) -> int:
        """Return the size of a blob in bytes."""

    @abc.abstractmethod
    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes of the blob at `offset` (fewer is an error)."""

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Release connections and files."""

    def _retrying(self, what: str, blob_id: str, call: Callable[[], object]) -> object:
        attempt = 0
        while True:
            try:
                try:
                    return call()
                except BackendError:
                    raise
                except Exception as ex:
                    # a backend bug or an unforeseen library error: fail this read, clearly
                    raise BackendError(f"unexpected {type(ex).__name__}: {ex}") from ex
            except BackendError as ex:
                if not ex.temporary or attempt >= self.retry_limit:
                    # backends name the blob in their own texts; say it once
                    cause = ex.text if blob_id in ex.text else f"failed to {what} blob {blob_id}: {ex.text}"
                    line = f"{self.backend_type} backend: {cause}"
                    logger.error("%s (after %d retries)", line, attempt)
                    if self._on_failure is not None:
                        try:
                            self._on_failure(line)
                        except Exception:
                            logger.exception("failed to report a backend failure")
                    raise
                attempt += 1
                delay = min(0.1 * 2**attempt, 2.0) * random.uniform(0.5, 1.0)
                log = logger.warning if attempt > 1 else logger.info
                log(
                    "%s backend: retry %d of %s blob %s in %.2fs: %s",
                    self.backend_type,
                    attempt,
                    what,
                    blob_id,
                    delay,
                    ex.text,
                )
                time.sleep(delay)

    def blob_size(self, blob_id: str) -> int:
        """Return the size of a blob, retrying temporary failures."""
        return int(self._retrying("stat", blob_id, lambda: self._blob_size(blob_id)))  # type: ignore[arg-type]

    def read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """Read `size` bytes of a blob at `offset`, retrying temporary failures.

        Raises:
            BackendError: the read failed for good (after the retries).
        """
        started = time.perf_counter()

        def once() -> bytes:
            data = self._read_range(blob_id, offset, size)
            if len(data) != size:
                raise BackendError(f"short read: {len(data)} of {size} bytes at {offset}", temporary=True)
            return data

        try:
            data = self._retrying("read", blob_id, once)
        except BackendError:
            self.metrics.record(size, started, ok=False)
            raise
        self.metrics.record(size, started, ok=True)
        return data  # type: ignore[return-value]
