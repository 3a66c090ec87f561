"""`ChunkMap`: persistence, refusal of damaged files, concurrent marking."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_actors.storage.cache.chunk_map import HEADER, MAGIC, VERSION, ChunkMap


def test_a_new_map_has_nothing_ready(tmp_path: Path) -> None:
    cmap = ChunkMap(str(tmp_path / "b.chunk_map"), 20)
    assert (cmap.ready_count(), cmap.all_ready()) == (0, False)
    assert not any(cmap.is_ready(i) for i in range(20))
    cmap.close()
    assert os.path.getsize(tmp_path / "b.chunk_map") == HEADER.size + 3


def test_marks_survive_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "b.chunk_map")
    cmap = ChunkMap(path, 20)
    assert cmap.mark_ready(3) and cmap.mark_ready(19) and cmap.mark_ready(8)
    assert not cmap.mark_ready(3)
    cmap.close()
    cmap = ChunkMap(path, 20)
    assert [i for i in range(20) if cmap.is_ready(i)] == [3, 8, 19]
    assert cmap.ready_count() == 3
    for i in range(20):
        cmap.mark_ready(i)
    assert cmap.all_ready()
    cmap.close()
    assert ChunkMap(path, 20).all_ready()


def test_a_zero_chunk_map_is_all_ready(tmp_path: Path) -> None:
    cmap = ChunkMap(str(tmp_path / "e.chunk_map"), 0)
    assert cmap.all_ready() and cmap.ready_count() == 0


def test_indexes_outside_the_map_are_refused(tmp_path: Path) -> None:
    cmap = ChunkMap(str(tmp_path / "b.chunk_map"), 9)
    for bad in (-1, 9, 100):
        with pytest.raises(IndexError):
            cmap.is_ready(bad)
        with pytest.raises(IndexError):
            cmap.mark_ready(bad)


def _full_map(path: str, count: int) -> None:
    cmap = ChunkMap(path, count)
    for i in range(count):
        cmap.mark_ready(i)
    cmap.close()


def _damage(kind: str, raw: bytes) -> bytes:
    if kind == "magic":
        return b"X" + raw[1:]
    if kind == "version":
        return HEADER.pack(MAGIC, VERSION + 1, 20) + raw[HEADER.size :]
    if kind == "count":
        return HEADER.pack(MAGIC, VERSION, 21) + raw[HEADER.size :]
    if kind == "truncated-header":
        return raw[:10]
    if kind == "truncated-bitmap":
        return raw[:-1]
    if kind == "extended":
        return raw + b"\xff"
    if kind == "empty":
        return b""
    if kind == "tail-bits":
        # 20 chunks use 4 bits of the last byte; the other 4 must be clear.
        return raw[:-1] + b"\xff"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["magic", "version", "count", "truncated-header", "truncated-bitmap", "extended", "empty", "tail-bits"],
)
def test_a_damaged_map_is_recreated_not_trusted(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "b.chunk_map")
    _full_map(path, 20)
    raw = Path(path).read_bytes()
    Path(path).write_bytes(_damage(kind, raw))
    cmap = ChunkMap(path, 20)
    assert cmap.ready_count() == 0
    assert not any(cmap.is_ready(i) for i in range(20))
    # The recreated file is valid again and keeps new marks.
    assert cmap.mark_ready(5)
    cmap.close()
    assert os.path.getsize(path) == HEADER.size + 3
    again = ChunkMap(path, 20)
    assert [i for i in range(20) if again.is_ready(i)] == [5]


def test_a_map_opened_with_another_count_starts_empty(tmp_path: Path) -> None:
    path = str(tmp_path / "b.chunk_map")
    _full_map(path, 16)
    assert ChunkMap(path, 17).ready_count() == 0


def test_concurrent_marks_from_threads_all_land(tmp_path: Path) -> None:
    path = str(tmp_path / "b.chunk_map")
    count, threads = 4000, 8
    cmap = ChunkMap(path, count)
    firsts = [0] * threads
    barrier = threading.Barrier(threads)

    def worker(n: int) -> None:
        barrier.wait()
        # Every thread marks every index, interleaved so that the threads share bytes.
        for i in range(n, count + n):
            firsts[n] += cmap.mark_ready(i % count)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sum(firsts) == count  # each bit was set exactly once
    assert cmap.all_ready() and cmap.ready_count() == count
    cmap.close()
    assert ChunkMap(path, count).all_ready()


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 200), marks=st.lists(st.integers(0, 199), max_size=60))
def test_reopened_maps_equal_a_model(
    tmp_path_factory: pytest.TempPathFactory, count: int, marks: list[int]
) -> None:
    path = str(tmp_path_factory.mktemp("m") / "b.chunk_map")
    model = set()
    cmap = ChunkMap(path, count)
    for i in marks:
        if i < count:
            assert cmap.mark_ready(i) == (i not in model)
            model.add(i)
    cmap.close()
    cmap = ChunkMap(path, count)
    assert {i for i in range(count) if cmap.is_ready(i)} == model
    assert cmap.ready_count() == len(model)
    assert cmap.all_ready() == (len(model) == count)
    cmap.close()
