"""A read-only view of one Nydus RAFS v6 bootstrap or plain EROFS image, mmapped.

Metadata (inodes, directories, xattrs, symlinks, chunk maps) comes from the mapping;
file bytes come from a `DeviceReader` (EROFS view) or through `chunk_extents` (RAFS view).
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from typing import Protocol

from nydus_actors.rafs.blobtable import BlobInfo, device_blobs, parse_blob_table
from nydus_actors.rafs.chunks import ChunkExtent, ChunkInfo, ChunkTable, decode_index_entry
from nydus_actors.rafs.directory import Directories
from nydus_actors.rafs.dirent import DirEntry
from nydus_actors.rafs.errors import RafsError, corrupt
from nydus_actors.rafs.inode import CHUNK_FORMAT_INDEXES, LAYOUT_CHUNK_BASED, NULL_ADDR, Inode, decode_inode
from nydus_actors.rafs.layout import Layout
from nydus_actors.rafs.superblock import (
    EROFS_MAGIC,
    RAFS_FLAG_TARFS_MODE,
    SB_OFFSET,
    SB_SIZE,
    SuperBlock,
    parse_superblock,
)
from nydus_actors.rafs.xattr import read_xattrs

#: nydus `RAFS_SUPER_VERSION_V6` (rafs/src/metadata/layout/mod.rs).
RAFS_SUPER_VERSION_V6 = 0x600
#: nydus `RAFS_DEFAULT_ATTR_TIMEOUT` / `RAFS_DEFAULT_ENTRY_TIMEOUT`, in seconds (rafs/src/fs.rs).
RAFS_DEFAULT_TIMEOUT = 1 << 32
#: Longest symlink body accepted (PATH_MAX): the kernel reads a target from one page.
MAX_SYMLINK = 4096

_INODE_CACHE = 1 << 16
# Chunk arrays can be long (one entry per chunk of a file), so fewer of them are kept.
_CHUNK_LIST_CACHE = 1 << 10

_U64 = struct.Struct("<Q")


class DeviceReader(Protocol):
    """Reads raw bytes of the image's devices: 0 is the image, k is extra device k.

    `RafsImage.read` serves device 0 from its own mapping and asks only for k >= 1.
    """

    def pread(self, device: int, offset: int, size: int) -> bytes:
        """Return `size` bytes of `device` at `offset` (fewer only at its end)."""
        ...


class RafsImage:
    """One opened image; every method raises `RafsError` on a malformed image.

    Attributes:
        path: the image path as given.
        is_rafs: a Nydus RAFS v6 bootstrap (compat bit 0x40000000) rather than plain EROFS.
        block_size: the EROFS block size.
        root_nid: nid of the root directory.
        inode_count: the superblock's inode count.
        chunk_size: the RAFS global chunk size; 0 on plain EROFS.
        blobs: the RAFS blob table; on plain EROFS one uncompressed blob per extra device.
        device_count: number of extra devices.
        superblock: the decoded superblock.
    """

    def __init__(self, path: str, buf: mmap.mmap, file_size: int, sb: SuperBlock) -> None:
        self.path = path
        self.superblock = sb
        self.is_rafs = sb.is_rafs
        self.block_size = sb.block_size
        self.root_nid = sb.root_nid
        self.inode_count = sb.inos
        self.chunk_size = sb.chunk_size if sb.is_rafs else 0
        self.device_count = sb.extra_devices
        self._buf = buf
        self._size = file_size
        self._bits = sb.blkszbits
        self._chunkbits = sb.chunk_size.bit_length() - 1 if sb.is_rafs else 0
        self._layout = Layout(buf, file_size, sb, path)
        self._xattr_base = sb.xattr_blkaddr * sb.block_size
        self.blobs: tuple[BlobInfo, ...] = parse_blob_table(buf, sb, path) if sb.is_rafs else device_blobs(sb)
        self._chunk_table = ChunkTable(
            buf,
            offset=sb.chunk_table_offset,
            size=sb.chunk_table_size,
            block_size=sb.block_size,
            chunk_size=sb.chunk_size,
            path=path,
        )
        self._inode = functools.lru_cache(maxsize=_INODE_CACHE)(self._load_inode)
        self._chunk_list = functools.lru_cache(maxsize=_CHUNK_LIST_CACHE)(self._load_chunk_list)
        self._directories = Directories(self.inode, self._meta_bytes, sb.blkszbits, file_size, path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RafsImage:
        """Map the image at `path` and validate its superblock and root directory.

        Raises:
            RafsError: the file cannot be opened, is RAFS v5, or is not a valid
                RAFS v6 / EROFS image this reader supports.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as file:
                st = os.fstat(file.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise RafsError(f"failed to open rafs image {path}: not a regular file")
                if st.st_size < SB_OFFSET + SB_SIZE:
                    parse_superblock(file.read(), st.st_size, path)
                buf = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as ex:
            raise RafsError(f"failed to open rafs image {path}: {ex.strerror or ex}") from ex
        try:
            sb = parse_superblock(buf, st.st_size, path)
            image = cls(path, buf, st.st_size, sb)
            root = image.inode(sb.root_nid)
            if not root.is_dir:
                raise corrupt(path, f"root inode {sb.root_nid} is not a directory")
        except BaseException:
            buf.close()
            raise
        return image

    def close(self) -> None:
        """Unmap the image; the object is unusable afterwards."""
        for cache in (self._inode, self._chunk_list):
            cache.cache_clear()
        self._directories.clear()
        self._buf.close()

    def __enter__(self) -> RafsImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- superblock -------------------------------------------------------------------------

    def super_meta(
        self, *, attr_timeout: float = RAFS_DEFAULT_TIMEOUT, entry_timeout: float = RAFS_DEFAULT_TIMEOUT
    ) -> dict:
        """Return nydusd's `RafsSuperMeta` JSON object for this image.

        Fields nydusd never fills for v6 (`sb_size`, `root_inode`, `batch_size`, the
        v5 inode and extended blob tables) stay 0, as in nydusd; timeouts default to
        nydusd's `RAFS_DEFAULT_ATTR_TIMEOUT` (2^32 s).
        """
        sb = self.superblock
        return {
            "magic": EROFS_MAGIC,
            "version": RAFS_SUPER_VERSION_V6,
            "sb_size": 0,
            "root_inode": 0,
            "chunk_size": sb.chunk_size,
            "batch_size": 0,
            "inodes_count": sb.inos,
            "flags": {"bits": sb.rafs_flags},
            "inode_table_entries": 0,
            "inode_table_offset": 0,
            "blob_table_size": sb.blob_table_size,
            "blob_table_offset": sb.blob_table_offset,
            "extended_blob_table_offset": 0,
            "extended_blob_table_entries": 0,
            "blob_device_table_count": sb.extra_devices,
            "blob_device_table_offset": sb.devt_slotoff * 128,
            "prefetch_table_offset": sb.prefetch_table_offset,
            "prefetch_table_entries": sb.prefetch_table_size // 4,
            "attr_timeout": _duration(attr_timeout),
            "entry_timeout": _duration(entry_timeout),
            "is_chunk_dict": False,
            "meta_blkaddr": sb.meta_blkaddr,
            "root_nid": sb.root_nid,
            "chunk_table_offset": sb.chunk_table_offset,
            "chunk_table_size": sb.chunk_table_size,
        }

    # --- inodes -----------------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        """Return the decoded inode `nid` (cached)."""
        return self._inode(nid)

    def _load_inode(self, nid: int) -> Inode:
        return decode_inode(self._buf, self._size, self.superblock, nid, self.path)

    def _where(self, nid: int) -> str:
        return f"invalid rafs image {self.path}: inode {nid}"

    # --- file data --------------------------------------------------------------------------

    def _unified(self, addr: int) -> tuple[int, int]:
        """Route a device-0 address inside an extra device's unified range to that device."""
        for k, slot in enumerate(self.superblock.devices, 1):
            if slot.mapped_blkaddr:
                start = slot.mapped_blkaddr << self._bits
                if start <= addr < start + (slot.blocks << self._bits):
                    return k, addr - start
        return 0, addr

    def _bytes(self, addr: int, length: int, nid: int) -> bytes:
        if addr + length > self._size:
            raise RafsError(
                f"{self._where(nid)}: data at byte {addr} (+{length}) lies past the end of the file"
            )
        return self._buf[addr : addr + length]

    def _meta_bytes(self, inode: Inode, off: int, end: int) -> bytes:
        """Bytes of a directory or symlink body, which must live in the image itself."""
        parts = []
        for device, addr, length in self._layout.map(inode, off, end):
            if device:
                raise RafsError(f"{self._where(inode.nid)}: metadata body lies on extra device {device}")
            parts.append(bytes(length) if addr is None else self._bytes(addr, length, inode.nid))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, nid: int, off: int, size: int, devices: DeviceReader) -> bytes:
        """Read up to `size` bytes at `off` the way the kernel does (EROFS addressing).

        Device 0 is read from the mapping; other devices through `devices`. On a RAFS
        image that means the blobs must be uncompressed devices; use `read_file` with
        a `ChunkSource` for compressed Nydus blobs.
        """
        inode = self.inode(nid)
        if inode.is_dir:
            raise RafsError(f"inode {nid} is a directory", errno=errno.EISDIR)
        if off < 0 or size < 0:
            raise RafsError(f"invalid read of inode {nid}: offset {off} size {size}", errno=errno.EINVAL)
        end = min(inode.size, off + size)
        if off >= end:
            return b""
        parts = []
        for mapped_device, mapped_addr, length in self._layout.map(inode, off, end):
            if mapped_addr is None:
                parts.append(bytes(length))
                continue
            device, addr = mapped_device, mapped_addr
            if device == 0 and self.device_count:
                device, addr = self._unified(addr)
            if device == 0:
                parts.append(self._bytes(addr, length, nid))
                continue
            try:
                data = devices.pread(device, addr, length)
            except OSError as ex:
                raise RafsError(f"failed to read device {device} of {self.path}: {ex}") from ex
            if len(data) != length:
                raise RafsError(
                    f"{self._where(nid)}: short read of device {device} at byte {addr}: "
                    f"{len(data)} of {length} bytes"
                )
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunk_extents(self, nid: int, off: int, size: int) -> list[ChunkExtent]:
        """Return the chunk pieces covering `[off, off + size)` of a RAFS file, clipped to i_size."""
        inode = self._regular(nid)
        if off < 0 or size < 0:
            raise RafsError(f"invalid read of inode {nid}: offset {off} size {size}", errno=errno.EINVAL)
        end = min(inode.size, off + size)
        if off >= end:
            return []
        chunks = self._chunk_list(nid)
        chunk = self.chunk_size
        extents = []
        pos = off
        while pos < end:
            n = pos // chunk
            skip = pos - n * chunk
            length = min(end - pos, chunk - skip)
            info = chunks[n]
            if info is not None and skip + length > info.uncompressed_size:
                raise RafsError(
                    f"{self._where(nid)}: chunk {n} holds {info.uncompressed_size} bytes, "
                    f"the file needs {skip + length}"
                )
            extents.append(ChunkExtent(info, skip, length))
            pos += length
        return extents

    def chunks(self) -> Iterator[ChunkInfo]:
        """Yield every entry of the RAFS chunk-info table, in table order."""
        table = self._chunk_table
        return (table.at(pos) for pos in range(len(table)))

    def _regular(self, nid: int) -> Inode:
        if not self.is_rafs:
            raise RafsError(f"{self.path} is a plain erofs image: it has no rafs chunks", errno=errno.EINVAL)
        if self.superblock.rafs_flags & RAFS_FLAG_TARFS_MODE:
            raise RafsError(f"{self.path} is a tarfs-mode rafs image, which the chunk path does not support")
        inode = self.inode(nid)
        if not inode.is_reg:
            code = errno.EISDIR if inode.is_dir else errno.EINVAL
            raise RafsError(f"inode {nid} is not a regular file", errno=code)
        return inode

    def _load_chunk_list(self, nid: int) -> tuple[ChunkInfo | None, ...]:
        inode = self.inode(nid)
        if inode.size == 0:
            return ()
        where = self._where(nid)
        if inode.layout != LAYOUT_CHUNK_BASED or not inode.chunk_format & CHUNK_FORMAT_INDEXES:
            raise RafsError(f"{where}: a rafs file with data must use chunk indexes")
        if not len(self._chunk_table):
            raise RafsError(f"{where}: the image has no chunk-info table")
        count = (inode.size + self.chunk_size - 1) >> self._chunkbits
        base = (inode.inline_offset + 7) & -8
        if base + 8 * count > self._size:
            raise RafsError(f"{where}: {count} chunk indexes run past the end of the file")
        chunks: list[ChunkInfo | None] = []
        for n, (raw,) in enumerate(_U64.iter_unpack(self._buf[base : base + 8 * count])):
            blob_plus_one, ci_index, blkaddr = decode_index_entry(raw)
            if blkaddr == NULL_ADDR:
                chunks.append(None)
                continue
            if not blob_plus_one:
                raise RafsError(f"{where}: chunk {n} has device id 0 instead of a blob")
            if blob_plus_one > len(self.blobs):
                raise RafsError(f"{where}: chunk {n} names blob {blob_plus_one - 1}, which does not exist")
            info = self._chunk_table.find(blob_plus_one - 1, ci_index, blkaddr)
            if info is None:
                raise RafsError(
                    f"{where}: no chunk info for blob {blob_plus_one - 1} chunk {ci_index} block {blkaddr}"
                )
            chunks.append(None if info.hole else info)
        return tuple(chunks)

    # --- directories ------------------------------------------------------------------------

    def readdir(self, dir_nid: int, start: int = 0) -> Iterator[DirEntry]:
        """List a directory in on-disk (byte-sorted) order, "." and ".." included.

        Each entry's `offset` is its index + 1; pass it as `start` to resume after it.
        """
        return self._directories.readdir(dir_nid, start)

    def lookup(self, dir_nid: int, name: bytes) -> int | None:
        """Return the nid of `name` in directory `dir_nid`, or None when absent."""
        return self._directories.lookup(dir_nid, name)

    # --- symlinks and xattrs ----------------------------------------------------------------

    def readlink(self, nid: int) -> bytes:
        """Return the target of symlink `nid`."""
        inode = self.inode(nid)
        if not inode.is_symlink:
            raise RafsError(f"inode {nid} is not a symlink", errno=errno.EINVAL)
        if inode.size > MAX_SYMLINK:
            raise RafsError(f"{self._where(nid)}: symlink target of {inode.size} bytes is too long")
        return self._meta_bytes(inode, 0, inode.size) if inode.size else b""

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        """Return every extended attribute of `nid`, full names to values."""
        inode = self.inode(nid)
        inode_end = inode.offset + (64 if inode.extended else 32)
        return read_xattrs(
            self._buf,
            file_size=self._size,
            inode_end=inode_end,
            xattr_size=inode.xattr_size,
            shared_base=self._xattr_base,
            where=self._where(nid),
        )


def _duration(seconds: float) -> dict[str, int]:
    whole = int(seconds)
    return {"secs": whole, "nanos": round((seconds - whole) * 1e9)}
