"""The daemon side of the supervisor protocol, against a snapshotter-style supervisor."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from nydus_actors.exceptions import UpgradeManagerError
from nydus_actors.upgrade.protocol import io_error_debug, receive_state, send_state
from tests.upgrade.snapshotter_supervisor import fetch_daemon_states, send_states_timeout, serve_once

MIB = 1024 * 1024


@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "sup.sock")


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def temp_fd(tmp_path) -> Iterator[int]:
    fd = os.open(tmp_path / "fuse-stand-in", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def assert_same_pipe(read_end: int, write_copy: int) -> None:
    """`write_copy` is the write end of the pipe whose read end is `read_end`."""
    assert os.fstat(write_copy).st_ino == os.fstat(read_end).st_ino
    assert os.fstat(write_copy).st_dev == os.fstat(read_end).st_dev
    os.write(write_copy, b"through the copy")
    assert os.read(read_end, 100) == b"through the copy"


def assert_same_description(fd: int, other: int) -> None:
    """Both fds share one open file description: same file, and one shared offset."""
    a, b = os.fstat(fd), os.fstat(other)
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"written through one")
    assert os.lseek(other, 0, os.SEEK_CUR) == len(b"written through one")
    assert os.pread(other, 100, 0).startswith(b"written through one")
    os.lseek(fd, 7, os.SEEK_SET)
    assert os.lseek(other, 0, os.SEEK_CUR) == 7


def assert_cloexec(fd: int) -> None:
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not os.get_inheritable(fd)


def test_send_state_small_to_snapshotter(sock_path, pipe):
    r, w = pipe
    got = fetch_daemon_states(sock_path, lambda: send_state(sock_path, b"small state", w))
    try:
        assert got.data == b"small state"
        assert (got.fd_count, got.fd_chunk) == (1, 0)
        assert_same_pipe(r, got.fd)
    finally:
        os.close(got.fd)


def test_send_state_large_sends_fd_once_with_first_chunk(sock_path, temp_fd):
    data = os.urandom(MIB)
    got = fetch_daemon_states(sock_path, lambda: send_state(sock_path, data, temp_fd))
    try:
        assert got.data == data
        assert got.chunks > 1  # really split, so the "fd only once" check means something
        assert (got.fd_count, got.fd_chunk) == (1, 0)
        assert_same_description(temp_fd, got.fd)
    finally:
        os.close(got.fd)


@pytest.mark.parametrize("size", [11, MIB])
def test_receive_state_from_snapshotter(sock_path, temp_fd, size):
    data = os.urandom(size)
    sender = send_states_timeout(sock_path, data, temp_fd, timeout=5)
    got, fd = receive_state(sock_path, timeout=5)
    try:
        sender.wait()
        assert got == data
        assert_cloexec(fd)
        assert_same_description(temp_fd, fd)
    finally:
        os.close(fd)


def test_round_trip_through_snapshotter(sock_path, pipe):
    """sendfd, then a takeover from what the snapshotter kept: the fd is the original pipe."""
    r, w = pipe
    got = fetch_daemon_states(sock_path, lambda: send_state(sock_path, b"state v1", w))
    try:
        sender = send_states_timeout(sock_path, got.data, got.fd, timeout=5)
        data, fd = receive_state(sock_path)
        sender.wait()
    finally:
        os.close(got.fd)
    try:
        assert data == b"state v1"
        assert_same_pipe(r, fd)
    finally:
        os.close(fd)


def test_connect_to_missing_path(sock_path):
    expected = (
        "StorageBackendError(CreateUnixStream(Os { code: 2, kind: NotFound, "
        'message: "No such file or directory" }))'
    )
    with pytest.raises(UpgradeManagerError) as info:
        receive_state(sock_path)
    assert info.value.detail == expected
    with pytest.raises(UpgradeManagerError) as info:
        send_state(sock_path, b"x", 0)
    assert info.value.detail == expected


def test_connect_to_stale_socket_is_refused(sock_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(sock_path)  # the file stays, nobody listens
    with pytest.raises(UpgradeManagerError) as info:
        receive_state(sock_path)
    assert info.value.detail == (
        "StorageBackendError(CreateUnixStream(Os { code: 111, kind: ConnectionRefused, "
        'message: "Connection refused" }))'
    )


def test_path_too_long_is_refused_like_rust(tmp_path):
    with pytest.raises(UpgradeManagerError) as info:
        receive_state(str(tmp_path / ("x" * 120)))
    assert info.value.detail == (
        "StorageBackendError(CreateUnixStream(Error { kind: InvalidInput, "
        'message: "path must be shorter than SUN_LEN" }))'
    )


def test_server_sending_no_fd(sock_path):
    sender = serve_once(sock_path, b"data but no fd", [], timeout=5)
    with pytest.raises(UpgradeManagerError) as info:
        receive_state(sock_path)
    sender.wait()
    assert info.value.detail == "StorageBackendError(NoEnoughFds)"


def test_extra_fds_are_closed_and_the_first_kept(sock_path, pipe, temp_fd, caplog):
    r, w = pipe
    before = _open_fds()
    sender = serve_once(sock_path, b"three fds", [w, temp_fd, r], timeout=5)
    with caplog.at_level(logging.WARNING, logger="nydus_actors.upgrade.protocol"):
        data, fd = receive_state(sock_path)
    sender.wait()
    try:
        assert data == b"three fds"
        assert_same_pipe(r, fd)
    finally:
        os.close(fd)
    assert _open_fds() == before
    assert "more than one fd" in caplog.text


def test_state_over_the_size_bound(sock_path, temp_fd):
    before = _open_fds()
    sender = serve_once(sock_path, b"y" * 5000, [temp_fd], timeout=5)
    with pytest.raises(UpgradeManagerError) as info:
        receive_state(sock_path, max_bytes=1000)
    sender.wait()
    assert info.value.detail == (
        'StorageBackendError(RecvFd(Custom { kind: InvalidData, error: "state larger than 1000 bytes" }))'
    )
    assert _open_fds() == before


def test_receive_times_out_when_nothing_comes(sock_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(sock_path)
        server.listen(1)  # connects succeed from the backlog; nothing is ever sent
        with pytest.raises(UpgradeManagerError) as info:
            receive_state(sock_path, timeout=0.3)
    assert info.value.detail == "StorageBackendError(Timeout)"


def test_send_times_out_when_nobody_reads(sock_path, temp_fd):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(sock_path)
        server.listen(1)
        with pytest.raises(UpgradeManagerError) as info:
            send_state(sock_path, bytes(8 * MIB), temp_fd, timeout=0.3)
    assert info.value.detail == "StorageBackendError(Timeout)"


def test_send_without_fd_fails_before_connecting(sock_path):
    with pytest.raises(UpgradeManagerError) as info:
        send_state(sock_path, b"state", -1)
    assert info.value.detail == "StorageBackendError(NoEnoughFds)"


def test_send_refuses_empty_state(sock_path, temp_fd):
    with pytest.raises(ValueError):
        send_state(sock_path, b"", temp_fd)


def test_io_error_debug_matches_rust():
    assert io_error_debug(OSError(errno.EPERM, "x")) == (
        'Os { code: 1, kind: PermissionDenied, message: "Operation not permitted" }'
    )
    assert io_error_debug(OSError(errno.ENXIO, "x")) == (
        'Os { code: 6, kind: Uncategorized, message: "No such device or address" }'
    )
