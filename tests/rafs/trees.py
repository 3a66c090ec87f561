"""Source trees for image tests, plus mkfs.erofs and a file-backed kernel EROFS mount.

`build_tree(root, kind)` fills `root` with one of KINDS; `mkfs_erofs` builds an image;
`kernel_mount` mounts it read-only with raw mount(2) (format doc §11.5).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from nydus_actors.rafs import RafsImage, decompress

KINDS = ("mixed", "wide", "deep")
#: Entries of the "wide" tree.
WIDE_ENTRIES = 10_000
#: Depth of the "deep" tree.
DEEP_LEVELS = 64

_MS_RDONLY = 1
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mkfs_available() -> bool:
    """Whether mkfs.erofs is installed."""
    return shutil.which("mkfs.erofs") is not None


@functools.cache
def why_no_kernel_mount() -> str | None:
    """Return why EROFS kernel mounts cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "mounting erofs needs root"
    try:
        with open("/proc/filesystems") as filesystems:
            if not any(line.split()[-1] == "erofs" for line in filesystems if line.strip()):
                return "the kernel has no erofs support"
    except OSError:
        return "/proc/filesystems is unreadable"
    if not mkfs_available():
        return "mkfs.erofs is not installed"
    return _probe_file_backed_mount()


def _probe_file_backed_mount() -> str | None:
    # File-backed EROFS mounts (no loop device) only exist in recent kernels (about 6.12 on).
    with tempfile.TemporaryDirectory(prefix="erofs-probe-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (Path(tmp) / "mnt").mkdir()
        image = mkfs_erofs(src, Path(tmp) / "probe.erofs")
        try:
            with kernel_mount(image, Path(tmp) / "mnt"):
                return None
        except OSError as ex:
            return f"the kernel cannot mount erofs from a regular file: {ex.strerror}"


def mkfs_erofs(src: Path, out: Path, *args: str) -> Path:
    """Run `mkfs.erofs --quiet ARGS OUT SRC` and return `out`."""
    proc = subprocess.run(
        ["mkfs.erofs", "--quiet", *args, str(out), str(src)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mkfs.erofs {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return out


@contextlib.contextmanager
def kernel_mount(image: Path | str, target: Path | str, devices: Sequence[Path | str] = ()) -> Iterator[Path]:
    """Mount `image` read-only as EROFS at `target` (file-backed, no loop device); unmount on exit.

    Extra devices are passed as `device=<absolute path>` in device-table order.
    """
    data = ",".join("device=" + os.path.abspath(dev) for dev in devices).encode() or None
    target = Path(target)
    if _libc.mount(os.fsencode(str(image)), os.fsencode(str(target)), b"erofs", _MS_RDONLY, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount erofs {image} at {target}: {os.strerror(err)}")
    try:
        yield target
    finally:
        if _libc.umount2(os.fsencode(str(target)), 0) != 0:
            _libc.umount2(os.fsencode(str(target)), _MNT_DETACH)


def uncompressed_blob(image: RafsImage, blob_dir: Path, out: Path) -> Path:
    """Write blob 0 of a RAFS image with every chunk at its uncompressed offset.

    That is the device the kernel can read a Nydus bootstrap through (format doc §10.6).
    """
    blob = image.blobs[0]
    data = bytearray(blob.uncompressed_size)
    raw = (blob_dir / blob.blob_id).read_bytes()
    for chunk in image.chunks():
        if chunk.blob_index:
            continue
        body = raw[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]
        plain = decompress(body, blob.compressor, chunk.uncompressed_size) if chunk.compressed else body
        data[chunk.uncompressed_offset : chunk.uncompressed_offset + len(plain)] = plain
    out.write_bytes(bytes(data))
    return out


def build_tree(root: Path, kind: str, *, big_ids: bool = True) -> Path:
    """Populate the empty directory `root` with the tree `kind` (one of KINDS) and return it.

    `big_ids=False` leaves out the owner above 65535 in "mixed", which
    `-Eforce-inode-compact` cannot store.
    """
    root.mkdir(parents=True, exist_ok=True)
    if kind == "mixed":
        _mixed(root, big_ids=big_ids)
    else:
        {"wide": _wide, "deep": _deep}[kind](root)
    return root


def _write(path: Path, data: bytes, *, mode: int = 0o644, mtime_ns: int | None = None) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _mixed(root: Path, *, big_ids: bool) -> None:
    rng = random.Random(20240601)
    base_ns = 1_700_000_000 * 10**9
    _write(root / "empty", b"")
    _write(root / "six", b"hello\n", mode=0o4755, mtime_ns=base_ns + 123_456_789)
    _write(root / "page", bytes(rng.getrandbits(8) for _ in range(4096)), mtime_ns=base_ns + 1)
    owned = _write(root / "owned", b"x" * 5000, mtime_ns=base_ns + 999_999_999)
    os.chown(owned, 1234, 5678)
    if big_ids:
        big_owner = _write(root / "big-ids", b"ids\n", mode=0o600, mtime_ns=base_ns + 42)
        os.chown(big_owner, 100_000, 200_000)
    _write(root / "zeros-1m", bytes(1 << 20))
    _write(root / "text-2m", (b"the quick brown fox jumps over the lazy dog\n" * 50_000)[: 2 << 20])
    large = rng.randbytes(6_000_000)
    _write(root / "large", large, mtime_ns=base_ns + 500)
    (root / "dup").mkdir()
    _write(root / "dup" / "large-copy", large)
    with open(root / "sparse", "wb") as sparse:
        sparse.seek(1 << 20)
        sparse.write(b"island")
        sparse.truncate(5 << 20)
        sparse.seek((5 << 20) - 3)
        sparse.write(b"end")
    os.utime(root / "sparse", ns=(base_ns + 7, base_ns + 7))
    _write(root / "linked", b"shared body\n")
    os.link(root / "linked", root / "hardlink")
    os.symlink("six", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("t" * 3000, root / "long-link")
    os.lchown(root / "rel-link", 4321, 8765)
    os.mknod(root / "fifo", 0o644 | stat.S_IFIFO)
    os.mknod(root / "socket", 0o755 | stat.S_IFSOCK)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(root / "big-dev", 0o600 | stat.S_IFCHR, os.makedev(300, 70_000))
    for name in ("!bang", "+plus", "-dash", "Zed", "a", "ab", "abc", "~tilde", "with space", "ünïcødé"):
        _write(root / name, name.encode())
    _write(root / ("n" * 254), b"longest name mkfs.erofs 1.5 accepts\n")
    many = root / "many"
    many.mkdir()
    for k in range(300):
        _write(many / f"entry-{k:03d}", b"")
    (root / "empty-dir").mkdir()
    (root / "a-dir" / "b" / "c").mkdir(parents=True)
    _write(root / "a-dir" / "b" / "c" / "leaf", b"leaf\n")
    os.setxattr(root / "six", b"user.foo", b"bar")
    os.setxattr(root / "page", b"user.big", bytes(range(200)))
    os.setxattr(root / "page", b"security.label", b"sec")
    os.setxattr(root / "empty-dir", b"trusted.overlay.opaque", b"y")
    os.setxattr(root / "dangling", b"trusted.link", b"on a symlink", follow_symlinks=False)
    for name in ("a", "ab", "abc", "Zed", "~tilde"):
        os.setxattr(root / name, b"user.shared", b"same value on five files")
    os.utime(root / "a-dir", ns=(base_ns + 11, base_ns + 11))


def _wide(root: Path) -> None:
    for k in range(WIDE_ENTRIES):
        (root / f"file-{k:05d}").touch()
    (root / "sub").mkdir()
    _write(root / "sub" / "inner", b"inner\n")


def _deep(root: Path) -> None:
    here = root
    for level in range(DEEP_LEVELS):
        here = here / f"level-{level:02d}"
        here.mkdir()
        _write(here / "marker", f"{level}\n".encode())
    os.symlink("../" * DEEP_LEVELS + "top", here / "up")
    _write(root / "top", b"top\n")
