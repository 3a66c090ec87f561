"""RafsFs: a RAFS v6 or plain EROFS image served through the VFS, with I/O statistics.

Inode numbers are the image's nids. File data of RAFS images comes chunk by
chunk from a `ChunkSource` (today the local blob files of a `localfs`
backend; the blob cache plugs in behind the same interface); plain EROFS
images are read from their own file and their extra devices.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import ClassVar

from nydus_actors.config import FsConfig
from nydus_actors.exceptions import OtherError, Unsupported
from nydus_actors.fs.base import DirEntry, Filesystem, InodeAttr, StatFs
from nydus_actors.metrics import FsIoStats, StatsFop
from nydus_actors.models import FsType
from nydus_actors.rafs import ChunkSource, Inode, LocalBlobSource, LocalDeviceReader, RafsImage, read_file
from nydus_actors.storage.backends.localfs import find_blob

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


def blob_paths(image: RafsImage, config: FsConfig) -> list[str | None]:
    """Locate each blob of the image for a `localfs` backend.

    By id in `dir` and `alt_dirs`, or `blob_file` for an image with one blob.
    """
    if config.backend_type != "localfs":
        raise Unsupported  # remote backends and the blob cache are not built yet
    backend = config.backend()
    return [find_blob(backend, blob.blob_id) for blob in image.blobs]


class _Counted:
    """Times one operation and counts it as a hit or an error in the instance's statistics."""

    __slots__ = ("_counted", "_fop", "_ino", "_started", "_stats", "size")

    def __init__(self, stats: FsIoStats, fop: StatsFop, ino: int) -> None:
        self._stats = stats
        self._fop = fop
        self._ino = ino
        self.size = 0
        self._counted = True

    def cancel(self) -> None:
        """Do not count this operation (another call will)."""
        self._counted = False

    def __enter__(self) -> _Counted:
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._counted:
            self._stats.record(self._fop, self._ino, self._started, ok=exc_type is None, size=self.size)


