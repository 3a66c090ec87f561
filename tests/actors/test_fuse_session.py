"""FuseSessionActor on a real FUSE mount: serving, attach/detach, in-flight, stop, external umount.

pyfuse3 has one global session per process, so every test here closes its
session completely. Every access to the mount goes through `within()`, so a
session that stops answering fails the test instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nydus_actors.actors.fuse_session import FuseSessionProxy, start_fuse_session
from nydus_actors.exceptions import OtherError
from nydus_actors.fs import kernel
from nydus_actors.fs.inflight import FuseOpcode
from nydus_actors.fs.passthrough import PassthroughFs
from tests.fs.mounting import MOUNT_MARKS, remove_mount

pytestmark = MOUNT_MARKS

TIMEOUT = 30.0
MTIME_NS = 1_650_000_000_111_222_333


def within(fn, *args, timeout: float = TIMEOUT):
    """Run `fn(*args)` in a thread; fail instead of hanging if the mount stops answering."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as ex:
            outcome["error"] = ex

    worker = threading.Thread(target=target, name="mount-access", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def loop_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name == "fuse-loop"]


def wait_until(predicate, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "dir" / "deeper").mkdir(parents=True)
    (src / "file").write_bytes(b"the quick brown fox\n")
    (src / "empty").touch()
    (src / "big").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (src / "dir" / "nested").write_bytes(b"nested\n")
    (src / "dir" / "deeper" / "leaf").write_bytes(b"leaf\n")
    os.symlink("file", src / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.mkfifo(src / "fifo")
    os.link(src / "file", src / "hardlink")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (src / "private").write_bytes(b"secret")
    os.chmod(src / "private", 0o600)
    os.chown(src / "private", 1234, 5678)
    os.utime(src / "file", ns=(MTIME_NS, MTIME_NS))
    os.utime(src / "dir", ns=(MTIME_NS + 1, MTIME_NS + 1))
    # Without user xattrs on the temp filesystem, the xattr checks adapt.
    with contextlib.suppress(OSError):
        os.setxattr(src / "file", "user.colour", b"blue")
    return src


@pytest.fixture
def mountpoint(tmp_path: Path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    remove_mount(str(path))


@pytest.fixture
def session(mountpoint: str):
    ended = threading.Event()
    proxy = start_fuse_session(mountpoint, threads=4, on_session_ended=ended.set)
    try:
        yield proxy, ended
    finally:
        if proxy.actor_ref.is_alive():
            try:
                proxy.unmount().get(timeout=TIMEOUT)
            finally:
                proxy.actor_ref.stop(timeout=TIMEOUT)


def serve(proxy: FuseSessionProxy, tree: Path) -> None:
    proxy.mount().get(timeout=TIMEOUT)
    assert proxy.attach("/", PassthroughFs(str(tree))).get(timeout=TIMEOUT) == 0
    proxy.start_serving().get(timeout=TIMEOUT)


def compare_trees(src: Path, mnt: Path) -> int:
    """Compare every entry below `src` with `mnt`; return how many were compared."""
    checked = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        assert sorted(os.listdir(mnt / rel)) == sorted(dirnames + filenames)
        for name in [*dirnames, *filenames]:
            host, served = src / rel / name, mnt / rel / name
            want, got = os.lstat(host), os.lstat(served)
            for field in ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_ino", "st_mtime_ns"):
                assert getattr(got, field) == getattr(want, field), (served, field)
            if stat.S_ISREG(want.st_mode):
                assert served.read_bytes() == host.read_bytes(), served
            elif stat.S_ISLNK(want.st_mode):
                assert os.readlink(served) == os.readlink(host)
            elif stat.S_ISCHR(want.st_mode):
                assert got.st_rdev == want.st_rdev
            checked += 1
    return checked


def test_serves_a_host_tree_and_attaches_while_serving(
    session, tree: Path, mountpoint: str, tmp_path: Path
) -> None:
    proxy, ended = session
    mnt = Path(mountpoint)
    serve(proxy, tree)

    assert proxy.serving().get(timeout=TIMEOUT)
    assert proxy.initialized().get(timeout=TIMEOUT)
    assert within(compare_trees, tree, mnt) == 13
    root = within(os.stat, mnt)
    assert stat.S_ISDIR(root.st_mode)
    assert root.st_mtime_ns == os.stat(tree).st_mtime_ns
    assert within(os.stat, mnt / "hardlink").st_ino == within(os.stat, mnt / "file").st_ino
    assert within(os.statvfs, mnt).f_blocks == os.statvfs(tree).f_blocks
    if "user.colour" in os.listxattr(tree / "file"):
        assert within(os.getxattr, mnt / "file", "user.colour") == b"blue"
        assert "user.colour" in within(os.listxattr, mnt / "file")
    with pytest.raises(OSError) as info:
        within(os.getxattr, mnt / "empty", "user.none")
    assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError) as info:
        within(os.open, mnt / "file", os.O_WRONLY)
    assert info.value.errno == errno.EROFS

    other = tmp_path / "other"
    other.mkdir()
    (other / "inside").write_bytes(b"from the second tree")
    assert proxy.attach("/b", PassthroughFs(str(other))).get(timeout=TIMEOUT) == 1
    assert proxy.slots().get(timeout=TIMEOUT) == (("/", 0), ("/b", 1))
    assert "b" in within(os.listdir, mnt)
    assert within((mnt / "b" / "inside").read_bytes) == b"from the second tree"
    assert within(os.stat, mnt / "b" / "inside").st_ino == (1 << 56) | os.stat(other / "inside").st_ino

    proxy.detach("/b").get(timeout=TIMEOUT)

    assert "b" not in within(os.listdir, mnt)
    assert not within(os.path.exists, mnt / "b")
    assert proxy.inflight().get(timeout=TIMEOUT) == ()

    proxy.stop_serving().get(timeout=TIMEOUT)

    assert not proxy.serving().get(timeout=TIMEOUT)
    assert kernel.is_mounted(mountpoint)
    assert loop_threads() == []

    proxy.unmount().get(timeout=TIMEOUT)

    assert not kernel.is_mounted(mountpoint)
    assert not ended.is_set()


def test_serving_again_adopts_the_connection_and_keeps_open_files(
    session, tree: Path, mountpoint: str
) -> None:
    # The same adoption path a takeover uses: the kernel no longer waits for INIT.
    proxy, _ = session
    mnt = Path(mountpoint)
    serve(proxy, tree)
    fd = within(os.open, mnt / "file", os.O_RDONLY)
    dir_fd = within(os.open, mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert within(os.pread, fd, 9, 4) == b"quick bro"
        proxy.stop_serving().get(timeout=TIMEOUT)
        queued = threading.Thread(target=os.listdir, args=(mnt,), daemon=True)
        queued.start()
        queued.join(0.3)
        assert queued.is_alive()  # the request waits in the kernel while nobody serves

        proxy.start_serving().get(timeout=TIMEOUT)

        queued.join(TIMEOUT)
        assert not queued.is_alive()
        assert within(os.pread, fd, 5, 16) == b"fox\n"
        assert sorted(within(os.listdir, dir_fd)) == ["deeper", "nested"]
    finally:
        within(os.close, fd)
        within(os.close, dir_fd)


def test_inflight_shows_a_delayed_read(
    session, tree: Path, mountpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYDUS_ACTORS_TEST_READ_DELAY", "1.0")
    proxy, _ = session
    serve(proxy, tree)
    inode = within(os.stat, Path(mountpoint) / "file").st_ino
    reader = threading.Thread(target=(Path(mountpoint) / "file").read_bytes, daemon=True)
    reader.start()
    try:
        reads = []

        def read_in_flight() -> bool:
            reads.extend(
                request
                for request in proxy.inflight().get(timeout=TIMEOUT)
                if request.opcode == FuseOpcode.READ
            )
            return bool(reads)

        assert wait_until(read_in_flight, timeout=5)
        assert reads[0].inode == inode
        assert abs(reads[0].timestamp_secs - time.time()) < 5
    finally:
        reader.join(TIMEOUT)
    assert not reader.is_alive()
    assert wait_until(lambda: proxy.inflight().get(timeout=TIMEOUT) == (), timeout=5)


def test_stop_serving_lets_a_read_in_flight_finish(
    session, tree: Path, mountpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYDUS_ACTORS_TEST_READ_DELAY", "1.0")
    proxy, _ = session
    serve(proxy, tree)
    fd = within(os.open, Path(mountpoint) / "file", os.O_RDONLY)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.pread(fd, 100, 0)), daemon=True)
    try:
        reader.start()
        assert wait_until(lambda: proxy.inflight().get(timeout=TIMEOUT) != (), timeout=5)

        proxy.stop_serving().get(timeout=TIMEOUT)

        # terminate() waited for the handler: the read was answered, not failed.
        reader.join(TIMEOUT)
        assert got == [b"the quick brown fox\n"]
        assert proxy.inflight().get(timeout=TIMEOUT) == ()
        # close() sends FLUSH and waits for its answer, so serve again first.
        proxy.start_serving().get(timeout=TIMEOUT)
    finally:
        within(os.close, fd)


def test_external_lazy_umount_ends_the_session(session, tree: Path, mountpoint: str) -> None:
    proxy, ended = session
    serve(proxy, tree)
    assert within(os.listdir, mountpoint)

    if shutil.which("umount"):
        subprocess.run(["umount", "-l", mountpoint], check=True, timeout=TIMEOUT)
    else:
        kernel.unmount(mountpoint)

    assert ended.wait(TIMEOUT)
    assert wait_until(lambda: loop_threads() == [])
    assert not proxy.serving().get(timeout=TIMEOUT)
    proxy.unmount().get(timeout=TIMEOUT)  # nothing left to unmount: tolerated
    assert not kernel.is_mounted(mountpoint)


def test_stopping_the_actor_never_unmounts(session, tree: Path, mountpoint: str) -> None:
    proxy, ended = session
    serve(proxy, tree)
    assert within(os.listdir, mountpoint)

    proxy.actor_ref.stop(timeout=TIMEOUT)

    assert loop_threads() == []
    assert kernel.is_mounted(mountpoint)
    assert not ended.is_set()
    # Every /dev/fuse fd is closed, so the kernel aborted the connection.
    with pytest.raises(OSError) as info:
        within(os.listdir, mountpoint)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def test_one_session_per_process(session, tree: Path, tmp_path: Path) -> None:
    proxy, _ = session
    serve(proxy, tree)
    second_mountpoint = tmp_path / "second"
    second_mountpoint.mkdir()
    second = start_fuse_session(str(second_mountpoint))
    try:
        second.mount().get(timeout=TIMEOUT)
        with pytest.raises(OtherError, match="another FUSE session is active"):
            second.start_serving().get(timeout=TIMEOUT)
        assert not second.serving().get(timeout=TIMEOUT)
    finally:
        second.unmount().get(timeout=TIMEOUT)
        second.actor_ref.stop(timeout=TIMEOUT)
        remove_mount(str(second_mountpoint))
    assert proxy.serving().get(timeout=TIMEOUT)


def test_requests_in_the_wrong_order_are_refused(session, tree: Path) -> None:
    proxy, _ = session

    with pytest.raises(OtherError, match="not mounted"):
        proxy.start_serving().get(timeout=TIMEOUT)
    proxy.stop_serving().get(timeout=TIMEOUT)  # nothing to stop: fine
    proxy.unmount().get(timeout=TIMEOUT)  # nothing mounted: fine
    proxy.mount().get(timeout=TIMEOUT)
    with pytest.raises(OtherError, match="already mounted"):
        proxy.mount().get(timeout=TIMEOUT)
    assert not proxy.initialized().get(timeout=TIMEOUT)
    assert proxy.ping().get(timeout=TIMEOUT)
