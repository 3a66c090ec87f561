"""The built bootstrap and blob, decoded independently: fixed layout, tables, chunks, dedupe, tree."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from pathlib import Path

import pytest

from nydus_actors.rafs.builder import BuildError, BuildResult, build, ondisk
from nydus_actors.rafs.builder import source as source_mod
from tests.rafs.builder import BS, MIB, Snapshot, decode, fsck_errors, populate, snapshot


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "tree"
    populate(root)
    return root


@pytest.fixture(scope="module")
def source_snapshot(source: Path) -> Snapshot:
    return snapshot(source)


def _build(source: Path, out: Path, **kw) -> BuildResult:
    blobs = out / "blobs"
    blobs.mkdir(parents=True)
    return build(source, out / "bootstrap", blobs, **kw)


CASES = [
    ("none", "blake3", 0x100000),
    ("zstd", "sha256", 0x10000),
    ("lz4_block", "blake3", 0x1000),
    ("zstd", "blake3", 0x1000000),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_decoded_tree_equals_source(source, source_snapshot, tmp_path, case):
    compressor, digester, chunk_size = case
    result = _build(source, tmp_path, compressor=compressor, digester=digester, chunk_size=chunk_size)
    image = decode(result.bootstrap, result.blob_path)
    assert image.tree == source_snapshot
    assert fsck_errors(result.bootstrap, result.blob_path) == ""


def test_fixed_layout_and_tables(source, tmp_path):
    result = _build(source, tmp_path, compressor="zstd", digester="blake3")
    boot = Path(result.bootstrap).read_bytes()
    image = decode(result.bootstrap, result.blob_path)
    sb, ext, blob = image.sb, image.ext, image.blob
    assert boot[:1024] == bytes(1024)
    assert len(boot) % BS == 0
    assert sb["checksum"] == 0 and sb["compat"] == 0x4000_0000 and sb["incompat"] == 0xC
    assert (sb["blkszbits"], sb["extslots"], sb["devt_slotoff"], sb["extra_devices"]) == (12, 0, 11, 1)
    assert sb["xattr_blkaddr"] == 0 and sb["u1"] == 0 and sb["blocks"] == len(boot) // BS
    assert sb["root_nid"] == 128
    assert sb["inos"] == len(image.tree.entries) - sum(len(g) - 1 for g in image.tree.links)
    # zstd 0x80 | blake3 0x4 | explicit uid/gid 0x10 | xattrs 0x20
    assert ext["flags"] == 0x80 | 0x4 | 0x10 | 0x20
    assert ext["chunk_size"] == 0x100000
    assert ext["blob_table_offset"] == 4096 and ext["blob_table_size"] == 256
    assert ext["chunk_table_offset"] % BS == 0 and ext["chunk_table_offset"] > ext["blob_table_offset"]
    assert ext["chunk_table_size"] == 80 * result.chunk_count
    assert ext["chunk_table_offset"] + ext["chunk_table_size"] <= len(boot)
    assert image.device["tag"] == result.blob_id.encode()
    assert image.device["blocks"] == blob["uncompressed_size"] // BS
    assert image.device["mapped_blkaddr"] * BS >= len(boot)
    assert blob["blob_id"] == result.blob_id.encode() and blob["blob_index"] == 0
    assert (blob["compression_algo"], blob["digest_algo"], blob["chunk_size"]) == (3, 0, 0x100000)
    assert blob["chunk_count"] == result.chunk_count == len(image.chunks)
    assert blob["compressed_size"] == os.path.getsize(result.blob_path)
    assert blob["uncompressed_size"] % BS == 0


def test_blob_is_content_addressed_and_alone(source, tmp_path):
    result = _build(source, tmp_path, compressor="lz4_block")
    data = Path(result.blob_path).read_bytes()
    assert result.blob_id == hashlib.sha256(data).hexdigest()
    assert Path(result.blob_path).name == result.blob_id
    assert os.listdir(tmp_path / "blobs") == [result.blob_id]
    assert sorted(os.listdir(tmp_path)) == ["blobs", "bootstrap"]


def test_duplicates_share_chunks(source, tmp_path):
    result = _build(source, tmp_path, compressor="none", chunk_size=0x10000)
    image = decode(result.bootstrap, result.blob_path)
    original = image.indexes[b"/random.bin"]
    assert original == image.indexes[b"/dup/random-copy.bin"]
    assert len(original) == 5 * MIB // 0x10000
    digests = [c["digest"] for c in image.chunks]
    assert len(digests) == len(set(digests))
    # every all-zero 64 KiB chunk of "zeros" and "sparse" is one chunk
    zero_ci = {ci for ci, _, _ in image.indexes[b"/zeros"]}
    assert len(zero_ci) == 1 and zero_ci <= {ci for ci, _, _ in image.indexes[b"/sparse"]}


def test_uncompressed_blob_is_the_device(source, tmp_path):
    result = _build(source, tmp_path, compressor="none")
    image = decode(result.bootstrap, result.blob_path)
    assert os.path.getsize(result.blob_path) == image.blob["uncompressed_size"]
    for c in image.chunks:
        assert c["flags"] == 0
        assert c["compressed_offset"] == c["uncompressed_offset"] and c["uncompressed_offset"] % BS == 0
        assert c["compressed_size"] == c["uncompressed_size"]
    assert image.ext["flags"] & 0xFF == 0x1 | 0x4 | 0x10 | 0x20


@pytest.mark.parametrize("compressor", ["zstd", "lz4_block"])
def test_incompressible_chunks_stay_raw(source, tmp_path, compressor):
    result = _build(source, tmp_path, compressor=compressor, digester="sha256")
    image = decode(result.bootstrap, result.blob_path)
    random_ci = {ci for ci, _, _ in image.indexes[b"/random.bin"]}
    text_ci = {ci for ci, _, _ in image.indexes[b"/text"]}
    for ci in random_ci:
        c = image.chunks[ci]
        assert c["flags"] == 0 and c["compressed_size"] == c["uncompressed_size"]
    for ci in text_ci:
        c = image.chunks[ci]
        assert c["flags"] == 1 and c["compressed_size"] < c["uncompressed_size"] // 10
    offsets = sorted((c["compressed_offset"], c["compressed_size"]) for c in image.chunks)
    for (off, size), (next_off, _) in itertools.pairwise(offsets):
        assert off + size == next_off, "compressed chunks are packed back to back"


def test_inode_shapes(source, tmp_path):
    result = _build(source, tmp_path)
    formats = decode(result.bootstrap).formats
    # a fifo with mtime 0 and small ids fits a compact inode; ns mtimes need extended ones
    assert formats[b"/fifo"] == 0
    assert formats[b"/small.txt"] == 1 | 4 << 1
    assert formats[b"/empty"] == 1 | 4 << 1
    assert formats[b"/rel"] == 1 | 2 << 1
    assert formats[b"/maxlink"] == 1 | 0 << 1, "a 4095-byte target cannot be inline"
    assert formats[b"/longlink"] == 1 | 2 << 1
    assert formats[b"/many"] == 1 | 2 << 1


def test_same_input_same_output(source, tmp_path):
    first = _build(source, tmp_path / "one", compressor="zstd")
    second = _build(source, tmp_path / "two", compressor="zstd")
    assert first.blob_id == second.blob_id
    assert Path(first.bootstrap).read_bytes() == Path(second.bootstrap).read_bytes()


def test_empty_directory_source(tmp_path):
    (tmp_path / "src").mkdir()
    os.utime(tmp_path / "src", ns=(5, 1_500_000_000))
    result = _build(tmp_path / "src", tmp_path / "out")
    assert result.chunk_count == 0
    image = decode(result.bootstrap, result.blob_path)
    assert image.tree.entries == {
        b"/": {
            "mode": stat.S_IFDIR | 0o755,
            "uid": 0,
            "gid": 0,
            "mtime_ns": 1_500_000_000,
            "nlink": 2,
            "xattrs": {},
        }
    }
    assert image.ext["chunk_table_size"] == 0


def test_xattr_names():
    assert ondisk.xattr_key(b"user.x") == (1, b"x")
    assert ondisk.xattr_key(b"system.posix_acl_access") == (2, b"")
    assert ondisk.xattr_key(b"security.capability") == (6, b"capability")
    assert ondisk.xattr_key(b"system.nfs4_acl") is None
    assert ondisk.xattr_key(b"user.") is None


def test_errors_leave_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    (tmp_path / "blobs").mkdir()

    def broken_open(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0])

    monkeypatch.setattr(source_mod, "open", broken_open, raising=False)
    with pytest.raises(BuildError, match="Permission denied"):
        build(tmp_path / "src", tmp_path / "boot", tmp_path / "blobs")
    assert os.listdir(tmp_path / "blobs") == []
    assert not (tmp_path / "boot").exists()
