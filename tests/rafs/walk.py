"""Whole-tree snapshots, from a kernel mount and from `RafsImage`, in one comparable shape."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nydus_actors.rafs import RafsImage

READ_PIECE = 1 << 20


@dataclass(frozen=True)
class Node:
    """What stat, readlink, listxattr and a full read say about one path."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    ino: int
    rdev: int
    target: bytes | None
    xattrs: dict[bytes, bytes]
    sha256: str | None
    dots: tuple[int, int] | None


def kernel_snapshot(root: Path) -> dict[bytes, Node]:
    """Snapshot the mounted tree at `root`; keys are paths relative to it (b"" = root)."""
    base = os.fsencode(root)
    nodes: dict[bytes, Node] = {}
    pending = [b""]
    while pending:
        rel = pending.pop()
        path = os.path.join(base, rel) if rel else base
        st = os.lstat(path)
        names = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        digest = None
        dots = None
        if stat.S_ISREG(st.st_mode):
            digest = _hash_file(path)
        elif stat.S_ISDIR(st.st_mode):
            # The mount root's ".." leaves the filesystem; EROFS points it at the root itself.
            parent = st.st_ino if not rel else os.lstat(os.path.join(path, b"..")).st_ino
            dots = (os.lstat(os.path.join(path, b".")).st_ino, parent)
            pending.extend(os.path.join(rel, name) if rel else name for name in os.listdir(path))
        nodes[rel] = Node(
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            nlink=st.st_nlink,
            ino=st.st_ino,
            rdev=st.st_rdev,
            target=target,
            xattrs=xattrs,
            sha256=digest,
            dots=dots,
        )
    return nodes


def _hash_file(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(READ_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def reader_snapshot(image: RafsImage, read: Callable[[int, int, int], bytes]) -> dict[bytes, Node]:
    """Snapshot the image through the reader; `read(nid, off, size)` reads file bytes.

    Every listed name is also looked up, and must resolve to the listed nid.
    """
    nodes: dict[bytes, Node] = {}
    pending = [(b"", image.root_nid)]
    while pending:
        rel, nid = pending.pop()
        inode = image.inode(nid)
        target = image.readlink(nid) if inode.is_symlink else None
        digest = None
        dots = None
        if inode.is_reg:
            hasher = hashlib.sha256()
            for off in range(0, inode.size, READ_PIECE):
                piece = read(nid, off, READ_PIECE)
                assert len(piece) == min(READ_PIECE, inode.size - off)
                hasher.update(piece)
            digest = hasher.hexdigest()
        elif inode.is_dir:
            found: dict[bytes, int] = {}
            for entry in image.readdir(nid):
                assert entry.file_type == image.inode(entry.nid).file_type, (rel, entry)
                assert image.lookup(nid, entry.name) == entry.nid, (rel, entry)
                found[entry.name] = entry.nid
            dots = (found.pop(b"."), found.pop(b".."))
            assert image.lookup(nid, b"no such name \xff") is None
            pending.extend((os.path.join(rel, name) if rel else name, child) for name, child in found.items())
        nodes[rel] = Node(
            mode=inode.mode,
            uid=inode.uid,
            gid=inode.gid,
            size=inode.size,
            mtime_ns=inode.mtime * 10**9 + inode.mtime_nsec,
            nlink=inode.nlink,
            ino=nid,
            rdev=inode.rdev,
            target=target,
            xattrs=image.xattrs(nid),
            sha256=digest,
            dots=dots,
        )
    return nodes
