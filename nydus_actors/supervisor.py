"""`nydus-actors supervisor`: holds each daemon's last saved state and fd while daemons come and go.

The server side of the supervisor protocol (reference §5.5, `upgrade.protocol`), one slot per `--sock`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator

import msgpack

from nydus_actors._lib import logs
from nydus_actors.upgrade.protocol import MAX_STATE_BYTES, StateTooLarge, recv_message, send_message

logger = logging.getLogger(__name__)

#: The protocol has no direction marker: a client that sends nothing within this window
#: is waiting to be sent the stored state.
CLASSIFY_WINDOW = 0.25
#: How long one save or fetch may take before its connection is dropped.
TRANSFER_TIMEOUT = 30.0
#: How long shutdown waits for transfers in progress.
DRAIN_TIMEOUT = 2.0

_MSGPACK_MAP_HEADS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


class SupervisorError(Exception):
    """The supervisor cannot serve a socket path."""


class _Slot:
    """The state one daemon saved last, and the fd that came with it.

    Connections get tickets in accept order. A fetch waits for every earlier connection
    that may be a save, so a daemon that saved and then fetched (or a new daemon fetching
    right after the old one saved) sees that save, although each runs on its own thread.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._data = b""
        self._fd = -1
        self._fd_ticket = -1
        self._next_ticket = 0
        self._unsettled: set[int] = set()
        self._closed = False

    def ticket(self) -> int:
        """Number a newly accepted connection; call in accept order."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._unsettled.add(ticket)
            return ticket

    def settle(self, ticket: int) -> None:
        """Mark a connection as not (or no longer) a save in progress."""
        with self._cond:
            self._unsettled.discard(ticket)
            self._cond.notify_all()

    def store(self, ticket: int, data: bytes, fd: int) -> int | None:
        """Take ownership of `fd` and hold it with `data`; return the size replaced, if any.

        Raises:
            SupervisorError: shutting down, or a later save already replaced the state.
        """
        with self._cond:
            self._unsettled.discard(ticket)
            self._cond.notify_all()
            if self._closed or ticket < self._fd_ticket:
                os.close(fd)
                raise SupervisorError("shutting down" if self._closed else "a later save came first")
            old_fd, old_size = self._fd, len(self._data)
            self._data, self._fd, self._fd_ticket = data, fd, ticket
        if old_fd < 0:
            return None
        # Only now: until the new fd was held, the old one may have been all that kept
        # the FUSE connection alive.
        os.close(old_fd)
        return old_size

    def copy(self, ticket: int, timeout: float) -> tuple[bytes, int] | None:
        """Return the held data and a duplicate of the held fd (the caller closes it).

        Waits up to `timeout` for saves accepted before `ticket` to finish.
        """
        with self._cond:
            self._unsettled.discard(ticket)
            if not self._cond.wait_for(lambda: min(self._unsettled, default=ticket) >= ticket, timeout):
                logger.warning(
                    "fetch on %s: an earlier save is still running; serving the state held", self.path
                )
            if self._fd < 0:
                return None
            # A duplicate, so that a save replacing the state mid-send cannot close it under us.
            return self._data, os.dup(self._fd)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _cut_short(data: bytes) -> bool:
    """Whether `data` is a msgpack map that ends before its last entry.

    EOF is the protocol's only end marker, so a daemon killed while sending looks like one
    that finished. Its state is one msgpack map (design §7), and a map cut short is exactly
    that partial save. Anything else is opaque and kept as sent.
    """
    if not data or data[0] not in _MSGPACK_MAP_HEADS:
        return False
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    try:
        unpacker.skip()
    except msgpack.OutOfData:
        return True
    except ValueError:
        return False
    return False


def _peek(conn: socket.socket) -> bytes:
    """Look at the next byte without waiting (a socket timeout would make recv wait first)."""
    timeout = conn.gettimeout()
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK)
    finally:
        conn.settimeout(timeout)


def _classify(conn: socket.socket) -> str:
    """Return "save", "fetch" or "gone" for a freshly accepted connection."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLRDHUP)
    events = poller.poll(CLASSIFY_WINDOW * 1000)
    if not events:
        return "fetch"
    try:
        first = _peek(conn)
    except BlockingIOError:
        return "fetch"
    except OSError:
        return "gone"
    if first:
        return "save"
    if events[0][1] & select.POLLHUP:
        return "gone"
    # Half-closed but still open: `receive_state` saying it will not send anything.
    return "fetch"


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SupervisorError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # nobody listens: a leftover of a supervisor that died
        except OSError as ex:
            raise SupervisorError(f"cannot tell whether {path} is in use: {ex}") from None
        else:
            raise SupervisorError(f"another process is listening on {path}")
    os.unlink(path)


