"""Hand-made corruptions: each fails as a RafsError on the one inode or file it touches."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from nydus_actors.rafs import LocalBlobSource, LocalDeviceReader, RafsError, RafsImage, read_file
from nydus_actors.rafs.crc32c import crc32c
from tests.paths import NYDUS_FIXTURES
from tests.rafs.trees import mkfs_available, mkfs_erofs

FIXTURES = NYDUS_FIXTURES
BOOTSTRAP = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
LIB_RS = 133  # nid of lib.rs in the sample; its 64-byte extended inode holds one chunk index
ROOT = 128

needs_mkfs = pytest.mark.skipif(not mkfs_available(), reason="mkfs.erofs is not installed")


def patch(image: Path, out: Path, *changes: tuple[int, bytes]) -> Path:
    """Copy `image` to `out` with bytes replaced, re-sealing the superblock checksum if it has one."""
    raw = bytearray(image.read_bytes())
    for offset, data in changes:
        raw[offset : offset + len(data)] = data
    if raw[1024 + 8] & 1:
        area = bytearray(raw[1024:4096])
        area[4:8] = bytes(4)
        struct.pack_into("<I", raw, 1028, crc32c(area))
    out.write_bytes(bytes(raw))
    return out


def _offset(nid: int) -> int:
    with RafsImage.open(str(BOOTSTRAP)) as img:
        return img.inode(nid).offset


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not mkfs_available():
        pytest.skip("mkfs.erofs is not installed")
    base = tmp_path_factory.mktemp("robust")
    src = base / "src"
    (src / "dir").mkdir(parents=True)
    (src / "tail").write_bytes(b"t" * 5000)
    (src / "dir" / "x").write_bytes(b"x")
    os.symlink("tail", src / "link")
    return mkfs_erofs(src, base / "plain.erofs", "-T0")


def _nid(image: Path, name: bytes) -> tuple[int, int]:
    with RafsImage.open(str(image)) as img:
        nid = img.lookup(img.root_nid, name)
        return nid, img.inode(nid).offset


def test_absurd_rafs_file_size_fails_that_file_only(tmp_path: Path) -> None:
    bad = patch(BOOTSTRAP, tmp_path / "boot", (_offset(LIB_RS) + 8, struct.pack("<Q", 1 << 63)))

    with (
        RafsImage.open(str(bad)) as img,
        LocalBlobSource(img, str(FIXTURES / "blobs")) as source,
        LocalDeviceReader(str(bad)) as devices,
    ):
        started = time.monotonic()
        with pytest.raises(RafsError, match="chunk indexes run past the end of the file"):
            read_file(img, LIB_RS, 0, 4096, source)
        with pytest.raises(RafsError, match="chunk entries run past the end of the file"):
            img.read(LIB_RS, (1 << 63) - 10, 1 << 40, devices)
        assert time.monotonic() - started < 1
        assert len(read_file(img, 136, 0, 1 << 20, source)) == 13400  # sync_io.rs is untouched


def test_directory_loop_is_listed_not_followed(tmp_path: Path) -> None:
    """Point lib.rs's dirent at the root: the reader lists it; walkers must bound themselves."""
    with RafsImage.open(str(BOOTSTRAP)) as img:
        root = img.inode(ROOT)
        # The root's dirents are inline after its inode; entry 2 is lib.rs.
        dirent = root.inline_offset + 2 * 12
    bad = patch(BOOTSTRAP, tmp_path / "boot", (dirent, struct.pack("<Q", ROOT)))

    with RafsImage.open(str(bad)) as img:
        assert img.lookup(ROOT, b"lib.rs") == ROOT
        assert [e.nid for e in img.readdir(ROOT)] == [ROOT, ROOT, ROOT, 136]


def test_absurd_xattr_count_fails_that_inode(tmp_path: Path) -> None:
    bad = patch(BOOTSTRAP, tmp_path / "boot", (_offset(LIB_RS) + 2, struct.pack("<H", 0xFFFF)))

    with RafsImage.open(str(bad)) as img:
        with pytest.raises(RafsError, match=f"inode {LIB_RS} run past the end of the file"):
            img.inode(LIB_RS)
        assert img.lookup(ROOT, b"lib.rs") == LIB_RS
        assert img.inode(136).size == 13400


def test_chunk_index_naming_no_blob(tmp_path: Path) -> None:
    index = (_offset(LIB_RS) + 64 + 7) & ~7
    bad = patch(BOOTSTRAP, tmp_path / "boot", (index + 2, b"\0"))

    with RafsImage.open(str(bad)) as img, pytest.raises(RafsError, match="device id 0 instead of a blob"):
        img.chunk_extents(LIB_RS, 0, 10)


def test_oversized_chunk_info_entry(tmp_path: Path) -> None:
    with RafsImage.open(str(BOOTSTRAP)) as img:
        table = img.superblock.chunk_table_offset
    bad = patch(BOOTSTRAP, tmp_path / "boot", (table + 44, struct.pack("<I", 1 << 30)))

    with RafsImage.open(str(bad)) as img, pytest.raises(RafsError, match="over the chunk size"):
        img.chunk_extents(136, 0, 10)


@needs_mkfs
def test_absurd_symlink_size(plain: Path, tmp_path: Path) -> None:
    nid, offset = _nid(plain, b"link")
    bad = patch(plain, tmp_path / "img", (offset + 8, struct.pack("<I", 0xFFFFFFFF)))

    with (
        RafsImage.open(str(bad)) as img,
        pytest.raises(RafsError, match="target of 4294967295 bytes is too long"),
    ):
        img.readlink(nid)


@needs_mkfs
def test_directory_larger_than_the_image(plain: Path, tmp_path: Path) -> None:
    nid, offset = _nid(plain, b"dir")
    bad = patch(plain, tmp_path / "img", (offset + 8, struct.pack("<I", 0xFFFFFF00)))

    with RafsImage.open(str(bad)) as img:
        with pytest.raises(RafsError, match="larger than the image"):
            list(img.readdir(nid))
        with pytest.raises(RafsError, match="larger than the image"):
            img.lookup(nid, b"x")


@needs_mkfs
def test_inline_tail_crossing_a_block(plain: Path, tmp_path: Path) -> None:
    nid, offset = _nid(plain, b"tail")
    with RafsImage.open(str(plain)) as img:
        assert img.inode(nid).layout == 2  # FLAT_INLINE: 4096 bytes in a block, 904 inline
    bad = patch(plain, tmp_path / "img", (offset + 8, struct.pack("<I", 4096 + 4095)))

    with RafsImage.open(str(bad)) as img, LocalDeviceReader(str(bad)) as devices:
        assert len(img.read(nid, 0, 4096, devices)) == 4096
        with pytest.raises(RafsError, match="inline tail of 4095 bytes crosses a block"):
            img.read(nid, 4096, 10, devices)


@needs_mkfs
def test_reads_are_clipped_to_the_file(plain: Path) -> None:
    with RafsImage.open(str(plain)) as img, LocalDeviceReader(str(plain)) as devices:
        nid = img.lookup(img.root_nid, b"tail")
        assert img.read(nid, 0, 1 << 50, devices) == b"t" * 5000
        assert img.read(nid, 4990, 1 << 50, devices) == b"t" * 10
        assert img.read(nid, 1 << 60, 10, devices) == b""
        with pytest.raises(RafsError) as info:
            img.read(nid, -1, 10, devices)
        assert info.value.errno == 22
