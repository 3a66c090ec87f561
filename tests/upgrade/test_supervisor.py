"""The `supervisor` program, run as a subprocess and driven through the daemon-side protocol."""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from nydus_actors.exceptions import UpgradeManagerError
from nydus_actors.upgrade.protocol import receive_state, recv_message, send_state
from tests.upgrade.test_protocol import assert_cloexec, assert_same_description, assert_same_pipe

REPO = Path(__file__).resolve().parents[2]
# Straight to the module: faster than the full CLI, and independent of the daemon's imports.
DIRECT = ["-c", "import sys; from nydus_actors.supervisor import main; sys.exit(main(sys.argv[1:]))"]
VIA_CLI = ["-m", "nydus_actors", "supervisor"]

# Connects, sends the first part of a state with an fd, says so, then waits to be killed.
KILLED_MID_MESSAGE = r"""
import array, os, socket, sys, time
path, part = sys.argv[1], bytes.fromhex(sys.argv[2])
r, w = os.pipe()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
print("sent", flush=True)
time.sleep(60)
"""


class SupervisorProcess:
    """One supervisor subprocess, its stderr in a file."""

    def __init__(self, socks: list[str], log: Path, entry: list[str]) -> None:
        self.socks = socks
        self.log_path = log
        args = [a for s in socks for a in ("--sock", s)]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *entry, *args, "--log-level", "debug"],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None:
                pytest.fail(f"supervisor exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {count} x {text!r} in the supervisor log:\n{self.log()}")
            time.sleep(0.01)

    def wait_ready(self) -> SupervisorProcess:
        for sock in self.socks:
            self.wait_log(f"listening on {sock}")
        return self

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_targets(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed while listing
                out.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def start(tmp_path) -> Iterator:
    """Start supervisors; every one still running at the end is killed by PID."""
    started: list[SupervisorProcess] = []

    def _start(*socks: str, entry: list[str] = DIRECT, ready: bool = True) -> SupervisorProcess:
        sup = SupervisorProcess(list(socks), tmp_path / f"supervisor-{len(started)}.log", entry)
        started.append(sup)
        return sup.wait_ready() if ready else sup

    try:
        yield _start
    finally:
        for sup in started:
            sup.kill()


@pytest.fixture
def sock(tmp_path) -> str:
    return str(tmp_path / "d1.sock")


def _file_fd(tmp_path: Path, name: str) -> int:
    return os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)


def _envelope(note: str) -> bytes:
    return msgpack.packb(
        {"format": "nydus-actors/state", "version": 1, "daemon": {"id": note}, "mounts": ["m" * 4000]}
    )