def _listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on `path`; return the socket and the (st_dev, st_ino) of its file."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The file is born 0600, so no other user can connect even for a moment.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    # A newer supervisor may have replaced the file; leave its socket alone.
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000


class Supervisor:
    """Serves one state slot per socket path, one thread per connection."""

    def __init__(self, paths: list[str]) -> None:
        self._slots = [_Slot(p) for p in paths]
        self._listeners: list[tuple[socket.socket, _Slot, tuple[int, int]]] = []
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._accepted = 0

    def start(self) -> None:
        """Listen on every path, or on none.

        Raises:
            SupervisorError: a path cannot be served.
        """
        try:
            for slot in self._slots:
                try:
                    sock, ident = _listen(slot.path)
                except OSError as ex:
                    raise SupervisorError(f"cannot listen on {slot.path}: {ex.strerror or ex}") from None
                self._listeners.append((sock, slot, ident))
                logger.info("listening on %s", slot.path)
        except BaseException:
            self.close()
            raise

    def serve(self, wakeup_fd: int) -> int:
        """Accept connections until `wakeup_fd` is readable; return the byte read from it."""
        with selectors.DefaultSelector() as selector:
            selector.register(wakeup_fd, selectors.EVENT_READ, None)
            for sock, slot, _ in self._listeners:
                selector.register(sock, selectors.EVENT_READ, slot)
            while True:
                for key, _ in selector.select():
                    if key.data is None:
                        woken = os.read(wakeup_fd, 64)
                        return woken[0] if woken else 0
                    self._accept(key.fileobj, key.data)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop listening, remove the socket files, and close every held fd."""
        for sock, slot, ident in self._listeners:
            sock.close()
            _unlink_if_ours(slot.path, ident)
        self._listeners.clear()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            slot.close()

    def _accept(self, listener: socket.socket, slot: _Slot) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as ex:
            # Out of fds and the like: the connection stays queued, so pause instead of spinning.
            logger.error("accept on %s failed: %s", slot.path, ex)
            time.sleep(0.1)
            return
        self._accepted += 1
        worker = threading.Thread(
            target=self._serve_connection,
            args=(slot, conn, slot.ticket()),
            name=f"conn-{self._accepted}",
            daemon=True,
        )
        with self._workers_lock:
            self._workers.add(worker)
        worker.start()

    def _serve_connection(self, slot: _Slot, conn: socket.socket, ticket: int) -> None:
        try:
            with conn:
                conn.settimeout(TRANSFER_TIMEOUT)
                kind = _classify(conn)
                if kind == "save":
                    _save(slot, conn, ticket)
                elif kind == "fetch":
                    _fetch(slot, conn, ticket)
                else:
                    logger.info("connection on %s closed without sending anything", slot.path)
        except Exception:
            logger.exception("connection on %s failed", slot.path)
        finally:
            slot.settle(ticket)
            with self._workers_lock:
                self._workers.discard(threading.current_thread())


def _save(slot: _Slot, conn: socket.socket, ticket: int) -> None:
    start = time.monotonic()
    try:
        data, fd = recv_message(conn, start + TRANSFER_TIMEOUT, MAX_STATE_BYTES)
    except TimeoutError:
        logger.warning("save on %s timed out after %.0f s; previous state kept", slot.path, TRANSFER_TIMEOUT)
        return
    except (StateTooLarge, OSError) as ex:
        logger.warning("save on %s failed (%s); previous state kept", slot.path, ex)
        return
    if fd < 0:
        logger.warning(
            "save on %s: %d bytes without an fd; ignored, previous state kept", slot.path, len(data)
        )
        return
    if _cut_short(data):
        os.close(fd)
        logger.warning(
            "save on %s: state cut short after %d bytes (sender died?); ignored, previous state kept",
            slot.path,
            len(data),
        )
        return
    try:
        replaced = slot.store(ticket, data, fd)
    except SupervisorError as ex:
        logger.warning("save on %s: %d bytes ignored: %s", slot.path, len(data), ex)
        return
    before = "first state" if replaced is None else f"replaced {replaced} bytes"
    logger.info("save on %s: %d bytes + fd in %.1f ms (%s)", slot.path, len(data), _ms(start), before)


def _fetch(slot: _Slot, conn: socket.socket, ticket: int) -> None:
    start = time.monotonic()
    held = slot.copy(ticket, TRANSFER_TIMEOUT)
    if held is None:
        # Closing at once gives the daemon a clean "no fd" error instead of a timeout.
        logger.info("fetch on %s: nothing stored; connection closed", slot.path)
        return
    data, fd = held
    try:
        send_message(conn, data, fd, start + TRANSFER_TIMEOUT)
    except OSError as ex:
        logger.warning("fetch on %s failed after %.1f ms: %s", slot.path, _ms(start), ex)
        return
    finally:
        os.close(fd)
    logger.info("fetch on %s: %d bytes + fd in %.1f ms", slot.path, len(data), _ms(start))
    with contextlib.suppress(OSError):
        if _peek(conn):
            # A fetching client never sends: this was a save whose first bytes came after
            # the window. Nothing acknowledges saves, so the log is the only place to say so.
            logger.error(
                "connection on %s sent data after the %.2f s window; a save was taken for a fetch and lost",
                slot.path,
                CLASSIFY_WINDOW,
            )


@contextlib.contextmanager
def _stop_signals() -> Iterator[int]:
    """Make SIGTERM and SIGINT readable on the yielded fd; restore the old handlers after."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    try:
        yield rfd
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(rfd)
        os.close(wfd)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydus-actors supervisor",
        description="Hold each daemon's state and FUSE fd for hot upgrade and failover.",
    )
    p.add_argument(
        "--sock", action="append", required=True, metavar="PATH", help="socket to serve; once per daemon"
    )
    p.add_argument("-l", "--log-level", default="info", help="trace, debug, info, warn or error")
    return p


def main(argv: list[str]) -> int:
    """Run the supervisor until SIGTERM or SIGINT; return the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as ex:  # --help, or a usage error already printed
        return ex.code if isinstance(ex.code, int) else 2
    try:
        level = logs.parse_level(args.log_level)
    except ValueError as ex:
        print(f"nydus-actors supervisor: error: {ex}", file=sys.stderr)
        return 2
    if len({os.path.abspath(p) for p in args.sock}) != len(args.sock):
        print("nydus-actors supervisor: error: the same --sock path is given twice", file=sys.stderr)
        return 2
    logs.setup_logging(level, log_file=None, rotation_mb=0, json_lines=False)
    supervisor = Supervisor(args.sock)
    with _stop_signals() as wakeup_fd:
        try:
            supervisor.start()
        except SupervisorError as ex:
            logger.error("cannot start: %s", ex)
            return 1
        try:
            signum = supervisor.serve(wakeup_fd)
            logger.info("stopping on signal %d", signum)
        finally:
            supervisor.close()
    logger.info("supervisor stopped")
    return 0
