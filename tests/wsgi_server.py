"""Serve a test WSGI app on a unix socket with the daemon's own waitress wrapper."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from nydus_actors.api.server import ApiHttpServer


@contextlib.contextmanager
def serve_unix(app: Callable, sock_path: Path) -> Iterator[None]:
    """Serve `app` on `sock_path` until the block ends."""
    server = ApiHttpServer(app, str(sock_path), threads=2)
    server.start()
    try:
        yield
    finally:
        server.stop()
