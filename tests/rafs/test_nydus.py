"""The Nydus RAFS v6 sample bootstrap and blob, and the refused RAFS v5 bootstraps."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import zstandard

from nydus_actors.exceptions import OtherError
from nydus_actors.rafs import ChunkExtent, LocalBlobSource, RafsError, RafsImage, read_file
from tests.paths import NYDUS_FIXTURES

FIXTURES = NYDUS_FIXTURES
BOOTSTRAP = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
V5_BOOTSTRAPS = sorted(
    p for p in (FIXTURES / "repeatable").iterdir() if p.is_file() and p.suffix != ".result"
)


@pytest.fixture
def image() -> RafsImage:
    img = RafsImage.open(str(BOOTSTRAP))
    yield img
    img.close()


def test_superblock_facts(image: RafsImage) -> None:
    assert image.is_rafs
    assert (image.block_size, image.root_nid, image.inode_count) == (4096, 128, 3)
    assert image.chunk_size == 1 << 20
    assert image.device_count == 1
    [blob] = image.blobs
    assert blob.blob_id == BLOB_ID
    assert (blob.index, blob.compressor, blob.digester, blob.chunk_count) == (0, "zstd", "blake3", 2)
    assert blob.features == 0x70000021


def test_super_meta_is_nydusd_rafs_super_meta(image: RafsImage) -> None:
    meta = image.super_meta()

    assert list(meta) == [
        "magic", "version", "sb_size", "root_inode", "chunk_size", "batch_size", "inodes_count",
        "flags", "inode_table_entries", "inode_table_offset", "blob_table_size", "blob_table_offset",
        "extended_blob_table_offset", "extended_blob_table_entries", "blob_device_table_count",
        "blob_device_table_offset", "prefetch_table_offset", "prefetch_table_entries", "attr_timeout",
        "entry_timeout", "is_chunk_dict", "meta_blkaddr", "root_nid", "chunk_table_offset",
        "chunk_table_size",
    ]  # fmt: skip
    assert meta["magic"] == 0xE0F5E1E2
    assert meta["version"] == 0x600
    assert meta["flags"] == {"bits": 0x194}
    assert (meta["chunk_size"], meta["inodes_count"], meta["meta_blkaddr"], meta["root_nid"]) == (
        1 << 20,
        3,
        2,
        128,
    )
    assert (meta["blob_table_offset"], meta["blob_table_size"]) == (4096, 256)
    assert (meta["chunk_table_offset"], meta["chunk_table_size"]) == (16384, 160)
    assert (meta["blob_device_table_count"], meta["blob_device_table_offset"]) == (1, 1408)
    assert meta["attr_timeout"] == {"secs": 1 << 32, "nanos": 0}
    assert image.super_meta(attr_timeout=5, entry_timeout=1.5)["entry_timeout"] == {
        "secs": 1,
        "nanos": 500_000_000,
    }


def test_listing(image: RafsImage) -> None:
    entries = list(image.readdir(image.root_nid))

    assert [(e.name, e.nid, e.file_type, e.offset) for e in entries] == [
        (b".", 128, 2, 1),
        (b"..", 128, 2, 2),
        (b"lib.rs", 133, 1, 3),
        (b"sync_io.rs", 136, 1, 4),
    ]
    assert [e.name for e in image.readdir(image.root_nid, 2)] == [b"lib.rs", b"sync_io.rs"]
    assert list(image.readdir(image.root_nid, 4)) == []
    assert image.lookup(image.root_nid, b"sync_io.rs") == 136
    assert image.lookup(image.root_nid, b"missing") is None
    root = image.inode(image.root_nid)
    assert stat.S_ISDIR(root.mode) and root.nlink == 2


def test_both_files_read_with_every_digest_checked(image: RafsImage) -> None:
    with LocalBlobSource(image, str(FIXTURES / "blobs"), validate=True) as source:
        for name, size in ((b"lib.rs", 16931), (b"sync_io.rs", 13400)):
            nid = image.lookup(image.root_nid, name)
            inode = image.inode(nid)
            assert inode.size == size and stat.S_ISREG(inode.mode)

            data = read_file(image, nid, 0, 1 << 20, source)

            assert len(data) == size
            text = data.decode()
            assert text.startswith("// Copyright")
            assert "fn " in text and "use " in text and "impl " in text and text.endswith("}\n")
            assert read_file(image, nid, 1000, 50, source) == data[1000:1050]
            assert read_file(image, nid, size - 10, 100, source) == data[-10:]
            assert read_file(image, nid, size, 100, source) == b""


def test_chunk_extents(image: RafsImage) -> None:
    nid = image.lookup(image.root_nid, b"sync_io.rs")

    [extent] = image.chunk_extents(nid, 100, 1 << 30)

    assert isinstance(extent, ChunkExtent)
    assert (extent.skip, extent.length) == (100, 13300)
    assert (extent.chunk.blob_index, extent.chunk.index, extent.chunk.compressed) == (0, 1, True)
    assert extent.chunk.uncompressed_offset == 5 * 4096
    assert image.chunk_extents(nid, 13400, 10) == []
    # The builder writes the chunk table in its own order, not by ci index.
    assert sorted(c.index for c in image.chunks()) == [0, 1]


def test_blob_files_map_overrides_the_directory(image: RafsImage, tmp_path: Path) -> None:
    copy = tmp_path / "renamed"
    shutil.copy(FIXTURES / "blobs" / BLOB_ID, copy)
    nid = image.lookup(image.root_nid, b"lib.rs")

    with LocalBlobSource(image, blob_files={BLOB_ID: str(copy)}, validate=True) as source:
        assert read_file(image, nid, 0, 20, source) == b"// Copyright (C) 202"


def test_corrupted_blob_fails_the_digest_check(image: RafsImage, tmp_path: Path) -> None:
    raw = bytearray((FIXTURES / "blobs" / BLOB_ID).read_bytes())
    nid = image.lookup(image.root_nid, b"sync_io.rs")
    chunk = image.chunk_extents(nid, 0, 1)[0].chunk
    # A valid zstd frame of the right size but other content, padded to the chunk's stored size.
    fake = zstandard.ZstdCompressor().compress(b"x" * chunk.uncompressed_size)
    raw[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size] = fake.ljust(
        chunk.compressed_size, b"\0"
    )
    (tmp_path / BLOB_ID).write_bytes(bytes(raw))

    mismatch = f"chunk 1 of blob {BLOB_ID}: blake3 digest mismatch"
    with (
        LocalBlobSource(image, str(tmp_path), validate=True) as source,
        pytest.raises(RafsError, match=mismatch),
    ):
        read_file(image, nid, 0, 10, source)
    with LocalBlobSource(image, str(tmp_path)) as source:
        assert read_file(image, nid, 0, 3, source) == b"xxx"


def test_undecodable_chunk_is_a_rafs_error(image: RafsImage, tmp_path: Path) -> None:
    (tmp_path / BLOB_ID).write_bytes(bytes(len((FIXTURES / "blobs" / BLOB_ID).read_bytes())))
    nid = image.lookup(image.root_nid, b"lib.rs")

    with LocalBlobSource(image, str(tmp_path)) as source, pytest.raises(RafsError, match="decompress"):
        read_file(image, nid, 0, 10, source)


def test_missing_blob_names_the_blob(image: RafsImage, tmp_path: Path) -> None:
    nid = image.lookup(image.root_nid, b"lib.rs")

    with LocalBlobSource(image, str(tmp_path)) as source, pytest.raises(RafsError, match=BLOB_ID):
        read_file(image, nid, 0, 10, source)


def test_misuse_gets_precise_errnos(image: RafsImage) -> None:
    nid = image.lookup(image.root_nid, b"lib.rs")

    with pytest.raises(RafsError) as info:
        image.lookup(nid, b"x")
    assert info.value.errno == 20  # ENOTDIR
    with pytest.raises(RafsError) as info:
        image.readlink(nid)
    assert info.value.errno == 22  # EINVAL
    with pytest.raises(RafsError) as info:
        image.chunk_extents(image.root_nid, 0, 1)
    assert info.value.errno == 21  # EISDIR
    with pytest.raises(RafsError, match="past the end"):
        image.inode(10**9)


@pytest.mark.parametrize("path", V5_BOOTSTRAPS, ids=lambda p: p.name)
def test_rafs_v5_is_refused(path: Path) -> None:
    with pytest.raises(RafsError, match="unsupported RAFS version 5") as info:
        RafsImage.open(str(path))

    assert isinstance(info.value, OtherError)
    assert str(path) in str(info.value)


def test_v5_fixtures_exist() -> None:
    assert len(V5_BOOTSTRAPS) == 2
