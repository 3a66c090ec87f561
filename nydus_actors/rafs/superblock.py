"""The EROFS superblock, the Nydus RAFS v6 extended superblock and the device table.

Decoding and validation only (format doc §1, §5, §10.1-10.3); nothing here reads inodes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nydus_actors.rafs.crc32c import crc32c
from nydus_actors.rafs.errors import RafsError, corrupt

EROFS_MAGIC = 0xE0F5E1E2
#: RAFS v5 bootstraps start with this magic ("RAFS") and a u32 version at byte 4.
RAFS_V5_MAGIC = 0x52414653
SB_OFFSET = 1024
SB_SIZE = 128

COMPAT_SB_CHKSUM = 0x1
COMPAT_RAFS_V6 = 0x40000000
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8
SUPPORTED_INCOMPAT = INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE
#: Incompat bits that only compressed images carry (LZ4_0PADDING, COMPR_CFGS, ZTAILPACKING, FRAGMENTS).
COMPRESSION_INCOMPAT = 0x1 | 0x2 | 0x10 | 0x20

RAFS_EXT_SB_OFFSET = 1152
RAFS_EXT_SB_SIZE = 256
RAFS_DEVICE_TABLE_OFFSET = 1408
RAFS_MIN_CHUNK_SIZE = 4096
RAFS_MAX_CHUNK_SIZE = 16 << 20
META_ALIGN = 4096

# RAFS v6 extended-superblock flags (nydus `RafsSuperFlags`).
RAFS_COMPRESSION_FLAGS = {0x1: "none", 0x2: "lz4_block", 0x40: "gzip", 0x80: "zstd"}
RAFS_DIGEST_FLAGS = {0x4: "blake3", 0x8: "sha256"}
RAFS_FLAG_TARFS_MODE = 0x200

DEVICE_SLOT_SIZE = 128

_SB = struct.Struct("<IIIBBHQQIIII16s16sIHHH")
_EXT_SB = struct.Struct("<QQIIQQQII")
_DEVICE_SLOT = struct.Struct("<64sII")
_EROFS_FIELDS = _SB.size


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """One extra device: its tag (the blob id in Nydus images), size and unified address."""

    tag: bytes
    blocks: int
    mapped_blkaddr: int


@dataclass(frozen=True, slots=True)
class SuperBlock:
    """The decoded superblocks of one image; RAFS fields are zero on plain EROFS."""

    checksum: int
    feature_compat: int
    blkszbits: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    feature_incompat: int
    extra_devices: int
    devt_slotoff: int
    devices: tuple[DeviceSlot, ...]
    is_rafs: bool
    rafs_flags: int = 0
    blob_table_offset: int = 0
    blob_table_size: int = 0
    chunk_size: int = 0
    chunk_table_offset: int = 0
    chunk_table_size: int = 0
    prefetch_table_offset: int = 0
    prefetch_table_size: int = 0

    @property
    def block_size(self) -> int:
        """Bytes per block."""
        return 1 << self.blkszbits

    @property
    def compressor(self) -> str:
        """The RAFS image-wide chunk compressor name ("none" on plain EROFS)."""
        for bit, name in RAFS_COMPRESSION_FLAGS.items():
            if self.rafs_flags & bit:
                return name
        return "none"

    @property
    def digester(self) -> str:
        """The RAFS image-wide chunk digest name ("blake3" on plain EROFS)."""
        return "sha256" if self.rafs_flags & 0x8 else "blake3"


def _check_v5(head: bytes, path: str) -> None:
    if len(head) >= 8:
        magic, version = struct.unpack_from("<II", head)
        if magic == RAFS_V5_MAGIC:
            major = version >> 8 if version >= 0x100 else version
            raise RafsError(
                f"unsupported RAFS version {major} (0x{version:x}) in {path}: "
                "only RAFS v6 and EROFS are supported"
            )


def parse_superblock(buf: bytes | memoryview, file_size: int, path: str) -> SuperBlock:
    """Decode and validate the superblock(s) at the start of `buf` (the whole image).

    Raises:
        RafsError: bad magic, RAFS v5, unsupported features, bad checksum, or
            tables that do not fit the file.
    """
    if file_size < SB_OFFSET + SB_SIZE or struct.unpack_from("<I", buf, SB_OFFSET)[0] != EROFS_MAGIC:
        _check_v5(bytes(buf[:8]), path)
        if file_size < SB_OFFSET + SB_SIZE:
            raise corrupt(path, f"file of {file_size} bytes is too short for a superblock")
        magic = struct.unpack_from("<I", buf, SB_OFFSET)[0]
        raise corrupt(path, f"bad magic 0x{magic:08x} (expected 0x{EROFS_MAGIC:08x})")
    (
        _magic,
        checksum,
        compat,
        blkszbits,
        extslots,
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        _uuid,
        _volume_name,
        incompat,
        _u1,
        extra_devices,
        devt_slotoff,
    ) = _SB.unpack_from(buf, SB_OFFSET)
    if not 9 <= blkszbits <= 16:
        raise corrupt(path, f"unsupported block size bits {blkszbits}")
    block_size = 1 << blkszbits
    if incompat & ~SUPPORTED_INCOMPAT:
        extra = incompat & ~SUPPORTED_INCOMPAT
        why = "compressed images are not supported" if extra & COMPRESSION_INCOMPAT else "unknown feature"
        raise corrupt(path, f"unsupported incompat features 0x{extra:x} ({why})")
    if compat & COMPAT_SB_CHKSUM:
        # The checksum covers the rest of block 0, or one whole block when blocks are small.
        span_end = block_size if block_size > SB_OFFSET else SB_OFFSET + block_size
        if file_size < span_end:
            raise corrupt(path, "file too short for the checksummed superblock block")
        area = bytearray(buf[SB_OFFSET:span_end])
        area[4:8] = b"\0\0\0\0"
        if crc32c(area) != checksum:
            raise corrupt(path, f"bad superblock checksum 0x{checksum:08x}")
    if meta_blkaddr * block_size > file_size:
        raise corrupt(path, f"meta_blkaddr {meta_blkaddr} lies past the end of the file")
    if SB_OFFSET + SB_SIZE + 16 * extslots > file_size:
        raise corrupt(path, f"{extslots} superblock extension slots do not fit the file")
    devices = _parse_devices(buf, file_size, path, extra_devices, devt_slotoff)
    fields = dict(
        checksum=checksum,
        feature_compat=compat,
        blkszbits=blkszbits,
        root_nid=root_nid,
        inos=inos,
        build_time=build_time,
        build_time_nsec=build_time_nsec,
        blocks=blocks,
        meta_blkaddr=meta_blkaddr,
        xattr_blkaddr=xattr_blkaddr,
        feature_incompat=incompat,
        extra_devices=extra_devices,
        devt_slotoff=devt_slotoff,
        devices=devices,
        is_rafs=bool(compat & COMPAT_RAFS_V6),
    )
    if compat & COMPAT_RAFS_V6:
        fields.update(_parse_rafs_ext(buf, file_size, path, block_size))
    return SuperBlock(**fields)


def _parse_devices(
    buf: bytes | memoryview, file_size: int, path: str, count: int, slotoff: int
) -> tuple[DeviceSlot, ...]:
    if count == 0:
        return ()
    start = slotoff * DEVICE_SLOT_SIZE
    if start < SB_OFFSET + SB_SIZE or start + count * DEVICE_SLOT_SIZE > file_size:
        raise corrupt(path, f"device table of {count} slots at byte {start} does not fit the file")
    slots = []
    for k in range(count):
        tag, blocks, mapped = _DEVICE_SLOT.unpack_from(buf, start + k * DEVICE_SLOT_SIZE)
        slots.append(DeviceSlot(tag=tag, blocks=blocks, mapped_blkaddr=mapped))
    return tuple(slots)


def _parse_rafs_ext(buf: bytes | memoryview, file_size: int, path: str, block_size: int) -> dict[str, int]:
    if file_size < RAFS_EXT_SB_OFFSET + RAFS_EXT_SB_SIZE:
        raise corrupt(path, "file too short for the rafs extended superblock")
    (
        flags,
        blob_off,
        blob_size,
        chunk_size,
        chunk_off,
        chunk_tsize,
        prefetch_off,
        prefetch_size,
        _padding,
    ) = _EXT_SB.unpack_from(buf, RAFS_EXT_SB_OFFSET)
    if block_size not in (512, 4096):
        raise corrupt(path, f"rafs block size {block_size} is neither 512 nor 4096")
    if bin(flags & sum(RAFS_COMPRESSION_FLAGS)).count("1") != 1:
        raise corrupt(path, f"rafs flags 0x{flags:x} name no single compression algorithm")
    if bin(flags & sum(RAFS_DIGEST_FLAGS)).count("1") != 1:
        raise corrupt(path, f"rafs flags 0x{flags:x} name no single digest algorithm")
    if chunk_size & (chunk_size - 1) or not RAFS_MIN_CHUNK_SIZE <= chunk_size <= RAFS_MAX_CHUNK_SIZE:
        raise corrupt(path, f"invalid rafs chunk size 0x{chunk_size:x}")
    tables = (
        ("blob", blob_off, blob_size, 256),
        ("chunk", chunk_off, chunk_tsize, 80),
        ("prefetch", prefetch_off, prefetch_size, 4),
    )
    for name, off, size, unit in tables:
        if size == 0:
            continue
        if size % unit or off % META_ALIGN or off < RAFS_DEVICE_TABLE_OFFSET or off + size > file_size:
            raise corrupt(path, f"invalid {name} table offset 0x{off:x}/size 0x{size:x}")
    return dict(
        rafs_flags=flags,
        blob_table_offset=blob_off,
        blob_table_size=blob_size,
        chunk_size=chunk_size,
        chunk_table_offset=chunk_off,
        chunk_table_size=chunk_tsize,
        prefetch_table_offset=prefetch_off,
        prefetch_table_size=prefetch_size,
    )
