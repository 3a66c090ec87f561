"""Lazy loading through the real daemon: an image's blob in a real registry, a blob cache on disk."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest

from nydus_actors.rafs.builder import build
from tests.integration.harness import needs_fuse
from tests.storage.servers import registry_server

pytestmark = [
    needs_fuse,
    pytest.mark.mount,
    pytest.mark.skipif(
        shutil.which("docker-registry") is None, reason="needs docker-registry (Debian package)"
    ),
]

REPO = "library/lazy"


def config(registry, cache_dir: Path, auth: str | None) -> str:
    backend = {"scheme": "http", "host": registry.host, "repo": REPO, "timeout": 5, "retry_limit": 1}
    if auth is not None:
        backend["auth"] = auth
    return json.dumps(
        {
            "device": {
                "backend": {"type": "registry", "config": backend},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}},
            },
            "mode": "direct",
            "digest_validate": True,
        }
    )


def uncached_read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, 64 * 1024 * 1024)
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    files = {"a.bin": rnd.randbytes(3 * 1024 * 1024 + 5), "b.txt": b"second file\n" * 50_000, "c": b"tiny"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    result = build(src, tmp_path / "image.boot", blobs)
    return result, files


def test_registry_backend_with_blob_cache(spawn, tmp_path: Path, image) -> None:
    result, files = image
    cache_dir = tmp_path / "cache"
    with registry_server(tmp_path / "reg", "basic") as registry:
        digest = registry.push_blob(REPO, Path(result.blob_path).read_bytes())
        assert digest == f"sha256:{result.blob_id}"
        daemon = spawn()
        body = {
            "source": str(result.bootstrap),
            "fs_type": "rafs",
            "config": config(registry, cache_dir, registry.auth),
        }
        status, _, reply = daemon.request("POST", "/api/v1/mount?mountpoint=/img", body)
        assert status == 204, reply
        root = daemon.mountpoint / "img"
        assert uncached_read(root / "a.bin") == files["a.bin"]
        assert (cache_dir / f"{result.blob_id}.blob.data").exists()
        fetched = daemon.request("GET", "/api/v1/metrics/backend?id=/img")[2]
        assert fetched["backend_type"] == "registry" and fetched["read_count"] > 0
        # a second read comes from the cache file: no backend read
        assert uncached_read(root / "a.bin") == files["a.bin"]
        assert (
            daemon.request("GET", "/api/v1/metrics/backend?id=/img")[2]["read_count"] == fetched["read_count"]
        )
        cache = daemon.request("GET", "/api/v1/metrics/blobcache?id=/img")[2]
        assert cache["store_path"] == str(cache_dir) and cache["total"] > 0 and cache["whole_hits"] > 0
        assert any(result.blob_id in f for f in cache["underlying_files"])

        # hot reload of the registry credentials: wrong ones fail the next fetch, right ones heal it
        wrong = "d3Jvbmc6d3Jvbmc="  # wrong:wrong
        assert daemon.request("PUT", "/api/v1/config?id=/img", {"registry_auth": wrong})[0] == 204
        with pytest.raises(OSError) as info:
            uncached_read(root / "b.txt")
        assert info.value.errno == 5
        events = daemon.request("GET", "/api/v1/daemon/events")[2]["errors"]
        assert any(result.blob_id in line for line in events)
        assert daemon.request("PUT", "/api/v1/config?id=/img", {"registry_auth": registry.auth})[0] == 204
        assert uncached_read(root / "b.txt") == files["b.txt"]
        assert uncached_read(root / "c") == files["c"]

        # the cache survives the daemon: a new one reads everything without the registry
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    again = spawn(name="again")
    body = {"source": str(result.bootstrap), "fs_type": "rafs", "config": config(registry, cache_dir, None)}
    assert again.request("POST", "/api/v1/mount?mountpoint=/img", body)[0] == 204
    for name, data in files.items():
        assert uncached_read(again.mountpoint / "img" / name) == data
    # umount removes cache files no mount uses any more
    assert again.request("DELETE", "/api/v1/mount?mountpoint=/img")[0] == 204
    assert not (cache_dir / f"{result.blob_id}.blob.data").exists()


def prefetch_config(registry, cache_dir: Path, **prefetch) -> str:
    doc = json.loads(config(registry, cache_dir, None))
    doc["fs_prefetch"] = {"enable": True, "threads_count": 2, "merging_size": 4 * 1024 * 1024, **prefetch}
    return json.dumps(doc)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_prefetch_fills_the_cache_in_merged_requests(spawn, tmp_path: Path, image) -> None:
    result, files = image
    with registry_server(tmp_path / "reg", "plain") as registry:
        registry.push_blob(REPO, Path(result.blob_path).read_bytes())
        daemon = spawn()
        body = {
            "source": str(result.bootstrap),
            "fs_type": "rafs",
            "config": prefetch_config(registry, tmp_path / "cache"),
            "prefetch_files": ["/a.bin"],
        }
        assert daemon.request("POST", "/api/v1/mount?mountpoint=/img", body)[0] == 204

        def prefetched() -> bool:
            metrics = daemon.request("GET", "/api/v1/metrics/blobcache?id=/img")[2]
            return metrics["prefetch_end_time_secs"] > 0

        assert wait_for(prefetched)
        cache = daemon.request("GET", "/api/v1/metrics/blobcache?id=/img")[2]
        assert cache["prefetch_data_amount"] > 0 and cache["prefetch_requests_count"] >= 1
        # a.bin's four 1 MiB chunks came in fewer requests than chunks
        assert cache["prefetch_requests_count"] < 4
        before = daemon.request("GET", "/api/v1/metrics/backend?id=/img")[2]["read_count"]
        assert uncached_read(daemon.mountpoint / "img" / "a.bin") == files["a.bin"]
        assert daemon.request("GET", "/api/v1/metrics/backend?id=/img")[2]["read_count"] == before


def test_umount_stops_a_slow_prefetch(spawn, tmp_path: Path, image) -> None:
    result, _ = image
    with registry_server(tmp_path / "reg", "plain") as registry:
        registry.push_blob(REPO, Path(result.blob_path).read_bytes())
        daemon = spawn()
        body = {
            "source": str(result.bootstrap),
            "fs_type": "rafs",
            # 64 KiB/s: the whole image would take a minute
            "config": prefetch_config(registry, tmp_path / "cache", prefetch_all=True, bandwidth_rate=65536),
        }
        assert daemon.request("POST", "/api/v1/mount?mountpoint=/img", body)[0] == 204
        assert daemon.request("DELETE", "/api/v1/mount?mountpoint=/img")[0] == 204
        assert daemon.state() == "RUNNING"
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        assert "still alive" not in daemon.log()
