"""PassthroughFs: a host directory served read-only (nydusd `--shared-dir`).

Inode numbers come from the host's (dev, ino), so every process derives the same ones.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections import OrderedDict
from typing import TYPE_CHECKING

from nydus_actors.exceptions import OtherError
from nydus_actors.fs.base import DirEntry, Filesystem, InodeAttr, StatFs
from nydus_actors.models import FsType

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

#: Directory listings kept between READDIRPLUS calls of one listing.
LISTING_CACHE_SIZE = 64

_DOT_OFFSET = 1
_DOTDOT_OFFSET = 2
_FIRST_NAME_OFFSET = 3

_OPEN_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_OPEN_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Node:
    """What this process knows of one host inode: a path to it and its lookup count."""

    __slots__ = ("dev", "ino", "nlookup", "rel")

    def __init__(self, rel: bytes, st: os.stat_result) -> None:
        self.rel = rel
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.nlookup = 0

    def matches(self, st: os.stat_result) -> bool:
        return st.st_dev == self.dev and st.st_ino == self.ino


def _error(code: int, detail: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


def _name_offset(name: bytes) -> int:
    # A hash keeps a name's offset stable while other names come and go.
    digest = hashlib.blake2b(name, digest_size=8).digest()
    return _FIRST_NAME_OFFSET + (int.from_bytes(digest, "little") >> 3)


class PassthroughFs(Filesystem):
    """Serve the tree below `source_dir` read-only.

    Paths are only ever built from the root and names the kernel looked up,
    which are never `.`/`..` and never contain `/`; symlinks are never followed;
    and every access checks that the path still leads to the (dev, ino) looked
    up, so a tree changed on the host gives ENOENT, not another file.
    """

    fs_type = FsType.PASSTHROUGH

    def __init__(self, source_dir: str) -> None:
        self._root = os.fsencode(os.path.realpath(source_dir))
        st = os.lstat(self._root)
        if not stat.S_ISDIR(st.st_mode):
            raise _error(errno.ENOTDIR)
        self._root_dev = st.st_dev
        self._root_ino = self._ino_of(st)
        root = _Node(b"", st)
        root.nlookup = 1
        self._nodes: dict[int, _Node] = {self._root_ino: root}
        self._opens: dict[int, int] = {}
        self._fds: dict[int, int] = {}
        self._listings: OrderedDict[int, tuple[tuple[int, bytes], ...]] = OrderedDict()

    @property
    def root_ino(self) -> int:
        return self._root_ino

    @property
    def source(self) -> str:
        """The served host directory."""
        return os.fsdecode(self._root)

    # -- lookups -------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> InodeAttr:
        node = self._node(parent)
        if name == b".":
            rel = node.rel
            st = self._lstat(node)
            if not stat.S_ISDIR(st.st_mode):
                raise _error(errno.ENOTDIR)
        elif name == b"..":
            rel = node.rel.rpartition(b"/")[0]
            st = os.lstat(self._path(rel))
        else:
            if not name or b"/" in name or b"\0" in name:
                raise _error(errno.ENOENT)
            rel = node.rel + b"/" + name if node.rel else name
            st = self._lstat_child(node, name)
        ino = self._remember(rel, st)
        self._nodes[ino].nlookup += 1
        return InodeAttr.from_stat(st, ino)

    def count_lookup(self, ino: int) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            node.nlookup += 1

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            return
        node.nlookup -= nlookup
        if node.nlookup > 0 or ino == self._root_ino:
            return
        del self._nodes[ino]
        self._opens.pop(ino, None)
        self._listings.pop(ino, None)
        self._close_fd(ino)

    def getattr(self, ino: int) -> InodeAttr:
        return InodeAttr.from_stat(self._lstat(self._node(ino)), ino)

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(self._lstat(node).st_mode):
            raise _error(errno.EINVAL)
        return os.readlink(self._path(node.rel))

    # -- directories ---------------------------------------------------------

    def opendir(self, ino: int) -> None:
        if not stat.S_ISDIR(self._lstat(self._node(ino)).st_mode):
            raise _error(errno.ENOTDIR)

    def readdir(self, ino: int, start: int) -> Iterator[DirEntry]:
        node = self._node(ino)
        dir_st = self._lstat(node)
        if not stat.S_ISDIR(dir_st.st_mode):
            raise _error(errno.ENOTDIR)
        listing = self._listings.get(ino)
        if start == 0 or listing is None:
            listing = self._list(node)
            self._listings[ino] = listing
        self._listings.move_to_end(ino)
        while len(self._listings) > LISTING_CACHE_SIZE:
            self._listings.popitem(last=False)

        for offset, name in listing:
            if offset <= start:
                continue
            if name == b".":
                yield DirEntry(name, InodeAttr.from_stat(dir_st, ino), offset)
                continue
            if name == b"..":
                parent_rel = node.rel.rpartition(b"/")[0]
                parent_st = os.lstat(self._path(parent_rel))
                yield DirEntry(name, InodeAttr.from_stat(parent_st, self._ino_of(parent_st)), offset)
                continue
            rel = node.rel + b"/" + name if node.rel else name
            try:
                st = os.lstat(self._path(rel))
            except FileNotFoundError:
                continue  # removed on the host since the listing was read
            yield DirEntry(name, InodeAttr.from_stat(st, self._remember(rel, st)), offset)

    def releasedir(self, ino: int) -> None:
        self._listings.pop(ino, None)

    def _list(self, node: _Node) -> tuple[tuple[int, bytes], ...]:
        """Read a directory: (offset, name) pairs in offset order, `.` and `..` first."""
        named = sorted((_name_offset(name), name) for name in os.listdir(self._path(node.rel)))
        listing = [(_DOT_OFFSET, b"."), (_DOTDOT_OFFSET, b"..")]
        for offset, name in named:
            # Two names with one hash: the later one moves up by one, keeping offsets unique.
            listing.append((max(offset, listing[-1][0] + 1), name))
        return tuple(listing)

    # -- files ---------------------------------------------------------------

    def open(self, ino: int, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _error(errno.EROFS)
        self._host_fd(ino)
        self._opens[ino] = self._opens.get(ino, 0) + 1

    def read(self, ino: int, off: int, size: int) -> bytes:
        return os.pread(self._host_fd(ino), size, off)

    def release(self, ino: int) -> None:
        count = self._opens.pop(ino, 0) - 1
        if count > 0:
            self._opens[ino] = count
        else:
            self._close_fd(ino)

    def _host_fd(self, ino: int) -> int:
        """Return the cached host fd of `ino`, opening it on first use.

        A read may come on a handle this process never issued (after a takeover),
        so the fd is (re)opened from the inode's path whenever it is missing.
        """
        fd = self._fds.get(ino)
        if fd is not None:
            return fd
        node = self._node(ino)
        fd = os.open(self._path(node.rel), _OPEN_FILE_FLAGS)
        try:
            st = os.fstat(fd)
            if not node.matches(st):
                raise _error(errno.ENOENT, "changed on the host")
            if not stat.S_ISREG(st.st_mode):
                raise _error(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
        except BaseException:
            os.close(fd)
            raise
        self._fds[ino] = fd
        return fd

    def _close_fd(self, ino: int) -> None:
        fd = self._fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    # -- filesystem-wide -------------------------------------------------------

    def statfs(self) -> StatFs:
        st = os.statvfs(self._root)
        return StatFs(
            bsize=st.f_bsize,
            frsize=st.f_frsize,
            blocks=st.f_blocks,
            bfree=st.f_bfree,
            bavail=st.f_bavail,
            files=st.f_files,
            ffree=st.f_ffree,
            favail=st.f_favail,
            namemax=st.f_namemax,
        )

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self._node(ino)
        self._lstat(node)
        return os.getxattr(self._path(node.rel), name, follow_symlinks=False)

    def listxattr(self, ino: int) -> list[bytes]:
        node = self._node(ino)
        self._lstat(node)
        return [os.fsencode(name) for name in os.listxattr(self._path(node.rel), follow_symlinks=False)]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._opens.clear()
        self._listings.clear()

    # -- helpers ---------------------------------------------------------------

    def save_state(self) -> dict:
        """The inodes the kernel knows: their paths, host identity and lookup counts.

        After a takeover the kernel keeps using these inode numbers without
        looking them up again, so the next daemon must know their paths.
        """
        return {
            "root": self._root,
            "nodes": [[ino, n.rel, n.dev, n.ino, n.nlookup] for ino, n in self._nodes.items()],
        }

    def restore_state(self, state: dict) -> None:
        if state.get("root") != self._root:
            raise OtherError(f"failed to restore passthrough state: it is of {state.get('root')!r}")
        for ino, rel, dev, host_ino, nlookup in state.get("nodes", []):
            node = self._nodes.get(ino)
            if node is None:
                node = _Node.__new__(_Node)
                node.rel, node.dev, node.ino, node.nlookup = bytes(rel), dev, host_ino, 0
                self._nodes[ino] = node
            node.nlookup = max(node.nlookup, nlookup)

    def _ino_of(self, st: os.stat_result) -> int:
        # Host inode numbers are unique per device only; other devices (mounts
        # below the source) get the device folded in above bit 64.
        if st.st_dev == self._root_dev:
            return st.st_ino
        return ((st.st_dev + 1) << 64) | st.st_ino

    def _path(self, rel: bytes) -> bytes:
        return self._root + b"/" + rel if rel else self._root

    def _node(self, ino: int) -> _Node:
        node = self._nodes.get(ino)
        if node is None:
            node = self._recover(ino)
            if node is None:
                raise _error(errno.ENOENT, f"inode {ino} was never looked up")
        return node

    def _recover(self, ino: int) -> _Node | None:
        """Find an inode the kernel names but this process never looked up.

        After a failover the kernel keeps node ids the dead daemon handed out
        after its last state save. Inode numbers are the host's, so the path can
        be found again by walking the shared directory; every inode seen on the
        way is remembered for the next miss. Only inodes on the root's device are
        searched (others carry the device in their number).
        """
        if ino >= 1 << 64:
            return None
        for dirpath, dirnames, filenames in os.walk(self._root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_dev != self._root_dev:
                    continue
                rel = os.path.relpath(path, self._root)
                if st.st_ino not in self._nodes:
                    self._nodes[st.st_ino] = _Node(rel, st)
                if st.st_ino == ino:
                    logger.info("passthrough: recovered inode %d at %s", ino, os.fsdecode(rel))
                    return self._nodes[ino]
        return None

    def _lstat(self, node: _Node) -> os.stat_result:
        st = os.lstat(self._path(node.rel))
        if not node.matches(st):
            raise _error(errno.ENOENT, "changed on the host")
        return st

    def _lstat_child(self, parent: _Node, name: bytes) -> os.stat_result:
        """lstat `name` inside `parent`, through an fd proven to be `parent`.

        Opening the parent with O_NOFOLLOW and checking its (dev, ino) means a
        path component swapped for a symlink on the host cannot lead outside.
        """
        dir_fd = os.open(self._path(parent.rel), _OPEN_DIR_FLAGS)
        try:
            if not parent.matches(os.fstat(dir_fd)):
                raise _error(errno.ENOENT, "changed on the host")
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def _remember(self, rel: bytes, st: os.stat_result) -> int:
        """Record `rel` as the path of the inode `st` describes; return its number."""
        ino = self._ino_of(st)
        node = self._nodes.get(ino)
        if node is None:
            node = _Node(rel, st)
            self._nodes[ino] = node
        else:
            # A hard link: the latest path that worked is the one to keep.
            node.rel = rel
        return ino
