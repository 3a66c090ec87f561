"""End to end: the real daemon lazily loading one image through every data-serving backend, and faults.

The contract test builds a zstd RAFS image once, puts its blob where each backend serves it
(a local blobs directory, a docker-registry, nginx for http-proxy, moto for s3), mounts it at
`/img` with a blob cache and digest validation, and checks bytes, backend metrics and cache hits.

The fault tests put a `FaultProxy` between the daemon and a registry (down, reset, cut, blackhole)
or let nginx serve a corrupted copy of the blob: a read of data not cached yet must fail with EIO
in bounded time, be reported in the events ring, leave cached files and the API serving, and
succeed without a remount once the fault is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_actors.rafs.builder import build
from tests.integration.harness import Daemon, needs_fuse
from tests.storage.faultproxy import FaultProxy
from tests.storage.servers import registry_server, requires_nginx, requires_registry, run_nginx
from tests.storage.test_backends_contract import BUCKET, PREFIX, S3_KEYS, s3_client, s3_settings

pytestmark = [needs_fuse, pytest.mark.mount]

REPO = "library/lazy-backends"
#: The file read before a fault is switched on: its chunk is then served from the blob cache.
WARM = "notes.txt"
#: The file read while the fault is on: none of its chunks is cached yet.
COLD = "big.bin"
#: A generous bound on a failing read: 1 s timeouts, one retry, some backoff, kernel round trips.
FAIL_BOUND = 20.0


@dataclass(frozen=True)
class Image:
    bootstrap: str
    blob_id: str
    blob_path: Path
    files: dict[str, bytes]  # relative path -> content, for every regular file of the tree


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    """One zstd image of a small tree: a random 3 MiB file (several chunks), text, empty, nested."""
    base = tmp_path_factory.mktemp("image")
    rnd = random.Random(11)
    files = {
        COLD: rnd.randbytes(3 * 1024 * 1024 + 4321),
        WARM: b"lazy loading through every backend\n" * 40,
        "empty": b"",
        "dir/sub/nested.txt": b"nested file\n" * 300,
    }
    src = base / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    blobs = base / "blobs"
    blobs.mkdir()
    result = build(src, base / "image.boot", blobs, compressor="zstd")
    return Image(result.bootstrap, result.blob_id, Path(result.blob_path), files)


# -- configs ---------------------------------------------------------------------------------------------


def v1_config(kind: str, settings: dict, work_dir: Path) -> str:
    """What nydus-snapshotter writes: backend under `device.backend.config`, cache under `device.cache`."""
    return json.dumps(
        {
            "device": {
                "backend": {"type": kind, "config": settings},
                "cache": {"type": "blobcache", "config": {"work_dir": str(work_dir)}},
            },
            "mode": "direct",
            "digest_validate": True,
        }
    )


def v2_config(kind: str, settings: dict, work_dir: Path) -> str:
    """The same in v2 JSON, which http-proxy needs: nydusd's v1 format has no http-proxy backend."""
    return json.dumps(
        {
            "version": 2,
            "backend": {"type": kind, kind: settings},
            "cache": {"type": "blobcache", "filecache": {"work_dir": str(work_dir)}},
            "rafs": {"mode": "direct", "validate": True},
        }
    )


def mount(daemon: Daemon, image: Image, config: str) -> Path:
    body = {"source": image.bootstrap, "fs_type": "rafs", "config": config}
    status, _, reply = daemon.request("POST", "/api/v1/mount?mountpoint=/img", body)
    assert status == 204, reply
    return daemon.mountpoint / "img"


def uncached_read(path: Path) -> bytes:
    """Read a whole file through FUSE after dropping its page cache, so the daemon serves every byte."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def tree_files(root: Path) -> set[str]:
    return {
        str(Path(dirpath, name).relative_to(root)) for dirpath, _, names in os.walk(root) for name in names
    }


# -- where each backend finds the blob -------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    kind: str  # the config's backend type
    settings: dict
    backend_type: str  # what /api/v1/metrics/backend reports
    v2: bool = False


@contextlib.contextmanager
def serve_blob(kind: str, image: Image, workdir: Path) -> Iterator[Served]:
    """Start the server a backend reads from, holding the image's blob; stop it on exit."""
    if kind == "localfs":
        yield Served("localfs", {"dir": str(image.blob_path.parent)}, "localfs")
    elif kind == "registry":
        with registry_server(workdir / "registry", "plain") as registry:
            assert registry.push_blob(REPO, image.blob_path.read_bytes()) == f"sha256:{image.blob_id}"
            settings = {"scheme": "http", "host": registry.host, "repo": REPO, "timeout": 5, "retry_limit": 1}
            yield Served("registry", settings, "registry")
    elif kind == "http-proxy":
        # nginx serves the build's blob directory: the blob by its id at the root
        with run_nginx(image.blob_path.parent, workdir / "nginx") as base:
            yield Served("http-proxy", {"addr": base, "timeout": 5, "retry_limit": 1}, "http-proxy", v2=True)
    else:
        server_mod = pytest.importorskip("moto.server", reason="needs moto[server] for an S3 endpoint")
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            client = s3_client(f"http://{host}:{port}", **S3_KEYS)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key=PREFIX + image.blob_id, Body=image.blob_path.read_bytes())
            yield Served("s3", s3_settings(f"{host}:{port}", retry_limit=1), "oss")
        finally:
            server.stop()


