"""FsIoStats keeps nydusd's arrays, buckets and exports."""

from __future__ import annotations

import time

from nydus_actors.metrics import FsIoStats, StatsFop, latency_index, size_index


def test_buckets_match_nydusd() -> None:
    assert [size_index(s) for s in (0, 1023, 1024, 4095, 4096, 65536, 131072, 524288, 1 << 20, 1 << 30)] == [
        0,
        0,
        1,
        1,
        2,
        4,
        5,
        6,
        7,
        7,
    ]
    assert [
        latency_index(us)
        for us in (0, 200, 201, 1000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000, 3_000_000)
    ] == [
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


def test_global_counters() -> None:
    stats = FsIoStats("/img")
    now = time.perf_counter()
    stats.record(StatsFop.OPEN, 5, now, ok=True)
    stats.record(StatsFop.READ, 5, now, ok=True, size=4096)
    stats.record(StatsFop.READ, 5, now, ok=False)
    stats.record(StatsFop.LOOKUP, 1, now, ok=False)
    out = stats.export()
    assert out["id"] == "/img" and out["measure_latency"] is True
    assert out["nr_opens"] == 1 and out["data_read"] == 4096
    assert out["fop_hits"][4] == 1 and out["fop_errors"][4] == 1 and out["fop_errors"][9] == 1
    assert out["block_count_read"][2] == 1 and sum(out["read_latency_dist"]) == 2
    assert [
        len(out[k])
        for k in (
            "block_count_read",
            "fop_hits",
            "fop_errors",
            "fop_cumulative_latency_total",
            "read_latency_dist",
        )
    ] == [8, 15, 15, 15, 8]
    assert stats.export_files(latest=False) == {} and stats.export_pattern() == []


def test_files_pattern_and_latest() -> None:
    stats = FsIoStats("/", files=True, access_pattern=True, latest_files=True)
    now = time.perf_counter()
    for ino in (3, 4, 5, 9, 20, 21):
        stats.record(StatsFop.READ, ino, now, ok=True, size=100)
    files = stats.export_files(latest=False)
    assert files["3"]["data_read"] == 100 and files["3"]["fop_hits"][4] == 1 and files["3"]["total_fops"] == 1
    assert stats.export_files(latest=True) == [[3, 5], [9], [20, 21]]
    assert stats.export_files(latest=True) == []
    pattern = stats.export_pattern()
    assert {p["ino"] for p in pattern} == {3, 4, 5, 9, 20, 21}
    assert set(pattern[0]) == {"ino", "nr_read", "first_access_time_secs", "first_access_time_nanos"}
