"""The real daemon through its CLI, its FUSE mount and its unix socket, as a user drives it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nydus_actors.version import build_info
from tests.integration.harness import force_unmount, is_mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


def make_tree(root: Path, seed: int) -> Path:
    """A small tree with every file type passthrough serves."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").write_bytes(b"")
    (root / "hello.txt").write_text(f"hello from tree {seed}\n")
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    sub = root / "dir" / "nested"
    sub.mkdir(parents=True)
    (sub / "deep.txt").write_text("deep\n" * 1000)
    (root / "dir" / "mode600").write_text("private")
    os.chmod(root / "dir" / "mode600", 0o600)
    os.symlink("hello.txt", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "hello.txt", root / "hardlink")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "hello.txt", b"user.color", b"blue")
    os.utime(root / "dir" / "nested" / "deep.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.chown(root / "dir" / "mode600", 1234, 5678)
    return root


def walk(root: Path) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = os.lstat(path)
    return out


def assert_same_tree(source: Path, mounted: Path, *, same_inodes: bool) -> None:
    expected = walk(source)
    actual = walk(mounted)
    assert sorted(actual) == sorted(expected)
    for rel, want in expected.items():
        got = actual[rel]
        for field in ("st_mode", "st_size", "st_uid", "st_gid", "st_nlink", "st_mtime_ns", "st_rdev"):
            assert getattr(got, field) == getattr(want, field), (rel, field)
        if same_inodes:
            assert got.st_ino == want.st_ino, rel
        src, dst = source / rel, mounted / rel
        if stat.S_ISREG(want.st_mode):
            assert dst.read_bytes() == src.read_bytes(), rel
        elif stat.S_ISLNK(want.st_mode):
            assert os.readlink(dst) == os.readlink(src), rel
        assert sorted(os.listxattr(dst, follow_symlinks=False)) == sorted(
            os.listxattr(src, follow_symlinks=False)
        )
    assert os.getxattr(mounted / "hello.txt", "user.color") == b"blue"


def transitions(log: str) -> list[str]:
    return re.findall(r"state machine: (\w+ -> \w+) on (\w+)", log)


def test_shared_dir_and_api_mounts(spawn, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", 1)
    daemon = spawn("--shared-dir", str(tree))
    daemon.wait_socket()
    assert is_mounted(daemon.mountpoint)
    assert daemon.state() == "RUNNING"
    assert transitions(daemon.log()) == [("INIT -> INIT", "Mount"), ("INIT -> RUNNING", "Start")]
    assert_same_tree(tree, daemon.mountpoint, same_inodes=True)
    with pytest.raises(OSError) as info:
        (daemon.mountpoint / "new").write_text("x")
    assert info.value.errno == 30  # EROFS
    with pytest.raises(FileNotFoundError):
        os.stat(daemon.mountpoint / "missing")

    second = make_tree(tmp_path / "second", 2)
    status, _, _ = daemon.request(
        "POST",
        "/api/v1/mount?mountpoint=/b",
        {"source": str(second), "fs_type": "passthrough_fs", "config": ""},
    )
    assert status == 204
    assert "b" in os.listdir(daemon.mountpoint)
    assert_same_tree(second, daemon.mountpoint / "b", same_inodes=False)
    info = daemon.request("GET", "/api/v1/daemon")[2]
    assert sorted(info["backend_collection"]) == ["/", "/b"]
    assert info["backend_collection"]["/b"]["backend_type"] == "PassthroughFs"

    status, _, _ = daemon.request("DELETE", "/api/v1/mount?mountpoint=/b")
    assert status == 204
    assert "b" not in os.listdir(daemon.mountpoint)
    assert not (daemon.mountpoint / "b").exists()
    assert sorted(daemon.request("GET", "/api/v1/daemon")[2]["backend_collection"]) == ["/"]


def test_shared_daemon_mode_mounts_through_api(spawn, tmp_path: Path) -> None:
    """nydus-snapshotter's shared-daemon command line: no start-up filesystem at all."""
    tree = make_tree(tmp_path / "tree", 3)
    daemon = spawn(
        "fuse",
        "--thread-num",
        "4",
        "--id",
        "cq8snap",
        "--log-rotation-size",
        "100",
        "--supervisor",
        str(tmp_path / "supervisor.sock"),
        "--failover-policy",
        "resend",
        "--backend-source",
        "x",
    )
    daemon.wait_socket()
    assert daemon.state() == "RUNNING"
    assert os.listdir(daemon.mountpoint) == []
    status, _, _ = daemon.request(
        "POST",
        "/api/v1/mount?mountpoint=%2Fsnap1",
        {"source": str(tree), "fs_type": "passthroughfs", "config": ""},
    )
    assert status == 204
    assert (daemon.mountpoint / "snap1" / "hello.txt").read_text() == "hello from tree 3\n"
    assert "--backend-source x is ignored" in daemon.log()
    info = daemon.request("GET", "/api/v1/daemon")[2]
    assert info["id"] == "cq8snap" and info["supervisor"] == str(tmp_path / "supervisor.sock")
    status, _, body = daemon.request("PUT", "/api/v1/daemon/fuse/sendfd")
    assert status == 500 and "CreateUnixStream" in body["message"]  # nobody listens there


def assert_clean_exit(daemon, *, code: int = 0) -> None:
    assert daemon.wait_exit() == code, daemon.stderr()
    log = daemon.log()
    assert "all actors and threads stopped" in log
    assert "still alive" not in log
    assert not daemon.apisock.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts(spawn, tmp_path: Path, signum: int) -> None:
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 4)))
    daemon.wait_socket()
    daemon.proc.send_signal(signum)
    assert_clean_exit(daemon)
    assert not is_mounted(daemon.mountpoint)
    assert transitions(daemon.log())[-2:] == [("RUNNING -> READY", "Stop"), ("READY -> STOPPED", "Stop")]


