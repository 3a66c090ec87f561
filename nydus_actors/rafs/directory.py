"""Listing and looking up directories, one lazily parsed and cached block at a time.

Blocks are self-contained and byte-sorted (format doc §6): a lookup binary-searches the
blocks by their first name, then the names inside one block.
"""

from __future__ import annotations

import errno
import functools
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

from nydus_actors.rafs.dirent import DIRENT_SIZE, MAX_NAME, DirBlock, DirEntry, parse_block
from nydus_actors.rafs.errors import RafsError
from nydus_actors.rafs.inode import Inode

_BLOCK_CACHE = 1 << 12
_NAMEOFF = struct.Struct("<H")


class Directories:
    """The directories of one image.

    Args:
        inode: returns the decoded inode of a nid.
        body: returns bytes `[off, end)` of a directory body.
        blkszbits: log2 of the block size.
        file_size: size of the image, which bounds any directory.
        path: the image path, for error texts.
    """

    def __init__(
        self,
        inode: Callable[[int], Inode],
        body: Callable[[Inode, int, int], bytes],
        blkszbits: int,
        file_size: int,
        path: str,
    ) -> None:
        self._inode = inode
        self._body = body
        self._bits = blkszbits
        self._block_size = 1 << blkszbits
        self._file_size = file_size
        self._path = path
        self._block = functools.lru_cache(maxsize=_BLOCK_CACHE)(self._load_block)
        self._counts = functools.lru_cache(maxsize=_BLOCK_CACHE)(self._load_counts)

    def clear(self) -> None:
        """Drop every cached block."""
        self._block.cache_clear()
        self._counts.cache_clear()

    def _where(self, nid: int) -> str:
        return f"invalid rafs image {self._path}: inode {nid}"

    def _directory(self, nid: int) -> Inode:
        inode = self._inode(nid)
        if not inode.is_dir:
            raise RafsError(f"inode {nid} is not a directory", errno=errno.ENOTDIR)
        # Directory blocks are never shared, so a directory cannot outgrow the image.
        if inode.size > self._file_size:
            raise RafsError(f"{self._where(nid)}: directory of {inode.size} bytes is larger than the image")
        return inode

    def _span(self, inode: Inode, k: int) -> tuple[int, int]:
        start = k << self._bits
        return start, min(inode.size, start + self._block_size)

    def _load_block(self, nid: int, k: int) -> DirBlock:
        inode = self._inode(nid)
        return parse_block(self._body(inode, *self._span(inode, k)), f"{self._where(nid)} block {k}")

    def _load_counts(self, nid: int) -> tuple[int, ...]:
        """Cumulative entry counts before each block, read from each block's first name offset."""
        inode = self._directory(nid)
        counts = [0]
        for k in range((inode.size + self._block_size - 1) >> self._bits):
            start, end = self._span(inode, k)
            if end - start < DIRENT_SIZE:
                raise RafsError(f"{self._where(nid)} block {k}: directory block is too short")
            nameoff = _NAMEOFF.unpack_from(self._body(inode, start, start + DIRENT_SIZE), 8)[0]
            if nameoff < DIRENT_SIZE or nameoff % DIRENT_SIZE or nameoff >= end - start:
                raise RafsError(f"{self._where(nid)} block {k}: bad first name offset {nameoff}")
            counts.append(counts[-1] + nameoff // DIRENT_SIZE)
        return tuple(counts)

    def readdir(self, nid: int, start: int = 0) -> Iterator[DirEntry]:
        """List directory `nid` from entry index `start`; each entry's offset is its index + 1."""
        # Checked here, not in the generator, so a bad directory fails at the call.
        counts = self._counts(nid)
        return self._entries(nid, counts, max(start, 0))

    def _entries(self, nid: int, counts: tuple[int, ...], start: int) -> Iterator[DirEntry]:
        k = bisect_right(counts, start) - 1
        while k < len(counts) - 1:
            block = self._block(nid, k)
            first = counts[k]
            for i in range(max(start - first, 0), len(block.names)):
                yield DirEntry(block.names[i], block.nids[i], block.types[i], first + i + 1)
            k += 1

    def lookup(self, nid: int, name: bytes) -> int | None:
        """Return the nid of `name` in directory `nid`, or None when absent."""
        inode = self._directory(nid)
        blocks = (inode.size + self._block_size - 1) >> self._bits
        if not blocks or not 0 < len(name) <= MAX_NAME:
            return None
        # The last block whose first name is <= name is the only one that can hold it.
        lo, hi = 0, blocks - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self._block(nid, mid).names[0] <= name:
                lo = mid
            else:
                hi = mid - 1
        block = self._block(nid, lo)
        i = bisect_left(block.names, name)
        if i < len(block.names) and block.names[i] == name:
            return block.nids[i]
        return None
