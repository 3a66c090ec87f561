"""BlobCacheManagerActor: the chunk sources of RAFS mounts, their backends and caches.

For each RAFS mount it opens the configured backend (a `BackendPool` of actors),
builds the chunk source the filesystem reads through, and keeps the metrics of
both. The sources themselves serve cache hits in the FUSE thread without any
message; only a miss reaches a backend actor (design §6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
from pykka.typing import ActorMemberMixin, proxy_method

from nydus_actors.actors.backend import BackendPool
from nydus_actors.config import FsConfig
from nydus_actors.exceptions import NoCounter
from nydus_actors.fs.rafs import blob_paths
from nydus_actors.rafs import BlobInfo, ChunkInfo, LocalBlobSource, RafsImage
from nydus_actors.storage.backends.factory import open_backend
from nydus_actors.storage.cache import BlobcacheMetrics, CachedChunkSource, shared_registry
from nydus_actors.storage.direct import DirectChunkSource
from nydus_actors.storage.objects import BlobObjects, EinvalError
from nydus_actors.storage.prefetch import Prefetcher, chunks_of, files_to_nids, table_nids
from nydus_actors.storage.readahead import ReadAheadSource

logger = logging.getLogger(__name__)

CACHING_TYPES = ("blobcache", "filecache")


@dataclass
class _Mount:
    source: Any
    pool: BackendPool | None
    cache_id: str | None
    cache_metrics: BlobcacheMetrics | None
    work_dir: str | None
    prefetcher: Prefetcher | None = None


class BlobCacheManagerActor(pykka.ThreadingActor):
    """Owns the chunk sources, backend pools and cache registries of all RAFS mounts."""

    def __init__(self, on_event: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self._on_event = on_event
        self._mounts: dict[str, _Mount] = {}
        # sources a remount replaced, kept until the filesystem no longer reads through them
        self._replaced: dict[str, list[_Mount]] = {}
        self._objects = BlobObjects()

    def open_source(
        self, mount_id: str, image: RafsImage, config: FsConfig, prefetch_files: tuple[str, ...] = ()
    ) -> Any:
        """Build the chunk source of a RAFS mount; the caller's filesystem reads through it.

        A second source for the same mount (a remount) keeps the first one open
        until `retire` is called, since the old filesystem serves until the swap.
        """
        if mount_id in self._mounts:
            self._replaced.setdefault(mount_id, []).append(self._mounts.pop(mount_id))
        validate = bool(config.rafs["validate"] or (config.cache or {}).get("validate", False))
        cache = config.cache or {}
        caching = cache.get("type") in CACHING_TYPES
        if config.backend_type == "localfs" and not caching:
            # local blob files need no cache: read chunks in place
            paths = blob_paths(image, config)
            files = {blob.blob_id: path for blob, path in zip(image.blobs, paths, strict=True) if path}
            source = LocalBlobSource(image, blob_files=files, validate=validate)
            self._mounts[mount_id] = _Mount(source, None, None, None, None)
            return source
        backend = open_backend(config, backend_id=mount_id, on_failure=self._report)
        pool = BackendPool(backend)

        def fetch(blob: BlobInfo, chunk: ChunkInfo) -> bytes:
            return pool.read_range(blob.blob_id, chunk.compressed_offset, chunk.compressed_size)

        try:
            if caching:
                work_dir = cache["filecache"]["work_dir"]
                metrics = BlobcacheMetrics(config.id or mount_id, work_dir)
                source = CachedChunkSource(
                    image.blobs,
                    work_dir,
                    fetch,
                    validate=validate,
                    on_error=self._report,
                    registry=shared_registry(work_dir),
                    metrics=metrics,
                )
                prefetcher = _prefetcher(
                    mount_id, image, config, source, pool, files=prefetch_files, metrics=metrics
                )
                # Read-ahead calls the backend itself, like prefetch, so that it never
                # queues in front of a miss in the backend actors.
                source = ReadAheadSource(
                    image,
                    source,
                    pool.read_range,
                    read_ahead_raw=pool.backend.read_range,
                    first_window=int(config.rafs["batch_size"]),
                )
                mount = _Mount(source, pool, config.id or mount_id, metrics, work_dir, prefetcher)
                self._mounts[mount_id] = mount
                if mount.prefetcher is not None:
                    mount.prefetcher.start()
            else:
                source = DirectChunkSource(image.blobs, fetch, validate=validate, on_error=self._report)
                self._mounts[mount_id] = _Mount(source, pool, None, None, None)
        except BaseException:
            pool.stop()
            raise
        logger.info(
            "chunk source of %s: %s backend, cache %r", mount_id, backend.backend_type, cache.get("type")
        )
        return source

    def retire(self, mount_id: str) -> None:
        """Close the sources a remount of `mount_id` replaced."""
        for mount in self._replaced.pop(mount_id, []):
            self._close(mount)

    def close_source(self, mount_id: str, *, collect: bool = True) -> None:
        """Close a mount's sources and backends; remove cache files nobody uses any more."""
        for mount in self._replaced.pop(mount_id, []):
            self._close(mount, collect=collect)
        mount = self._mounts.pop(mount_id, None)
        if mount is not None:
            self._close(mount, collect=collect)

    def _close(self, mount: _Mount, *, collect: bool = True) -> None:
        if mount.prefetcher is not None:
            mount.prefetcher.stop()
        mount.source.close()
        if mount.pool is not None:
            mount.pool.stop()
        if collect and mount.work_dir is not None:
            removed = shared_registry(mount.work_dir).gc()
            if removed:
                logger.info("removed %d unused cache files from %s", len(removed), mount.work_dir)

    def backend_metrics(self, metrics_id: str | None) -> dict:
        """`GET /api/v1/metrics/backend`: by backend id (the mountpoint), or the only one."""
        table = {mp: m.pool.backend.metrics for mp, m in self._mounts.items() if m.pool is not None}
        return _pick(table, metrics_id).export()

    def blobcache_metrics(self, metrics_id: str | None) -> dict:
        """`GET /api/v1/metrics/blobcache`: by config id, or the only one."""
        table = {m.cache_id: m for m in self._mounts.values() if m.cache_metrics is not None}
        mount = _pick(table, metrics_id)
        mount.source.refresh_metrics()
        return mount.cache_metrics.export()

    def set_registry_auth(self, backend_id: str, auth: str | None) -> int:
        """Hot-reload registry credentials of the backends with this id; return how many changed."""
        changed = 0
        for mp, mount in self._mounts.items():
            backend = None if mount.pool is None else mount.pool.backend
            if backend is not None and mp == backend_id and hasattr(backend, "set_auth"):
                backend.set_auth(auth)
                changed += 1
        return changed

    def add_blob_object(self, blob_type: str, blob_id: str, domain_id: str, config: dict) -> list[str]:
        """`PUT /api/v2/blobs`: only bootstrap entries can be added, as in nydusd."""
        if blob_type != "bootstrap":
            raise EinvalError
        added = self._objects.add_bootstrap(blob_id, domain_id, config)
        logger.info("blob objects added: %s", ", ".join(added))
        return added

    def get_blob_objects(self, domain_id: str, blob_id: str | None) -> list[dict]:
        """`GET /api/v2/blobs`."""
        return self._objects.list(domain_id, blob_id)

    def remove_blob_objects(self, domain_id: str, blob_id: str | None) -> list[str]:
        """`DELETE /api/v2/blobs?domain_id=[&blob_id=]`."""
        removed = self._objects.remove(domain_id, blob_id)
        logger.info("blob objects removed: %s", ", ".join(removed))
        return removed

    def _report(self, line: str) -> None:
        if self._on_event is not None:
            self._on_event(line)

    def on_stop(self) -> None:
        # the cache outlives the process: the next daemon reuses it
        for mount_id in list(self._mounts) + list(self._replaced):
            self.close_source(mount_id, collect=False)

    def ping(self) -> bool:
        return True


