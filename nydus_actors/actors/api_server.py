"""ApiServerActor: owns the waitress server on the `--apisock` unix socket."""

from __future__ import annotations

import logging

import pykka
from pykka.typing import ActorMemberMixin, proxy_method

from nydus_actors.api.app import create_app
from nydus_actors.api.server import ApiHttpServer

logger = logging.getLogger(__name__)


class ApiServerActor(pykka.ThreadingActor):
    """Runs the HTTP API for one `Daemon` actor; holds no business logic.

    Each request becomes one message to the daemon, sent from a waitress worker
    thread; this actor only manages the server's lifecycle.
    """

    def __init__(self, path: str, daemon: object, *, threads: int = 4) -> None:
        super().__init__()
        # Bind in the caller's thread so that a bad socket path fails `start()` itself.
        self._server: ApiHttpServer | None = ApiHttpServer(create_app(daemon), path, threads=threads)

    def on_start(self) -> None:
        assert self._server is not None
        self._server.start()

    def on_stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def on_failure(self, *args: object) -> None:
        del args
        if self._server is not None:
            self._server.stop()

    def ping(self) -> bool:
        """Answer once the server is listening."""
        return True


class ApiServerProxy(ActorMemberMixin, pykka.ActorProxy[ApiServerActor]):
    ping = proxy_method(ApiServerActor.ping)
