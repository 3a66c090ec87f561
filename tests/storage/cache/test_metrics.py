"""`BlobcacheMetrics`: nydusd's field names and order, and the counts a `CachedChunkSource` keeps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nydus_actors.rafs.chunks import ChunkExtent
from nydus_actors.storage.cache import BlobcacheMetrics, BlobCacheRegistry, CachedChunkSource
from nydus_actors.storage.cache.blob_file import data_path
from tests.storage.cache import Built, Fetcher, build_image

FIELDS = [
    "underlying_files",
    "store_path",
    "partial_hits",
    "whole_hits",
    "total",
    "entries_count",
    "prefetch_data_amount",
    "prefetch_requests_count",
    "prefetch_workers",
    "prefetch_unmerged_chunks",
    "prefetch_cumulative_time_millis",
    "prefetch_begin_time_secs",
    "prefetch_begin_time_millis",
    "prefetch_end_time_secs",
    "prefetch_end_time_millis",
    "buffered_backend_size",
    "data_all_ready",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(tmp_path_factory.mktemp("image"))


def test_a_fresh_set_exports_every_field_in_order() -> None:
    metrics = BlobcacheMetrics("/snap/1", "/var/cache")
    out = metrics.export()
    assert list(out) == FIELDS
    assert out["underlying_files"] == [] and out["store_path"] == "/var/cache"
    assert out["data_all_ready"] is False
    assert all(out[f] == 0 for f in FIELDS[2:-1])
    json.dumps(out)


def test_prefetch_fields() -> None:
    metrics = BlobcacheMetrics("i", "/c")
    before = time.time()
    metrics.prefetch_begin(8)
    metrics.record_prefetch(1 << 20, 4, 12)
    metrics.record_prefetch(4096, 1, 3)
    metrics.prefetch_end()
    out = metrics.export()
    assert out["prefetch_workers"] == 8
    assert (out["prefetch_data_amount"], out["prefetch_requests_count"]) == ((1 << 20) + 4096, 2)
    assert (out["prefetch_unmerged_chunks"], out["prefetch_cumulative_time_millis"]) == (5, 15)
    begin = out["prefetch_begin_time_secs"] + out["prefetch_begin_time_millis"] / 1000
    end = out["prefetch_end_time_secs"] + out["prefetch_end_time_millis"] / 1000
    assert before - 0.001 <= begin <= end <= time.time()
    assert 0 <= out["prefetch_begin_time_millis"] < 1000


def test_a_source_counts_hits_entries_and_readiness(built: Built, tmp_path: Path) -> None:
    registry = BlobCacheRegistry(str(tmp_path / "cache"))
    fetch = Fetcher(built.blob_path)
    metrics = BlobcacheMetrics("/snap/7", registry.work_dir)
    source = CachedChunkSource(
        built.image.blobs, registry.work_dir, fetch, validate=True, registry=registry, metrics=metrics
    )
    c0, c1, c2 = built.chunks[:3]

    def counts() -> tuple[int, int, int, int]:
        out = metrics.export()
        return out["total"], out["whole_hits"], out["partial_hits"], out["entries_count"]

    assert metrics.export()["underlying_files"] == [data_path(registry.work_dir, built.blob.blob_id)]
    assert counts() == (0, 0, 0, 0)
    source.read_range(c0, 0, 100)  # miss
    assert counts() == (1, 0, 0, 1)
    source.read_range(c0, 100, 100)  # hit
    assert counts() == (2, 1, 0, 1)
    # One file read over a cached and an uncached chunk is a partial hit.
    source.read_extents([ChunkExtent(c0, 0, 10), ChunkExtent(c1, 0, 10)])
    assert counts() == (3, 1, 1, 2)
    source.read_extents([ChunkExtent(c0, 0, 10), ChunkExtent(None, 0, 5), ChunkExtent(c1, 0, 10)])
    assert counts() == (4, 2, 1, 2)
    source.read_extents([ChunkExtent(c2, 0, 10)])  # a miss only
    assert counts() == (5, 2, 1, 3)
    assert metrics.export()["data_all_ready"] is False
    for chunk in built.chunks:
        source.read_chunk(chunk)
    out = metrics.export()
    assert out["entries_count"] == len(built.chunks) and out["data_all_ready"] is True
    assert out["total"] == 5 + len(built.chunks)
    source.close()
    fetch.close()
