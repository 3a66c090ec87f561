"""Images the reader must refuse, each with a clear RafsError."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nydus_actors.rafs import RafsError, RafsImage
from nydus_actors.rafs.crc32c import crc32c
from tests.paths import NYDUS_FIXTURES
from tests.rafs.trees import mkfs_available, mkfs_erofs

FIXTURES = NYDUS_FIXTURES
BOOTSTRAP = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"

needs_mkfs = pytest.mark.skipif(not mkfs_available(), reason="mkfs.erofs is not installed")


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "text").write_bytes(b"compressible text " * 5000)
    (src / "sub" / "more").write_bytes(b"more text " * 3000)
    os.symlink("text", src / "link")
    return src


def _patched(image: Path, out: Path, offset: int, data: bytes, *, fix_crc: bool = True) -> Path:
    raw = bytearray(image.read_bytes())
    raw[offset : offset + len(data)] = data
    if fix_crc:
        blkszbits = raw[1024 + 12]
        area = bytearray(raw[1024 : 1 << blkszbits])
        area[4:8] = bytes(4)
        struct.pack_into("<I", raw, 1028, crc32c(area))
    out.write_bytes(bytes(raw))
    return out


def _refused(path: Path, match: str) -> RafsError:
    with pytest.raises(RafsError, match=match) as info:
        RafsImage.open(str(path))
    return info.value


@needs_mkfs
@pytest.mark.parametrize(
    "args", [("-zlz4hc",), ("-zlz4", "-Eztailpacking"), ("-zlz4hc", "-Elegacy-compress")]
)
def test_compressed_images_are_refused_at_open(
    small_tree: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    image = mkfs_erofs(small_tree, tmp_path / "z.erofs", *args)

    error = _refused(image, r"unsupported incompat features 0x1\d* \(compressed images are not supported\)")

    assert str(image) in str(error)


@needs_mkfs
def test_compressed_inode_is_refused_when_no_feature_bit_says_so(small_tree: Path, tmp_path: Path) -> None:
    image = mkfs_erofs(small_tree, tmp_path / "z.erofs", "-zlz4hc")
    cleared = _patched(image, tmp_path / "cleared.erofs", 1024 + 80, struct.pack("<I", 0))

    with RafsImage.open(str(cleared)) as img:
        nid = img.lookup(img.root_nid, b"text")
        with pytest.raises(
            RafsError, match=f"inode {nid} uses compressed layout [13], which is not supported"
        ):
            img.inode(nid)


@needs_mkfs
def test_unknown_incompat_bit_is_refused(small_tree: Path, tmp_path: Path) -> None:
    image = mkfs_erofs(small_tree, tmp_path / "plain.erofs")
    patched = _patched(image, tmp_path / "bit.erofs", 1024 + 80, struct.pack("<I", 0x400))

    _refused(patched, r"unsupported incompat features 0x400 \(unknown feature\)")


@needs_mkfs
def test_bad_checksum_is_refused(small_tree: Path, tmp_path: Path) -> None:
    image = mkfs_erofs(small_tree, tmp_path / "plain.erofs")
    patched = _patched(image, tmp_path / "crc.erofs", 1024 + 48, b"\xff", fix_crc=False)

    _refused(patched, "bad superblock checksum")


@needs_mkfs
def test_bad_magic_and_truncation(small_tree: Path, tmp_path: Path) -> None:
    image = mkfs_erofs(small_tree, tmp_path / "plain.erofs")
    raw = image.read_bytes()
    (tmp_path / "magic").write_bytes(raw[:1024] + b"\0\0\0\0" + raw[1028:])
    (tmp_path / "short").write_bytes(raw[:1100])
    (tmp_path / "empty").write_bytes(b"")

    _refused(tmp_path / "magic", r"invalid rafs image .*: bad magic 0x00000000 \(expected 0xe0f5e1e2\)")
    _refused(tmp_path / "short", "too short for a superblock")
    _refused(tmp_path / "empty", "too short for a superblock")


def test_unopenable_paths(tmp_path: Path) -> None:
    _refused(tmp_path / "missing", "failed to open rafs image .*missing: No such file or directory")
    _refused(tmp_path, "failed to open rafs image .*: Is a directory")
    _refused(Path("/dev/null"), "failed to open rafs image /dev/null: not a regular file")


def test_rafs_tables_are_validated(tmp_path: Path) -> None:
    ext = 1152
    _refused(
        _patched(BOOTSTRAP, tmp_path / "compr", ext, struct.pack("<Q", 0x83), fix_crc=False), "compression"
    )
    _refused(_patched(BOOTSTRAP, tmp_path / "digest", ext, struct.pack("<Q", 0x9C), fix_crc=False), "digest")
    _refused(
        _patched(BOOTSTRAP, tmp_path / "chunk", ext + 20, struct.pack("<I", 3000), fix_crc=False),
        "chunk size",
    )
    _refused(
        _patched(BOOTSTRAP, tmp_path / "table", ext + 24, struct.pack("<Q", 1 << 40), fix_crc=False),
        "invalid chunk table offset",
    )
    _refused(
        _patched(BOOTSTRAP, tmp_path / "id", 4096, b"../../etc/passwd", fix_crc=False), "invalid blob id"
    )


def test_plain_erofs_has_no_chunk_extents(tmp_path: Path) -> None:
    if not mkfs_available():
        pytest.skip("mkfs.erofs is not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    with RafsImage.open(str(mkfs_erofs(src, tmp_path / "img"))) as img:
        nid = img.lookup(img.root_nid, b"f")
        with pytest.raises(RafsError, match="plain erofs image") as info:
            img.chunk_extents(nid, 0, 4)
        assert info.value.errno == 22
        assert img.chunk_size == 0 and img.blobs == ()
