"""PassthroughFs against a real host tree: attributes, listings, reads, errno values."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from nydus_actors.fs.base import InodeAttr, StatFs
from nydus_actors.fs.passthrough import PassthroughFs
from nydus_actors.models import FsType

MTIME_NS = 1_600_000_000_123_456_789


def xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"0123456789")
    (src / "empty").touch()
    (src / "dir").mkdir()
    (src / "dir" / "nested").write_bytes(b"nested data")
    os.symlink("file", src / "link")
    os.symlink("/etc/passwd", src / "outside")
    os.mkfifo(src / "fifo")
    os.link(src / "file", src / "hardlink")
    os.utime(src / "file", ns=(MTIME_NS, MTIME_NS))
    if os.geteuid() == 0:
        os.mknod(src / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    if xattrs_supported(src):
        os.setxattr(src / "file", "user.colour", b"blue")
    return src


def assert_matches(attr: InodeAttr, path: Path) -> None:
    st = os.lstat(path)
    assert attr.ino == st.st_ino
    assert attr.mode == st.st_mode
    assert attr.nlink == st.st_nlink
    assert (attr.uid, attr.gid) == (st.st_uid, st.st_gid)
    assert attr.rdev == st.st_rdev
    assert attr.size == st.st_size
    assert attr.blocks == st.st_blocks
    assert attr.mtime_ns == st.st_mtime_ns
    assert attr.ctime_ns == st.st_ctime_ns


def errno_of(call) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def test_lookup_reports_host_attributes_of_every_file_type(tree: Path) -> None:
    fs = PassthroughFs(str(tree))

    assert fs.fs_type is FsType.PASSTHROUGH
    assert fs.root_ino == os.lstat(tree).st_ino
    assert_matches(fs.getattr(fs.root_ino), tree)
    for name in sorted(os.listdir(tree)):
        attr = fs.lookup(fs.root_ino, os.fsencode(name))
        assert_matches(attr, tree / name)
        assert_matches(fs.getattr(attr.ino), tree / name)

    assert fs.getattr(os.lstat(tree / "file").st_ino).mtime_ns == MTIME_NS
    assert stat.S_ISFIFO(fs.lookup(fs.root_ino, b"fifo").mode)
    assert stat.S_ISLNK(fs.lookup(fs.root_ino, b"link").mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_char_device_keeps_its_rdev(tree: Path) -> None:
    fs = PassthroughFs(str(tree))

    attr = fs.lookup(fs.root_ino, b"null")

    assert stat.S_ISCHR(attr.mode)
    assert attr.rdev == os.makedev(1, 3)


def test_hard_links_share_one_inode(tree: Path) -> None:
    fs = PassthroughFs(str(tree))

    first = fs.lookup(fs.root_ino, b"file")
    second = fs.lookup(fs.root_ino, b"hardlink")

    assert first.ino == second.ino
    assert first.nlink == 2
    assert fs.read(first.ino, 0, 4) == b"0123"


def test_nested_lookup_dot_and_dotdot(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    sub = fs.lookup(fs.root_ino, b"dir")

    nested = fs.lookup(sub.ino, b"nested")

    assert_matches(nested, tree / "dir" / "nested")
    assert fs.lookup(sub.ino, b".").ino == sub.ino
    assert fs.lookup(sub.ino, b"..").ino == fs.root_ino
    assert fs.lookup(fs.root_ino, b"..").ino == fs.root_ino  # never above the source


def test_symlinks_are_never_followed(tree: Path) -> None:
    fs = PassthroughFs(str(tree))

    outside = fs.lookup(fs.root_ino, b"outside")

    assert stat.S_ISLNK(outside.mode)
    assert fs.readlink(outside.ino) == b"/etc/passwd"
    assert errno_of(lambda: fs.open(outside.ino, os.O_RDONLY)) in (errno.ELOOP, errno.EINVAL)
    assert errno_of(lambda: fs.lookup(outside.ino, b"x")) == errno.ENOTDIR


def test_errno_values(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    file_ino = fs.lookup(fs.root_ino, b"file").ino

    assert errno_of(lambda: fs.lookup(fs.root_ino, b"missing")) == errno.ENOENT
    assert errno_of(lambda: fs.lookup(fs.root_ino, b"dir/nested")) == errno.ENOENT
    assert errno_of(lambda: fs.lookup(fs.root_ino, b"")) == errno.ENOENT
    assert errno_of(lambda: fs.lookup(file_ino, b"x")) == errno.ENOTDIR
    assert errno_of(lambda: fs.opendir(file_ino)) == errno.ENOTDIR
    assert errno_of(lambda: list(fs.readdir(file_ino, 0))) == errno.ENOTDIR
    assert errno_of(lambda: fs.readlink(file_ino)) == errno.EINVAL
    assert errno_of(lambda: fs.getxattr(file_ino, b"user.nothing")) == errno.ENODATA
    assert errno_of(lambda: fs.open(file_ino, os.O_WRONLY)) == errno.EROFS
    assert errno_of(lambda: fs.open(file_ino, os.O_RDWR)) == errno.EROFS
    assert errno_of(lambda: fs.getattr(123456789)) == errno.ENOENT
    assert errno_of(lambda: fs.read(123456789, 0, 1)) == errno.ENOENT


def test_readdir_lists_dot_entries_and_resumes_at_any_offset(tree: Path) -> None:
    fs = PassthroughFs(str(tree))

    full = list(fs.readdir(fs.root_ino, 0))

    assert [entry.name for entry in full[:2]] == [b".", b".."]
    assert sorted(entry.name for entry in full[2:]) == sorted(os.fsencode(n) for n in os.listdir(tree))
    offsets = [entry.next_offset for entry in full]
    assert offsets == sorted(set(offsets))
    for entry in full[2:]:
        assert_matches(entry.attr, tree / os.fsdecode(entry.name))
    for index, entry in enumerate(full):
        rest = list(fs.readdir(fs.root_ino, entry.next_offset))
        assert [later.name for later in rest] == [later.name for later in full[index + 1 :]]


def test_readdir_offsets_survive_changes_on_the_host(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    full = list(fs.readdir(fs.root_ino, 0))
    middle = full[4]

    (tree / "added-later").touch()
    names = [entry.name for entry in fs.readdir(fs.root_ino, 0)]
    resumed = [entry.name for entry in fs.readdir(fs.root_ino, middle.next_offset)]

    assert b"added-later" in names
    expected = [entry.name for entry in full[5:]]
    assert [name for name in resumed if name != b"added-later"] == expected


def test_readdir_does_not_count_lookups(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    sub = fs.lookup(fs.root_ino, b"dir")
    entries = {entry.name: entry for entry in fs.readdir(sub.ino, 0)}
    nested = entries[b"nested"].attr.ino

    # Known from the listing (READDIRPLUS hands the node to the kernel) ...
    assert fs.read(nested, 0, 6) == b"nested"
    fs.count_lookup(nested)
    fs.forget(nested, 1)
    # ... and dropped once the one counted reference is forgotten.
    assert nested not in {node[0] for node in fs.save_state()["nodes"]}


def test_inodes_never_looked_up_are_found_again(tree: Path) -> None:
    """After a failover the kernel names inodes the dead daemon looked up after its last state save."""
    fs = PassthroughFs(str(tree))
    nested = os.lstat(tree / "dir" / "nested").st_ino
    assert fs.read(nested, 0, 6) == b"nested"
    assert_matches(fs.getattr(nested), tree / "dir" / "nested")
    missing = max(os.lstat(p).st_ino for p in tree.rglob("*")) + 10_000
    assert errno_of(lambda: fs.getattr(missing)) == errno.ENOENT


def test_forget_of_unknown_inodes_and_root_is_harmless(tree: Path) -> None:
    fs = PassthroughFs(str(tree))

    fs.forget(987654321, 3)
    fs.forget(fs.root_ino, 100)
    fs.release(987654321)

    assert_matches(fs.getattr(fs.root_ino), tree)


def test_reads_are_stateless_and_fds_are_closed(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    ino = fs.lookup(fs.root_ino, b"file").ino
    fds_before = len(os.listdir("/proc/self/fd"))

    # A read on a handle this process never opened (as after a takeover).
    assert fs.read(ino, 2, 3) == b"234"
    assert fs.read(ino, 8, 100) == b"89"
    assert fs.read(ino, 100, 10) == b""
    fs.release(ino)
    assert len(os.listdir("/proc/self/fd")) == fds_before

    fs.open(ino, os.O_RDONLY)
    fs.open(ino, os.O_RDONLY)
    fs.release(ino)
    assert fs.read(ino, 0, 2) == b"01"
    fs.release(ino)
    assert len(os.listdir("/proc/self/fd")) == fds_before

    fs.open(ino, os.O_RDONLY)
    fs.forget(ino, 1)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_file_replaced_on_the_host_is_not_served(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    ino = fs.lookup(fs.root_ino, b"empty").ino

    # Moving the old file away keeps its inode number from being reused.
    (tree / "empty").rename(tree / "dir" / "moved")
    (tree / "empty").write_bytes(b"new inode")

    assert errno_of(lambda: fs.getattr(ino)) == errno.ENOENT
    assert errno_of(lambda: fs.read(ino, 0, 4)) == errno.ENOENT
    assert fs.lookup(fs.root_ino, b"empty").size == len(b"new inode")


def test_xattrs(tree: Path) -> None:
    if not xattrs_supported(tree):
        pytest.skip("the temp filesystem has no user xattrs")
    fs = PassthroughFs(str(tree))
    ino = fs.lookup(fs.root_ino, b"file").ino
    empty = fs.lookup(fs.root_ino, b"empty").ino

    assert b"user.colour" in fs.listxattr(ino)
    assert fs.getxattr(ino, b"user.colour") == b"blue"
    assert fs.listxattr(empty) == []


def test_statfs_is_the_host_directorys(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    host = os.statvfs(tree)

    stats = fs.statfs()

    assert isinstance(stats, StatFs)
    assert (stats.bsize, stats.blocks, stats.files, stats.namemax) == (
        host.f_bsize,
        host.f_blocks,
        host.f_files,
        host.f_namemax,
    )


def test_source_must_be_a_directory(tree: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PassthroughFs(str(tree / "missing"))
    with pytest.raises(NotADirectoryError):
        PassthroughFs(str(tree / "file"))


def test_close_releases_cached_fds(tree: Path) -> None:
    fs = PassthroughFs(str(tree))
    ino = fs.lookup(fs.root_ino, b"file").ino
    fds_before = len(os.listdir("/proc/self/fd"))
    fs.open(ino, os.O_RDONLY)

    fs.close()

    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_entries_on_another_device_get_distinct_inode_numbers(tree: Path) -> None:
    submount = tree / "dir" / "tmpfs"
    submount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "nydus-test", str(submount)], check=True)
    try:
        (submount / "there").write_bytes(b"on tmpfs")
        fs = PassthroughFs(str(tree))
        sub = fs.lookup(fs.lookup(fs.root_ino, b"dir").ino, b"tmpfs")
        there = fs.lookup(sub.ino, b"there")

        host = os.lstat(submount / "there")
        assert there.ino == ((host.st_dev + 1) << 64) | host.st_ino
        assert fs.read(there.ino, 0, 100) == b"on tmpfs"
        assert [entry.name for entry in fs.readdir(sub.ino, 0)] == [b".", b"..", b"there"]
        fs.close()
    finally:
        subprocess.run(["umount", "-l", str(submount)], check=True)
