"""Compact (32 B) and extended (64 B) EROFS inodes, decoded into immutable values.

Format doc §2: nid -> `meta_blkaddr x bs + nid x 32`; layouts 0/2/4 are readable, 1/3 compressed.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from nydus_actors.rafs.errors import corrupt
from nydus_actors.rafs.superblock import SuperBlock

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

#: A block address meaning "no data here": a hole, or an entirely inline body.
NULL_ADDR = 0xFFFFFFFF
INODE_SLOT = 32

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
_CHUNK_FORMAT_KNOWN = CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES

_FORMAT_EXTENDED = 0x1
_FORMAT_NLINK_1 = 0x10
_FORMAT_KNOWN = 0x1F

_COMPACT = struct.Struct("<HHHHIIIIHH")
_EXTENDED = struct.Struct("<HHHHQIIIIqII")  # i_mtime is signed (time64_t), as the kernel reads it

#: EROFS dirent file types by `S_IFMT` value (format doc §6).
FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}


@dataclass(frozen=True, slots=True)
class Inode:
    """One decoded inode.

    Attributes:
        nid: the inode's slot number, which the kernel reports as st_ino.
        rdev: an `st_rdev` value (`os.makedev` encoding); 0 except for devices.
        layout: the EROFS data layout (0 flat plain, 2 flat inline, 4 chunk based).
        xattr_count: `i_xattr_icount`, the size of the inline xattr area in 4-byte units (+1 header).
        ino: the on-disk `i_ino` (informational; nid is the stable number).
        extended: a 64-byte inode.
        offset: byte offset of the inode in the image.
        inline_offset: byte offset just past the inode and its inline xattrs.
        raw_u: the `i_u` union (start block, or the chunk format of chunk-based inodes).
    """

    nid: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    rdev: int
    layout: int
    xattr_count: int
    ino: int
    extended: bool
    offset: int
    inline_offset: int
    raw_u: int

    @property
    def is_dir(self) -> bool:
        """Whether this is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """Whether this is a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """Whether this is a symbolic link."""
        return stat.S_ISLNK(self.mode)

    @property
    def file_type(self) -> int:
        """The EROFS dirent file type (1 reg … 7 symlink)."""
        return FILE_TYPES[stat.S_IFMT(self.mode)]

    @property
    def xattr_size(self) -> int:
        """Bytes of the inline xattr area right after the inode."""
        return 12 + 4 * (self.xattr_count - 1) if self.xattr_count else 0

    @property
    def chunk_format(self) -> int:
        """The chunk format word of a chunk-based inode."""
        return self.raw_u & 0xFFFF


def decode_rdev(value: int) -> int:
    """Turn the Linux "new" dev_t encoding of `i_u` into an `st_rdev` value."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def decode_inode(buf: bytes | memoryview, file_size: int, sb: SuperBlock, nid: int, path: str) -> Inode:
    """Decode and check the inode `nid`.

    Raises:
        RafsError: the slot lies outside the file, or the inode uses an unknown
            format bit, a compressed or reserved layout, or an unknown file type.
    """
    if nid < 0:
        raise corrupt(path, f"negative nid {nid}")
    offset = sb.meta_blkaddr * sb.block_size + nid * INODE_SLOT
    if offset + INODE_SLOT > file_size:
        raise corrupt(path, f"inode {nid} at byte {offset} lies past the end of the file")
    i_format = struct.unpack_from("<H", buf, offset)[0]
    if i_format & ~_FORMAT_KNOWN:
        raise corrupt(path, f"inode {nid} has unsupported format bits 0x{i_format:x}")
    layout = (i_format >> 1) & 0x7
    if layout in (LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT):
        raise corrupt(path, f"inode {nid} uses compressed layout {layout}, which is not supported")
    if layout > LAYOUT_CHUNK_BASED:
        raise corrupt(path, f"inode {nid} has unknown data layout {layout}")
    if i_format & _FORMAT_EXTENDED:
        if offset + _EXTENDED.size > file_size:
            raise corrupt(path, f"extended inode {nid} is cut off by the end of the file")
        (_, icount, mode, _, size, raw_u, ino, uid, gid, mtime, nsec, nlink) = _EXTENDED.unpack_from(
            buf, offset
        )
        isize = 64
    else:
        (_, icount, mode, nlink, size, mtime_rel, raw_u, ino, uid, gid) = _COMPACT.unpack_from(buf, offset)
        mtime = sb.build_time + mtime_rel
        nsec = sb.build_time_nsec
        isize = 32
    fmt = stat.S_IFMT(mode)
    if fmt not in FILE_TYPES:
        raise corrupt(path, f"inode {nid} has unknown file type in mode 0o{mode:o}")
    if i_format & _FORMAT_NLINK_1 and fmt != stat.S_IFDIR and not i_format & _FORMAT_EXTENDED:
        nlink = 1
    xsize = 12 + 4 * (icount - 1) if icount else 0
    inline_offset = offset + isize + xsize
    if inline_offset > file_size:
        raise corrupt(path, f"inline xattrs of inode {nid} run past the end of the file")
    if layout == LAYOUT_CHUNK_BASED and (raw_u & 0xFFFF) & ~_CHUNK_FORMAT_KNOWN:
        raise corrupt(path, f"inode {nid} has unsupported chunk format 0x{raw_u & 0xFFFF:x}")
    rdev = decode_rdev(raw_u) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return Inode(
        nid=nid,
        mode=mode,
        nlink=nlink,
        uid=uid,
        gid=gid,
        size=size,
        mtime=mtime,
        mtime_nsec=nsec,
        rdev=rdev,
        layout=layout,
        xattr_count=icount,
        ino=ino,
        extended=bool(i_format & _FORMAT_EXTENDED),
        offset=offset,
        inline_offset=inline_offset,
        raw_u=raw_u,
    )
