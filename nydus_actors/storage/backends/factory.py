"""Build the backend a filesystem config names (reference §7.5)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nydus_actors.config import FsConfig
from nydus_actors.exceptions import Unsupported
from nydus_actors.storage.backends.base import BlobBackend
from nydus_actors.storage.backends.http_proxy import HttpProxyBackend
from nydus_actors.storage.backends.localfs import LocalfsBackend
from nydus_actors.storage.backends.s3 import S3Backend

logger = logging.getLogger(__name__)


def open_backend(
    config: FsConfig, *, backend_id: str, on_failure: Callable[[str], None] | None = None
) -> BlobBackend:
    """Create the backend of `config`, keyed by `backend_id` in the metrics.

    Raises:
        ConfigError: the config has no backend.
        Unsupported: the backend kind is not implemented here (`oss`, `localdisk`).
        BackendError: the backend settings cannot be used (e.g. a bad `addr`).
    """
    kind = config.backend_type
    settings = config.backend()
    logger.debug("Opening %s backend %s", kind, backend_id)
    if kind == "localfs":
        return LocalfsBackend(backend_id, settings, on_failure=on_failure)
    if kind == "http-proxy":
        return HttpProxyBackend(backend_id, settings, on_failure=on_failure)
    if kind == "s3":
        return S3Backend(backend_id, settings, on_failure=on_failure)
    if kind == "registry":
        # Imported on use, so that the other backends never depend on the registry client and its auth code.
        from nydus_actors.storage.backends.registry import RegistryBackend  # noqa: PLC0415

        return RegistryBackend(backend_id, settings, on_failure=on_failure)
    raise Unsupported(f"failed to open backend {backend_id}: backend type {kind} is not supported")
