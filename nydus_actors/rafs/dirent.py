"""Directory blocks: 12-byte dirents packed at the block start, names after them.

Format doc §6. Each block is self-contained and byte-sorted, so blocks parse independently.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from nydus_actors.rafs.errors import RafsError

DIRENT_SIZE = 12
MAX_NAME = 255
_DIRENT = struct.Struct("<QHBx")
_NAMEOFF = struct.Struct("<H")


class DirEntry(NamedTuple):
    """One directory entry; `offset` resumes a listing right after it."""

    name: bytes
    nid: int
    file_type: int
    offset: int


class DirBlock(NamedTuple):
    """The decoded entries of one directory block, in on-disk order."""

    names: tuple[bytes, ...]
    nids: tuple[int, ...]
    types: tuple[int, ...]


def entry_count(data: bytes, where: str) -> int:
    """Return how many dirents the block `data` holds, checking the first name offset."""
    if len(data) < DIRENT_SIZE:
        raise RafsError(f"{where}: directory block of {len(data)} bytes is too short")
    nameoff = _NAMEOFF.unpack_from(data, 8)[0]
    if nameoff < DIRENT_SIZE or nameoff % DIRENT_SIZE or nameoff >= len(data):
        raise RafsError(f"{where}: bad first name offset {nameoff} in a {len(data)}-byte block")
    return nameoff // DIRENT_SIZE


def _name_end(data: bytes, start: int) -> int:
    # The last name runs to the first NUL, or to the end of the block.
    nul = data.find(b"\0", start)
    return len(data) if nul < 0 else nul


def parse_block(data: bytes, where: str) -> DirBlock:
    """Decode every entry of one directory block.

    Raises:
        RafsError: offsets out of order or outside the block, empty or too long
            names, or an unknown file type.
    """
    count = entry_count(data, where)
    raw = list(_DIRENT.iter_unpack(data[: count * DIRENT_SIZE]))
    size = len(data)
    names = []
    nids = []
    types = []
    for k, (nid, start, ftype) in enumerate(raw):
        end = raw[k + 1][1] if k + 1 < count else _name_end(data, start)
        if not count * DIRENT_SIZE <= start < end <= size or end - start > MAX_NAME:
            raise RafsError(f"{where}: dirent {k} has bad name bounds {start}..{end}")
        if ftype >= 8:
            raise RafsError(f"{where}: dirent {k} has unknown file type {ftype}")
        names.append(data[start:end])
        nids.append(nid)
        types.append(ftype)
    return DirBlock(tuple(names), tuple(nids), tuple(types))
