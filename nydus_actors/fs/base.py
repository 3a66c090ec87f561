"""The interface every served filesystem implements, on its own inode numbers.

No FUSE here: `fs/vfs.py` maps inode numbers to node ids, `fs/operations.py` builds replies.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nydus_actors.models import FsType

#: `readdir` offsets of a filesystem stay below this; the pseudo-root uses the range above.
MAX_DIR_OFFSET = (1 << 62) - 1


@dataclass(frozen=True, slots=True)
class InodeAttr:
    """Attributes of one inode, as `stat(2)` reports them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    #: How long the kernel may cache the attributes and the name of this inode, in
    #: seconds; images are immutable, so their filesystems hand out long timeouts.
    timeout: float = 5.0
    entry_timeout: float = 5.0

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int) -> InodeAttr:
        """Build attributes from a host `stat_result` under inode number `ino`."""
        return cls(
            ino=ino,
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=st.st_size,
            blocks=st.st_blocks,
            blksize=st.st_blksize,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )


@dataclass(frozen=True, slots=True)
class StatFs:
    """Filesystem statistics, the fields of `statvfs(3)`."""

    bsize: int = 4096
    frsize: int = 4096
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    favail: int = 0
    namemax: int = 255


class DirEntry(NamedTuple):
    """One directory entry; `next_offset` resumes the listing after it."""

    name: bytes
    attr: InodeAttr
    next_offset: int


class Filesystem(abc.ABC):
    """A read-only filesystem served under one path of the pseudo-root.

    Inode numbers are positive ints chosen by the filesystem, unique and stable
    for its lifetime; they may be larger than 64 bits (the VFS remaps what does
    not fit its node-id scheme). Methods run in the FUSE loop thread only, one at
    a time. Errors are `OSError(errno, ...)` or a `NydusError` (it carries
    `.errno`).

    Lookup counting follows the FUSE protocol: `lookup` (including `.` and
    `..`) and `count_lookup` add one reference, `forget` drops references, and an
    inode must be tolerated in `forget` even if this process never issued it
    (after a takeover the kernel keeps the old daemon's node ids).
    """

    fs_type: ClassVar[FsType]

    @property
    @abc.abstractmethod
    def root_ino(self) -> int:
        """Inode number of the root directory."""

    @abc.abstractmethod
    def lookup(self, parent: int, name: bytes) -> InodeAttr:
        """Find `name` in directory `parent` and count one reference to it."""

    @abc.abstractmethod
    def count_lookup(self, ino: int) -> None:
        """Count one reference to `ino`, as a lookup would (READDIRPLUS entries)."""

    @abc.abstractmethod
    def forget(self, ino: int, nlookup: int) -> None:
        """Drop `nlookup` references to `ino`; unknown inodes are ignored."""

    @abc.abstractmethod
    def getattr(self, ino: int) -> InodeAttr:
        """Return the attributes of `ino`."""

    @abc.abstractmethod
    def readlink(self, ino: int) -> bytes:
        """Return the target of symlink `ino`."""

    @abc.abstractmethod
    def opendir(self, ino: int) -> None:
        """Check that `ino` can be listed (ENOTDIR when it is no directory)."""

    @abc.abstractmethod
    def readdir(self, ino: int, start: int) -> Iterator[DirEntry]:
        """List directory `ino` after offset `start` (0 for the beginning).

        Offsets are stable: listing again from any `next_offset` handed out
        earlier neither repeats nor skips entries that did not change. They are
        at most `MAX_DIR_OFFSET`. Entries do not count a lookup; the caller calls
        `count_lookup` for each entry the kernel accepted (never `.` or `..`).
        """

    def releasedir(self, ino: int) -> None:
        """Forget any listing state kept for `ino` (the kernel closed it)."""
        del ino

    @abc.abstractmethod
    def open(self, ino: int, flags: int) -> None:
        """Open regular file `ino` for reading; write access gives EROFS."""

    @abc.abstractmethod
    def read(self, ino: int, off: int, size: int) -> bytes:
        """Read up to `size` bytes of `ino` at `off`.

        Must work without a preceding `open` in this process: file handles are
        stateless, and after a takeover reads arrive on handles the previous
        daemon issued.
        """

    def read_nowait(self, ino: int, off: int, size: int) -> bytes | None:
        """Read like `read` if that cannot block on the network, else return None.

        The FUSE loop calls this first and runs `read` in a worker thread only when
        it returns None (a cache miss), so cached reads cost no thread switch and a
        slow fetch never stalls the loop. Local filesystems never block for long.
        """
        return self.read(ino, off, size)

    @abc.abstractmethod
    def release(self, ino: int) -> None:
        """Close one open of `ino`; unknown inodes are ignored."""

    @abc.abstractmethod
    def statfs(self) -> StatFs:
        """Return filesystem statistics."""

    @abc.abstractmethod
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Return extended attribute `name` of `ino` (ENODATA when absent)."""

    @abc.abstractmethod
    def listxattr(self, ino: int) -> list[bytes]:
        """Return the names of the extended attributes of `ino`."""

    def save_state(self) -> dict:
        """What a next daemon needs to answer for this filesystem's inodes (msgpack-able)."""
        return {}

    def restore_state(self, state: dict) -> None:
        """Take over the state `save_state` of a previous daemon returned."""
        del state

    def close(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Release host resources; called once when the filesystem is detached."""
