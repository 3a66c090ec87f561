"""Read-ahead of a cached mount: the window a miss fetches and the windows a sequential reader gets ahead."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nydus_actors.rafs import RafsImage
from nydus_actors.rafs.builder import build
from nydus_actors.storage.backends.base import BackendError
from nydus_actors.storage.cache import BlobCacheRegistry, CachedChunkSource
from nydus_actors.storage.readahead import MAX_WINDOW, ReadAheadSource

KIB, MIB = 1024, 1024 * 1024
CHUNK = 64 * KIB
SIZE = 20 * MIB + 5 * KIB  # past MAX_WINDOW twice, with a short last chunk


class Inline(Executor):
    """Runs read-ahead at once in the caller, so that a test sees exactly what was planned."""

    def submit(self, fn: Callable, /, *args: object, **kwargs: object) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@dataclass
class Blob:
    """The image's blob on disk, read by offset like a backend; records every request."""

    raw: bytes
    fail: bool = False
    requests: list[tuple[int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read_raw(self, blob_id: str, offset: int, size: int) -> bytes:
        with self.lock:
            self.requests.append((offset, size))
        if self.fail:
            raise BackendError("connection refused", temporary=True)
        return self.raw[offset : offset + size]

    def fetch_chunk(self, blob_info: object, chunk) -> bytes:
        return self.read_raw("", chunk.compressed_offset, chunk.compressed_size)


@dataclass
class Mount:
    image: RafsImage
    nid: int
    data: bytes
    blob: Blob
    cache: CachedChunkSource

    def ready_until(self) -> int:
        """How many leading bytes of the file are cached."""
        for extent in self.image.chunk_extents(self.nid, 0, len(self.data)):
            if not self.cache.is_ready(extent.chunk):
                return extent.chunk.file_offset
        return len(self.data)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(SIZE)
    (src / "f").write_bytes(data)
    (tmp_path / "blobs").mkdir()
    result = build(src, tmp_path / "i.boot", tmp_path / "blobs", chunk_size=CHUNK, compressor="none")
    blob = Blob(Path(result.blob_path).read_bytes())
    with RafsImage.open(str(result.bootstrap)) as image:
        work_dir = str(tmp_path / "cache")
        cache = CachedChunkSource(
            image.blobs, work_dir, blob.fetch_chunk, validate=True, registry=BlobCacheRegistry(work_dir)
        )
        try:
            yield Mount(image, image.lookup(image.root_nid, b"f"), data, blob, cache)
        finally:
            cache.close()


def read_ahead(mount: Mount, first_window: int, ahead: Executor | None = None) -> ReadAheadSource:
    return ReadAheadSource(
        mount.image, mount.cache, mount.blob.read_raw, first_window=first_window, ahead=ahead
    )


def test_a_miss_fetches_its_window_in_one_request(mount: Mount) -> None:
    source = read_ahead(mount, 512 * KIB, Inline())
    source.fill_miss(mount.nid, 0, 64 * KIB)
    assert mount.blob.requests == [(0, 512 * KIB)]
    assert mount.ready_until() == 512 * KIB


def test_a_lone_read_does_not_read_ahead(mount: Mount) -> None:
    source = read_ahead(mount, 512 * KIB, Inline())
    source.note_read(mount.nid, 0, 64 * KIB)
    source.note_read(mount.nid, 10 * MIB, 64 * KIB)  # a jump: another stream starts
    assert mount.blob.requests == []


def test_sequential_reads_keep_doubling_windows_ahead_up_to_the_end(mount: Mount) -> None:
    source = read_ahead(mount, 512 * KIB, Inline())
    step = 128 * KIB
    source.note_read(mount.nid, 0, step)
    source.fill_miss(mount.nid, 0, step)  # the first read misses: its window
    source.note_read(mount.nid, step, step)
    # 512 KiB fetched by the miss, then windows of 512 KiB and 1 MiB: the reader is kept
    # DEPTH windows of 512 KiB behind the frontier.
    assert mount.blob.requests == [(0, 512 * KIB), (512 * KIB, 512 * KIB), (MIB, MIB)]
    assert mount.ready_until() == 2 * MIB
    for off in range(2 * step, SIZE, step):
        assert mount.ready_until() >= min(off + step, SIZE), "the reader caught up with the read-ahead"
        source.note_read(mount.nid, off, step)
    sizes = [size for _, size in mount.blob.requests]
    assert sizes[:6] == [512 * KIB, 512 * KIB, MIB, 2 * MIB, 4 * MIB, MAX_WINDOW]
    assert set(sizes[6:]) <= {MAX_WINDOW} | {sizes[-1]}  # then MAX_WINDOW, the last one cut at the end
    # every chunk fetched once, nothing past the file's last chunk
    assert sum(sizes) == sum(chunk.compressed_size for chunk in mount.image.chunks())
    assert mount.ready_until() == SIZE


def test_read_ahead_has_its_own_way_to_the_backend(mount: Mount) -> None:
    ahead: list[tuple[int, int]] = []

    def read_ahead_raw(blob_id: str, offset: int, size: int) -> bytes:
        ahead.append((offset, size))
        return mount.blob.raw[offset : offset + size]

    source = ReadAheadSource(
        mount.image,
        mount.cache,
        mount.blob.read_raw,
        first_window=512 * KIB,
        read_ahead_raw=read_ahead_raw,
        ahead=Inline(),
    )
    source.note_read(mount.nid, 0, 64 * KIB)
    source.fill_miss(mount.nid, 0, 64 * KIB)
    source.note_read(mount.nid, 64 * KIB, 64 * KIB)
    assert mount.blob.requests == [(0, 512 * KIB)]  # the miss: through the backend actors
    assert ahead == [(512 * KIB, 512 * KIB), (MIB, MIB)]  # read-ahead: never queued behind misses


def test_a_failed_read_ahead_is_left_to_the_reads(mount: Mount) -> None:
    source = read_ahead(mount, 512 * KIB, Inline())
    source.note_read(mount.nid, 0, 64 * KIB)
    mount.blob.fail = True
    source.note_read(mount.nid, 64 * KIB, 64 * KIB)  # read-ahead fails quietly: nothing cached
    assert mount.blob.requests and mount.ready_until() == 0
    mount.blob.fail = False
    source.fill_miss(mount.nid, 0, 64 * KIB)
    assert mount.ready_until() >= 512 * KIB


def test_a_whole_file_read_with_read_ahead_threads(mount: Mount) -> None:
    source = read_ahead(mount, 256 * KIB)
    step = MIB
    parts = []
    try:
        for off in range(0, SIZE, step):
            size = min(step, SIZE - off)
            source.note_read(mount.nid, off, size)
            extents = mount.image.chunk_extents(mount.nid, off, size)
            data = source.read_extents_cached(extents)
            if data is None:  # a miss, as a fetch thread serves it
                source.fill_miss(mount.nid, off, size)
                data = source.read_extents(extents)
            parts.append(data)
    finally:
        source.close()
    assert b"".join(parts) == mount.data
    # merged windows: a small fraction of one request per chunk
    assert len(mount.blob.requests) < SIZE // CHUNK // 8
