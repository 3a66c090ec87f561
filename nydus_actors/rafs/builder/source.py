"""Walk a directory into an image tree, then feed its regular files to the blob writer.

Names are bytes and sorted bytewise; hard links inside the tree share one node.
"""

from __future__ import annotations

import errno
import os
import stat

from nydus_actors.rafs.builder.chunker import BlobWriter
from nydus_actors.rafs.builder.errors import BuildError
from nydus_actors.rafs.builder.progress import Progress
from nydus_actors.rafs.builder.tree import Node, split_mtime_ns


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as ex:
        if ex.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    out = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as ex:
            # The attribute went away between list and get.
            if ex.errno != errno.ENODATA:
                raise
    return out


def _node(path: bytes, st: os.stat_result) -> Node:
    sec, nsec = split_mtime_ns(st.st_mtime_ns)
    node = Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=sec, mtime_nsec=nsec)
    node.xattrs = _xattrs(path)
    if stat.S_ISDIR(st.st_mode):
        node.children = {}
    elif stat.S_ISLNK(st.st_mode):
        node.target = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node.rdev = st.st_rdev
    return node


def _scan(root_path: bytes) -> tuple[Node, list[tuple[Node, bytes]], int]:
    """Metadata pass: the tree, its regular files in layout order, and their total size."""
    root = _node(root_path, os.stat(root_path))
    files: list[tuple[Node, bytes]] = []
    total = 0
    links: dict[tuple[int, int], Node] = {}
    queue = [(root, root_path)]
    pos = 0
    while pos < len(queue):
        directory, dir_path = queue[pos]
        pos += 1
        with os.scandir(dir_path) as it:
            names = sorted(entry.name for entry in it)
        assert directory.children is not None
        for name in names:
            path = os.path.join(dir_path, name)
            st = os.lstat(path)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
                directory.children[name] = links[key]
                continue
            node = _node(path, st)
            directory.children[name] = node
            if st.st_nlink > 1:
                links[key] = node
            if node.is_dir:
                queue.append((node, path))
            elif node.is_reg:
                files.append((node, path))
                total += st.st_size
    return root, files, total


def load_directory(path: str, blobs: BlobWriter, progress: Progress | None = None) -> Node:
    """Build the tree of directory `path`, chunking every regular file into `blobs`."""
    root_path = os.fsencode(os.path.abspath(path))
    try:
        root, files, total = _scan(root_path)
    except OSError as ex:
        raise BuildError(f"{os.fsdecode(ex.filename or root_path)}: {ex.strerror}") from None
    if progress is not None:
        progress.start(total)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress.update(done, nbytes=n)

    for node, file_path in files:
        try:
            with open(file_path, "rb") as f:
                node.size, node.chunks = blobs.add_file(f, on_bytes)
        except OSError as ex:
            raise BuildError(f"{os.fsdecode(file_path)}: {ex.strerror}") from None
        if progress is not None:
            progress.update(done, files=1)
    return root
