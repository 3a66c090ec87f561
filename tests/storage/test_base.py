"""BlobBackend's retry policy, failure report and metrics, over an in-memory backend."""

from __future__ import annotations

import pytest

from nydus_actors.storage.backends.base import BackendError, BlobBackend, latency_index_ms


class FlakyBackend(BlobBackend):
    backend_type = "localfs"

    def __init__(self, data: bytes, failures: list[BackendError], **kw) -> None:
        super().__init__("/img", **kw)
        self.data = data
        self.failures = failures
        self.calls = 0

    def _blob_size(self, blob_id: str) -> int:
        return len(self.data)

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.data[offset : offset + size]


def test_temporary_errors_are_retried() -> None:
    backend = FlakyBackend(b"abcdef", [BackendError("reset", temporary=True)] * 2, retry_limit=2)
    assert backend.read_range("b1", 1, 3) == b"bcd"
    assert backend.calls == 3
    out = backend.metrics.export()
    assert (out["read_count"], out["read_errors"], out["read_amount_total"]) == (1, 0, 3)
    assert out["backend_type"] == "localfs" and len(out["read_latency_sizes_dist"]) == 8


def test_exhausted_retries_report_once() -> None:
    lines: list[str] = []
    backend = FlakyBackend(
        b"abc", [BackendError("503", temporary=True)] * 5, retry_limit=1, on_failure=lines.append
    )
    with pytest.raises(BackendError):
        backend.read_range("b1", 0, 1)
    assert backend.calls == 2
    assert lines == ["localfs backend: failed to read blob b1: 503"]
    assert backend.metrics.export()["read_errors"] == 1


def test_permanent_errors_are_not_retried() -> None:
    backend = FlakyBackend(b"abc", [BackendError("404")], retry_limit=5)
    with pytest.raises(BackendError):
        backend.read_range("b1", 0, 1)
    assert backend.calls == 1


def test_short_reads_are_errors() -> None:
    backend = FlakyBackend(b"abc", [], retry_limit=0)
    with pytest.raises(BackendError, match="short read"):
        backend.read_range("b1", 2, 5)


def test_latency_buckets() -> None:
    assert [latency_index_ms(ms) for ms in (0, 1, 2, 20, 50, 100, 500, 1000, 2000, 2001)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]
