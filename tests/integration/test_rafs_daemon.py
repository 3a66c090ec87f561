"""RAFS images served by the real daemon: the Nydus v6 fixture over a localfs backend."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.integration.harness import needs_fuse
from tests.paths import NYDUS_FIXTURES

pytestmark = [needs_fuse, pytest.mark.mount]

FIXTURES = NYDUS_FIXTURES
BOOTSTRAP = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
BLOBS = FIXTURES / "blobs"
V5_BOOTSTRAP = FIXTURES / "repeatable" / "sha256-nocompress-repeatable"
SIZES = {"lib.rs": 16931, "sync_io.rs": 13400}


def v1_config(**extra) -> str:
    return json.dumps(
        {
            "device": {"backend": {"type": "localfs", "config": {"dir": str(BLOBS)}}, "cache": {"type": ""}},
            "mode": "direct",
            "digest_validate": True,
            **extra,
        }
    )


V2_TOML = f"""
version = 2
id = "toml"
[backend]
type = "localfs"
[backend.localfs]
dir = "{BLOBS}"
[rafs]
mode = "direct"
validate = true
"""


def mount(daemon, mountpoint: str, config: str, source: Path = BOOTSTRAP, method: str = "POST"):
    body = {"source": str(source), "fs_type": "rafs", "config": config}
    return daemon.request(method, f"/api/v1/mount?mountpoint={mountpoint}", body)


def digests(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in sorted(os.listdir(root))}


@pytest.mark.skipif(not BOOTSTRAP.exists(), reason="needs ../shared/fixtures/nydus")
def test_fixture_through_the_api(spawn) -> None:
    daemon = spawn()
    status, _, body = mount(
        daemon, "/img", v1_config(iostats_files=True, access_pattern=True, latest_read_files=True)
    )
    assert status == 204, body
    root = daemon.mountpoint / "img"
    assert sorted(os.listdir(root)) == sorted(SIZES)
    for name, size in SIZES.items():
        data = (root / name).read_bytes()
        assert len(data) == size == os.stat(root / name).st_size
        assert b"fn " in data  # Rust source, every chunk digest verified by the daemon

    info = daemon.request("GET", "/api/v1/daemon")[2]["backend_collection"]["/img"]
    assert info["backend_type"] == "Rafs"
    assert info["config"]["backend"]["type"] == "localfs"
    assert info["config"]["rafs"]["mode"] == "direct"
    assert info["config"]["cache"] is not None

    metrics = daemon.request("GET", "/api/v1/metrics?id=/img")[2]
    assert len(metrics["fop_hits"]) == 15 and len(metrics["fop_errors"]) == 15
    assert len(metrics["block_count_read"]) == 8 and len(metrics["read_latency_dist"]) == 8
    assert metrics["fop_hits"][4] >= 2 and metrics["data_read"] == sum(SIZES.values())
    assert metrics["id"] == "/img" and metrics["files_account_enabled"] is True
    assert sum(metrics["read_latency_dist"]) == metrics["fop_hits"][4] + metrics["fop_errors"][4]
    assert (
        daemon.request("GET", "/api/v1/metrics")[2]["data_read"] == metrics["data_read"]
    )  # the only instance

    files = daemon.request("GET", "/api/v1/metrics/files?id=/img")[2]
    read_inos = {ino for ino, f in files.items() if f["fop_hits"][4] > 0}
    assert {str(os.stat(root / n).st_ino & ((1 << 56) - 1)) for n in SIZES} <= read_inos
    latest = daemon.request("GET", "/api/v1/metrics/files?id=/img&latest=true")[2]
    assert latest and all(len(r) in (1, 2) for r in latest)
    assert daemon.request("GET", "/api/v1/metrics/files?id=/img&latest=true")[2] == []  # cleared on read
    pattern = daemon.request("GET", "/api/v1/metrics/pattern?id=/img")[2]
    assert {p["nr_read"] > 0 for p in pattern} == {True} and len(pattern) == 2

    meta = daemon.request("GET", "/api/v1/daemon/backend?mountpoint=/img")[2]
    assert meta["root_nid"] == 128 and meta["chunk_size"] == 1024 * 1024
    assert meta["version"] == 0x600 and "flags" in meta and "bits" in meta["flags"]
    assert meta["attr_timeout"] == meta["entry_timeout"] == {"secs": 3600, "nanos": 0}

    # swap the instance to the same bootstrap with a v2 TOML config
    status, _, body = mount(daemon, "/img", V2_TOML, method="PUT")
    assert status == 204, body
    assert digests(root).keys() == SIZES.keys()
    assert daemon.request("GET", "/api/v1/daemon")[2]["backend_collection"]["/img"]["config"]["id"] == "toml"

    assert daemon.request("DELETE", "/api/v1/mount?mountpoint=/img")[0] == 204
    status, _, body = daemon.request("GET", "/api/v1/metrics?id=/img")
    assert status == 404


@pytest.mark.skipif(not BOOTSTRAP.exists(), reason="needs ../shared/fixtures/nydus")
def test_bad_rafs_mounts_keep_the_daemon_serving(spawn, tmp_path: Path) -> None:
    daemon = spawn()
    status, _, body = mount(daemon, "/v5", v1_config(), source=V5_BOOTSTRAP)
    assert status == 500 and "unsupported RAFS version" in body["message"]
    status, _, body = mount(daemon, "/bad", "{not a config")
    assert status == 500
    assert body["message"] == (
        'Mount(MountFilesystem(Other("RAFS failed to handle request, '
        'Failed to load config: failed to parse configuration information`")))'
    )
    garbage = tmp_path / "garbage.boot"
    garbage.write_bytes(os.urandom(8192))
    status, _, body = mount(daemon, "/garbage", v1_config(), source=garbage)
    assert status == 500 and "magic" in body["message"]
    empty_dir = tmp_path / "noblobs"
    empty_dir.mkdir()
    config = json.dumps(
        {"device": {"backend": {"type": "localfs", "config": {"dir": str(empty_dir)}}}, "mode": "direct"}
    )
    assert mount(daemon, "/noblob", config)[0] == 204
    with pytest.raises(OSError) as info:
        (daemon.mountpoint / "noblob" / "lib.rs").read_bytes()
    assert info.value.errno == 5  # EIO for that file only
    assert sorted(os.listdir(daemon.mountpoint / "noblob")) == sorted(SIZES)
    # a registry nobody listens on: the mount works, reads fail with EIO in bounded time
    registry = json.dumps(
        {
            "device": {
                "backend": {
                    "type": "registry",
                    "config": {"host": "127.0.0.1:1", "repo": "x", "scheme": "http", "timeout": 2},
                }
            },
            "mode": "direct",
        }
    )
    assert mount(daemon, "/reg", registry)[0] == 204
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        (daemon.mountpoint / "reg" / "lib.rs").read_bytes()
    assert info.value.errno == 5 and time.monotonic() - started < 30
    events = daemon.request("GET", "/api/v1/daemon/events")[2]
    assert any("be7d77ee" in line and "registry" in line for line in events["errors"]), events
    backend = daemon.request("GET", "/api/v1/metrics/backend?id=/reg")[2]
    assert backend["backend_type"] == "registry" and backend["read_errors"] >= 1
    oss = json.dumps(
        {
            "device": {"backend": {"type": "oss", "config": {"endpoint": "e", "bucket_name": "b"}}},
            "mode": "direct",
        }
    )
    status, _, body = mount(daemon, "/oss", oss)
    assert (status, body["message"]) == (501, "Mount(MountFilesystem(Unsupported))")
    assert daemon.state() == "RUNNING"
    assert sorted(daemon.request("GET", "/api/v1/daemon")[2]["backend_collection"]) == ["/noblob", "/reg"]


@pytest.mark.skipif(not BOOTSTRAP.exists(), reason="needs ../shared/fixtures/nydus")
def test_bootstrap_at_start(spawn, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(v1_config())
    daemon = spawn("--bootstrap", str(BOOTSTRAP), "--config", str(config))
    daemon.wait_socket()
    assert digests(daemon.mountpoint).keys() == SIZES.keys()
    assert daemon.request("GET", "/api/v1/metrics")[2]["id"] == "/"
    second = spawn("--bootstrap", str(BOOTSTRAP), "--localfs-dir", str(BLOBS), name="e")
    second.wait_socket()
    assert digests(second.mountpoint) == digests(daemon.mountpoint)
