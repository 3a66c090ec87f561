"""BackendActor: a small pool of actors around one storage backend instance.

A backend read can take a while (a registry across the network), and an actor
handles one message at a time, so each backend instance gets a few identical
actors sharing one thread-safe `BlobBackend` (its connection pool, auth state and
metrics), and callers take them round-robin (pykka's worker-pool idiom).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pykka
from pykka.typing import ActorMemberMixin, proxy_method

from nydus_actors.storage.backends import BlobBackend

logger = logging.getLogger(__name__)

#: Actors per backend instance: concurrent fetches of one mount.
POOL_SIZE = 4
#: Longest wait for one backend read, beyond the backend's own timeouts and retries.
FETCH_TIMEOUT = 300.0


class BackendActor(pykka.ThreadingActor):
    """Serves reads of one backend instance; several of these share the instance."""

    def __init__(self, backend: BlobBackend) -> None:
        super().__init__()
        self._backend = backend

    def read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """Read `size` bytes of a blob at `offset` (retries included)."""
        return self._backend.read_range(blob_id, offset, size)

    def blob_size(self, blob_id: str) -> int:
        """Return the size of a blob."""
        return self._backend.blob_size(blob_id)

    def ping(self) -> bool:
        return True


class BackendProxy(ActorMemberMixin, pykka.ActorProxy[BackendActor]):
    read_range = proxy_method(BackendActor.read_range)
    blob_size = proxy_method(BackendActor.blob_size)
    ping = proxy_method(BackendActor.ping)


class BackendPool:
    """The actors of one backend instance, used round-robin; owned by the blob cache manager."""

    def __init__(self, backend: BlobBackend, size: int = POOL_SIZE) -> None:
        self.backend = backend
        self._proxies: list[Any] = [BackendActor.start(backend).proxy() for _ in range(size)]
        self._next = itertools.cycle(self._proxies)

    def read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """Read through the next actor and wait for it (called from FUSE worker or prefetch threads)."""
        return next(self._next).read_range(blob_id, offset, size).get(timeout=FETCH_TIMEOUT)

    def stop(self) -> None:
        """Stop the actors and close the backend."""
        for proxy in self._proxies:
            proxy.actor_ref.stop(block=True, timeout=10)
        self.backend.close()
        logger.debug("backend %s of %s stopped", self.backend.backend_type, self.backend.backend_id)