def test_exit_keeps_the_mount(spawn, tmp_path: Path) -> None:
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 5)))
    status, _, body = daemon.request("PUT", "/api/v1/daemon/exit")
    assert status == 204 and body is None
    assert_clean_exit(daemon)
    # nydusd semantics: exit stops serving but does not unmount; with nobody holding
    # the FUSE connection any more the mount is dead until someone removes it.
    assert is_mounted(daemon.mountpoint)
    with pytest.raises(OSError) as info:
        os.listdir(daemon.mountpoint)
    assert info.value.errno in (107, 103)  # ENOTCONN / ECONNABORTED
    force_unmount(daemon.mountpoint)
    assert transitions(daemon.log())[-2:] == [("RUNNING -> READY", "Stop"), ("READY -> STOPPED", "Exit")]


def test_external_umount_stops_the_daemon(spawn, tmp_path: Path) -> None:
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 6)))
    daemon.wait_socket()
    subprocess.run(["umount", "-l", str(daemon.mountpoint)], check=True)
    assert_clean_exit(daemon)
    assert "FUSE session ended" in daemon.log()


def test_inflight_shows_a_busy_read(spawn, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", 7)
    daemon = spawn("--shared-dir", str(tree), env={"NYDUS_ACTORS_TEST_READ_DELAY": "1.5"})
    assert daemon.request("GET", "/api/v1/metrics/inflight")[0] == 204
    done = threading.Event()

    def reader() -> None:
        (daemon.mountpoint / "hello.txt").read_bytes()
        done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    reads: list[dict] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not reads:
        status, _, body = daemon.request("GET", "/api/v1/metrics/inflight")
        if status == 200:  # an OPEN may show first; wait for the delayed READ
            reads = [entry for entry in body if entry["opcode"] == 15]
        time.sleep(0.05)
    thread.join()
    assert done.is_set()
    assert reads
    assert reads[0]["inode"] == os.stat(tree / "hello.txt").st_ino
    assert abs(reads[0]["timestamp_secs"] - time.time()) < 30
    assert set(reads[0]) == {"inode", "opcode", "unique", "timestamp_secs"}
    assert daemon.request("GET", "/api/v1/metrics/inflight")[0] == 204


def test_http_framing_over_the_socket(spawn, tmp_path: Path) -> None:
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 8)))
    daemon.wait_socket()
    assert stat.S_IMODE(os.stat(daemon.apisock).st_mode) == 0o600
    status, headers, body = daemon.request("GET", "/api/v1/daemon")
    assert status == 200
    assert headers.get_all("Server") == ["Nydus API"]
    assert headers["Content-Type"] == "application/json"
    assert body["version"]["git_commit"] == build_info().git_commit
    status, headers, _ = daemon.request("PUT", "/api/v1/daemon", {"log_level": "info"})
    assert status == 204
    assert headers.get_all("Server") == ["Nydus API"]
    assert "Content-Type" not in headers
    assert headers.get("Content-Length", "0") == "0"
    status, _, body = daemon.request("GET", "/api/v1/nope")
    assert (status, body["message"]) == (404, "NoRoute")
    # a body over 51,200 bytes is refused and the daemon keeps serving
    status, _, body = daemon.request("PUT", "/api/v1/daemon", {"log_level": "info", "pad": "x" * 60_000})
    assert status == 400 and "larger than the limit of 51200" in body["message"]
    assert daemon.state() == "RUNNING"
    # one line per request in the log: method, path, status, elapsed, size
    assert re.search(r"API GET /api/v1/daemon 200 [\d.]+ms \d+B", daemon.log())


