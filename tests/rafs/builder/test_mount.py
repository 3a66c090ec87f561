"""The stock kernel mounts what the builder writes (file-backed mount(2), blob as extra device)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from nydus_actors.rafs.builder import build
from tests.rafs.builder import (
    MOUNT_SKIP,
    decode,
    fsck_errors,
    kernel_mount,
    make_layer,
    populate,
    snapshot,
    uncompressed_device,
    without,
)

pytestmark = [pytest.mark.mount, pytest.mark.skipif(MOUNT_SKIP is not None, reason=MOUNT_SKIP or "")]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "tree"
    populate(root)
    return root


@pytest.mark.parametrize("chunk_size", [0x100000, 0x1000])
def test_uncompressed_image_mounts_as_the_source(source, tmp_path, chunk_size):
    (tmp_path / "blobs").mkdir()
    result = build(source, tmp_path / "boot", tmp_path / "blobs", compressor="none", chunk_size=chunk_size)
    assert fsck_errors(result.bootstrap, result.blob_path) == ""
    expected = snapshot(source)
    with kernel_mount(result.bootstrap, result.blob_path, tmp_path / "mnt") as mnt:
        mounted = snapshot(mnt)
    assert mounted == expected


@pytest.mark.parametrize("compressor", ["zstd", "lz4_block"])
def test_compressed_image_lists_and_reads_through_an_uncompressed_device(source, tmp_path, compressor):
    (tmp_path / "blobs").mkdir()
    result = build(source, tmp_path / "boot", tmp_path / "blobs", compressor=compressor, digester="sha256")
    assert fsck_errors(result.bootstrap, result.blob_path) == ""
    expected = snapshot(source)
    # With the compressed blob as the device the kernel serves all metadata (reads need offsets
    # in the uncompressed space, so file bytes are not compared here).
    with kernel_mount(result.bootstrap, result.blob_path, tmp_path / "mnt") as mnt:
        listed = snapshot(mnt, content=False)
    assert listed == without(expected, "sha256")
    device = uncompressed_device(decode(result.bootstrap), result.blob_path, tmp_path / "device")
    with kernel_mount(result.bootstrap, device, tmp_path / "mnt") as mnt:
        mounted = snapshot(mnt)
    assert mounted == expected


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_layer_image_mounts_as_the_source(tmp_path, suffix):
    src = tmp_path / "src"
    populate(src, sockets=False, big=1 << 20, many=300)
    layer = tmp_path / f"layer{suffix}"
    make_layer(src, layer)
    (tmp_path / "blobs").mkdir()
    result = build(layer, tmp_path / "boot", tmp_path / "blobs", compressor="none")
    assert fsck_errors(result.bootstrap, result.blob_path) == ""
    expected = snapshot(src)
    with kernel_mount(result.bootstrap, result.blob_path, tmp_path / "mnt") as mnt:
        mounted = snapshot(mnt)
    assert mounted == expected
    assert b"/.wh.foo" in mounted.entries and b"/sub/.wh..wh..opq" in mounted.entries


def test_empty_tree_mounts(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "blobs").mkdir()
    result = build(tmp_path / "src", tmp_path / "boot", tmp_path / "blobs")
    assert fsck_errors(result.bootstrap, result.blob_path) == ""
    with kernel_mount(result.bootstrap, result.blob_path, tmp_path / "mnt") as mnt:
        assert snapshot(mnt) == snapshot(tmp_path / "src")


def test_xattr_areas_larger_than_a_block(tmp_path):
    # ext4 cannot hold 12 KiB of xattrs on one file, a layer tarball can.
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tf:
        for n in range(3):
            ti = tarfile.TarInfo(f"f{n}")
            ti.size, ti.mtime = 3, 5
            ti.pax_headers = {f"SCHILY.xattr.user.k{i}": str(i) * 3000 for i in range(4)}
            tf.addfile(ti, io.BytesIO(b"abc"))
    (tmp_path / "blobs").mkdir()
    result = build(layer, tmp_path / "boot", tmp_path / "blobs", compressor="none")
    assert fsck_errors(result.bootstrap, result.blob_path) == ""
    decoded = decode(result.bootstrap, result.blob_path).tree
    with kernel_mount(result.bootstrap, result.blob_path, tmp_path / "mnt") as mnt:
        mounted = snapshot(mnt)
    assert mounted == decoded
    assert mounted.entries[b"/f2"]["xattrs"][b"user.k3"] == b"3" * 3000
