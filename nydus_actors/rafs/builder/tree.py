"""The in-memory image tree a source produces and the bootstrap writer lays out.

A `Node` is one inode; a hard link is the same `Node` object under two names.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from nydus_actors.rafs.builder.chunker import Chunk


@dataclass(eq=False, slots=True)
class Node:
    """One inode: metadata plus the part of its body that depends on its type."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: symlink target (the body of a symlink inode)
    target: bytes = b""
    #: regular files: byte size and the chunks covering it, in file order
    size: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    #: directories: name -> node
    children: dict[bytes, Node] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def new_dir(mode: int = 0o755) -> Node:
    """A directory with no entries; `mode` holds the permission bits."""
    return Node(mode=stat.S_IFDIR | (mode & 0o7777), children={})


def split_mtime_ns(mtime_ns: int) -> tuple[int, int]:
    """Seconds and nanoseconds (0..999999999), flooring negative times the way stat does."""
    return divmod(mtime_ns, 1_000_000_000)


def bfs(root: Node) -> Iterator[tuple[Node, Node]]:
    """Yield (node, parent directory) for every distinct inode, breadth first by sorted name.

    The root is its own parent. A hard-linked node comes once, at its first name.
    """
    seen = {id(root)}
    queue = [(root, root)]
    pos = 0
    while pos < len(queue):
        node, parent = queue[pos]
        pos += 1
        yield node, parent
        if node.children is None:
            continue
        for name in sorted(node.children):
            child = node.children[name]
            if id(child) not in seen:
                seen.add(id(child))
                queue.append((child, node))
