"""The FUSE layer: the kernel mount, the pseudo-root VFS and the filesystems it serves.

Only `fs/operations.py` (not re-exported here) and the session actor import pyfuse3.
"""

from nydus_actors.fs.base import DirEntry, Filesystem, InodeAttr, StatFs
from nydus_actors.fs.factory import open_filesystem
from nydus_actors.fs.passthrough import PassthroughFs
from nydus_actors.fs.vfs import Invalidation, Vfs

__all__ = [
    "DirEntry",
    "Filesystem",
    "InodeAttr",
    "Invalidation",
    "PassthroughFs",
    "StatFs",
    "Vfs",
    "open_filesystem",
]
