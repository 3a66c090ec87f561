"""Rehearsals of hot upgrade and failover through a supervisor, under a reader that checks every byte.

The sequences are nydus-snapshotter's (reference §5.7): sendfd to the supervisor,
a new daemon with `--upgrade` takes over, reaches READY, the old one exits, the new
one starts. Failover: the serving daemon is SIGKILLed with reads in flight, a new
daemon with the same command line detects the crash, takes over and starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nydus_actors.rafs.builder import build
from tests.integration.harness import is_mounted, needs_fuse, run_supervisor

pytestmark = [needs_fuse, pytest.mark.mount]

READER = Path(__file__).with_name("reader.py")


@contextlib.contextmanager
def reader(tmp_path: Path, files: dict[str, str], held: str, held_dir: str):
    spec = tmp_path / "reader.json"
    spec.write_text(json.dumps({"files": files, "held": held, "dir": held_dir}))
    result, stop = tmp_path / "reader-result.json", tmp_path / "reader-stop"
    proc = subprocess.Popen([sys.executable, str(READER), str(spec), str(result), str(stop)])
    outcome: dict = {}
    try:
        yield outcome
    except BaseException:
        # A failed step may leave the mount unserved, and the reader waiting in the kernel
        # until the fixtures end the daemons; the step's own error is what matters.
        proc.kill()
        raise
    stop.touch()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if result.exists():
        outcome.update(json.loads(result.read_text()))


def make_sources(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A host tree (passthrough) and a RAFS image of another tree (localfs blobs)."""
    rnd = random.Random(42)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(6):
        (tree / f"f{i}.bin").write_bytes(rnd.randbytes(rnd.randint(1000, 300_000)))
    (tree / "sub" / "nested.txt").write_text("nested\n" * 1000)
    image_src = tmp_path / "image-src"
    image_src.mkdir()
    for i in range(4):
        (image_src / f"r{i}.bin").write_bytes(rnd.randbytes(rnd.randint(1000, 2_000_000)))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    result = build(image_src, tmp_path / "image.boot", blobs)
    return tree, Path(result.bootstrap), blobs


def rafs_config(blobs: Path) -> str:
    return json.dumps(
        {"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}}, "mode": "direct"}
    )


def expected_files(mountpoint: Path, tree: Path, image_dir: Path) -> dict[str, str]:
    files = {}
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            files[str(mountpoint / "a" / path.relative_to(tree))] = hashlib.sha256(
                path.read_bytes()
            ).hexdigest()
    for path in sorted(image_dir.iterdir()):
        files[str(mountpoint / "b" / path.name)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def start_first(spawn, tmp_path: Path, common: list[str], env: dict[str, str] | None = None):
    tree, bootstrap, blobs = make_sources(tmp_path)
    daemon = spawn(*common, env=env, name="d0", mountpoint=tmp_path / "mnt")
    assert daemon.state() == "RUNNING"
    body = {"source": str(tree), "fs_type": "passthrough_fs", "config": ""}
    assert daemon.request("POST", "/api/v1/mount?mountpoint=/a", body)[0] == 204
    body = {"source": str(bootstrap), "fs_type": "rafs", "config": rafs_config(blobs)}
    assert daemon.request("POST", "/api/v1/mount?mountpoint=/b", body)[0] == 204
    return daemon, tree, tmp_path / "image-src"


def test_hot_upgrade_twenty_times_under_reads(spawn, tmp_path: Path) -> None:
    sock = tmp_path / "supervisor.sock"
    (tmp_path / "mnt").mkdir()
    common = ["--id", "d1", "--supervisor", str(sock)]
    with run_supervisor(sock):
        old, tree, image_dir = start_first(spawn, tmp_path, common)
        files = expected_files(old.mountpoint, tree, image_dir)
        held = next(p for p in files if "/b/" in p)
        with reader(tmp_path, files, held, str(old.mountpoint / "a")) as outcome:
            time.sleep(0.3)
            for cycle in range(1, 21):
                status, _, body = old.request("PUT", "/api/v1/daemon/fuse/sendfd")
                assert status == 204, body
                new = spawn(*common, "--upgrade", name=f"d{cycle}", mountpoint=old.mountpoint)
                assert new.state() == "INIT"
                status, _, body = new.request("PUT", "/api/v1/daemon/fuse/takeover")
                assert status == 204, body
                assert new.state() == "READY"
                assert old.request("PUT", "/api/v1/daemon/exit")[0] == 204
                assert old.wait_exit() == 0
                assert new.request("PUT", "/api/v1/daemon/start")[0] == 204
                assert new.state() == "RUNNING"
                assert is_mounted(new.mountpoint)
                old = new
            time.sleep(0.3)
        info = old.request("GET", "/api/v1/daemon")[2]
        assert sorted(info["backend_collection"]) == ["/a", "/b"]
    assert outcome["errors"] == 0, outcome["messages"]
    assert outcome["wrong"] == 0, outcome["messages"]
    assert outcome["reads"] > 100
    assert "upgrade step takeover" in old.log()


def test_failover_ten_times_with_reads_in_flight(spawn, tmp_path: Path) -> None:
    sock = tmp_path / "supervisor.sock"
    (tmp_path / "mnt").mkdir()
    common = ["--id", "d1", "--supervisor", str(sock), "--failover-policy", "resend"]
    env = {"NYDUS_ACTORS_TEST_READ_DELAY": "0.05"}  # so that a kill lands on reads in flight
    with run_supervisor(sock):
        old, tree, image_dir = start_first(spawn, tmp_path, common, env)
        assert old.request("PUT", "/api/v1/daemon/fuse/sendfd")[0] == 204
        files = expected_files(old.mountpoint, tree, image_dir)
        held = next(p for p in files if "/b/" in p)
        with reader(tmp_path, files, held, str(old.mountpoint / "a")) as outcome:
            for _ in range(10):
                deadline = time.monotonic() + 5
                while (
                    old.request("GET", "/api/v1/metrics/inflight")[0] != 200 and time.monotonic() < deadline
                ):
                    time.sleep(0.01)
                old.proc.kill()
                old.proc.wait(timeout=10)
                # the same command line: the same API socket (its stale file stays) and log
                new = spawn(*common, env=env, name="d0", mountpoint=old.mountpoint)
                assert new.state() == "INIT"
                status, _, body = new.request("PUT", "/api/v1/daemon/fuse/takeover")
                assert status == 204, body
                assert new.request("PUT", "/api/v1/daemon/start")[0] == 204
                assert new.request("PUT", "/api/v1/daemon/fuse/sendfd")[0] == 204
                old = new
            time.sleep(0.3)
    assert outcome["errors"] == 0, outcome["messages"]
    assert outcome["wrong"] == 0, outcome["messages"]
    assert outcome["reads"] > 10
    assert "upgrade step takeover" in old.log()