def _prefetcher(
    mount_id: str,
    image: RafsImage,
    config: FsConfig,
    source: CachedChunkSource,
    pool: BackendPool,
    *,
    files: tuple[str, ...],
    metrics: BlobcacheMetrics,
) -> Prefetcher | None:
    """The prefetch of a mount, if its config enables one (nydusd: cache.prefetch, else rafs.prefetch)."""
    cache_prefetch = (config.cache or {}).get("prefetch") or {}
    settings = cache_prefetch if cache_prefetch.get("enable") else config.rafs["prefetch"]
    if not settings.get("enable"):
        return None
    nids = files_to_nids(image, files) if files else table_nids(image)
    if nids:
        chunks = chunks_of(image, nids)
    elif settings.get("prefetch_all"):
        chunks = sorted(image.chunks(), key=lambda c: (c.blob_index, c.compressed_offset))
    else:
        return None
    return Prefetcher(
        mount_id,
        image,
        source,
        pool.backend.read_range,
        chunks,
        threads=int(settings.get("threads", 8)),
        batch_size=int(settings.get("batch_size", 1 << 20)),
        bandwidth_limit=int(settings.get("bandwidth_limit", 0)),
        metrics=metrics,
    )


def _pick(table: dict, metrics_id: str | None) -> Any:
    if metrics_id is not None:
        found = table.get(metrics_id)
    elif len(table) == 1:
        found = next(iter(table.values()))
    else:
        found = None
    if found is None:
        raise NoCounter
    return found


class BlobCacheManagerProxy(ActorMemberMixin, pykka.ActorProxy[BlobCacheManagerActor]):
    open_source = proxy_method(BlobCacheManagerActor.open_source)
    close_source = proxy_method(BlobCacheManagerActor.close_source)
    retire = proxy_method(BlobCacheManagerActor.retire)
    add_blob_object = proxy_method(BlobCacheManagerActor.add_blob_object)
    get_blob_objects = proxy_method(BlobCacheManagerActor.get_blob_objects)
    remove_blob_objects = proxy_method(BlobCacheManagerActor.remove_blob_objects)
    backend_metrics = proxy_method(BlobCacheManagerActor.backend_metrics)
    blobcache_metrics = proxy_method(BlobCacheManagerActor.blobcache_metrics)
    set_registry_auth = proxy_method(BlobCacheManagerActor.set_registry_auth)
    ping = proxy_method(BlobCacheManagerActor.ping)