def test_idle_connection_stays_open(spawn, tmp_path: Path) -> None:
    """The snapshotter's liveness probe: an idle connection must never be closed."""
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 9)))
    daemon.wait_socket()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(daemon.apisock))
    try:
        for _ in range(20):
            assert daemon.state() == "RUNNING"
            time.sleep(0.1)
        probe.setblocking(False)
        with pytest.raises(BlockingIOError):
            probe.recv(1)  # nothing to read and not closed
        probe.setblocking(True)
        probe.sendall(b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        probe.close()


def test_stale_socket_file_is_replaced(spawn, tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "d-api.sock"
    stale.bind(str(path))
    stale.close()
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 10)))
    assert daemon.state() == "RUNNING"


def test_crashed_daemon_is_detected(spawn, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", 11)
    first = spawn("--shared-dir", str(tree))
    first.wait_socket()
    first.proc.kill()
    first.proc.wait(timeout=10)
    assert is_mounted(first.mountpoint) and first.apisock.exists()
    second = spawn("--shared-dir", str(tree))  # same mountpoint and socket: a failover start
    assert second.mountpoint == first.mountpoint
    assert second.state() == "INIT"
    status, _, body = second.request("PUT", "/api/v1/daemon/fuse/takeover")
    assert (
        status == 500
        and body["message"] == 'Upgrade(DaemonAbnormal(UpgradeManager("MissingSupervisorPath")))'
    )
    assert second.state() == "INIT"
    assert second.request("PUT", "/api/v1/daemon/exit")[0] == 204
    assert_clean_exit(second)
    force_unmount(first.mountpoint)


def test_upgrade_flag_waits_in_init(spawn, tmp_path: Path) -> None:
    daemon = spawn("--upgrade", "--shared-dir", str(make_tree(tmp_path / "tree", 12)))
    assert daemon.state() == "INIT"
    assert not is_mounted(daemon.mountpoint)
    status, _, body = daemon.request("PUT", "/api/v1/daemon/start")
    assert status == 400 and body["message"] == 'Configure(DaemonAbnormal(UnexpectedEvent("Start")))'
    daemon.proc.send_signal(signal.SIGTERM)
    assert_clean_exit(daemon)


def test_systemd_notify(spawn, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(notify_path))
    sink.settimeout(20)
    try:
        daemon = spawn(
            "--shared-dir", str(make_tree(tmp_path / "tree", 13)), env={"NOTIFY_SOCKET": str(notify_path)}
        )
        assert sink.recv(256) == b"READY=1"
        assert daemon.apisock.exists() and daemon.state() == "RUNNING"
        daemon.proc.send_signal(signal.SIGTERM)
        assert sink.recv(256) == b"STOPPING=1"
        assert_clean_exit(daemon)
    finally:
        sink.close()


def test_json_logs(spawn, tmp_path: Path) -> None:
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 14)), "--log-format", "json")
    daemon.state()
    daemon.proc.send_signal(signal.SIGTERM)
    assert_clean_exit(daemon)
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("INIT -> RUNNING" in entry["message"] for entry in entries)


def test_version_matches_daemon_info(spawn, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nydus_actors", "--version"], capture_output=True, text=True, check=True
    )
    commit = re.search(r"Git Commit:\s*(.+)", out.stdout).group(1).strip()
    assert re.search(r"Version:\s*v\d", out.stdout)
    daemon = spawn("--shared-dir", str(make_tree(tmp_path / "tree", 15)))
    assert daemon.request("GET", "/api/v1/daemon")[2]["version"]["git_commit"] == commit
