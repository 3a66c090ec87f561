"""The local blob cache: uncompressed chunks in sparse per-blob files, a persisted ready map per blob.

No actors here; the cache manager actor and the FUSE side both call into this library.
"""

from nydus_actors.storage.cache.blob_file import CachedBlob
from nydus_actors.storage.cache.chunk_map import ChunkMap
from nydus_actors.storage.cache.metrics import BlobcacheMetrics
from nydus_actors.storage.cache.source import BlobCacheRegistry, CachedChunkSource, shared_registry

__all__ = [
    "BlobCacheRegistry",
    "BlobcacheMetrics",
    "CachedBlob",
    "CachedChunkSource",
    "ChunkMap",
    "shared_registry",
]
