"""The supervisor protocol (reference §5.1 to §5.5): state bytes plus one fd over a unix stream socket.

A message ends at EOF; the fd travels as SCM_RIGHTS with the first chunk. The daemon is the client.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import time

from nydus_actors.exceptions import UpgradeManagerError, rust_debug_str

logger = logging.getLogger(__name__)

#: Largest state accepted from a peer; the daemon's own state is far smaller.
MAX_STATE_BYTES = 64 * 1024 * 1024

_RECV_CHUNK = 256 * 1024
_FD_SIZE = array.array("i").itemsize
# Room for more fds than a correct peer sends, so that extras arrive (and are closed
# here) instead of the kernel dropping them with MSG_CTRUNC. nydusd accepts 16.
_ANC_SPACE = socket.CMSG_SPACE(16 * _FD_SIZE)
# Linux's sun_path is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107

TIMEOUT = "StorageBackendError(Timeout)"
NO_ENOUGH_FDS = "StorageBackendError(NoEnoughFds)"

# Rust's `decode_error_kind` on Linux, for the errno values a socket call can return.
_RUST_KINDS = {
    errno.ENOENT: "NotFound",
    errno.EACCES: "PermissionDenied",
    errno.EPERM: "PermissionDenied",
    errno.ECONNREFUSED: "ConnectionRefused",
    errno.ECONNRESET: "ConnectionReset",
    errno.ECONNABORTED: "ConnectionAborted",
    errno.ENOTCONN: "NotConnected",
    errno.EADDRINUSE: "AddrInUse",
    errno.EADDRNOTAVAIL: "AddrNotAvailable",
    errno.EPIPE: "BrokenPipe",
    errno.EAGAIN: "WouldBlock",
    errno.EINVAL: "InvalidInput",
    errno.ETIMEDOUT: "TimedOut",
    errno.EINTR: "Interrupted",
    errno.ENOTDIR: "NotADirectory",
    errno.EISDIR: "IsADirectory",
    errno.ELOOP: "FilesystemLoop",
    errno.ENOMEM: "OutOfMemory",
    errno.ENOSPC: "StorageFull",
    errno.ENOSYS: "Unsupported",
    errno.EROFS: "ReadOnlyFilesystem",
}


class StateTooLarge(Exception):
    """A peer sent more than the caller's size bound."""


def io_error_debug(ex: OSError) -> str:
    """Render an OSError as Rust's `{:?}` of the matching `std::io::Error`."""
    if ex.errno is None:
        return f"Custom {{ kind: Other, error: {rust_debug_str(str(ex))} }}"
    kind = _RUST_KINDS.get(ex.errno, "Uncategorized")
    return f"Os {{ code: {ex.errno}, kind: {kind}, message: {rust_debug_str(os.strerror(ex.errno))} }}"


def _path_error(path: str) -> str | None:
    """Rust's own refusals of a unix socket path, made before any system call."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        return 'Error { kind: InvalidInput, message: "paths must not contain interior null bytes" }'
    if len(raw) > _SUN_PATH_MAX:
        return 'Error { kind: InvalidInput, message: "path must be shorter than SUN_LEN" }'
    return None


def _arm(sock: socket.socket, deadline: float) -> None:
    """Give the next socket call whatever is left of the overall deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


def connect(path: str, deadline: float) -> socket.socket:
    """Connect to the supervisor socket at `path` (CLOEXEC, like every Python socket).

    Raises:
        UpgradeManagerError: `CreateUnixStream(..)` or `Timeout`.
    """
    bad = _path_error(path)
    if bad is not None:
        raise UpgradeManagerError(f"StorageBackendError(CreateUnixStream({bad}))")
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _arm(sock, deadline)
            sock.connect(path)
            return sock
        except TimeoutError:
            sock.close()
            raise UpgradeManagerError(TIMEOUT) from None
        except BlockingIOError:
            # A full listen backlog: a blocking connect would wait for the server, so do the same.
            sock.close()
            if time.monotonic() >= deadline:
                raise UpgradeManagerError(TIMEOUT) from None
            time.sleep(0.01)
        except OSError as ex:
            sock.close()
            raise UpgradeManagerError(f"StorageBackendError(CreateUnixStream({io_error_debug(ex)}))") from ex


