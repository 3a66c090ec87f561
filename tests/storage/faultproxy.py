"""A TCP proxy on 127.0.0.1 that injects network faults into the response direction (test-servers §7.4).

Modes, switchable at run time: pass, latency, slow, cut, reset, blackhole, down (listener closed).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

MODES = ("pass", "latency", "slow", "cut", "reset", "blackhole", "down")
CHUNK = 16 * 1024


class FaultProxy:
    """Forward 127.0.0.1:`port` to `upstream`, misbehaving as `mode` says.

    The mode is sampled when a connection is accepted; `set_mode` aborts the
    connections already open so that pooled keep-alive clients see the new mode too.

    Args:
        upstream: (host, port) every accepted connection is piped to.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.latency = 0.05  # seconds before each forwarded response chunk
        self.rate = 256_000  # bytes per second in `slow`
        self.cut_after = 1000  # response bytes forwarded in `cut`
        self.accepted = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_mode(
        self,
        mode: str,
        *,
        latency: float | None = None,
        rate: int | None = None,
        cut_after: int | None = None,
    ) -> None:
        """Switch the fault; open connections are aborted."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if latency is not None:
            self.latency = latency
        if rate is not None:
            self.rate = rate
        if cut_after is not None:
            self.cut_after = cut_after
        previous, self.mode = self.mode, mode
        self._abort_live()
        if mode == "down" and previous != "down":
            self._unlisten()
        elif mode != "down" and previous == "down":
            self._listen()

    def close(self) -> None:
        self._closed = True
        self._unlisten()
        self._abort_live()

    # -- listening -----------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))  # the same port again after `down`
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True, name="faultproxy").start()

    def _unlisten(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not on Linux.
            _quietly(listener.shutdown, socket.SHUT_RDWR)
            listener.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._live.add(client)
            threading.Thread(target=self._serve, args=(client, self.mode), daemon=True).start()

    def _abort_live(self) -> None:
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            _quietly(sock.shutdown, socket.SHUT_RDWR)
            _quietly(sock.close)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.add(sock)

    # -- one connection ------------------------------------------------------------------------------

    def _serve(self, client: socket.socket, mode: str) -> None:
        upstream = None
        try:
            if mode == "reset":
                # Linger 0 turns close() into a RST.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if mode == "blackhole":
                while client.recv(CHUNK):
                    pass
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError as ex:
                logger.debug("fault proxy: upstream %s unreachable: %s", self.upstream, ex)
                return
            upstream.settimeout(None)
            self._track(upstream)
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            self._respond(upstream, client, mode)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    _quietly(sock.close)
                    with self._lock:
                        self._live.discard(sock)

    def _respond(self, upstream: socket.socket, client: socket.socket, mode: str) -> None:
        """Pipe upstream → client with the fault of `mode`."""
        budget = self.cut_after
        while True:
            data = upstream.recv(CHUNK)
            if not data:
                return
            if mode == "latency":
                time.sleep(self.latency)
            elif mode == "cut":
                data = data[:budget]
                budget -= len(data)
                client.sendall(data)
                if budget <= 0:
                    client.shutdown(socket.SHUT_WR)
                    return
                continue
            elif mode == "slow":
                # Small pieces keep bytes trickling, so only a whole-request deadline can stop it.
                piece = max(1, self.rate // 20)
                for start in range(0, len(data), piece):
                    client.sendall(data[start : start + piece])
                    time.sleep(len(data[start : start + piece]) / self.rate)
                continue
            client.sendall(data)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy requests unchanged; pass the client's half-close on."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _quietly(call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(OSError):
        call(*args)
