"""Reader of Nydus RAFS v6 bootstraps and plain EROFS images (no FUSE, no actors).

The format is described in docs/rafs-v6-format.md; `RafsImage` is the entry point.
"""

from nydus_actors.rafs.blob import ChunkSource, LocalBlobSource, chunk_digest, decompress, read_file
from nydus_actors.rafs.blobtable import BlobInfo
from nydus_actors.rafs.chunks import ChunkExtent, ChunkInfo
from nydus_actors.rafs.devices import LocalDeviceReader
from nydus_actors.rafs.dirent import DirEntry
from nydus_actors.rafs.errors import RafsError
from nydus_actors.rafs.image import DeviceReader, RafsImage
from nydus_actors.rafs.inode import Inode

__all__ = [
    "BlobInfo",
    "ChunkExtent",
    "ChunkInfo",
    "ChunkSource",
    "DeviceReader",
    "DirEntry",
    "Inode",
    "LocalBlobSource",
    "LocalDeviceReader",
    "RafsError",
    "RafsImage",
    "chunk_digest",
    "decompress",
    "read_file",
]