def send_message(sock: socket.socket, data: bytes, fd: int, deadline: float) -> None:
    """Write `data` with `fd` on the first chunk, then the rest with plain writes.

    Raises:
        OSError, TimeoutError: the socket failed or the deadline passed.
    """
    view = memoryview(data)
    _arm(sock, deadline)
    sent = sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if sent < len(view):
        _arm(sock, deadline)
        sock.sendall(view[sent:])


def _keep_first_fd(ancdata: list[tuple[int, int, bytes]], held: int) -> int:
    """Return the fd to hold: `held`, or the first one in `ancdata`; close every other fd."""
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            continue
        fds = array.array("i")
        fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
        for fd in fds:
            if held < 0:
                held = fd
            else:
                logger.warning("peer sent more than one fd; closing fd %d and using the first", fd)
                os.close(fd)
    return held


def recv_message(sock: socket.socket, deadline: float, max_bytes: int) -> tuple[bytes, int]:
    """Read until EOF; return the data and the first fd received, or -1 if none came.

    Received fds are CLOEXEC. On any error every fd received so far is closed.

    Raises:
        OSError, TimeoutError: the socket failed or the deadline passed.
        StateTooLarge: more than `max_bytes` arrived.
    """
    chunks: list[bytes] = []
    size = 0
    fd = -1
    try:
        while True:
            _arm(sock, deadline)
            data, ancdata, flags, _ = sock.recvmsg(_RECV_CHUNK, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
            fd = _keep_first_fd(ancdata, fd)
            if flags & socket.MSG_CTRUNC:
                logger.warning("peer sent more fds than fit; the kernel closed the rest")
            if not data:
                return b"".join(chunks), fd
            size += len(data)
            if size > max_bytes:
                raise StateTooLarge(f"state larger than {max_bytes} bytes")
            chunks.append(data)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def send_state(path: str, data: bytes, fd: int, *, timeout: float = 10) -> None:
    """Hand `data` and `fd` to the supervisor at `path` (nydusd's `sendfd`, reference §5.2).

    The caller keeps its own `fd`; the supervisor gets a copy.

    Raises:
        UpgradeManagerError: with nydusd's `StorageBackendError(..)` text.
        ValueError: `data` is empty (a stream socket carries no fd without a data byte).
    """
    if fd < 0:
        raise UpgradeManagerError(NO_ENOUGH_FDS)
    if not data:
        raise ValueError("state data must not be empty")
    deadline = time.monotonic() + timeout
    with connect(path, deadline) as sock:
        try:
            send_message(sock, data, fd, deadline)
            # EOF ends the message; close() alone would too, this just makes it explicit.
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise UpgradeManagerError(TIMEOUT) from None
        except OSError as ex:
            raise UpgradeManagerError(f"StorageBackendError(SendFd({io_error_debug(ex)}))") from ex


def receive_state(path: str, *, timeout: float = 10, max_bytes: int = MAX_STATE_BYTES) -> tuple[bytes, int]:
    """Fetch the state and fd the supervisor at `path` holds (nydusd's takeover, reference §5.3).

    The returned fd is CLOEXEC and belongs to the caller.

    Raises:
        UpgradeManagerError: with nydusd's `StorageBackendError(..)` text; `NoEnoughFds` when
            the supervisor sent no fd (for example because it holds nothing).
    """
    deadline = time.monotonic() + timeout
    with connect(path, deadline) as sock:
        try:
            # Saying at once that nothing will be sent lets our supervisor answer without
            # waiting out its save-or-fetch window; a snapshotter supervisor only writes.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            data, fd = recv_message(sock, deadline, max_bytes)
        except TimeoutError:
            raise UpgradeManagerError(TIMEOUT) from None
        except StateTooLarge as ex:
            detail = f"Custom {{ kind: InvalidData, error: {rust_debug_str(str(ex))} }}"
            raise UpgradeManagerError(f"StorageBackendError(RecvFd({detail}))") from None
        except OSError as ex:
            raise UpgradeManagerError(f"StorageBackendError(RecvFd({io_error_debug(ex)}))") from ex
    if fd < 0:
        raise UpgradeManagerError(NO_ENOUGH_FDS)
    logger.debug("received %d state bytes and fd %d from %s", len(data), fd, path)
    return data, fd
