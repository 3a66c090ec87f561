"""The daemon against the kernel: the same images, mounted by both, must look the same.

Images come from `nydus-actors image create` (RAFS v6, uncompressed and zstd)
and from Debian's `mkfs.erofs` (plain, block-map chunks, chunks in a blob
device). Each is mounted by the kernel (file-backed `mount(2)`) and by the
daemon (`POST /api/v1/mount`, localfs backend), and the whole trees are
compared: names, types, modes, uid/gid, sizes, mtimes, nlink, symlink targets,
xattrs, rdev, hard-link groups and file bytes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import needs_fuse
from tests.rafs import trees as trees_lib
from tests.rafs.builder import MOUNT_SKIP, populate, snapshot, without

pytestmark = [
    needs_fuse,
    pytest.mark.mount,
    pytest.mark.skipif(MOUNT_SKIP is not None, reason=MOUNT_SKIP or ""),
]


@contextlib.contextmanager
def kernel_mount(image: Path, target: Path, device: Path | None = None):
    target.mkdir(parents=True, exist_ok=True)
    with trees_lib.kernel_mount(image, target, [device] if device else []) as mounted:
        yield mounted


def image_create(src: Path, out: Path, compressor: str) -> tuple[Path, Path]:
    blobs = out / f"blobs-{compressor}"
    blobs.mkdir()
    boot = out / f"rafs-{compressor}.boot"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nydus_actors",
            "image",
            "create",
            "--bootstrap",
            str(boot),
            "--blob-dir",
            str(blobs),
            "--compressor",
            compressor,
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    return boot, blobs


def mkfs(src: Path, image: Path, *args: str) -> None:
    trees_lib.mkfs_erofs(src, image, *args)


def localfs(**backend) -> str:
    return json.dumps(
        {
            "device": {"backend": {"type": "localfs", "config": backend}},
            "mode": "direct",
            "digest_validate": True,
        }
    )


def assert_matches_source(ours, src: Path) -> None:
    source = snapshot(src)
    assert ours.entries.keys() == source.entries.keys()
    for path, entry in source.entries.items():
        if path != b"/":  # the source root's own attributes are the temp dir's
            assert ours.entries[path] == entry, path
    assert ours.links == source.links


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    src = base / "src"
    populate(src, many=10_000)
    # mkfs.erofs 1.5 cannot store 255-byte names (format doc §11.4): give it 254-byte ones
    short = base / "src254"
    populate(short, many=10_000)
    for path in sorted(short.rglob("*"), key=lambda p: -len(p.parts)):
        if len(path.name) == 255:
            path.rename(path.with_name(path.name[:254]))
    return {"src": src, "src254": short}


def test_image_create_uncompressed_matches_kernel_and_source(spawn, trees, tmp_path: Path) -> None:
    boot, blobs = image_create(trees["src"], tmp_path, "none")
    blob = next(blobs.iterdir())
    daemon = spawn()
    status, _, body = daemon.request(
        "POST",
        "/api/v1/mount?mountpoint=/img",
        {"source": str(boot), "fs_type": "rafs", "config": localfs(dir=str(blobs))},
    )
    assert status == 204, body
    ours = snapshot(daemon.mountpoint / "img")
    with kernel_mount(boot, tmp_path / "kernel", blob) as mnt:
        theirs = snapshot(mnt)
    assert ours == theirs
    assert without(ours, "mtime_ns") == without(snapshot(trees["src"]), "mtime_ns") or ours == snapshot(
        trees["src"]
    )


def test_image_create_zstd_matches_source(spawn, trees, tmp_path: Path) -> None:
    boot, blobs = image_create(trees["src"], tmp_path, "zstd")
    daemon = spawn()
    status, _, body = daemon.request(
        "POST",
        "/api/v1/mount?mountpoint=/z",
        {"source": str(boot), "fs_type": "rafs", "config": localfs(dir=str(blobs))},
    )
    assert status == 204, body
    ours = snapshot(daemon.mountpoint / "z")
    with kernel_mount(boot, tmp_path / "kernel", next(blobs.iterdir())) as mnt:
        assert without(snapshot(mnt, content=False), "sha256") == without(ours, "sha256")
    assert_matches_source(ours, trees["src"])


@pytest.mark.parametrize(
    ("variant", "args"),
    [
        ("plain", ()),
        ("noinline", ("-Enoinline_data",)),
        ("shared-xattrs", ("-x0",)),
        ("chunk4k", ("--chunksize=4096",)),
        ("blobdev", ("--chunksize=1048576",)),
    ],
)
def test_mkfs_erofs_images_match_kernel(
    spawn, trees, tmp_path: Path, variant: str, args: tuple[str, ...]
) -> None:
    image = tmp_path / f"{variant}.img"
    blob = None
    if variant == "blobdev":
        blob = tmp_path / "blob"
        args = (*args, f"--blobdev={blob}")
    mkfs(trees["src254"], image, *args)
    daemon = spawn()
    config = localfs(blob_file=str(blob)) if blob else localfs(dir=str(tmp_path))
    status, _, body = daemon.request(
        "POST",
        f"/api/v1/mount?mountpoint=/{variant}",
        {"source": str(image), "fs_type": "rafs", "config": config},
    )
    assert status == 204, body
    ours = snapshot(daemon.mountpoint / variant)
    with kernel_mount(image, tmp_path / "kernel", blob) as mnt:
        theirs = snapshot(mnt)
    assert ours == theirs


def test_compressed_erofs_is_refused(spawn, trees, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_bytes(b"compress me " * 1000)
    image = tmp_path / "lz4.img"
    mkfs(small, image, "-zlz4hc")
    daemon = spawn()
    status, _, body = daemon.request(
        "POST",
        "/api/v1/mount?mountpoint=/c",
        {"source": str(image), "fs_type": "rafs", "config": localfs(dir="/")},
    )
    assert status == 500 and "compress" in body["message"]
    assert daemon.state() == "RUNNING"
