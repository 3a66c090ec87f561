"""Byte encodings of the EROFS / RAFS v6 structures the builder writes (spec §1-§7, §10).

Pure functions from field values to little-endian bytes; no layout decisions here.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence

from nydus_actors.rafs.inode import FILE_TYPES  # one table for the reader and the writer

BLOCK_SIZE = 4096
BLKSZBITS = 12
EROFS_MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
EXT_SB_OFFSET = 1152
DEVT_SLOTOFF = 11
DEVT_OFFSET = DEVT_SLOTOFF * 128

COMPAT_RAFS_V6 = 0x4000_0000
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8

# extended superblock flags beyond the compressor and digester bits
RAFS_EXPLICIT_UID_GID = 0x10
RAFS_HAS_XATTR = 0x20

# blob features: every chunk's uncompressed offset is 4 KiB aligned
BLOB_FEATURE_ALIGNED = 0x1

LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFF_FFFF

COMPACT_SIZE = 32
EXTENDED_SIZE = 64
DIRENT_SIZE = 12


# (index, prefix); whole-name entries first so that they win over no prefix at all
_XATTR_WHOLE = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}
_XATTR_PREFIXES = ((b"user.", 1), (b"trusted.", 4), (b"security.", 6))


def file_type(mode: int) -> int:
    """EROFS dirent file_type of an inode mode."""
    return FILE_TYPES.get(stat.S_IFMT(mode), 0)


def encode_rdev(rdev: int) -> int:
    """Linux "new" dev_t encoding (what the kernel decodes from i_u)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def superblock(*, root_nid: int, inos: int, blocks: int, meta_blkaddr: int, extra_devices: int) -> bytes:
    """The 128-byte EROFS superblock, checksum left 0 as Nydus does."""
    sb = struct.pack(
        "<IIIBBHQQIIII16s16sIHHH",
        EROFS_MAGIC,
        0,
        COMPAT_RAFS_V6,
        BLKSZBITS,
        0,
        root_nid,
        inos,
        0,
        0,
        blocks,
        meta_blkaddr,
        0,
        bytes(16),
        bytes(16),
        INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE,
        0,
        extra_devices,
        DEVT_SLOTOFF,
    )
    return sb.ljust(128, b"\0")


def ext_superblock(
    *,
    flags: int,
    blob_table_offset: int,
    blob_table_size: int,
    chunk_size: int,
    chunk_table_offset: int,
    chunk_table_size: int,
) -> bytes:
    """The 256-byte RAFS v6 extended superblock at byte 1152 (§10.2); no prefetch table."""
    ext = struct.pack(
        "<QQIIQQQII",
        flags,
        blob_table_offset,
        blob_table_size,
        chunk_size,
        chunk_table_offset,
        chunk_table_size,
        0,
        0,
        0,
    )
    return ext.ljust(256, b"\0")


def device_slot(*, tag: bytes, blocks: int, mapped_blkaddr: int) -> bytes:
    """One 128-byte device table slot (§5): the blob id as tag."""
    return struct.pack("<64sII", tag, blocks, mapped_blkaddr).ljust(128, b"\0")


def blob_entry(
    *,
    blob_id: bytes,
    blob_index: int,
    chunk_size: int,
    chunk_count: int,
    compression_algo: int,
    digest_algo: int,
    features: int,
    compressed_size: int,
    uncompressed_size: int,
) -> bytes:
    """One 256-byte blob table entry `RafsV6Blob` (§10.4); no TOC, no blob meta."""
    head = struct.pack(
        "<64sIIIIIIQQ",
        blob_id,
        blob_index,
        chunk_size,
        chunk_count,
        compression_algo,
        digest_algo,
        features,
        compressed_size,
        uncompressed_size,
    )
    return head.ljust(256, b"\0")


_CHUNK_INFO = struct.Struct("<32sIIIIQQQII")


