"""OCI layer tarballs as the source: same tree as the directory, whiteouts kept, pax details honoured."""

from __future__ import annotations

import base64
import gzip
import io
import random
import stat
import tarfile
from pathlib import Path

import pytest

from nydus_actors.rafs.builder import BuildError, build
from nydus_actors.rafs.builder.layer import parse_pax_time
from tests.rafs.builder import decode, make_layer, pax_time, populate


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "tree"
    populate(root, sockets=False, big=2 << 20, many=3000)
    return root


def _decoded(source: Path, out: Path):
    (out / "blobs").mkdir(parents=True)
    result = build(source, out / "boot", out / "blobs", compressor="zstd", chunk_size=0x10000)
    return decode(result.bootstrap, result.blob_path).tree


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_layer_gives_the_directory_tree(source, tmp_path, suffix):
    layer = tmp_path / f"layer{suffix}"
    make_layer(source, layer)
    from_layer = _decoded(layer, tmp_path / "layer")
    from_dir = _decoded(source, tmp_path / "dir")
    assert from_layer == from_dir
    for whiteout in (b"/.wh.foo", b"/sub/.wh..wh..opq"):
        entry = from_layer.entries[whiteout]
        assert stat.S_ISREG(entry["mode"]) and entry["size"] == 0
    assert from_layer.entries[b"/old"]["mtime_ns"] < 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1700000000", (1700000000, 0)),
        ("1700000000.5", (1700000000, 500000000)),
        ("1700000000.24669425", (1700000000, 246694250)),
        ("1700000000.123456789", (1700000000, 123456789)),
        ("1700000000.1234567891", (1700000000, 123456789)),
        ("-1.5", (-2, 500000000)),
        ("0.000000001", (0, 1)),
    ],
)
def test_pax_time_fraction_is_right_padded(text, expected):
    assert parse_pax_time(text) == expected
    if len(text.partition(".")[2]) <= 9:
        assert parse_pax_time(pax_time(expected[0] * 10**9 + expected[1])) == expected


def _tar(tmp_path: Path, members, name: str = "layer.tar") -> Path:
    """Write a tar from (TarInfo, data or None) pairs."""
    path = tmp_path / name
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data) if data is not None else 0
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = kw.pop("mode", 0o644)
    for key, value in kw.items():
        setattr(ti, key, value)
    return ti


def _tree(tmp_path: Path, layer: Path):
    (tmp_path / "blobs").mkdir(exist_ok=True)
    result = build(layer, tmp_path / "boot", tmp_path / "blobs")
    return decode(result.bootstrap, result.blob_path).tree.entries


def test_missing_parents_later_duplicates_and_links(tmp_path):
    layer = _tar(
        tmp_path,
        [
            (_info("a/b/file"), b"first"),
            (_info("a/b/file", mtime=7), b"second wins"),
            (_info("a", tarfile.DIRTYPE, mode=0o700, mtime=9, uid=3), None),
            (_info("a/link", tarfile.LNKTYPE, linkname="a/b/file"), None),
            (_info("/abs/./x", tarfile.SYMTYPE, linkname="../a"), None),
        ],
    )
    entries = _tree(tmp_path, layer)
    assert entries[b"/"]["mode"] == stat.S_IFDIR | 0o755 and entries[b"/"]["mtime_ns"] == 0
    assert entries[b"/a"]["mode"] == stat.S_IFDIR | 0o700 and entries[b"/a"]["uid"] == 3
    assert entries[b"/a"]["nlink"] == 3
    assert entries[b"/a/b"]["mode"] == stat.S_IFDIR | 0o755
    assert entries[b"/a/b/file"]["size"] == len(b"second wins") and entries[b"/a/b/file"]["nlink"] == 2
    assert entries[b"/a/link"] == entries[b"/a/b/file"]
    assert entries[b"/abs/x"]["target"] == b"../a"


def test_pax_xattrs_and_big_ids(tmp_path):
    ti = _info("f", uid=100000, gid=200000)
    ti.pax_headers = {
        "SCHILY.xattr.user.plain": "text",
        "SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\xff".decode("utf-8", "surrogateescape"),
        "LIBARCHIVE.xattr.user.from%20libarchive": base64.b64encode(b"la").decode().rstrip("="),
        "mtime": "1700000000.000001",
    }
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tf:
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    entry = _tree(tmp_path, layer)[b"/f"]
    assert entry["xattrs"] == {
        b"user.plain": b"text",
        b"security.capability": b"\x01\x00\x00\x02\xff",
        b"user.from libarchive": b"la",
    }
    assert (entry["uid"], entry["gid"]) == (100000, 200000)
    assert entry["mtime_ns"] == 1700000000_000001000


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(_info("x", tarfile.LNKTYPE, linkname="nowhere"), None)], "hard link"),
        ([(_info("../escape"), b"")], "climbs out"),
        ([(_info("f"), b""), (_info("f/g"), b"")], "parent is not a directory"),
    ],
)
def test_bad_members(tmp_path, members, message):
    layer = _tar(tmp_path, members)
    with pytest.raises(BuildError, match=message):
        _tree(tmp_path, layer)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_not_a_tar_and_truncated_gzip(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(BuildError, match="bad tar archive"):
        _tree(tmp_path, junk)
    good = _tar(tmp_path, [(_info("f"), random.Random(0).randbytes(100000))])
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(gzip.compress(good.read_bytes())[:2000])
    with pytest.raises(BuildError, match="bad tar archive"):
        _tree(tmp_path, truncated)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(BuildError, match="bad tar archive"):
        _tree(tmp_path, empty)
