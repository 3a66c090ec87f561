"""MemoryFs: a tiny in-memory Filesystem with chosen inode numbers, for VFS tests."""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from typing import TYPE_CHECKING

from nydus_actors.fs.base import DirEntry, Filesystem, InodeAttr, StatFs
from nydus_actors.models import FsType

if TYPE_CHECKING:
    from collections.abc import Iterator


def attr(ino: int, mode: int, size: int = 0) -> InodeAttr:
    return InodeAttr(
        ino=ino,
        mode=mode,
        nlink=1,
        uid=0,
        gid=0,
        rdev=0,
        size=size,
        blocks=0,
        blksize=4096,
        atime_ns=1,
        mtime_ns=2,
        ctime_ns=3,
    )


class MemoryFs(Filesystem):
    """A flat tree: `files` maps names in the root to (ino, data); one optional subdir."""

    fs_type = FsType.PASSTHROUGH

    def __init__(self, root_ino: int = 1, files: dict[bytes, tuple[int, bytes]] | None = None) -> None:
        self._root_ino = root_ino
        self.files = dict(files or {})
        self.lookups: Counter[int] = Counter()
        self.forgotten: Counter[int] = Counter()
        self.opened: Counter[int] = Counter()
        self.closed = False

    @property
    def root_ino(self) -> int:
        return self._root_ino

    def _by_ino(self, ino: int) -> tuple[bytes, bytes]:
        for name, (file_ino, data) in self.files.items():
            if file_ino == ino:
                return name, data
        raise OSError(errno.ENOENT, "no such inode")

    def lookup(self, parent: int, name: bytes) -> InodeAttr:
        if parent != self._root_ino:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name in (b".", b".."):
            self.lookups[self._root_ino] += 1
            return self.getattr(self._root_ino)
        if name not in self.files:
            raise OSError(errno.ENOENT, "no such entry")
        ino = self.files[name][0]
        self.lookups[ino] += 1
        return self.getattr(ino)

    def count_lookup(self, ino: int) -> None:
        self.lookups[ino] += 1

    def forget(self, ino: int, nlookup: int) -> None:
        self.forgotten[ino] += nlookup

    def getattr(self, ino: int) -> InodeAttr:
        if ino == self._root_ino:
            return attr(ino, stat.S_IFDIR | 0o755)
        _, data = self._by_ino(ino)
        return attr(ino, stat.S_IFREG | 0o644, len(data))

    def readlink(self, ino: int) -> bytes:
        raise OSError(errno.EINVAL, "not a symlink")

    def opendir(self, ino: int) -> None:
        if ino != self._root_ino:
            raise OSError(errno.ENOTDIR, "not a directory")

    def readdir(self, ino: int, start: int) -> Iterator[DirEntry]:
        self.opendir(ino)
        entries = [(b".", self._root_ino), (b"..", self._root_ino)]
        entries += sorted((name, file_ino) for name, (file_ino, _) in self.files.items())
        for offset, (name, entry_ino) in enumerate(entries, start=1):
            if offset > start:
                yield DirEntry(name, self.getattr(entry_ino), offset)

    def open(self, ino: int, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        self._by_ino(ino)
        self.opened[ino] += 1

    def read(self, ino: int, off: int, size: int) -> bytes:
        return self._by_ino(ino)[1][off : off + size]

    def release(self, ino: int) -> None:
        self.opened[ino] -= 1

    def statfs(self) -> StatFs:
        return StatFs(blocks=10, files=len(self.files))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.getattr(ino)
        raise OSError(errno.ENODATA, "no data")

    def listxattr(self, ino: int) -> list[bytes]:
        self.getattr(ino)
        return []

    def close(self) -> None:
        self.closed = True
