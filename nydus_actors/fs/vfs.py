"""The pseudo-root VFS: filesystems attached at paths, under derivable node ids.

Node ids are computed, never counted, because a takeover keeps the kernel's (design §4).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from nydus_actors.exceptions import AlreadyExists, NotFound, OtherError
from nydus_actors.fs.base import MAX_DIR_OFFSET, DirEntry, InodeAttr, StatFs

if TYPE_CHECKING:
    from collections.abc import Generator

    from nydus_actors.fs.base import Filesystem

logger = logging.getLogger(__name__)

#: Node id of the VFS root directory (the FUSE root).
ROOT_ID = 1
#: Slot of the filesystem attached at "/".
ROOT_SLOT = 0
#: Slots available to filesystems attached below "/".
SUB_SLOTS = range(1, 255)
#: Slot of the pseudo directories.
PSEUDO_SLOT = 255

SLOT_SHIFT = 56
INNER_MASK = (1 << SLOT_SHIFT) - 1
# Inner numbers below this are used as they are; remapped ones live above it, so
# an identity-mapped inode can never collide with a remapped one.
_REMAP_BASE = 1 << 55
# Offsets of pseudo children in a directory listing; filesystem offsets stay below.
_PSEUDO_OFFSET_BASE = MAX_DIR_OFFSET + 1

_PSEUDO_DIR_MODE = stat.S_IFDIR | 0o755


@dataclass(frozen=True, slots=True)
class Invalidation:
    """A directory entry the kernel must forget: `name` in node `parent`."""

    parent: int
    name: bytes


def _no_node(node: int) -> OSError:
    return OSError(errno.ENOENT, f"no such node {node:#x}")


def _invalid_mountpoint(path: str) -> OtherError:
    return OtherError(f"VFS failed to handle request, invalid mountpoint {path!r}")


def split_mountpoint(path: str) -> tuple[bytes, ...]:
    """Split an absolute, normalized mountpoint into name components.

    Raises:
        OtherError: the path is relative, has empty, `.` or `..` components, or
            a NUL byte.
    """
    if not path.startswith("/") or "\0" in path:
        raise _invalid_mountpoint(path)
    if path == "/":
        return ()
    parts = path[1:].split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _invalid_mountpoint(path)
    return tuple(os.fsencode(part) for part in parts)


def _hash56(data: bytes, probe: int) -> int:
    digest = hashlib.blake2b(data + probe.to_bytes(4, "little"), digest_size=7).digest()
    return int.from_bytes(digest, "little")


class _InoMap:
    """Maps a filesystem's inode numbers into the 56 bits of a node id.

    Inode numbers in [1, 2**55) map to themselves (except the reserved ones);
    any other number maps to `2**55 | hash(number)`. Hashing is deterministic, so
    a new daemon computes the same ids; the dict makes it reversible, and a
    collision (two numbers, one hash) is resolved by probing the next hash.
    """

    def __init__(self, reserved: frozenset[int]) -> None:
        self._reserved = reserved
        self._to_node: dict[int, int] = {}
        self._to_ino: dict[int, int] = {}

    def to_node(self, ino: int) -> int:
        if 0 < ino < _REMAP_BASE and ino not in self._reserved:
            return ino
        mapped = self._to_node.get(ino)
        if mapped is not None:
            return mapped
        if ino < 0:
            raise OSError(errno.EIO, f"invalid inode number {ino}")
        data = ino.to_bytes(max(1, (ino.bit_length() + 7) // 8), "little")
        probe = 0
        while True:
            mapped = _REMAP_BASE | (_hash56(data, probe) & (_REMAP_BASE - 1))
            if mapped not in self._to_ino:
                break
            probe += 1
        self._to_node[ino] = mapped
        self._to_ino[mapped] = ino
        return mapped

    def pairs(self) -> list[list[int]]:
        """The remapped numbers, as [node part, inode] pairs."""
        return [[mapped, ino] for mapped, ino in self._to_ino.items()]

    def restore(self, pairs: list) -> None:
        for mapped, ino in pairs:
            self._to_node[ino] = mapped
            self._to_ino[mapped] = ino

    def to_ino(self, inner: int) -> int | None:
        if inner >= _REMAP_BASE:
            return self._to_ino.get(inner)
        if inner == 0 or inner in self._reserved:
            return None
        return inner


class _PseudoDir:
    """A directory of the pseudo-root; its children are pseudo dirs or mounts."""

    __slots__ = ("children", "name", "node", "parent", "path")

    def __init__(self, path: str, name: bytes, node: int, parent: _PseudoDir | None) -> None:
        self.path = path
        self.name = name
        self.node = node
        self.parent = parent
        self.children: dict[bytes, _PseudoDir | _Mount] = {}

    def listing_key(self) -> int:
        return 256 + (self.node & INNER_MASK)


class _Mount:
    """A filesystem attached at `path` in `slot`."""

    __slots__ = ("fs", "inos", "name", "parent", "path", "root_ino", "slot")

    def __init__(self, path: str, name: bytes, slot: int, fs: Filesystem, parent: _PseudoDir) -> None:
        self.path = path
        self.name = name
        self.slot = slot
        self.fs = fs
        self.parent = parent
        self.root_ino = fs.root_ino
        # In slot 0 node id 1 is the root, so an inner inode 1 that is not the
        # root must be remapped.
        self.inos = _InoMap(frozenset({ROOT_ID}) if slot == ROOT_SLOT else frozenset())

    def node_of(self, ino: int) -> int:
        if self.slot == ROOT_SLOT and ino == self.root_ino:
            return ROOT_ID
        return (self.slot << SLOT_SHIFT) | self.inos.to_node(ino)

    def inner_of(self, node: int) -> int | None:
        if self.slot == ROOT_SLOT and node == ROOT_ID:
            return self.root_ino
        return self.inos.to_ino(node & INNER_MASK)

    def listing_key(self) -> int:
        return self.slot

    def export(self, attr: InodeAttr) -> InodeAttr:
        return replace(attr, ino=self.node_of(attr.ino))


class Vfs:
    """The pseudo-root: attach/detach filesystems and route requests by node id.

    Node ids: node 1 is the root; a filesystem at "/" (slot 0) shows its own
    inode numbers (its root is node 1); one at "/<name>" (nested paths too) gets
    a slot 1..254 and node ids `(slot << 56) | inode`; pseudo directories live in
    slot 255 under a hash of their path. Inode numbers that do not fit (0, 1 in
    slot 0 unless it is the root, 2**55 and above) are remapped by a
    deterministic hash (`_InoMap`). A new daemon that attaches the same
    filesystems in the same slots therefore computes the same ids.

    Not thread-safe: while the FUSE loop runs, only the loop thread touches it
    (the session actor runs mutations inside the loop).
    """

    def __init__(self) -> None:
        self._root = _PseudoDir("/", b"", ROOT_ID, None)
        self._pseudo: dict[int, _PseudoDir] = {ROOT_ID: self._root}
        self._mounts: dict[str, _Mount] = {}
        self._by_slot: dict[int, _Mount] = {}
        # Names of the "/" filesystem handed to the kernel in the root; they need
        # invalidating when that filesystem is detached.
        self._root_names: set[bytes] = set()
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._time_ns = time.time_ns()

    # -- attach and detach -------------------------------------------------

    def attach(self, path: str, fs: Filesystem, *, slot: int | None = None) -> int:
        """Attach `fs` at `path` and return its slot.

        Args:
            path: absolute, normalized mountpoint inside the FUSE mount.
            fs: the filesystem; the VFS owns it until it is detached.
            slot: the slot to use (restoring a handed-over state), or None for
                the lowest free one.

        Raises:
            AlreadyExists: something is attached at `path`, or a pseudo directory
                with attached filesystems below it is there.
            OtherError: the path is invalid, lies inside another attached
                filesystem, or no (or not the requested) slot is free.
        """
        parts = split_mountpoint(path)
        if path in self._mounts:
            raise AlreadyExists
        if not parts:
            if slot not in (None, ROOT_SLOT):
                raise OtherError(f"VFS failed to handle request, slot {slot} is not for mountpoint /")
            self._add_mount(_Mount(path, b"", ROOT_SLOT, fs, self._root))
            return ROOT_SLOT

        parent = self._root
        depth = 0
        for part in parts[:-1]:
            child = parent.children.get(part)
            if child is None:
                break
            if isinstance(child, _Mount):
                raise OtherError(
                    f"VFS failed to handle request, mountpoint {path} is inside the "
                    f"filesystem mounted at {child.path}"
                )
            parent = child
            depth += 1
        else:
            if parts[-1] in parent.children:
                raise AlreadyExists
        slot = self._choose_slot(path, slot)

        for part in parts[depth:-1]:
            parent = self._add_pseudo_dir(parent, part)
        mount = _Mount(path, parts[-1], slot, fs, parent)
        parent.children[mount.name] = mount
        self._add_mount(mount)
        return slot

    def detach(self, path: str) -> tuple[Invalidation, ...]:
        """Detach and close the filesystem at `path`.

        Returns:
            The directory entries the kernel must forget.

        Raises:
            NotFound: nothing is attached at `path`.
            OtherError: the path is invalid.
        """
        split_mountpoint(path)
        mount = self._mounts.pop(path, None)
        if mount is None:
            raise NotFound
        del self._by_slot[mount.slot]
        if mount.slot == ROOT_SLOT:
            invalidations = tuple(Invalidation(ROOT_ID, name) for name in sorted(self._root_names))
            self._root_names.clear()
        else:
            invalidations = (self._unlink(mount.parent, mount.name),)
        self._close_fs(mount)
        logger.debug("detached %s from slot %d", path, mount.slot)
        return invalidations

    def slots(self) -> dict[str, int]:
        """Return the slot of every attached filesystem, by mountpoint."""
        return {path: mount.slot for path, mount in self._mounts.items()}

    def save_state(self) -> dict[str, dict]:
        """Per mountpoint: slot, remapped inode numbers and the filesystem's own state."""
        return {
            path: {"slot": mount.slot, "inos": mount.inos.pairs(), "fs": mount.fs.save_state()}
            for path, mount in self._mounts.items()
        }

    def restore_inos(self, path: str, pairs: list) -> None:
        """Take over the remapped inode numbers of a previous daemon's mount at `path`."""
        mount = self._mounts.get(path)
        if mount is None:
            raise NotFound
        mount.inos.restore(pairs)

    def close(self) -> None:
        """Close every attached filesystem and forget them."""
        for mount in self._mounts.values():
            self._close_fs(mount)
        self._mounts.clear()
        self._by_slot.clear()
        self._root.children.clear()
        self._pseudo = {ROOT_ID: self._root}
        self._root_names.clear()

    def _choose_slot(self, path: str, wanted: int | None) -> int:
        if wanted is None:
            for slot in SUB_SLOTS:
                if slot not in self._by_slot:
                    return slot
            raise OtherError(f"VFS failed to handle request, no free slot for mountpoint {path}")
        if wanted not in SUB_SLOTS or wanted in self._by_slot:
            raise OtherError(f"VFS failed to handle request, slot {wanted} is not free for {path}")
        return wanted

    def _add_mount(self, mount: _Mount) -> None:
        self._mounts[mount.path] = mount
        self._by_slot[mount.slot] = mount
        logger.debug("attached %s in slot %d", mount.path, mount.slot)

    def _add_pseudo_dir(self, parent: _PseudoDir, name: bytes) -> _PseudoDir:
        path = parent.path.rstrip("/") + "/" + os.fsdecode(name)
        encoded = os.fsencode(path)
        probe = 0
        while True:
            node = (PSEUDO_SLOT << SLOT_SHIFT) | _hash56(encoded, probe)
            if node not in self._pseudo:
                break
            probe += 1
        child = _PseudoDir(path, name, node, parent)
        parent.children[name] = child
        self._pseudo[node] = child
        return child

    def _unlink(self, parent: _PseudoDir, name: bytes) -> Invalidation:
        """Remove `name` from `parent` and the pseudo dirs this leaves empty."""
        del parent.children[name]
        while parent.parent is not None and not parent.children:
            del self._pseudo[parent.node]
            name = parent.name
            parent = parent.parent
            del parent.children[name]
        return Invalidation(parent.node, name)

    @staticmethod
    def _close_fs(mount: _Mount) -> None:
        try:
            mount.fs.close()
        except Exception as ex:
            logger.error("failed to close filesystem at %s: %s", mount.path, ex)

    # -- requests ------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> InodeAttr:
        """Find `name` in directory `parent`, counting one kernel reference."""
        pseudo = self._pseudo.get(parent)
        if pseudo is None:
            mount, inner = self._mount_of(parent)
            if name == b".." and inner == mount.root_ino:
                return self.getattr(mount.parent.node)
            return mount.export(mount.fs.lookup(inner, name))
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(pseudo.parent.node if pseudo.parent is not None else ROOT_ID)
        child = pseudo.children.get(name)
        if child is not None:
            return self._child_attr(child, count=True)
        root_mount = self._root_mount() if parent == ROOT_ID else None
        if root_mount is None:
            raise OSError(errno.ENOENT, "no such entry")
        attr = root_mount.export(root_mount.fs.lookup(root_mount.root_ino, name))
        self._root_names.add(name)
        return attr

    def count_lookup(self, node: int) -> None:
        """Count one kernel reference to `node` (an accepted READDIRPLUS entry)."""
        if node in self._pseudo:
            return
        target = self._try_mount_of(node)
        if target is not None:
            target[0].fs.count_lookup(target[1])

    def forget(self, node: int, nlookup: int) -> None:
        """Drop `nlookup` kernel references to `node`; unknown nodes are ignored."""
        if node in self._pseudo:
            return
        target = self._try_mount_of(node)
        if target is not None:
            target[0].fs.forget(target[1], nlookup)

    def getattr(self, node: int) -> InodeAttr:
        """Return the attributes of `node`."""
        if self._is_pseudo(node):
            return self._pseudo_attr(self._pseudo[node])
        mount, inner = self._mount_of(node)
        return mount.export(mount.fs.getattr(inner))

    def readlink(self, node: int) -> bytes:
        """Return the target of symlink `node`."""
        mount, inner = self._fs_node(node, errno.EINVAL)
        return mount.fs.readlink(inner)

    def opendir(self, node: int) -> None:
        """Check that `node` is a directory that can be listed."""
        if node in self._pseudo:
            return
        mount, inner = self._mount_of(node)
        mount.fs.opendir(inner)

    def readdir(self, node: int, start: int) -> Generator[DirEntry, None, None]:
        """List directory `node` after offset `start`; attrs carry node ids.

        In the root, the "/" filesystem's entries come first (minus names a
        pseudo child shadows), then the pseudo children at offsets above
        `MAX_DIR_OFFSET`, ordered by slot or path hash so offsets stay stable
        while other entries come and go.
        """
        pseudo = self._pseudo.get(node)
        if pseudo is None:
            mount, inner = self._mount_of(node)
            for entry in mount.fs.readdir(inner, start):
                yield self._export_entry(mount, inner, entry)
            return
        if start < _PSEUDO_OFFSET_BASE:
            root_mount = self._root_mount() if node == ROOT_ID else None
            if root_mount is not None:
                for entry in root_mount.fs.readdir(root_mount.root_ino, start):
                    if entry.name in pseudo.children:
                        continue
                    if entry.name not in (b".", b".."):
                        self._root_names.add(entry.name)
                    yield self._export_entry(root_mount, root_mount.root_ino, entry)
            else:
                parent = pseudo.parent if pseudo.parent is not None else pseudo
                if start < 1:
                    yield DirEntry(b".", self.getattr(node), 1)
                if start < 2:
                    yield DirEntry(b"..", self.getattr(parent.node), 2)
        children = sorted(pseudo.children.items(), key=lambda item: item[1].listing_key())
        for name, child in children:
            offset = _PSEUDO_OFFSET_BASE + child.listing_key() + 1
            if offset > start:
                yield DirEntry(name, self._child_attr(child, count=False), offset)

    def releasedir(self, node: int) -> None:
        """Forget listing state of directory `node`."""
        if self._is_pseudo(node):
            return
        target = self._try_mount_of(node)
        if target is not None:
            target[0].fs.releasedir(target[1])

    def open(self, node: int, flags: int) -> None:
        """Open file `node` for reading."""
        mount, inner = self._fs_node(node, errno.EISDIR)
        mount.fs.open(inner, flags)

    def read(self, node: int, off: int, size: int) -> bytes:
        """Read up to `size` bytes of file `node` at `off`."""
        mount, inner = self._fs_node(node, errno.EISDIR)
        return mount.fs.read(inner, off, size)

    def file_of(self, node: int) -> tuple[Filesystem, int]:
        """Return the filesystem and its inode number behind file `node`.

        The FUSE layer uses it to run a read that may block outside the loop
        thread while only the loop thread touches the VFS itself.
        """
        mount, inner = self._fs_node(node, errno.EISDIR)
        return mount.fs, inner

    def release(self, node: int) -> None:
        """Close one open of `node`; unknown nodes are ignored."""
        if self._is_pseudo(node):
            return
        target = self._try_mount_of(node)
        if target is not None:
            target[0].fs.release(target[1])

    def statfs(self) -> StatFs:
        """Return the statistics of the "/" filesystem, or empty ones."""
        root_mount = self._root_mount()
        return root_mount.fs.statfs() if root_mount is not None else StatFs()

    def getxattr(self, node: int, name: bytes) -> bytes:
        """Return extended attribute `name` of `node`."""
        mount, inner = self._fs_node(node, errno.ENODATA)
        return mount.fs.getxattr(inner, name)

    def listxattr(self, node: int) -> list[bytes]:
        """Return the extended attribute names of `node`."""
        if self._is_pseudo(node):
            return []
        mount, inner = self._mount_of(node)
        return mount.fs.listxattr(inner)

    # -- helpers ---------------------------------------------------------------

    def _root_mount(self) -> _Mount | None:
        return self._by_slot.get(ROOT_SLOT)

    def _is_pseudo(self, node: int) -> bool:
        """Tell whether `node` is a pseudo dir (the root is not while "/" is attached)."""
        if node == ROOT_ID:
            return ROOT_SLOT not in self._by_slot
        return node in self._pseudo

    def _try_mount_of(self, node: int) -> tuple[_Mount, int] | None:
        mount = self._root_mount() if node == ROOT_ID else self._by_slot.get(node >> SLOT_SHIFT)
        if mount is None:
            return None
        inner = mount.inner_of(node)
        return None if inner is None else (mount, inner)

    def _mount_of(self, node: int) -> tuple[_Mount, int]:
        target = self._try_mount_of(node)
        if target is None:
            raise _no_node(node)
        return target

    def _fs_node(self, node: int, pseudo_errno: int) -> tuple[_Mount, int]:
        """Resolve a node that must belong to a filesystem, not a pseudo dir."""
        if self._is_pseudo(node):
            raise OSError(pseudo_errno, os.strerror(pseudo_errno))
        return self._mount_of(node)

    def _child_attr(self, child: _PseudoDir | _Mount, *, count: bool) -> InodeAttr:
        if isinstance(child, _PseudoDir):
            return self._pseudo_attr(child)
        attr = child.export(child.fs.getattr(child.root_ino))
        if count:
            child.fs.count_lookup(child.root_ino)
        return attr

    def _export_entry(self, mount: _Mount, dir_ino: int, entry: DirEntry) -> DirEntry:
        if not 0 < entry.next_offset <= MAX_DIR_OFFSET:
            raise OSError(errno.EIO, f"directory offset {entry.next_offset} out of range")
        if entry.name == b".." and dir_ino == mount.root_ino:
            # The parent of a filesystem's root is the pseudo directory it is attached in.
            return DirEntry(b"..", self.getattr(mount.parent.node), entry.next_offset)
        return DirEntry(entry.name, mount.export(entry.attr), entry.next_offset)

    def _pseudo_attr(self, pseudo: _PseudoDir) -> InodeAttr:
        return InodeAttr(
            ino=pseudo.node,
            mode=_PSEUDO_DIR_MODE,
            nlink=2 + len(pseudo.children),
            uid=self._uid,
            gid=self._gid,
            rdev=0,
            size=0,
            blocks=0,
            blksize=4096,
            atime_ns=self._time_ns,
            mtime_ns=self._time_ns,
            ctime_ns=self._time_ns,
        )
