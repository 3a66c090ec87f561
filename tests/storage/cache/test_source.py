"""`CachedChunkSource` and `BlobCacheRegistry` over a real built image and a counting fake fetch."""

from __future__ import annotations

import os
import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from nydus_actors.rafs import LocalBlobSource, RafsError, RafsImage, read_file
from nydus_actors.rafs.chunks import ChunkExtent
from nydus_actors.storage.backends.base import BackendError
from nydus_actors.storage.cache import BlobCacheRegistry, CachedBlob, CachedChunkSource, shared_registry
from nydus_actors.storage.cache.blob_file import data_path, map_path
from tests.paths import NYDUS_FIXTURES
from tests.storage.cache import Built, Fetcher, build_image


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(tmp_path_factory.mktemp("image"))


@pytest.fixture
def fetcher(built: Built) -> Fetcher:
    fetch = Fetcher(built.blob_path)
    yield fetch
    fetch.close()


@pytest.fixture
def registry(tmp_path: Path) -> BlobCacheRegistry:
    return BlobCacheRegistry(str(tmp_path / "cache"))


def make_source(built: Built, registry: BlobCacheRegistry, fetch: Fetcher, **kw) -> CachedChunkSource:
    kw.setdefault("validate", True)
    return CachedChunkSource(built.image.blobs, registry.work_dir, fetch, registry=registry, **kw)


@pytest.mark.parametrize("validate", [False, True])
def test_a_miss_fetches_once_then_hits(built: Built, registry, fetcher: Fetcher, validate: bool) -> None:
    with make_source(built, registry, fetcher, validate=validate) as source:
        for chunk in built.chunks:
            assert source.read_chunk(chunk) == built.expected[chunk.index]
        assert fetcher.calls == dict.fromkeys(range(len(built.chunks)), 1)
        rnd = random.Random(3)
        for _ in range(300):
            chunk = rnd.choice(built.chunks)
            skip = rnd.randrange(chunk.uncompressed_size)
            length = rnd.randrange(chunk.uncompressed_size - skip + 1)
            assert source.read_range(chunk, skip, length) == built.expected[chunk.index][skip : skip + length]
        assert fetcher.total == len(built.chunks)


def test_a_first_partial_read_still_caches_the_whole_chunk(built: Built, registry, fetcher) -> None:
    chunk = built.chunks[0]
    with make_source(built, registry, fetcher) as source:
        assert source.read_range(chunk, 100, 10) == built.expected[0][100:110]
        assert source.read_chunk(chunk) == built.expected[0]
    assert fetcher.total == 1


