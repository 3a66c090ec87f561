"""The reader against the kernel: mkfs.erofs images and the Nydus sample, mounted and compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydus_actors.rafs import LocalBlobSource, LocalDeviceReader, RafsImage, read_file
from tests.paths import NYDUS_FIXTURES
from tests.rafs.trees import build_tree, kernel_mount, mkfs_erofs, uncompressed_blob, why_no_kernel_mount
from tests.rafs.walk import Node, kernel_snapshot, reader_snapshot

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(why_no_kernel_mount() is not None, reason=why_no_kernel_mount() or ""),
]

FIXTURES = NYDUS_FIXTURES

#: mkfs.erofs argument sets; "BLOB" becomes the blob device path.
VARIANTS = {
    "plain": (),
    "chunk4k": ("--chunksize=4096",),
    "blobdev1m": ("--chunksize=1048576", "--blobdev=BLOB"),
    "blobdev4k": ("--chunksize=4096", "--blobdev=BLOB"),
    "compact": ("-Eforce-inode-compact",),
    "x0": ("-x0",),
    "noinline": ("-Enoinline_data",),
}
CASES = [
    *(("mixed", variant) for variant in VARIANTS),
    ("wide", "plain"),
    ("wide", "blobdev1m"),
    ("deep", "plain"),
    ("deep", "compact"),
]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each source tree, built once per module (the wide one has 10k entries)."""
    base = tmp_path_factory.mktemp("trees")
    built = {kind: build_tree(base / kind, kind) for kind in ("mixed", "wide", "deep")}
    # -Eforce-inode-compact cannot store owners above 65535.
    built["mixed-compact"] = build_tree(base / "mixed-compact", "mixed", big_ids=False)
    return built


def _build(trees: dict[str, Path], kind: str, variant: str, out: Path) -> tuple[Path, list[Path]]:
    src = trees["mixed-compact" if (kind, variant) == ("mixed", "compact") else kind]
    blob = out / "image.blob"
    args = [arg.replace("BLOB", str(blob)) for arg in VARIANTS[variant]]
    image = mkfs_erofs(src, out / "image.erofs", *args)
    return image, [blob] if blob.exists() else []


def _compare(expected: dict[bytes, Node], actual: dict[bytes, Node]) -> None:
    assert sorted(actual) == sorted(expected)
    mismatched = [path for path in expected if actual[path] != expected[path]]
    assert not mismatched, [(path, expected[path], actual[path]) for path in mismatched[:3]]


@pytest.mark.parametrize(("kind", "variant"), CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_reader_matches_kernel(trees: dict[str, Path], tmp_path: Path, kind: str, variant: str) -> None:
    image, devices = _build(trees, kind, variant, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with kernel_mount(image, mountpoint, devices):
        expected = kernel_snapshot(mountpoint)

    with RafsImage.open(str(image)) as img, LocalDeviceReader(str(image), [str(d) for d in devices]) as dev:
        actual = reader_snapshot(img, lambda nid, off, size: img.read(nid, off, size, dev))
        assert img.device_count == len(devices)
        assert not img.is_rafs

    _compare(expected, actual)


def test_mixed_tree_exercises_what_it_claims(trees: dict[str, Path], tmp_path: Path) -> None:
    """The mixed tree covers every type, shared and inline xattrs, and all three layouts."""
    image, _ = _build(trees, "mixed", "x0", tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with kernel_mount(image, mountpoint):
        nodes = kernel_snapshot(mountpoint)

    kinds = {node.mode >> 12 for node in nodes.values()}
    assert kinds == {0o01, 0o02, 0o04, 0o06, 0o10, 0o12, 0o14}
    assert nodes[b"big-ids"].uid == 100_000
    assert nodes[b"six"].mtime_ns % 10**9 == 123_456_789
    assert nodes[b"n" * 254].size > 0
    assert nodes[b"sparse"].size == 5 << 20
    assert nodes[b"linked"].ino == nodes[b"hardlink"].ino
    assert nodes[b"empty-dir"].xattrs == {b"trusted.overlay.opaque": b"y"}
    with RafsImage.open(str(image)) as img:
        layouts = {img.inode(node.ino).layout for node in nodes.values()}
        assert {0, 2} <= layouts
        # -x0 moves every xattr to the shared area.
        assert img.inode(nodes[b"six"].ino).xattr_count == 2


def test_nydus_sample_matches_kernel_with_an_uncompressed_blob(tmp_path: Path) -> None:
    bootstrap = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
    with RafsImage.open(str(bootstrap)) as img:
        device = uncompressed_blob(img, FIXTURES / "blobs", tmp_path / "uncompressed.blob")
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        with kernel_mount(bootstrap, mountpoint, [device]):
            expected = kernel_snapshot(mountpoint)

        with LocalBlobSource(img, str(FIXTURES / "blobs"), validate=True) as source:
            through_chunks = reader_snapshot(
                img, lambda nid, off, size: read_file(img, nid, off, size, source)
            )
        with LocalDeviceReader(str(bootstrap), [str(device)]) as dev:
            through_device = reader_snapshot(img, lambda nid, off, size: img.read(nid, off, size, dev))

    assert set(expected) == {b"", b"lib.rs", b"sync_io.rs"}
    _compare(expected, through_chunks)
    _compare(expected, through_device)