def _wait_for(predicate, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached")
        time.sleep(0.01)


def test_save_then_fetch_twice(start, sock, tmp_path):
    sup = start(sock)
    fd = _file_fd(tmp_path, "fuse")
    try:
        send_state(sock, b"state one", fd)
        fetched = [receive_state(sock), receive_state(sock)]
        try:
            for data, copy in fetched:
                assert data == b"state one"
                assert_cloexec(copy)
                assert_same_description(fd, copy)
            assert_same_description(fetched[0][1], fetched[1][1])
        finally:
            for _, copy in fetched:
                os.close(copy)
    finally:
        os.close(fd)
    sup.wait_log(f"save on {sock}: 9 bytes + fd in")
    sup.wait_log(f"fetch on {sock}: 9 bytes + fd in", count=2)


def test_fetch_with_nothing_stored(start, sock):
    start(sock)
    with pytest.raises(UpgradeManagerError) as info:
        receive_state(sock, timeout=5)
    assert info.value.detail == "StorageBackendError(NoEnoughFds)"


def test_save_replaces_state_and_closes_the_old_fd(start, sock, tmp_path):
    sup = start(sock)
    old_fd, new_fd = _file_fd(tmp_path, "old"), _file_fd(tmp_path, "new")
    try:
        send_state(sock, b"old state", old_fd)
        send_state(sock, b"new state, longer", new_fd)
        data, fd = receive_state(sock)
        try:
            assert data == b"new state, longer"
            assert_same_description(new_fd, fd)
        finally:
            os.close(fd)
    finally:
        os.close(old_fd)
        os.close(new_fd)
    # Saves run on their own threads; whichever order they finish in, the later one wins.
    sup.wait_log(f"save on {sock}: ", count=2)
    log = sup.log()
    assert "(replaced 9 bytes)" in log or "9 bytes ignored: a later save came first" in log
    assert str(tmp_path / "old") not in sup.fd_targets()
    assert str(tmp_path / "new") in sup.fd_targets()


def test_sender_killed_mid_message_keeps_previous_state(start, sock, tmp_path):
    sup = start(sock)
    good = _envelope("good")
    fd = _file_fd(tmp_path, "fuse")
    client = None
    try:
        send_state(sock, good, fd)
        half = _envelope("newer")[:2000]
        client = subprocess.Popen(
            [sys.executable, "-c", KILLED_MID_MESSAGE, sock, half.hex()], stdout=subprocess.PIPE
        )
        assert client.stdout.readline() == b"sent\n"
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
        sup.wait_log("state cut short after 2000 bytes")
        data, copy = receive_state(sock)
        try:
            assert data == good
            assert_same_description(fd, copy)
        finally:
            os.close(copy)
    finally:
        os.close(fd)
        if client is not None and client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
            client.wait()


def test_save_without_fd_is_ignored(start, sock, pipe_fds):
    sup = start(sock)
    r, w = pipe_fds
    send_state(sock, b"kept", w)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(sock)
        raw.sendall(b"no fd here")
    sup.wait_log("10 bytes without an fd; ignored")
    data, fd = receive_state(sock)
    try:
        assert data == b"kept"
        assert_same_pipe(r, fd)
    finally:
        os.close(fd)


def test_nydusd_style_fetch_waits_out_the_window(start, sock, pipe_fds):
    """A client that neither sends nor half-closes (nydusd's restore) is served after the window."""
    start(sock)
    r, w = pipe_fds
    send_state(sock, b"for nydusd", w)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(sock)
        data, fd = recv_message(raw, time.monotonic() + 5, 1 << 20)
    try:
        assert data == b"for nydusd"
        assert_same_pipe(r, fd)
    finally:
        os.close(fd)


def test_two_sockets_keep_separate_states(start, tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    start(a, b)
    fd_a, fd_b = _file_fd(tmp_path, "fa"), _file_fd(tmp_path, "fb")
    try:
        send_state(a, b"state of a", fd_a)
        send_state(b, b"state of b", fd_b)
        for path, want, orig in ((a, b"state of a", fd_a), (b, b"state of b", fd_b)):
            data, fd = receive_state(path)
            try:
                assert data == want
                assert_same_description(orig, fd)
            finally:
                os.close(fd)
    finally:
        os.close(fd_a)
        os.close(fd_b)


@pytest.mark.parametrize(("entry", "signum"), [(DIRECT, signal.SIGTERM), (VIA_CLI, signal.SIGINT)])
def test_stop_signal_exits_zero_and_removes_sockets(start, tmp_path, pipe_fds, entry, signum):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    sup = start(a, b, entry=entry)
    send_state(a, b"held", pipe_fds[1])
    os.kill(sup.pid, signum)
    assert sup.proc.wait(timeout=10) == 0
    assert not os.path.exists(a)
    assert not os.path.exists(b)
    assert "supervisor stopped" in sup.log()


def test_stale_socket_is_replaced_and_private(start, sock, pipe_fds):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(sock)
    start(sock)
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    send_state(sock, b"after stale", pipe_fds[1])
    data, fd = receive_state(sock)
    os.close(fd)
    assert data == b"after stale"


def test_refuses_a_live_socket_and_a_regular_file(start, sock, tmp_path):
    first = start(sock)
    second = start(sock, ready=False)
    assert second.proc.wait(timeout=10) == 1
    assert "another process is listening on" in second.log()
    assert first.proc.poll() is None
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    third = start(str(plain), ready=False)
    assert third.proc.wait(timeout=10) == 1
    assert "is not a socket" in third.log()
    assert plain.read_text() == "not a socket"


def test_many_sequential_connections(start, sock, tmp_path):
    sup = start(sock)
    fd = _file_fd(tmp_path, "fuse")
    try:
        send_state(sock, b"warm-up", fd)
        data, copy = receive_state(sock)
        os.close(copy)
        _wait_for(lambda: "fetch on" in sup.log())
        baseline = sup.fd_count()
        began = time.monotonic()
        for i in range(120):
            payload = f"state {i}".encode() * (1 + i % 7)
            send_state(sock, payload, fd)
            data, copy = receive_state(sock)
            os.close(copy)
            assert data == payload
            if i % 10 == 0:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
                    idle.connect(sock)  # and closes without a word
        # Half-closing fetches never wait out the save-or-fetch window.
        assert time.monotonic() - began < 120 * 0.25
        _wait_for(lambda: sup.log().count("closed without sending anything") == 12)
        _wait_for(lambda: sup.fd_count() == baseline)
    finally:
        os.close(fd)
    assert sup.proc.poll() is None


@pytest.fixture
def pipe_fds() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def test_save_sent_after_the_window_is_reported(start, sock, tmp_path):
    """A save that starts too late is served as a fetch; the supervisor says so in its log."""
    sup = start(sock)
    fd = _file_fd(tmp_path, "fuse")
    try:
        # Larger than the socket buffers, so the fetch is still sending when the late data comes.
        send_state(sock, bytes(8 * 1024 * 1024), fd)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
            late.connect(sock)
            time.sleep(0.35)
            late.sendmsg([b"late save"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            with contextlib.suppress(ConnectionResetError):
                _, copy = recv_message(late, time.monotonic() + 5, 16 * 1024 * 1024)
                os.close(copy)
    finally:
        os.close(fd)
    sup.wait_log("a save was taken for a fetch and lost")
