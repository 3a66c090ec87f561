"""Lay out an image tree as a RAFS v6 bootstrap (EROFS metadata + Nydus tables) and write it.

Layout (spec §10.1): block 0 = superblock, extended superblock, device table; block 1 = blob
table; inodes from block 2 in BFS order; then whole directory/symlink blocks; then the chunk table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass

from nydus_actors.rafs.builder import ondisk
from nydus_actors.rafs.builder.chunker import Blob
from nydus_actors.rafs.builder.codec import Compressor, Digester
from nydus_actors.rafs.builder.errors import BuildError
from nydus_actors.rafs.builder.ondisk import BLOCK_SIZE as BS
from nydus_actors.rafs.builder.tree import Node, bfs

logger = logging.getLogger(__name__)

BLOB_TABLE_OFFSET = BS
#: meta_blkaddr is the blob table's block, so the root inode at the next block has nid 128:
#: a non-zero root nid, as Nydus keeps it (glibc skips d_ino 0).
META_BLKADDR = 1
FIRST_INODE_OFFSET = 2 * BS
#: unified-address alignment of a blob's device space, after the bootstrap (Nydus builder)
_SEG_ALIGN = 0x8_0000
_U32 = 0xFFFF_FFFF
_U16 = 0xFFFF


@dataclass(slots=True)
class _Slot:
    """Where one inode goes and how its body is stored."""

    node: Node
    parent: Node
    ino: int
    nlink: int
    size: int
    extended: bool
    xattr_icount: int
    xattrs: bytes
    layout: int = ondisk.LAYOUT_FLAT_PLAIN
    offset: int = 0
    #: bytes of the body kept in whole blocks after the inode area, and their first block
    head_len: int = 0
    head_blkaddr: int = ondisk.NULL_ADDR
    #: sorted dirent names of a directory, "." and ".." included
    names: list[bytes] | None = None

    @property
    def isize(self) -> int:
        return ondisk.EXTENDED_SIZE if self.extended else ondisk.COMPACT_SIZE

    @property
    def fixed(self) -> int:
        return self.isize + len(self.xattrs)


def _align(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def _xattr_list(node: Node, where: str) -> list[tuple[int, bytes, bytes]]:
    out = []
    for name in sorted(node.xattrs):
        key = ondisk.xattr_key(name)
        value = node.xattrs[name]
        if key is None:
            # EROFS (without long-prefix tables, which Nydus does not write) cannot name it.
            logger.warning("%s: xattr %r has no EROFS prefix; dropped", where, name)
            continue
        if len(key[1]) > 255 or len(value) > _U16:
            raise BuildError(f"{where}: xattr {name!r} is too large for EROFS")
        out.append((key[0], key[1], value))
    return out


def _slots(root: Node) -> list[_Slot]:
    order = list(bfs(root))
    links: Counter[int] = Counter()
    for node, _ in order:
        if node.children is not None:
            links.update(id(child) for child in node.children.values() if not child.is_dir)
    slots = []
    for ino, (node, parent) in enumerate(order, start=1):
        names = None
        if node.children is not None:
            nlink = 2 + sum(1 for child in node.children.values() if child.is_dir)
            names = sorted([b".", b"..", *node.children])
            size = ondisk.dir_size(names)
        else:
            nlink = links[id(node)] or 1
            size = node.size if node.is_reg else len(node.target) if node.is_symlink else 0
        icount, xattrs = ondisk.xattr_area(_xattr_list(node, f"inode {ino}"))
        if icount > _U16:
            raise BuildError(f"inode {ino}: xattrs too large for EROFS")
        extended = bool(
            node.mtime or node.mtime_nsec or node.uid > _U16 or node.gid > _U16 or nlink > _U16 or size > _U32
        )
        slots.append(_Slot(node, parent, ino, nlink, size, extended, icount, xattrs, names=names))
    return slots


def _place(slots: list[_Slot]) -> int:
    """Give every inode its offset and layout; return the end of the inode area."""
    cursor = FIRST_INODE_OFFSET
    for slot in slots:
        node = slot.node
        in_block = cursor % BS
        if in_block and in_block + slot.fixed > BS:
            # Keep an inode and its xattrs inside one block whenever they fit in one.
            cursor = _align(cursor, BS)
        if node.is_reg:
            slot.layout = ondisk.LAYOUT_CHUNK_BASED
            slot.offset = cursor
            end = _align(cursor + slot.fixed, 8) + 8 * len(node.chunks)
        elif node.is_dir or node.is_symlink:
            tail = slot.size % BS
            fits_here = cursor % BS + slot.fixed + tail <= BS
            if tail and not fits_here and slot.fixed + tail <= BS:
                cursor = _align(cursor, BS)
                fits_here = True
            slot.offset = cursor
            if tail and fits_here:
                # The tail shares the inode's block; it must never cross into the next one.
                slot.layout = ondisk.LAYOUT_FLAT_INLINE
                slot.head_len = slot.size - tail
                end = cursor + slot.fixed + tail
            else:
                slot.layout = ondisk.LAYOUT_FLAT_PLAIN
                slot.head_len = _align(slot.size, BS)
                end = cursor + slot.fixed
        else:
            slot.offset = cursor
            end = cursor + slot.fixed
        cursor = _align(end, 32)
    return cursor


def _i_u(slot: _Slot, chunk_size: int) -> int:
    node = slot.node
    if slot.layout == ondisk.LAYOUT_CHUNK_BASED:
        return (chunk_size.bit_length() - 1 - ondisk.BLKSZBITS) | ondisk.CHUNK_FORMAT_INDEXES
    if node.is_dir or node.is_symlink:
        return slot.head_blkaddr if slot.head_len else (ondisk.NULL_ADDR if slot.size else 0)
    if node.rdev:
        return ondisk.encode_rdev(node.rdev)
    return 0


def render(root: Node, blob: Blob, chunk_size: int, compressor: Compressor, digester: Digester) -> bytes:
    """The whole bootstrap for `root`, whose regular files point at chunks of `blob`."""
    slots = _slots(root)
    inode_end = _place(slots)
    nids = {id(s.node): (s.offset - META_BLKADDR * BS) // 32 for s in slots}

    next_blk = _align(inode_end, BS) // BS
    for slot in slots:
        if slot.head_len:
            slot.head_blkaddr = next_blk
            next_blk += slot.head_len // BS
    chunk_table_offset = next_blk * BS if blob.chunks else 0
    chunk_table_size = 80 * len(blob.chunks)
    total = _align(max(next_blk * BS, chunk_table_offset + chunk_table_size), BS)
    if total // BS > _U32:
        raise BuildError("the bootstrap would exceed 2^32 blocks")

    out = bytearray(total)
    flags = compressor.sb_flag | digester.sb_flag | ondisk.RAFS_EXPLICIT_UID_GID
    if any(s.xattrs for s in slots):
        flags |= ondisk.RAFS_HAS_XATTR
    root_nid = nids[id(root)]
    out[ondisk.SB_OFFSET : ondisk.SB_OFFSET + 128] = ondisk.superblock(
        root_nid=root_nid, inos=len(slots), blocks=total // BS, meta_blkaddr=META_BLKADDR, extra_devices=1
    )
    out[ondisk.EXT_SB_OFFSET : ondisk.EXT_SB_OFFSET + 256] = ondisk.ext_superblock(
        flags=flags,
        blob_table_offset=BLOB_TABLE_OFFSET,
        blob_table_size=256,
        chunk_size=chunk_size,
        chunk_table_offset=chunk_table_offset,
        chunk_table_size=chunk_table_size,
    )
    blob_id = blob.blob_id.encode()
    out[ondisk.DEVT_OFFSET : ondisk.DEVT_OFFSET + 128] = ondisk.device_slot(
        tag=blob_id,
        blocks=blob.uncompressed_size // BS,
        # Past the bootstrap, so no device-0 address is ever taken for a blob address.
        mapped_blkaddr=_align(total, _SEG_ALIGN) // BS,
    )
    out[BLOB_TABLE_OFFSET : BLOB_TABLE_OFFSET + 256] = ondisk.blob_entry(
        blob_id=blob_id,
        blob_index=0,
        chunk_size=chunk_size,
        chunk_count=len(blob.chunks),
        compression_algo=compressor.blob_algo,
        digest_algo=digester.blob_algo,
        features=ondisk.BLOB_FEATURE_ALIGNED,
        compressed_size=blob.compressed_size,
        uncompressed_size=blob.uncompressed_size,
    )
    for slot in slots:
        _write_inode(out, slot, nids, chunk_size)
    pos = chunk_table_offset
    for chunk in blob.chunks:
        out[pos : pos + 80] = ondisk.chunk_info(
            digest=chunk.digest,
            blob_index=0,
            flags=chunk.flags,
            compressed_size=chunk.compressed_size,
            uncompressed_size=chunk.uncompressed_size,
            compressed_offset=chunk.compressed_offset,
            uncompressed_offset=chunk.uncompressed_offset,
            file_offset=chunk.file_offset,
            index=chunk.index,
        )
        pos += 80
    return bytes(out)


def _write_inode(out: bytearray, slot: _Slot, nids: dict[int, int], chunk_size: int) -> None:
    node = slot.node
    raw = ondisk.inode(
        extended=slot.extended,
        layout=slot.layout,
        xattr_icount=slot.xattr_icount,
        mode=node.mode,
        nlink=slot.nlink,
        size=slot.size,
        i_u=_i_u(slot, chunk_size),
        ino=slot.ino,
        uid=node.uid,
        gid=node.gid,
        mtime=node.mtime,
        mtime_nsec=node.mtime_nsec,
    )
    pos = slot.offset
    out[pos : pos + len(raw)] = raw
    pos += len(raw)
    out[pos : pos + len(slot.xattrs)] = slot.xattrs
    pos += len(slot.xattrs)
    if slot.layout == ondisk.LAYOUT_CHUNK_BASED:
        pos = _align(pos, 8)
        entries = b"".join(
            ondisk.chunk_index(ci_index=c.index, blob_index=0, blkaddr=c.uncompressed_offset // BS)
            for c in node.chunks
        )
        out[pos : pos + len(entries)] = entries
        return
    if node.is_dir:
        assert node.children is not None and slot.names is not None
        kids = {b".": node, b"..": slot.parent, **node.children}
        body = ondisk.dir_body([(n, nids[id(kids[n])], ondisk.file_type(kids[n].mode)) for n in slot.names])
    elif node.is_symlink:
        body = node.target
    else:
        return
    if slot.head_len:
        start = slot.head_blkaddr * BS
        head = body[: slot.head_len]
        out[start : start + len(head)] = head
    tail = body[slot.head_len :]
    out[pos : pos + len(tail)] = tail


def write_file(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bootstrap-", dir=directory)
    except OSError as ex:
        raise BuildError(f"cannot write the bootstrap in {directory}: {ex.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as ex:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise BuildError(f"cannot write the bootstrap {path}: {ex.strerror}") from None