def chunk_info(
    *,
    digest: bytes,
    blob_index: int,
    flags: int,
    compressed_size: int,
    uncompressed_size: int,
    compressed_offset: int,
    uncompressed_offset: int,
    file_offset: int,
    index: int,
) -> bytes:
    """One 80-byte chunk info entry `RafsV5ChunkInfo` (§10.5); crc32 0."""
    return _CHUNK_INFO.pack(
        digest,
        blob_index,
        flags,
        compressed_size,
        uncompressed_size,
        compressed_offset,
        uncompressed_offset,
        file_offset,
        index,
        0,
    )


_INDEX = struct.Struct("<HBBI")


def chunk_index(*, ci_index: int, blob_index: int, blkaddr: int) -> bytes:
    """One 8-byte chunk index entry as Nydus packs it (§10.6): the device id is blob_index + 1."""
    return _INDEX.pack(ci_index & 0xFFFF, blob_index + 1, (ci_index >> 16) & 0xFF, blkaddr)


_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")


def inode(
    *,
    extended: bool,
    layout: int,
    xattr_icount: int,
    mode: int,
    nlink: int,
    size: int,
    i_u: int,
    ino: int,
    uid: int,
    gid: int,
    mtime: int,
    mtime_nsec: int,
) -> bytes:
    """A compact (32 B) or extended (64 B) inode; compact ones carry no mtime of their own."""
    if extended:
        return _EXTENDED.pack(
            1 | layout << 1,
            xattr_icount,
            mode,
            0,
            size,
            i_u,
            ino,
            uid,
            gid,
            mtime & 0xFFFF_FFFF_FFFF_FFFF,
            mtime_nsec,
            nlink,
            bytes(16),
        )
    return _COMPACT.pack(layout << 1, xattr_icount, mode, nlink, size, 0, i_u, ino, uid, gid, 0)


def xattr_key(name: bytes) -> tuple[int, bytes] | None:
    """(e_name_index, suffix) for a full xattr name, or None when EROFS has no prefix for it."""
    whole = _XATTR_WHOLE.get(name)
    if whole is not None:
        return whole, b""
    for prefix, index in _XATTR_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    return None


def xattr_area(xattrs: Sequence[tuple[int, bytes, bytes]]) -> tuple[int, bytes]:
    """(i_xattr_icount, bytes) of an inline xattr area (§7): 12-byte header, 4-aligned entries."""
    if not xattrs:
        return 0, b""
    parts = [bytes(12)]
    for index, suffix, value in xattrs:
        entry = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
        parts.append(entry + bytes(-len(entry) % 4))
    area = b"".join(parts)
    return (len(area) - 12) // 4 + 1, area


def dir_blocks(names: Sequence[bytes], block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """Split sorted dirent names into blocks: a list of [start, end) index ranges."""
    blocks = []
    start, used = 0, 0
    for i, name in enumerate(names):
        need = DIRENT_SIZE + len(name)
        if used + need > block_size:
            blocks.append((start, i))
            start, used = i, 0
        used += need
    blocks.append((start, len(names)))
    return blocks


def dir_size(names: Sequence[bytes], block_size: int = BLOCK_SIZE) -> int:
    """i_size of a directory body: full blocks, then the exact length of the last one."""
    ranges = dir_blocks(names, block_size)
    s, e = ranges[-1]
    last = sum(DIRENT_SIZE + len(n) for n in names[s:e])
    return (len(ranges) - 1) * block_size + last


def dir_body(entries: Sequence[tuple[bytes, int, int]], block_size: int = BLOCK_SIZE) -> bytes:
    """Directory body from sorted (name, nid, file_type); every block self-contained, zero padded."""
    names = [e[0] for e in entries]
    out = bytearray()
    ranges = dir_blocks(names, block_size)
    for bi, (s, e) in enumerate(ranges):
        block = bytearray()
        nameoff = DIRENT_SIZE * (e - s)
        for name, nid, ftype in entries[s:e]:
            block += struct.pack("<QHBB", nid, nameoff, ftype, 0)
            nameoff += len(name)
        for name, _, _ in entries[s:e]:
            block += name
        if bi != len(ranges) - 1:
            block += bytes(block_size - len(block))
        out += block
    return bytes(out)
