"""Mutated and truncated images: opening and walking them succeeds or raises RafsError only."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_actors.rafs import LocalBlobSource, LocalDeviceReader, RafsError, RafsImage, read_file
from nydus_actors.rafs.crc32c import crc32c
from tests.paths import NYDUS_FIXTURES
from tests.rafs.trees import mkfs_available, mkfs_erofs, uncompressed_blob

FIXTURES = NYDUS_FIXTURES
#: Bounds of one walk, so a mutated image cannot make the test itself slow.
MAX_NODES = 400
READ_LIMIT = 256 << 10

FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@dataclass(frozen=True)
class Base:
    """A valid image to mutate, the byte ranges worth mutating, and how to read its files."""

    raw: bytes
    regions: tuple[tuple[int, int], ...]
    devices: tuple[str, ...] = ()
    blob_dir: str | None = None


def _small_tree(root: Path) -> Path:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "tiny").write_bytes(b"tiny file\n")
    (root / "two-blocks").write_bytes(bytes(range(256)) * 20)
    (root / "dir" / "sub" / "deep").write_bytes(b"deep\n" * 300)
    (root / "empty").write_bytes(b"")
    os.symlink("tiny", root / "link")
    os.symlink("x" * 200, root / "long-link")
    os.mkfifo(root / "fifo")
    for name in ("tiny", "two-blocks", "empty"):
        os.setxattr(root / name, b"user.shared", b"shared value")
    os.setxattr(root / "tiny", b"user.own", b"inline value" * 4)
    os.setxattr(root / "dir", b"user.opaque", b"y")
    return root


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    base = tmp_path_factory.mktemp("fuzz-bases")
    found = {}
    boot = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
    with RafsImage.open(str(boot)) as img:
        device = uncompressed_blob(img, FIXTURES / "blobs", base / "uncompressed.blob")
    # Superblocks and device table, blob table, inodes and dirents, chunk table.
    found["nydus"] = Base(
        boot.read_bytes(),
        ((1028, 1700), (4096, 4352), (12288, 12800), (16384, 16544)),
        devices=(str(device),),
        blob_dir=str(FIXTURES / "blobs"),
    )
    if mkfs_available():
        src = _small_tree(base / "src")
        plain = mkfs_erofs(src, base / "plain.erofs", "-x1").read_bytes()
        found["plain"] = Base(plain, ((0, len(plain)), (1028, 1152)))
        blob = base / "chunked.blob"
        chunked = mkfs_erofs(
            src, base / "chunked.erofs", "--chunksize=4096", f"--blobdev={blob}"
        ).read_bytes()
        found["chunked"] = Base(chunked, ((0, len(chunked)), (1028, 1152)), devices=(str(blob),))
    return found


_EXTREMES = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000)


@st.composite
def mutations(draw: st.DrawFn, base: Base) -> tuple[list[tuple[int, bytes]], int | None, bool]:
    """Changes (offset, new bytes) inside the interesting regions, an optional truncation, CRC fix."""
    changes = []
    for _ in range(draw(st.integers(1, 8))):
        start, end = draw(st.sampled_from(base.regions))
        end = min(end, len(base.raw))
        offset = draw(st.integers(start, end - 1))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            # Flip one bit: keeps most fields plausible, so parsing goes deeper.
            data = bytes([base.raw[offset] ^ (1 << draw(st.integers(0, 7)))])
        elif kind == 1:
            data = bytes([draw(st.integers(0, 255))])
        else:
            # Overwrite an aligned field with an extreme value: sizes, counts, offsets, addresses.
            width = draw(st.sampled_from((2, 4, 8)))
            offset -= offset % width
            value = draw(st.sampled_from(_EXTREMES) | st.integers(0, (1 << 8 * width) - 1))
            data = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        changes.append((offset, data))
    # Mostly keep the length and a valid checksum, so parsing gets past the superblock.
    truncate = draw(st.integers(0, len(base.raw))) if draw(st.integers(0, 4)) == 0 else None
    return changes, truncate, draw(st.integers(0, 3)) > 0


def _mutate(base: Base, changes: list[tuple[int, bytes]], truncate: int | None, fix_crc: bool) -> bytes:
    raw = bytearray(base.raw)
    for offset, data in changes:
        raw[offset : offset + len(data)] = data
    del raw[len(base.raw) :]
    if fix_crc and len(raw) >= 4096 and raw[1024 + 8] & 1:
        area = bytearray(raw[1024:4096])
        area[4:8] = bytes(4)
        struct.pack_into("<I", raw, 1028, crc32c(area))
    return bytes(raw if truncate is None else raw[:truncate])


def _read_all(nid: int, size: int, read: Callable[[int, int, int], bytes]) -> None:
    read(nid, 0, min(size, READ_LIMIT))
    if size > READ_LIMIT:
        read(nid, size - 4096, 8192)


def walk(img: RafsImage, base: Base, *, strict: bool = False) -> int:
    """Visit every reachable inode the way a FUSE client would; return how many were visited.

    Unless `strict`, a RafsError fails only the one call, like one failed FUSE request.
    """

    def _attempt(operation: Callable[..., object], *args: object) -> None:
        try:
            operation(*args)
        except RafsError:
            if strict:
                raise

    def read_device(nid: int, off: int, size: int) -> bytes:
        return img.read(nid, off, size, devices)

    with LocalDeviceReader(img.path, base.devices) as devices:
        source = LocalBlobSource(img, base.blob_dir, validate=True) if img.is_rafs else None
        seen: set[int] = set()
        pending = [img.root_nid]
        while pending and len(seen) < MAX_NODES:
            nid = pending.pop()
            if nid in seen:
                continue
            seen.add(nid)
            try:
                inode = img.inode(nid)
            except RafsError:
                if strict:
                    raise
                continue
            _attempt(img.xattrs, nid)
            if stat.S_ISDIR(inode.mode):
                _attempt(_list, img, nid, pending)
            elif stat.S_ISLNK(inode.mode):
                _attempt(img.readlink, nid)
            elif stat.S_ISREG(inode.mode):
                _attempt(_read_all, nid, inode.size, read_device)
                if source is not None:
                    _attempt(_read_all, nid, inode.size, partial(read_file, img, source=source))
        if source is not None:
            source.close()
    return len(seen)


def _list(img: RafsImage, nid: int, pending: list[int]) -> None:
    for entry in img.readdir(nid):
        # A corrupted image may list names out of order; lookup may then miss.
        img.lookup(nid, entry.name)
        pending.append(entry.nid)


def _check(base: Base, path: Path, changes, truncate, fix_crc) -> None:
    path.write_bytes(_mutate(base, changes, truncate, fix_crc))
    try:
        img = RafsImage.open(str(path))
    except RafsError:
        return
    try:
        img.super_meta()
        walk(img, base)
    finally:
        img.close()


def test_unmutated_bases_walk_cleanly(bases: dict[str, Base], tmp_path: Path) -> None:
    for name, base in bases.items():
        (tmp_path / name).write_bytes(base.raw)
        with RafsImage.open(str(tmp_path / name)) as img:
            assert walk(img, base, strict=True) >= 3, name


@pytest.mark.parametrize("name", ["nydus", "plain", "chunked"])
def test_mutated_images_fail_only_with_rafs_error(bases: dict[str, Base], tmp_path: Path, name: str) -> None:
    if name not in bases:
        pytest.skip("mkfs.erofs is not installed")
    base = bases[name]
    path = tmp_path / "mutated"

    @FUZZ_SETTINGS
    @given(mutations(base))
    def run(mutation: tuple[list[tuple[int, int]], int | None, bool]) -> None:
        _check(base, path, *mutation)

    run()
