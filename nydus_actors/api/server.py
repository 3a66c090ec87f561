"""Start and stop waitress on the API unix socket.

waitress has no public stop (waitress issues #343, #372), so stopping lives
here alone: stop accepting, let requests in progress finish and their replies
reach the socket (so the 204 of `PUT /daemon/exit` is flushed before the
process ends), then close every channel from inside waitress's loop thread,
which makes the loop return, and shut the worker threads down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.wasyncore import close_all

logger = logging.getLogger(__name__)

#: nydusd's connection limit (dbs-uhttp).
MAX_CONNECTIONS = 256
#: waitress closes channels idle for longer than this; the snapshotter keeps one
#: idle connection as a liveness probe and treats its closing as a crash, so
#: idle channels must never be closed (about 31 years).
NEVER = 10**9


class ApiHttpServer:
    """A waitress server on one unix socket, run by one owned thread."""

    def __init__(self, app: object, path: str, *, threads: int = 4) -> None:
        self._path = path
        self._map: dict = {}
        # The socket must never exist with looser permissions than 0600, and
        # waitress chmods only after bind: bind under a strict umask instead.
        old_umask = os.umask(0o177)
        try:
            self._server = create_server(
                app,
                map=self._map,
                unix_socket=path,
                unix_socket_perms="600",
                threads=threads,
                ident="Nydus API",
                channel_timeout=NEVER,
                connection_limit=MAX_CONNECTIONS,
                # Bodies above nydusd's 51,200-byte limit get nydusd's error from the app,
                # so waitress must let them through up to a sane bound.
                max_request_body_size=1024 * 1024,
                expose_tracebacks=False,
                asyncore_use_poll=True,
                asyncore_loop_timeout=1,
            )
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.run, name="api-http", daemon=False)

    def start(self) -> None:
        """Serve in the owned thread."""
        self._thread.start()
        logger.info("API server listening on %s", self._path)

    def _in_loop(self, func: object, timeout: float = 5.0) -> None:
        done = threading.Event()

        def thunk() -> None:
            try:
                func()  # type: ignore[operator]
            finally:
                done.set()

        self._server.trigger.pull_trigger(thunk)
        done.wait(timeout)

    def _busy(self) -> bool:
        dispatcher = self._server.task_dispatcher
        if dispatcher.queue or dispatcher.active_count:
            return True
        return any(
            isinstance(obj, HTTPChannel) and (obj.requests or obj.total_outbufs_len)
            for obj in list(self._map.values())
        )

    def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Stop accepting, drain replies in progress, close all and join the thread."""
        if not self._thread.is_alive():
            return

        def stop_accepting() -> None:
            self._server.accepting = False
            self._server.del_channel()
            self._server.socket.close()

        self._in_loop(stop_accepting)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        deadline = time.monotonic() + drain_timeout
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.005)
        self._in_loop(lambda: close_all(self._map))
        self._server.task_dispatcher.shutdown(timeout=drain_timeout)
        self._thread.join(timeout=drain_timeout + 1)
        if self._thread.is_alive():
            logger.error("API server thread did not stop")
        else:
            logger.info("API server stopped")
