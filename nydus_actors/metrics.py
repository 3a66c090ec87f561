"""Per-instance filesystem I/O statistics with nydusd's field names (reference §3.4 to §3.6).

One `FsIoStats` belongs to one RAFS instance. Its counters are written by the
FUSE loop thread and by the worker threads that wait for backend fetches, under
a lock; the daemon actor reads exports, which at worst see a request half counted.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field


class StatsFop(enum.IntEnum):
    """nydusd's `StatsFop` order; clients index the arrays by these positions."""

    GETATTR = 0
    READLINK = 1
    OPEN = 2
    RELEASE = 3
    READ = 4
    STATFS = 5
    GETXATTR = 6
    LISTXATTR = 7
    OPENDIR = 8
    LOOKUP = 9
    READDIR = 10
    READDIRPLUS = 11
    ACCESS = 12
    FORGET = 13
    BATCH_FORGET = 14


FOP_COUNT = 15
BLOCK_BUCKETS = 8
LATENCY_BUCKETS_US = (200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)


def size_index(size: int) -> int:
    """Bucket of a request size: <1K, 1K~, 4K~, 16K~, 64K~, 128K~, 512K~, 1M~."""
    kib = size >> 10
    for index, bound in enumerate((1, 4, 16, 64, 128, 512, 1024)):
        if kib < bound:
            return index
    return 7


def latency_index(micros: int) -> int:
    """Bucket of a latency: ≤200µs, ≤1ms, ≤20ms, ≤50ms, ≤500ms, ≤1s, ≤2s, >2s."""
    for index, bound in enumerate(LATENCY_BUCKETS_US):
        if micros <= bound:
            return index
    return 7


@dataclass(slots=True)
class _FileStats:
    total_fops: int = 0
    data_read: int = 0
    block_count_read: list[int] = field(default_factory=lambda: [0] * BLOCK_BUCKETS)
    fop_hits: list[int] = field(default_factory=lambda: [0] * FOP_COUNT)
    fop_errors: list[int] = field(default_factory=lambda: [0] * FOP_COUNT)


@dataclass(slots=True)
class _Access:
    nr_read: int = 0
    first_ns: int = 0


class FsIoStats:
    """Counters of one filesystem instance, keyed in the daemon by its mountpoint."""

    def __init__(
        self,
        instance_id: str,
        *,
        files: bool = False,
        access_pattern: bool = False,
        latest_files: bool = False,
    ) -> None:
        self.id = instance_id
        self._files_enabled = files
        self._pattern_enabled = access_pattern
        self._latest_enabled = latest_files
        self.nr_opens = 0
        self.data_read = 0
        self.block_count_read = [0] * BLOCK_BUCKETS
        self.fop_hits = [0] * FOP_COUNT
        self.fop_errors = [0] * FOP_COUNT
        self.fop_latency_us = [0] * FOP_COUNT
        self.read_latency_dist = [0] * BLOCK_BUCKETS
        self._files: dict[int, _FileStats] = {}
        self._access: dict[int, _Access] = {}
        self._latest: set[int] = set()
        self._lock = threading.Lock()

    def record(self, fop: StatsFop, ino: int, started: float, *, ok: bool, size: int = 0) -> None:
        """Count one finished operation (`started` from `time.perf_counter()`)."""
        micros = int((time.perf_counter() - started) * 1_000_000)
        with self._lock:
            self._record(fop, ino, micros, ok=ok, size=size)

    def _record(self, fop: StatsFop, ino: int, micros: int, *, ok: bool, size: int) -> None:
        self.fop_latency_us[fop] += micros
        if not ok:
            self.fop_errors[fop] += 1
        else:
            self.fop_hits[fop] += 1
            if fop is StatsFop.OPEN:
                self.nr_opens += 1
            elif fop is StatsFop.RELEASE:
                self.nr_opens = max(0, self.nr_opens - 1)
        if fop is StatsFop.READ:
            if ok:
                self.data_read += size
                self.block_count_read[size_index(size)] += 1
            self.read_latency_dist[latency_index(micros)] += 1
            if self._pattern_enabled and ok:
                access = self._access.get(ino)
                if access is None:
                    access = self._access[ino] = _Access(first_ns=time.time_ns())
                access.nr_read += 1
            if self._latest_enabled:
                self._latest.add(ino)
        if self._files_enabled:
            stats = self._files.get(ino)
            if stats is None:
                stats = self._files[ino] = _FileStats()
            stats.total_fops += 1
            if ok:
                stats.fop_hits[fop] += 1
                if fop is StatsFop.READ:
                    stats.data_read += size
                    stats.block_count_read[size_index(size)] += 1
            else:
                stats.fop_errors[fop] += 1

    def export(self) -> dict:
        """`GET /api/v1/metrics`."""
        return {
            "files_account_enabled": self._files_enabled,
            "access_pattern_enabled": self._pattern_enabled,
            "record_latest_read_files_enabled": self._latest_enabled,
            "measure_latency": True,
            "id": self.id,
            "nr_opens": self.nr_opens,
            "data_read": self.data_read,
            "block_count_read": list(self.block_count_read),
            "fop_hits": list(self.fop_hits),
            "fop_errors": list(self.fop_errors),
            "fop_cumulative_latency_total": list(self.fop_latency_us),
            "read_latency_dist": list(self.read_latency_dist),
        }

    def export_files(self, *, latest: bool) -> dict | list:
        """`GET /api/v1/metrics/files`: per-inode counters, or inode ranges read since the last call."""
        if latest:
            inodes = sorted(self._latest)
            self._latest.clear()
            return _ranges(inodes)
        return {
            str(ino): {
                "total_fops": s.total_fops,
                "data_read": s.data_read,
                "block_count_read": list(s.block_count_read),
                "fop_hits": list(s.fop_hits),
                "fop_errors": list(s.fop_errors),
            }
            for ino, s in list(self._files.items())
        }

    def export_pattern(self) -> list[dict]:
        """`GET /api/v1/metrics/pattern`: files read at least once."""
        return [
            {
                "ino": ino,
                "nr_read": a.nr_read,
                "first_access_time_secs": a.first_ns // 1_000_000_000,
                "first_access_time_nanos": a.first_ns % 1_000_000_000,
            }
            for ino, a in list(self._access.items())
            if a.nr_read > 0
        ]


def _ranges(inodes: list[int]) -> list[list[int]]:
    """Collapse sorted inode numbers into `[a, b]` ranges and `[a]` singles."""
    out: list[list[int]] = []
    start = prev = None
    for ino in inodes:
        if start is None:
            start = prev = ino
        elif ino == prev + 1:
            prev = ino
        else:
            out.append([start] if start == prev else [start, prev])
            start = prev = ino
    if start is not None:
        out.append([start] if start == prev else [start, prev])
    return out