class RafsFs(Filesystem):
    """One mounted RAFS instance: immutable image metadata plus a chunk source for data."""

    fs_type: ClassVar[FsType] = FsType.RAFS

    def __init__(
        self, image: RafsImage, config: FsConfig, stats: FsIoStats, source: ChunkSource | None = None
    ) -> None:
        """Serve `image`; a RAFS image reads its chunks through `source` (owned by the caller)."""
        self.image = image
        self.config = config
        self.stats = stats
        rafs = config.rafs
        self.attr_timeout = float(rafs["attr_timeout"])
        self.entry_timeout = float(rafs["entry_timeout"])
        self._source = source
        self._devices: LocalDeviceReader | None = None
        self._cached = getattr(source, "read_extents_cached", None)
        # read-ahead hooks of a cached remote source (storage/readahead.py)
        self._note_read = getattr(source, "note_read", None)
        self._fill_miss = getattr(source, "fill_miss", None)
        self._extents_reader = getattr(source, "read_extents", None)
        # local blob files never wait on the network: read them in the FUSE loop
        self._local = isinstance(source, LocalBlobSource)
        if not image.is_rafs:
            # a device without a blob file fails the reads that need it, with EIO
            paths = blob_paths(image, config)
            self._devices = LocalDeviceReader(image.path, [path or "" for path in paths])
        elif source is None:
            raise OtherError(f"failed to serve {image.path}: no chunk source for a RAFS image")

    @property
    def root_ino(self) -> int:
        return self.image.root_nid

    def _attr(self, inode: Inode) -> InodeAttr:
        mtime_ns = inode.mtime * 1_000_000_000 + inode.mtime_nsec
        return InodeAttr(
            ino=inode.nid,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            rdev=inode.rdev,
            size=inode.size,
            blocks=(inode.size + 511) // 512,
            blksize=self.image.block_size,
            atime_ns=mtime_ns,
            mtime_ns=mtime_ns,
            ctime_ns=mtime_ns,
            timeout=self.attr_timeout,
            entry_timeout=self.entry_timeout,
        )

    def _dir(self, ino: int) -> Inode:
        inode = self.image.inode(ino)
        if not stat.S_ISDIR(inode.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        return inode

    def lookup(self, parent: int, name: bytes) -> InodeAttr:
        with _Counted(self.stats, StatsFop.LOOKUP, parent):
            self._dir(parent)
            nid = self.image.lookup(parent, name)
            if nid is None:
                raise OSError(errno.ENOENT, "no such entry")
            return self._attr(self.image.inode(nid))

    def count_lookup(self, ino: int) -> None:
        del ino  # inodes come from the immutable image: nothing to keep alive

    def forget(self, ino: int, nlookup: int) -> None:
        del ino, nlookup

    def getattr(self, ino: int) -> InodeAttr:
        with _Counted(self.stats, StatsFop.GETATTR, ino):
            return self._attr(self.image.inode(ino))

    def readlink(self, ino: int) -> bytes:
        with _Counted(self.stats, StatsFop.READLINK, ino):
            if not stat.S_ISLNK(self.image.inode(ino).mode):
                raise OSError(errno.EINVAL, "not a symlink")
            return self.image.readlink(ino)

    def opendir(self, ino: int) -> None:
        with _Counted(self.stats, StatsFop.OPENDIR, ino):
            self._dir(ino)

    def readdir(self, ino: int, start: int) -> Iterator[DirEntry]:
        with _Counted(self.stats, StatsFop.READDIRPLUS, ino):
            self._dir(ino)
            entries = list(self.image.readdir(ino, start))
        for entry in entries:
            yield DirEntry(entry.name, self._attr(self.image.inode(entry.nid)), entry.offset)

    def open(self, ino: int, flags: int) -> None:
        with _Counted(self.stats, StatsFop.OPEN, ino):
            if flags & _WRITE_FLAGS:
                raise OSError(errno.EROFS, "read-only image")
            if stat.S_ISDIR(self.image.inode(ino).mode):
                raise OSError(errno.EISDIR, "is a directory")

    def read_nowait(self, ino: int, off: int, size: int) -> bytes | None:
        if self._devices is not None or self._local:
            return self.read(ino, off, size)
        if self._cached is None:
            return None
        if self._note_read is not None:
            self._note_read(ino, off, size)
        with _Counted(self.stats, StatsFop.READ, ino) as op:
            try:
                data = self._cached(self.image.chunk_extents(ino, off, size))
            except OtherError as ex:
                raise OSError(errno.EIO, str(ex)) from ex
            if data is None:
                # not counted here: the worker thread's `read` counts this request
                op.cancel()
                return None
            op.size = len(data)
            return data

    def read(self, ino: int, off: int, size: int) -> bytes:
        if self._fill_miss is not None:
            self._fill_miss(ino, off, size)
        with _Counted(self.stats, StatsFop.READ, ino) as op:
            try:
                if self._extents_reader is not None:
                    data = self._extents_reader(self.image.chunk_extents(ino, off, size))
                elif self._source is not None:
                    data = read_file(self.image, ino, off, size, self._source)
                else:
                    assert self._devices is not None
                    data = self.image.read(ino, off, size, self._devices)
            except OtherError as ex:
                # a broken chunk or a missing blob fails this read only
                raise OSError(errno.EIO, str(ex)) from ex
            op.size = len(data)
            return data

    def release(self, ino: int) -> None:
        with _Counted(self.stats, StatsFop.RELEASE, ino):
            pass

    def statfs(self) -> StatFs:
        with _Counted(self.stats, StatsFop.STATFS, self.image.root_nid):
            return StatFs(
                bsize=self.image.block_size,
                frsize=self.image.block_size,
                files=self.image.inode_count,
                namemax=255,
            )

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with _Counted(self.stats, StatsFop.GETXATTR, ino):
            value = self.image.xattrs(ino).get(name)
            if value is None:
                raise OSError(errno.ENODATA, "no such attribute")
            return value

    def listxattr(self, ino: int) -> list[bytes]:
        with _Counted(self.stats, StatsFop.LISTXATTR, ino):
            return list(self.image.xattrs(ino))

    def close(self) -> None:
        # the chunk source belongs to the blob cache manager, which closes it on umount
        if self._devices is not None:
            self._devices.close()
        self.image.close()