def test_files_read_through_the_cache_equal_their_content(built: Built, registry, fetcher) -> None:
    img = built.image
    with make_source(built, registry, fetcher) as source:
        for name, content in built.files.items():
            nid = img.lookup(img.root_nid, name.encode())
            assert read_file(img, nid, 0, len(content) + 10, source) == content
            for off, size in ((1, 131072), (65530, 20), (len(content) // 2, 100000)):
                want = content[off : off + size]
                assert read_file(img, nid, off, size, source) == want
                assert source.read_extents(img.chunk_extents(nid, off, size)) == want
    assert fetcher.total == len(built.chunks)


def test_concurrent_misses_of_one_chunk_make_one_fetch(built: Built, registry: BlobCacheRegistry) -> None:
    fetch = Fetcher(built.blob_path, delay=0.3)
    chunk = built.chunks[2]
    results: list[bytes] = []
    barrier = threading.Barrier(16)

    def reader(source: CachedChunkSource) -> None:
        barrier.wait()
        results.append(source.read_range(chunk, 0, chunk.uncompressed_size))

    with make_source(built, registry, fetch) as source:
        threads = [threading.Thread(target=reader, args=(source,)) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    fetch.close()
    assert fetch.calls == {chunk.index: 1}
    assert len(results) == 16 and all(r == built.expected[chunk.index] for r in results)


def test_concurrent_misses_share_one_error(built: Built, registry: BlobCacheRegistry) -> None:
    fetch = Fetcher(built.blob_path, delay=0.3)
    chunk = built.chunks[1]
    fetch.damage[chunk.index] = 1
    lines: list[str] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(16)

    def reader(source: CachedChunkSource) -> None:
        barrier.wait()
        try:
            source.read_chunk(chunk)
        except RafsError as ex:
            errors.append(ex)

    with make_source(built, registry, fetch, on_error=lines.append) as source:
        threads = [threading.Thread(target=reader, args=(source,)) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 16 and len({id(e) for e in errors}) == 1
        assert lines == [errors[0].text]
        # The error was not cached: the next read fetches again and succeeds.
        assert source.read_chunk(chunk) == built.expected[chunk.index]
    fetch.close()
    assert fetch.calls == {chunk.index: 2}


def test_a_digest_mismatch_is_reported_not_cached_and_refetched(built: Built, registry, fetcher) -> None:
    chunk = next(c for c in built.chunks if not c.compressed and c.uncompressed_size > 1000)
    fetcher.damage[chunk.index] = 1
    lines: list[str] = []
    with make_source(built, registry, fetcher, on_error=lines.append) as source:
        with pytest.raises(RafsError) as info:
            source.read_range(chunk, 0, 10)
        text = info.value.text
        assert built.blob.blob_id in text and f"chunk {chunk.index}" in text and "digest mismatch" in text
        assert lines == [text]
        cached = registry.acquire(built.blob)
        assert not cached.is_ready(chunk)
        registry.release(built.blob.blob_id)
        assert source.read_range(chunk, 0, 10) == built.expected[chunk.index][:10]
        assert source.metrics.entries_count == 1
    assert fetcher.calls[chunk.index] == 2


def test_an_undecodable_chunk_is_reported(built: Built, registry, fetcher) -> None:
    chunk = next(c for c in built.chunks if c.compressed)
    fetcher.damage[chunk.index] = 1
    lines: list[str] = []
    # Decoding fails whatever `validate` says.
    with make_source(built, registry, fetcher, validate=False, on_error=lines.append) as source:
        with pytest.raises(RafsError, match=f"chunk {chunk.index} of blob {built.blob.blob_id}: "):
            source.read_chunk(chunk)
        assert len(lines) == 1
        assert source.read_chunk(chunk) == built.expected[chunk.index]


def test_without_validate_a_damaged_raw_chunk_is_served(built: Built, registry, fetcher) -> None:
    chunk = next(c for c in built.chunks if not c.compressed and c.uncompressed_size > 1000)
    fetcher.damage[chunk.index] = 1
    with make_source(built, registry, fetcher, validate=False) as source:
        assert source.read_chunk(chunk) != built.expected[chunk.index]


def test_a_validating_source_checks_what_a_non_validating_one_cached(built: Built, registry, fetcher) -> None:
    chunk = next(c for c in built.chunks if not c.compressed and c.uncompressed_size > 1000)
    extent = ChunkExtent(chunk, 0, chunk.uncompressed_size)
    fetcher.damage[chunk.index] = 1
    with (
        make_source(built, registry, fetcher, validate=False) as trusting,
        make_source(built, registry, fetcher, validate=True) as checking,
    ):
        assert trusting.read_chunk(chunk) != built.expected[chunk.index]  # damaged bytes now cached
        # The FUSE loop leaves an unchecked chunk to a worker thread, which checks it and fetches it again.
        assert checking.read_extents_cached([extent]) is None
        assert checking.read_extents([extent]) == built.expected[chunk.index]
        assert fetcher.calls[chunk.index] == 2
        # The good bytes replaced the bad ones for every image, and are checked now.
        assert trusting.read_chunk(chunk) == built.expected[chunk.index]
        assert checking.read_extents_cached([extent]) == built.expected[chunk.index]
        assert checking.read_range(chunk, 10, 20) == built.expected[chunk.index][10:30]
        assert fetcher.calls[chunk.index] == 2


def test_cached_bytes_damaged_between_daemons_are_fetched_again(
    built: Built, tmp_path: Path, fetcher
) -> None:
    work = str(tmp_path / "cache")
    chunk = built.chunks[1]
    with make_source(built, BlobCacheRegistry(work), fetcher) as source:
        assert source.read_chunk(chunk) == built.expected[chunk.index]
    with open(data_path(work, built.blob.blob_id), "r+b") as f:
        f.seek(chunk.uncompressed_offset + 7)
        f.write(b"\xde\xad")
    # A new registry is what a new daemon opens: the bit is still set, the bytes are not checked.
    with make_source(built, BlobCacheRegistry(work), fetcher, validate=False) as trusting:
        assert trusting.read_chunk(chunk) != built.expected[chunk.index]
    with make_source(built, BlobCacheRegistry(work), fetcher) as checking:
        assert checking.read_range(chunk, 0, 100) == built.expected[chunk.index][:100]
        assert fetcher.calls[chunk.index] == 2
        assert checking.metrics.entries_count == 1
    with make_source(built, BlobCacheRegistry(work), fetcher, validate=False) as trusting:
        assert trusting.read_chunk(chunk) == built.expected[chunk.index]


def test_fetch_errors_pass_through_and_are_not_cached(built: Built, registry, fetcher) -> None:
    chunk = built.chunks[0]
    lines: list[str] = []
    with make_source(built, registry, fetcher, on_error=lines.append) as source:
        fetcher.error = BackendError("registry said 500")
        with pytest.raises(BackendError, match="registry said 500"):
            source.read_chunk(chunk)
        fetcher.error = TimeoutError("backend actor did not answer")
        with pytest.raises(RafsError, match=f"failed to fetch chunk 0 of blob {built.blob.blob_id}: backend"):
            source.read_chunk(chunk)
        assert lines == []  # the backend reports its own failures
        fetcher.error = None
        assert source.read_chunk(chunk) == built.expected[0]
    assert fetcher.calls[0] == 3


def test_a_failed_cache_write_still_serves_the_read(built: Built, registry, fetcher, monkeypatch) -> None:
    chunk = built.chunks[0]
    lines: list[str] = []

    def full_disk(self: CachedBlob, chunk, data, *, replace: bool = False) -> bool:
        raise OSError(28, "No space left on device")

    with make_source(built, registry, fetcher, on_error=lines.append) as source:
        monkeypatch.setattr(CachedBlob, "store", full_disk)
        assert source.read_chunk(chunk) == built.expected[0]
        assert len(lines) == 1 and "No space left on device" in lines[0]
        monkeypatch.undo()
        assert source.read_chunk(chunk) == built.expected[0]
        assert source.read_chunk(chunk) == built.expected[0]
    assert fetcher.calls[0] == 2


def test_the_cache_is_reused_after_reopening(built: Built, tmp_path: Path, fetcher: Fetcher) -> None:
    work = str(tmp_path / "cache")
    registry = BlobCacheRegistry(work)
    with make_source(built, registry, fetcher) as source:
        for chunk in built.chunks:
            source.read_chunk(chunk)
    assert registry.referenced() == set()
    fetcher.calls.clear()
    again = BlobCacheRegistry(work)
    with make_source(built, again, fetcher) as source:
        assert source.metrics.entries_count == len(built.chunks) and source.metrics.data_all_ready
        for chunk in built.chunks:
            assert source.read_chunk(chunk) == built.expected[chunk.index]
    assert fetcher.total == 0


def test_a_resized_data_file_discards_the_map(built: Built, tmp_path: Path, fetcher: Fetcher) -> None:
    work = str(tmp_path / "cache")
    with make_source(built, BlobCacheRegistry(work), fetcher) as source:
        for chunk in built.chunks:
            source.read_chunk(chunk)
    os.truncate(data_path(work, built.blob.blob_id), 4096)
    with make_source(built, BlobCacheRegistry(work), fetcher) as source:
        assert source.metrics.entries_count == 0
        assert source.read_chunk(built.chunks[-1]) == built.expected[built.chunks[-1].index]
    assert os.path.getsize(data_path(work, built.blob.blob_id)) == built.blob.uncompressed_size


def test_two_sources_share_one_cached_blob(built: Built, registry: BlobCacheRegistry, fetcher) -> None:
    one = make_source(built, registry, fetcher)
    two = make_source(built, registry, fetcher, validate=False)
    assert one._cached[0] is two._cached[0]
    assert one.read_chunk(built.chunks[0]) == built.expected[0]
    assert two.read_chunk(built.chunks[0]) == built.expected[0]
    assert two.read_chunk(built.chunks[1]) == built.expected[1]
    assert one.read_chunk(built.chunks[1]) == built.expected[1]
    assert fetcher.calls == {0: 1, 1: 1}
    one.close()
    one.close()  # idempotent
    assert registry.referenced() == {built.blob.blob_id}
    assert two.read_chunk(built.chunks[1]) == built.expected[1]
    two.close()
    assert registry.referenced() == set()


def test_sources_share_the_process_registry_by_default(built: Built, tmp_path: Path, fetcher) -> None:
    work = str(tmp_path / "shared")
    one = CachedChunkSource(built.image.blobs, work, fetcher, validate=True)
    two = CachedChunkSource(built.image.blobs, work + "/", fetcher, validate=True)
    assert shared_registry(work) is shared_registry(work + "/.")
    one.read_chunk(built.chunks[3])
    two.read_chunk(built.chunks[3])
    assert fetcher.total == 1
    one.close()
    two.close()
    assert shared_registry(work).referenced() == set()


def test_gc_removes_only_unreferenced_files(tmp_path: Path) -> None:
    first = build_image(tmp_path / "a", seed=1)
    second = build_image(tmp_path / "b", seed=2)
    assert first.blob.blob_id != second.blob.blob_id
    registry = BlobCacheRegistry(str(tmp_path / "cache"))
    work = registry.work_dir
    Path(work, "notes.txt").write_text("not a cache file")
    fa, fb = Fetcher(first.blob_path), Fetcher(second.blob_path)
    a = CachedChunkSource(first.image.blobs, work, fa, validate=True, registry=registry)
    b = CachedChunkSource(second.image.blobs, work, fb, validate=True, registry=registry)
    a.read_chunk(first.chunks[0])
    b.read_chunk(second.chunks[0])
    assert registry.gc() == []
    a.close()
    removed = registry.gc()
    assert removed == sorted([data_path(work, first.blob.blob_id), map_path(work, first.blob.blob_id)])
    assert sorted(os.listdir(work)) == sorted(
        ["notes.txt", second.blob.blob_id + ".blob.data", second.blob.blob_id + ".chunk_map"]
    )
    assert b.read_chunk(second.chunks[0]) == second.expected[0] and fb.total == 1
    b.close()
    assert len(registry.gc()) == 2
    assert os.listdir(work) == ["notes.txt"]
    fa.close()
    fb.close()


def test_an_image_with_another_layout_for_a_cached_blob_is_refused(built: Built, registry, fetcher) -> None:
    with make_source(built, registry, fetcher):
        odd = replace(built.blob, chunk_count=built.blob.chunk_count + 1)
        with pytest.raises(RafsError, match="is cached as"):
            CachedChunkSource([odd], registry.work_dir, fetcher, validate=True, registry=registry)
        assert registry.referenced() == {built.blob.blob_id}


def test_bad_requests_are_refused(built: Built, registry, fetcher) -> None:
    chunk = built.chunks[0]
    with make_source(built, registry, fetcher) as source:
        with pytest.raises(RafsError, match="outside chunk"):
            source.read_range(chunk, 10, chunk.uncompressed_size)
        with pytest.raises(RafsError, match="which does not exist"):
            source.read_chunk(replace(chunk, blob_index=3))
        with pytest.raises(RafsError, match="outside blob"):
            source.read_chunk(replace(chunk, index=built.blob.chunk_count))
        with pytest.raises(RafsError, match="past the uncompressed end"):
            source.read_chunk(replace(chunk, uncompressed_offset=built.blob.uncompressed_size))
        with pytest.raises(RafsError, match="unsupported flags"):
            source.read_chunk(replace(chunk, flags=0x4))
    encrypted = replace(built.blob, features=built.blob.features | 0x100)
    with CachedChunkSource(
        [encrypted], registry.work_dir, fetcher, validate=True, registry=registry
    ) as source:
        with pytest.raises(RafsError, match="unsupported encrypted feature"):
            source.read_chunk(chunk)
        assert not source.metrics.data_all_ready
    assert fetcher.total == 0


def test_the_nydus_built_sample_reads_the_same_through_the_cache(tmp_path: Path) -> None:
    """The RAFS v6 image from Nydus's own builder, against the plain reader."""
    boot = NYDUS_FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
    blob_dir = NYDUS_FIXTURES / "blobs"
    if not boot.exists():
        pytest.skip("the Nydus fixtures are not next to the checkout")
    image = RafsImage.open(str(boot))
    fds = {b.blob_id: os.open(blob_dir / b.blob_id, os.O_RDONLY) for b in image.blobs}

    def fetch(blob, chunk) -> bytes:
        return os.pread(fds[blob.blob_id], chunk.compressed_size, chunk.compressed_offset)

    registry = BlobCacheRegistry(str(tmp_path / "cache"))
    with (
        LocalBlobSource(image, str(blob_dir), validate=True) as local,
        CachedChunkSource(image.blobs, registry.work_dir, fetch, validate=True, registry=registry) as cached,
    ):
        chunks = list(image.chunks())
        assert chunks
        for chunk in chunks:
            assert cached.read_chunk(chunk) == local.read_chunk(chunk)
        assert cached.metrics.data_all_ready
    for fd in fds.values():
        os.close(fd)
    image.close()


@pytest.mark.parametrize(("compressor", "digester"), [("lz4_block", "sha256"), ("none", "blake3")])
def test_other_compressors_and_digesters(tmp_path: Path, compressor: str, digester: str) -> None:
    built = build_image(tmp_path / "img", compressor=compressor, digester=digester)
    fetch = Fetcher(built.blob_path)
    registry = BlobCacheRegistry(str(tmp_path / "cache"))
    with make_source(built, registry, fetch) as source:
        for chunk in built.chunks:
            assert source.read_chunk(chunk) == built.expected[chunk.index]
            assert source.read_chunk(chunk) == built.expected[chunk.index]
    assert fetch.total == len(built.chunks)
    fetch.close()
