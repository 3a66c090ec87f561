"""InflightTracker: entries live for the duration of a request, snapshots from other threads."""

from __future__ import annotations

import threading

import pytest

from nydus_actors.fs.inflight import FuseOpcode, InflightTracker


def test_track_registers_for_the_duration_of_the_block() -> None:
    tracker = InflightTracker()

    with tracker.track(7, FuseOpcode.LOOKUP):
        with tracker.track(8, FuseOpcode.READ):
            inner = tracker.snapshot()
        outer = tracker.snapshot()

    assert [(r.inode, r.opcode) for r in inner] == [(7, 1), (8, 15)]
    assert inner[0].unique < inner[1].unique
    assert [(r.inode, r.opcode) for r in outer] == [(7, 1)]
    assert tracker.snapshot() == ()


def test_entries_are_removed_when_the_request_fails() -> None:
    tracker = InflightTracker()

    with pytest.raises(ValueError), tracker.track(1, FuseOpcode.GETATTR):
        raise ValueError

    assert tracker.snapshot() == ()


def test_snapshot_is_safe_while_another_thread_tracks() -> None:
    tracker = InflightTracker()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with tracker.track(1, FuseOpcode.READ), tracker.track(2, FuseOpcode.READ):
                pass

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(20000):
            assert len(tracker.snapshot()) <= 2
    finally:
        stop.set()
        worker.join()


def test_opcodes_match_the_kernel_protocol() -> None:
    assert {op.name: op.value for op in FuseOpcode} == {
        "LOOKUP": 1,
        "FORGET": 2,
        "GETATTR": 3,
        "READLINK": 5,
        "OPEN": 14,
        "READ": 15,
        "STATFS": 17,
        "RELEASE": 18,
        "GETXATTR": 22,
        "LISTXATTR": 23,
        "OPENDIR": 27,
        "READDIR": 28,
        "RELEASEDIR": 29,
        "READDIRPLUS": 44,
    }
