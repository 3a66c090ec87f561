"""Helpers for the image builder tests: source trees, tree snapshots, an independent image decoder, mounts.

The decoder here is written from the format document alone (not from the builder), so that
builder and checker do not share mistakes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import lz4.block
import pytest
import zstandard

from tests.rafs import trees
from tests.rafs.trees import why_no_kernel_mount

BS = 4096
MIB = 1 << 20
BASE_NS = 1_700_000_000_123_456_789
#: owners, device nodes and trusted.* xattrs in the test trees need root
ROOT = os.geteuid() == 0

# ----------------------------------------------------------------------------- source trees


def _write(path: Path, data: bytes, mode: int | None = None) -> None:
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)


def populate(root: Path, *, sockets: bool = True, big: int = 5 * MIB, many: int = 3000) -> None:
    """Make a tree with every file type and the metadata corners the builder must keep."""
    rnd = random.Random(1234)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    (root / "dup").mkdir()
    _write(root / "empty", b"")
    _write(root / "small.txt", b"hello\n", 0o4755)
    _write(root / "block4k", rnd.randbytes(4096))
    _write(root / "f5000", rnd.randbytes(5000), 0o600)
    if ROOT:
        os.chown(root / "f5000", 1234, 5678)
    blob = rnd.randbytes(big)
    _write(root / "random.bin", blob)
    _write(root / "dup" / "random-copy.bin", blob)
    _write(root / "zeros", bytes(MIB))
    _write(root / "text", b"the quick brown fox jumps over the lazy dog\n" * (2 * MIB // 44))
    _write(root / "noperm", b"secret", 0o000)
    with open(root / "sparse", "wb") as f:
        f.seek(MIB + 17)
        f.write(rnd.randbytes(100))
        f.truncate(3 * MIB + 5)
    _write(root / "old", b"before the epoch")
    _write(root / "bigids", b"ids")
    if ROOT:
        os.chown(root / "bigids", 70000, 80000)
    # hard links: three names, one of them in a subdirectory
    _write(root / "hl-a", b"linked content\n")
    os.link(root / "hl-a", root / "sub" / "hl-b")
    os.link(root / "hl-a", root / "sub" / "hl-c")
    os.symlink("small.txt", root / "rel")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("x" * 4000, root / "longlink")
    os.symlink("y" * 4095, root / "maxlink")
    os.link(root / "rel", root / "rel-hard", follow_symlinks=False)
    os.mkfifo(root / "fifo")
    if ROOT:
        os.lchown(root / "dangling", 4321, 70001)
        os.mknod(root / "chr", stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.mknod(root / "blk", stat.S_IFBLK | 0o660, os.makedev(7, 0))
        os.mknod(root / "bigdev", stat.S_IFCHR | 0o600, os.makedev(300, 70000))
    if sockets:
        os.mknod(root / "sock", stat.S_IFSOCK | 0o755)
    (root / "emptydir").mkdir()
    (root / "sticky").mkdir(mode=0o1777)
    os.chmod(root / "sticky", 0o1777)
    many_dir = root / "many"
    many_dir.mkdir()
    for i in range(many):
        (many_dir / f"f{i:05d}").touch()
    for i in range(5):
        (many_dir / f"d{i}").mkdir()
    deep = root / "deep"
    for _ in range(50):
        deep = deep / "d"
    deep.mkdir(parents=True)
    _write(deep / "bottom", b"deep down\n")
    _write(root / ("a" * 255), b"long name\n")
    (root / ("b" * 255)).mkdir()
    _write(root / ("b" * 255) / ("c" * 255), b"long long\n")
    for name in ("héllo wörld", "-dash", "~tilde", ".hidden", "Zed", "+plus"):
        _write(root / name, name.encode())
    _write(root / ".wh.foo", b"")
    _write(root / "sub" / ".wh..wh..opq", b"")
    # xattrs: user.* on files and dirs, trusted.* anywhere, a binary value, a large inline area
    os.setxattr(root / "small.txt", "user.foo", b"bar")
    os.setxattr(root / "f5000", "user.long", b"v" * 200)
    os.setxattr(root / "text", "user.bin", b"\x00\xff\x80binary")
    if ROOT:
        os.setxattr(root / "sub", "trusted.overlay.opaque", b"y")
        os.setxattr(root / "rel", "trusted.sym", b"on a symlink", follow_symlinks=False)
        os.setxattr(root / "fifo", "trusted.fifo", b"")
    os.setxattr(root / "emptydir", "user.empty", b"")
    for i in range(40):
        os.setxattr(root / "hl-a", f"user.attr{i:02d}", f"value {i}".encode() * 3)
    _set_mtimes(root)


def _set_mtimes(root: Path) -> None:
    """Distinct ns mtimes everywhere (children before parents), plus a zero and a negative one."""
    paths = sorted(_walk(root), key=lambda p: (-len(p.parts), str(p)))
    for i, path in enumerate(paths):
        ns = BASE_NS + i * 1_000_001_117
        if path.name == "fifo":
            ns = 0
        elif path.name == "old":
            ns = -315_360_000 * 10**9 + 5
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(BASE_NS - 7, BASE_NS - 7))


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def pax_time(ns: int) -> str:
    """A pax mtime the way Go writes it: no trailing zeros in the fraction."""
    sec, nsec = divmod(abs(ns), 10**9)
    sign = "-" if ns < 0 else ""
    return f"{sign}{sec}.{nsec:09d}".rstrip("0").rstrip(".")


def make_layer(src: Path, out: Path) -> None:
    """Write `src` as an OCI layer tarball (pax: ns mtimes, SCHILY xattrs, hard links), gzip by suffix."""
    mode = "w:gz" if out.suffix in (".gz", ".tgz") else "w"
    seen: dict[tuple[int, int], str] = {}
    with tarfile.open(out, mode, format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        entries = [src, *sorted(_walk(src), key=lambda p: [os.fsencode(x) for x in p.relative_to(src).parts])]
        for path in entries:
            arcname = "./" if path == src else "./" + str(path.relative_to(src))
            st = os.lstat(path)
            ti = tf.gettarinfo(str(path), arcname)
            assert ti is not None, path
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                if key in seen:
                    ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, seen[key], 0
                else:
                    seen[key] = arcname
            ti.uname = ti.gname = ""
            ti.pax_headers = {"mtime": pax_time(st.st_mtime_ns)}
            for name in os.listxattr(path, follow_symlinks=False):
                value = os.getxattr(path, name, follow_symlinks=False)
                ti.pax_headers["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
            if ti.isreg():
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)


# ----------------------------------------------------------------------------- snapshots


@dataclass
class Snapshot:
    """What a tree looks like to a reader: per path attributes, and hard-link groups."""

    entries: dict[bytes, dict] = field(default_factory=dict)
    links: set[frozenset[bytes]] = field(default_factory=set)


def _entry(st_mode: int, uid: int, gid: int, mtime_ns: int, nlink: int) -> dict:
    return {"mode": st_mode, "uid": uid, "gid": gid, "mtime_ns": mtime_ns, "nlink": nlink}


def snapshot(root: str | Path, *, content: bool = True) -> Snapshot:
    """Snapshot a real directory tree (source or mount point)."""
    root_b = os.fsencode(root)
    snap = Snapshot()
    groups: dict[int, set[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        rel_dir = os.path.relpath(dirpath, root_b)
        names = [b"."] if dirpath == root_b else []
        for name in names + dirnames + filenames:
            path = dirpath if name == b"." else os.path.join(dirpath, name)
            rel = b"/" if name == b"." else b"/" + os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            e = _entry(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink)
            e["xattrs"] = {
                os.fsencode(n): os.getxattr(path, n, follow_symlinks=False)
                for n in os.listxattr(path, follow_symlinks=False)
            }
            if not stat.S_ISDIR(st.st_mode):
                e["size"] = st.st_size
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, set()).add(rel)
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            if stat.S_ISREG(st.st_mode) and content:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(MIB):
                        h.update(block)
                e["sha256"] = h.hexdigest()
            snap.entries[rel] = e
    snap.links = {frozenset(g) for g in groups.values()}
    return snap


def without(snap: Snapshot, *keys: str) -> Snapshot:
    """A copy of `snap` without some attributes."""
    entries = {p: {k: v for k, v in e.items() if k not in keys} for p, e in snap.entries.items()}
    return Snapshot(entries, set(snap.links))


# ----------------------------------------------------------------------------- image decoder


@dataclass
class Image:
    """Everything the independent decoder read from a bootstrap (+ blob)."""

    sb: dict
    ext: dict
    device: dict
    blob: dict
    chunks: list[dict]
    tree: Snapshot
    #: path -> list of (ci index, device id, blkaddr) of a regular file
    indexes: dict[bytes, list[tuple[int, int, int]]]
    #: path -> i_format (bit 0 extended, bits 1-3 data layout)
    formats: dict[bytes, int]


_SB = struct.Struct("<IIIBBHQQIIII16s16sIHHH")
_SB_FIELDS = (
    *("magic", "checksum", "compat", "blkszbits", "extslots", "root_nid", "inos", "build_time"),
    *("build_time_nsec", "blocks", "meta_blkaddr", "xattr_blkaddr", "uuid", "volume_name", "incompat"),
    *("u1", "extra_devices", "devt_slotoff"),
)
_EXT = struct.Struct("<QQIIQQQII")
_BLOB = struct.Struct("<64sIIIIIIQQ")
_CHUNK = struct.Struct("<32sIIIIQQQII")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII")
_XATTR_PREFIX = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}


def _decompress(algo: int, data: bytes, size: int) -> bytes:
    if algo == 3:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if algo == 1:
        return lz4.block.decompress(data, uncompressed_size=size)
    raise AssertionError(f"unexpected compression algo {algo}")


class _Decoder:
    def __init__(self, boot: bytes, blob: bytes | None) -> None:
        self.boot, self.blob_bytes = boot, blob
        f = _SB.unpack_from(boot, 1024)
        self.sb = dict(zip(_SB_FIELDS, f, strict=True))
        assert self.sb["magic"] == 0xE0F5E1E2
        self.bs = 1 << self.sb["blkszbits"]
        e = _EXT.unpack_from(boot, 1152)
        names = "flags blob_table_offset blob_table_size chunk_size chunk_table_offset chunk_table_size"
        self.ext = dict(zip(names.split(), e[:6], strict=True))
        self.ext["prefetch_table_offset"], self.ext["prefetch_table_size"] = e[6], e[7]
        off = self.sb["devt_slotoff"] * 128
        tag, blocks, mapped = struct.unpack_from("<64sII", boot, off)
        self.device = {"tag": tag, "blocks": blocks, "mapped_blkaddr": mapped}
        b = _BLOB.unpack_from(boot, self.ext["blob_table_offset"])
        names = "blob_id blob_index chunk_size chunk_count compression_algo digest_algo features"
        self.blob = dict(zip([*names.split(), "compressed_size", "uncompressed_size"], b, strict=True))
        self.chunks = []
        for i in range(self.ext["chunk_table_size"] // 80):
            c = _CHUNK.unpack_from(boot, self.ext["chunk_table_offset"] + 80 * i)
            names = "digest blob_index flags compressed_size uncompressed_size compressed_offset "
            names += "uncompressed_offset file_offset index crc32"
            self.chunks.append(dict(zip(names.split(), c, strict=True)))
        self.tree = Snapshot()
        self.indexes: dict[bytes, list[tuple[int, int, int]]] = {}
        self.formats: dict[bytes, int] = {}
        self._chunk_data: dict[int, bytes] = {}

    def inode(self, nid: int) -> dict:
        bs = self.bs
        off = self.sb["meta_blkaddr"] * bs + nid * 32
        fmt = struct.unpack_from("<H", self.boot, off)[0]
        assert fmt >> 4 == 0, f"unknown i_format bits {fmt:#x}"
        if fmt & 1:
            _, icount, mode, _, size, i_u, _, uid, gid, mtime, nsec, nlink = _EXTENDED.unpack_from(
                self.boot, off
            )
            isize = 64
            mtime = mtime - (1 << 64) if mtime >= 1 << 63 else mtime
        else:
            _, icount, mode, nlink, size, _, i_u, _, uid, gid, _ = _COMPACT.unpack_from(self.boot, off)
            isize, mtime, nsec = 32, self.sb["build_time"], self.sb["build_time_nsec"]
        assert off // bs == (off + isize - 1) // bs, "inode straddles a block"
        xsize = 12 + 4 * (icount - 1) if icount else 0
        ino = {"off": off, "fmt": fmt, "layout": (fmt >> 1) & 7, "mode": mode, "size": size, "i_u": i_u}
        ino |= {"uid": uid, "gid": gid, "mtime_ns": mtime * 10**9 + nsec, "nlink": nlink, "isize": isize}
        ino["xsize"] = xsize
        ino["xattrs"] = self._xattrs(off + isize, xsize)
        return ino

    def _xattrs(self, pos: int, xsize: int) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        if not xsize:
            return out
        assert self.boot[pos + 4] == 0, "shared xattrs"
        p, end = pos + 12, pos + xsize
        while p < end:
            nlen, index, vlen = struct.unpack_from("<BBH", self.boot, p)
            name = _XATTR_PREFIX[index] + self.boot[p + 4 : p + 4 + nlen]
            out[name] = self.boot[p + 4 + nlen : p + 4 + nlen + vlen]
            p += (4 + nlen + vlen + 3) // 4 * 4
        assert p == end
        return out

    def body(self, ino: dict) -> bytes:
        bs, size, layout = self.bs, ino["size"], ino["layout"]
        if layout == 0:
            start = ino["i_u"] * bs
            return self.boot[start : start + size]
        assert layout == 2, f"layout {layout}"
        head = (size + bs - 1) // bs * bs - bs if size % bs else size
        assert size % bs, "FLAT_INLINE with a whole last block"
        tail_pos = ino["off"] + ino["isize"] + ino["xsize"]
        tail = size - head
        assert tail_pos // bs == (tail_pos + tail - 1) // bs, "inline tail crosses a block"
        return self.boot[ino["i_u"] * bs : ino["i_u"] * bs + head] + self.boot[tail_pos : tail_pos + tail]

    def dirents(self, ino: dict) -> list[tuple[bytes, int, int]]:
        body, bs, out = self.body(ino), self.bs, []
        for start in range(0, len(body), bs):
            block = body[start : start + bs]
            n = struct.unpack_from("<Q H", block, 0)[1] // 12
            heads = [struct.unpack_from("<QHBB", block, 12 * i) for i in range(n)]
            for i, (nid, nameoff, ftype, _) in enumerate(heads):
                end = heads[i + 1][1] if i + 1 < n else len(block)
                name = block[nameoff:end]
                if i + 1 == n:
                    name = name.split(b"\0", 1)[0]
                out.append((name, nid, ftype))
        names = [e[0] for e in out]
        assert names == sorted(names), "dirents not byte-sorted"
        return out

    def chunk_bytes(self, ci: int) -> bytes:
        if ci in self._chunk_data:
            return self._chunk_data[ci]
        c = self.chunks[ci]
        assert c["index"] == ci and c["blob_index"] == 0
        assert c["uncompressed_offset"] % BS == 0
        raw = self.blob_bytes[c["compressed_offset"] : c["compressed_offset"] + c["compressed_size"]]
        assert len(raw) == c["compressed_size"], "chunk beyond the blob"
        if c["flags"] & 1:
            data = _decompress(self.blob["compression_algo"], raw, c["uncompressed_size"])
        else:
            data = raw
        assert len(data) == c["uncompressed_size"]
        digest = (
            blake3.blake3(data).digest() if self.blob["digest_algo"] == 0 else hashlib.sha256(data).digest()
        )
        assert digest == c["digest"], f"chunk {ci}: digest mismatch"
        self._chunk_data[ci] = data
        return data

    def file(self, path: bytes, ino: dict) -> dict:
        chunk_size = self.ext["chunk_size"]
        assert ino["layout"] == 4
        assert ino["i_u"] & 0xFFFF == (chunk_size.bit_length() - 1 - 12) | 0x20
        n = (ino["size"] + chunk_size - 1) // chunk_size
        pos = (ino["off"] + ino["isize"] + ino["xsize"] + 7) // 8 * 8
        entries = [struct.unpack_from("<HBBI", self.boot, pos + 8 * i) for i in range(n)]
        self.indexes[path] = [(lo | hi << 16, dev, blk) for lo, dev, hi, blk in entries]
        if self.blob_bytes is None:
            return {}
        h = hashlib.sha256()
        for i, (ci, dev, blk) in enumerate(self.indexes[path]):
            assert dev == 1
            assert self.chunks[ci]["uncompressed_offset"] == blk * BS
            data = self.chunk_bytes(ci)
            assert len(data) == min(chunk_size, ino["size"] - i * chunk_size)
            h.update(data)
        return {"sha256": h.hexdigest()}

    def walk(self) -> None:
        groups: dict[int, set[bytes]] = {}
        root = self.sb["root_nid"]
        queue = [(b"/", root, root)]
        while queue:
            path, nid, parent = queue.pop()
            ino = self.inode(nid)
            self.formats[path] = ino["fmt"]
            e = _entry(ino["mode"], ino["uid"], ino["gid"], ino["mtime_ns"], ino["nlink"])
            e["xattrs"] = ino["xattrs"]
            mode = ino["mode"]
            if stat.S_ISDIR(mode):
                ents = self.dirents(ino)
                kinds = {name: (cnid, t) for name, cnid, t in ents}
                assert kinds[b"."][0] == nid and kinds[b".."][0] == parent
                for name, cnid, _ in ents:
                    if name not in (b".", b".."):
                        queue.append(((path if path != b"/" else b"") + b"/" + name, cnid, nid))
            else:
                e["size"] = ino["size"]
                if ino["nlink"] > 1:
                    groups.setdefault(nid, set()).add(path)
            if stat.S_ISLNK(mode):
                e["target"] = self.body(ino)
            elif stat.S_ISREG(mode):
                e |= self.file(path, ino)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                v = ino["i_u"]
                e["rdev"] = os.makedev((v & 0xFFF00) >> 8, (v & 0xFF) | ((v >> 12) & 0xFFF00))
            self.tree.entries[path] = e
        self.tree.links = {frozenset(g) for g in groups.values()}


def decode(bootstrap: str | Path, blob: str | Path | None = None) -> Image:
    """Decode a bootstrap, and with its blob verify and hash every file from the chunk table."""
    blob_bytes = Path(blob).read_bytes() if blob is not None else None
    d = _Decoder(Path(bootstrap).read_bytes(), blob_bytes)
    d.walk()
    return Image(d.sb, d.ext, d.device, d.blob, d.chunks, d.tree, d.indexes, d.formats)


def uncompressed_device(image: Image, blob: str | Path, out: Path) -> Path:
    """Decompress every chunk to its uncompressed offset: the device the kernel needs for reads."""
    data = Path(blob).read_bytes()
    with open(out, "wb") as f:
        f.truncate(image.blob["uncompressed_size"])
        for c in image.chunks:
            raw = data[c["compressed_offset"] : c["compressed_offset"] + c["compressed_size"]]
            if c["flags"] & 1:
                raw = _decompress(image.blob["compression_algo"], raw, c["uncompressed_size"])
            f.seek(c["uncompressed_offset"])
            f.write(raw)
    return out


# ----------------------------------------------------------------------------- kernel and erofs-utils

#: Why kernel-mount tests cannot run here, or None (shared with the reader's tests).
MOUNT_SKIP = why_no_kernel_mount()


@contextlib.contextmanager
def kernel_mount(bootstrap: str | Path, blob: str | Path, target: Path) -> Iterator[Path]:
    """Raw mount(2) of the bootstrap file with the blob as its extra device; always unmounted."""
    target.mkdir(parents=True, exist_ok=True)
    with trees.kernel_mount(bootstrap, target, [blob]) as mounted:
        yield mounted


def fsck_errors(bootstrap: str | Path, blob: str | Path) -> str:
    """The `<E>` lines fsck.erofs prints (its exit code is not reliable); skips without erofs-utils."""
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs (erofs-utils) is not installed")
    proc = subprocess.run(
        ["fsck.erofs", f"--device={blob}", str(bootstrap)], capture_output=True, text=True, check=False
    )
    return "\n".join(line for line in (proc.stderr + proc.stdout).splitlines() if "<E>" in line)