BACKENDS = [
    pytest.param("localfs", id="localfs"),
    pytest.param("registry", id="registry", marks=requires_registry),
    pytest.param("http-proxy", id="http-proxy", marks=requires_nginx),
    pytest.param("s3", id="s3"),
]


@pytest.mark.parametrize("kind", BACKENDS)
def test_every_backend_serves_the_image(spawn, tmp_path: Path, image: Image, kind: str) -> None:
    """Exact bytes for every file, backend reads counted under the right type, a second pass all hits."""
    cache_dir = tmp_path / "cache"
    with serve_blob(kind, image, tmp_path) as served:
        daemon = spawn()
        make = v2_config if served.v2 else v1_config
        root = mount(daemon, image, make(served.kind, served.settings, cache_dir))
        assert tree_files(root) == set(image.files)
        for name, data in image.files.items():
            assert uncached_read(root / name) == data, name
        assert (cache_dir / f"{image.blob_id}.blob.data").exists()

        fetched = daemon.request("GET", "/api/v1/metrics/backend?id=/img")[2]
        assert fetched["backend_type"] == served.backend_type
        assert fetched["read_count"] > 0 and fetched["read_errors"] == 0
        assert fetched["read_amount_total"] > 0

        # Everything is cached now: the second pass reads no byte from the backend.
        for name, data in image.files.items():
            assert uncached_read(root / name) == data, name
        again = daemon.request("GET", "/api/v1/metrics/backend?id=/img")[2]
        assert again["read_count"] == fetched["read_count"]
        cache = daemon.request("GET", "/api/v1/metrics/blobcache?id=/img")[2]
        assert cache["store_path"] == str(cache_dir)
        assert cache["whole_hits"] > 0 and cache["total"] > 0

        assert daemon.request("DELETE", "/api/v1/mount?mountpoint=/img")[0] == 204
        assert not root.exists()


# -- faults ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryBlob:
    host: str
    port: int


@pytest.fixture(scope="module")
def registry_blob(tmp_path_factory, image: Image) -> Iterator[RegistryBlob]:
    """One plain registry holding the image's blob for every fault test (it stays healthy itself)."""
    workdir = tmp_path_factory.mktemp("fault-registry")
    with registry_server(workdir, "plain") as registry:
        registry.push_blob(REPO, image.blob_path.read_bytes())
        host, _, port = registry.host.rpartition(":")
        yield RegistryBlob(host, int(port))


def expect_eio_soon(path: Path) -> float:
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        uncached_read(path)
    elapsed = time.monotonic() - started
    assert info.value.errno == errno.EIO, info.value
    assert elapsed < FAIL_BOUND
    return elapsed


def check_fault_contained(daemon: Daemon, root: Path, image: Image, cause: str = "") -> None:
    """A failed fetch is reported with its blob id (and `cause`) and hurts nothing already cached."""
    events = daemon.request("GET", "/api/v1/daemon/events")[2]["errors"]
    assert any(image.blob_id in line and cause in line for line in events), events
    assert uncached_read(root / WARM) == image.files[WARM]
    assert daemon.state() == "RUNNING"


@requires_registry
@pytest.mark.parametrize("mode", ["down", "reset", "cut", "blackhole"])
def test_registry_fault_fails_reads_then_heals(
    spawn, tmp_path: Path, image: Image, registry_blob: RegistryBlob, mode: str
) -> None:
    with FaultProxy((registry_blob.host, registry_blob.port)) as proxy:
        settings = {
            "scheme": "http",
            "host": proxy.address,
            "repo": REPO,
            "timeout": 1,
            "connect_timeout": 1,
            "retry_limit": 1,
        }
        daemon = spawn()
        root = mount(daemon, image, v1_config("registry", settings, tmp_path / "cache"))
        assert uncached_read(root / WARM) == image.files[WARM]

        proxy.set_mode(mode)
        expect_eio_soon(root / COLD)
        check_fault_contained(daemon, root, image)

        proxy.set_mode("pass")
        assert uncached_read(root / COLD) == image.files[COLD]


def corrupted(data: bytes) -> bytes:
    """Flip a byte in every 4 KiB: random data sits in zstd raw blocks, so it decodes to wrong bytes."""
    out = bytearray(data)
    for offset in range(2048, len(out), 4096):
        out[offset] ^= 0xFF
    return bytes(out)


@requires_nginx
def test_corrupted_blob_fails_digest_validation_then_heals(spawn, tmp_path: Path, image: Image) -> None:
    www = tmp_path / "www"
    www.mkdir()
    served = www / image.blob_id
    good = image.blob_path.read_bytes()
    served.write_bytes(good)
    with run_nginx(www, tmp_path / "nginx") as base:
        daemon = spawn()
        settings = {"addr": base, "timeout": 2, "connect_timeout": 2, "retry_limit": 1}
        root = mount(daemon, image, v2_config("http-proxy", settings, tmp_path / "cache"))
        assert uncached_read(root / WARM) == image.files[WARM]

        # Swap files by rename so nginx never serves a half-written one.
        staged = www / "staged"
        staged.write_bytes(corrupted(good))
        os.replace(staged, served)
        expect_eio_soon(root / COLD)
        # the bytes arrive intact over HTTP: only the chunk digest check can catch them
        check_fault_contained(daemon, root, image, cause="digest mismatch")

        staged.write_bytes(good)
        os.replace(staged, served)
        assert uncached_read(root / COLD) == image.files[COLD]
