"""nydus-snapshotter's supervisor behaviour (reference §5.5), re-created from its description.

The daemon-side protocol is tested against this, so it shares no code with `nydus_actors`.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_FD_SIZE = array.array("i").itemsize
# The snapshotter reads with a 256 KiB data buffer and room for 64 fds.
_DATA_BUFFER = 256 * 1024
_OOB_BUFFER = socket.CMSG_SPACE(64 * _FD_SIZE)


@dataclass
class Received:
    """What one `fetch_daemon_states` read."""

    data: bytes
    fd: int  #: the first fd of the first SCM_RIGHTS message; the caller closes it
    fd_count: int  #: every fd that arrived (the extras are already closed)
    fd_chunk: int  #: index of the read that carried the first fd
    chunks: int  #: how many reads returned data


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    return server


def _read_until_eof(conn: socket.socket) -> Received:
    data: list[bytes] = []
    fds: list[int] = []
    fd_chunk = -1
    while True:
        chunk, ancdata, _, _ = conn.recvmsg(_DATA_BUFFER, _OOB_BUFFER, socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                if got and fd_chunk < 0:
                    fd_chunk = len(data)
                fds.extend(got)
        if not chunk:
            break
        data.append(chunk)
    if not fds:
        raise RuntimeError("received no control file descriptor")
    for extra in fds[1:]:
        os.close(extra)
    return Received(b"".join(data), fds[0], len(fds), fd_chunk, len(data))


def fetch_daemon_states(path: str, trigger: Callable[[], object], *, timeout: float = 10) -> Received:
    """Listen on `path`, run `trigger` (the daemon's `sendfd`) concurrently, read one connection.

    The snapshotter waits without limit; `timeout` keeps a broken test from hanging.
    An exception raised by `trigger` is re-raised here.
    """
    failures: list[BaseException] = []

    def run_trigger() -> None:
        try:
            trigger()
        except BaseException as ex:
            failures.append(ex)

    deadline = time.monotonic() + timeout
    with _listen(path) as server:
        server.settimeout(0.05)
        thread = threading.Thread(target=run_trigger, name="trigger")
        thread.start()
        try:
            while True:
                try:
                    conn, _ = server.accept()
                    break
                except TimeoutError:
                    # A trigger that failed before connecting will never connect.
                    if failures:
                        raise failures[0] from None
                    if time.monotonic() > deadline:
                        raise
            with conn:
                conn.settimeout(timeout)
                received = _read_until_eof(conn)
        finally:
            thread.join(timeout)
            os.unlink(path)
    if failures:
        os.close(received.fd)
        raise failures[0]
    return received


class Sender:
    """A listener that serves one connection from a background thread."""

    def __init__(self, path: str, data: bytes, fds: Sequence[int], timeout: float) -> None:
        self._path = path
        self._server = _listen(path)
        self._server.settimeout(timeout)
        self._data = data
        self._fds = list(fds)
        self.error: BaseException | None = None
        self.accepted = False
        self._thread = threading.Thread(target=self._run, name="send-states")
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._server:
                conn, _ = self._server.accept()
            self.accepted = True
            with conn:
                view = memoryview(self._data)
                ancdata = []
                if self._fds:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self._fds))]
                sent = conn.sendmsg([view], ancdata)
                while sent < len(view):
                    sent += conn.send(view[sent:])
        except BaseException as ex:
            self.error = ex
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def wait(self, timeout: float = 10) -> None:
        """Wait for the send to finish; re-raise what failed in it."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("sender still running")
        if self.error is not None:
            raise self.error


def serve_once(path: str, data: bytes, fds: Sequence[int], timeout: float) -> Sender:
    """Like `send_states_timeout`, but with any list of fds (none, or several)."""
    return Sender(path, data, fds, timeout)


def send_states_timeout(path: str, data: bytes, fd: int, timeout: float) -> Sender:
    """Listen on `path`; send `data` with `fd` on the first chunk to the first client within `timeout`."""
    return Sender(path, data, [fd], timeout)
