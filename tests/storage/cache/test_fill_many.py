"""`CachedChunkSource.fill_many`: merged fetches, one sync, claims that concurrent misses wait on."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from nydus_actors.rafs import RafsImage, read_file
from nydus_actors.rafs.builder import build
from nydus_actors.storage.cache import BlobCacheRegistry, CachedChunkSource

MIB = 1024 * 1024


@pytest.fixture
def image(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(8).randbytes(5 * MIB + 99)
    (src / "f").write_bytes(data)
    (tmp_path / "blobs").mkdir()
    result = build(src, tmp_path / "i.boot", tmp_path / "blobs", compressor="zstd")
    with RafsImage.open(str(result.bootstrap)) as img:
        yield img, data, Path(result.blob_path).read_bytes()


def test_one_fetch_fills_many_chunks(tmp_path: Path, image) -> None:
    img, data, blob = image
    calls: list[tuple[int, int]] = []

    def fetch_range(blob_id: str, offset: int, size: int) -> bytes:
        calls.append((offset, size))
        return blob[offset : offset + size]

    def fetch_chunk(blob_info, chunk) -> bytes:
        raise AssertionError("every chunk should be cached already")

    chunks = sorted(img.chunks(), key=lambda c: c.compressed_offset)
    source = CachedChunkSource(
        img.blobs,
        str(tmp_path / "cache"),
        fetch_chunk,
        validate=True,
        registry=BlobCacheRegistry(str(tmp_path / "cache")),
    )
    try:
        assert source.fill_many(chunks, fetch_range) == len(chunks)
        assert len(calls) == 1
        nid = img.lookup(img.root_nid, b"f")
        assert read_file(img, nid, 0, len(data), source) == data
        assert source.fill_many(chunks, fetch_range) == 0  # all cached: nothing fetched
        assert len(calls) == 1
    finally:
        source.close()


def test_corrupt_chunk_is_left_out_and_waiters_see_it(tmp_path: Path, image) -> None:
    img, data, blob = image
    chunks = sorted(img.chunks(), key=lambda c: c.compressed_offset)
    bad = chunks[1]
    started, release = threading.Event(), threading.Event()

    def fetch_range(blob_id: str, offset: int, size: int) -> bytes:
        started.set()
        release.wait(10)
        raw = bytearray(blob[offset : offset + size])
        raw[bad.compressed_offset - offset + 5] ^= 0xFF
        return bytes(raw)

    errors: list[str] = []
    fetched: list[int] = []

    def fetch_chunk(blob_info, chunk) -> bytes:
        fetched.append(chunk.index)
        return blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]

    cache = str(tmp_path / "cache")
    source = CachedChunkSource(
        img.blobs,
        cache,
        fetch_chunk,
        validate=True,
        on_error=errors.append,
        registry=BlobCacheRegistry(cache),
    )
    try:
        filler = threading.Thread(target=source.fill_many, args=(chunks, fetch_range))
        filler.start()
        assert started.wait(10)
        waiter_result: list[object] = []

        def wait_for_first() -> None:
            waiter_result.append(source.read_chunk(chunks[0]))

        waiter = threading.Thread(target=wait_for_first)
        waiter.start()
        release.set()
        filler.join(10)
        waiter.join(10)
        assert waiter_result and fetched == []  # the waiter got the claimed fill, no second fetch
        assert not source.is_ready(bad) and all(source.is_ready(c) for c in chunks if c is not bad)
        assert any("digest mismatch" in e for e in errors)
        nid = img.lookup(img.root_nid, b"f")
        assert read_file(img, nid, 0, len(data), source) == data  # the bad chunk is fetched again
        assert fetched == [bad.index]
    finally:
        source.close()
