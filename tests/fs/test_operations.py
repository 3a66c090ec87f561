"""VfsOperations called directly under trio: replies, error translation, in-flight tracking."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio

from nydus_actors.exceptions import InvalidArgument, NotFound
from nydus_actors.fs import operations as operations_module
from nydus_actors.fs.inflight import FuseOpcode, InflightTracker
from nydus_actors.fs.operations import VfsOperations, read_delay_from_env
from nydus_actors.fs.passthrough import PassthroughFs
from nydus_actors.fs.vfs import ROOT_ID, Vfs
from tests.fs.memfs import MemoryFs

MTIME_NS = 1_700_000_000_000_000_123


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "file").write_bytes(b"hello world")
    (root / "sub").mkdir()
    os.symlink("file", root / "link")
    os.utime(root / "file", ns=(MTIME_NS, MTIME_NS))
    return root


@pytest.fixture
def vfs(src: Path) -> Vfs:
    vfs = Vfs()
    vfs.attach("/", PassthroughFs(str(src)))
    return vfs


@pytest.fixture
def ops(vfs: Vfs) -> VfsOperations:
    return VfsOperations(vfs, InflightTracker())


def fuse_errno(coroutine_fn, *args) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(coroutine_fn, *args)
    return info.value.errno


def test_handlers_do_not_use_writeback_or_dot_lookups() -> None:
    assert VfsOperations.enable_writeback_cache is False
    assert VfsOperations.supports_dot_lookup is False


def test_lookup_and_getattr_reply_with_node_ids_and_timeouts(ops: VfsOperations, src: Path) -> None:
    entry = trio.run(ops.lookup, ROOT_ID, b"file")

    host = os.lstat(src / "file")
    assert entry.st_ino == host.st_ino
    assert entry.st_mode == host.st_mode
    assert entry.st_size == 11
    assert entry.st_nlink == host.st_nlink
    assert entry.st_mtime_ns == MTIME_NS
    assert entry.entry_timeout == 5
    assert entry.attr_timeout == 5
    root = trio.run(ops.getattr, ROOT_ID)
    assert root.st_ino == ROOT_ID
    assert stat.S_ISDIR(root.st_mode)


def test_os_errors_become_fuse_errors(ops: VfsOperations) -> None:
    file_ino = trio.run(ops.lookup, ROOT_ID, b"file").st_ino

    assert fuse_errno(ops.lookup, ROOT_ID, b"missing") == errno.ENOENT
    assert fuse_errno(ops.getattr, 424242) == errno.ENOENT
    assert fuse_errno(ops.readlink, file_ino) == errno.EINVAL
    assert fuse_errno(ops.opendir, file_ino) == errno.ENOTDIR
    assert fuse_errno(ops.open, file_ino, os.O_RDWR) == errno.EROFS
    assert fuse_errno(ops.getxattr, file_ino, b"user.none") == errno.ENODATA


def test_nydus_errors_carry_their_errno() -> None:
    class FailingFs(MemoryFs):
        def getattr(self, ino: int):
            if ino == 2:
                raise NotFound
            if ino == 3:
                raise InvalidArgument("x")
            return super().getattr(ino)

    vfs = Vfs()
    vfs.attach("/", FailingFs(root_ino=1234))
    ops = VfsOperations(vfs, InflightTracker())

    assert fuse_errno(ops.getattr, 2) == errno.ENOENT
    assert fuse_errno(ops.getattr, 3) == errno.EINVAL


def test_unexpected_errors_become_eio_and_one_error_line(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenFs(MemoryFs):
        def getattr(self, ino: int):
            raise KeyError(ino)

    vfs = Vfs()
    vfs.attach("/", BrokenFs())
    ops = VfsOperations(vfs, InflightTracker())

    with caplog.at_level(logging.ERROR, logger="nydus_actors.fs.operations"):
        assert fuse_errno(ops.getattr, ROOT_ID) == errno.EIO

    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "failed to handle FUSE getattr" in errors[0].getMessage()


def test_open_read_release_use_the_node_id_as_handle(ops: VfsOperations) -> None:
    node = trio.run(ops.lookup, ROOT_ID, b"file").st_ino

    info = trio.run(ops.open, node, os.O_RDONLY)

    assert info.fh == node
    assert trio.run(ops.read, info.fh, 6, 100) == b"world"
    trio.run(ops.release, info.fh)
    # A handle never opened by this process still reads (as after a takeover).
    assert trio.run(ops.read, node, 0, 5) == b"hello"


def test_readlink_statfs_and_xattrs(ops: VfsOperations, src: Path) -> None:
    link = trio.run(ops.lookup, ROOT_ID, b"link").st_ino

    assert trio.run(ops.readlink, link) == b"file"
    stats = trio.run(ops.statfs)
    assert stats.f_blocks == os.statvfs(src).f_blocks
    assert stats.f_namemax == os.statvfs(src).f_namemax
    assert trio.run(ops.listxattr, ROOT_ID) == [
        os.fsencode(name) for name in os.listxattr(src, follow_symlinks=False)
    ]


def test_readdir_counts_only_accepted_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = MemoryFs(root_ino=50, files={b"a": (60, b""), b"b": (61, b""), b"c": (62, b"")})
    vfs = Vfs()
    vfs.attach("/", fs)
    ops = VfsOperations(vfs, InflightTracker())
    replied: list[tuple[bytes, int, int]] = []

    def reply(token, name, attr, next_id) -> bool:
        if len(replied) == 4:
            return False  # the kernel buffer is full
        replied.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = trio.run(ops.opendir, ROOT_ID)
    trio.run(ops.readdir, fh, 0, None)

    assert [name for name, _, _ in replied] == [b".", b"..", b"a", b"b"]
    assert replied[0][1] == ROOT_ID
    assert fs.lookups == {60: 1, 61: 1}

    replied.clear()
    trio.run(ops.readdir, fh, 4, None)

    assert [name for name, _, _ in replied] == [b"c"]
    assert fs.lookups == {60: 1, 61: 1, 62: 1}
    trio.run(ops.releasedir, fh)


def test_forget_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    class ForgetfulFs(MemoryFs):
        def forget(self, ino: int, nlookup: int) -> None:
            raise RuntimeError("boom")

    vfs = Vfs()
    vfs.attach("/", ForgetfulFs(root_ino=3))
    ops = VfsOperations(vfs, InflightTracker())

    with caplog.at_level(logging.ERROR):
        trio.run(ops.forget, [(7, 1), ((9 << 56) | 1, 2), (ROOT_ID, 1)])

    assert "failed to forget node 0x7" in caplog.text


def test_in_flight_requests_are_tracked_while_a_read_is_delayed(vfs: Vfs) -> None:
    tracker = InflightTracker()
    slow = VfsOperations(vfs, tracker, read_delay=0.2)
    node = trio.run(slow.lookup, ROOT_ID, b"file").st_ino
    seen = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow.read, node, 0, 5)
            await trio.sleep(0.05)
            seen.extend(tracker.snapshot())

    trio.run(scenario)

    assert len(seen) == 1
    assert (seen[0].inode, seen[0].opcode) == (node, FuseOpcode.READ)
    assert seen[0].unique > 0
    assert seen[0].timestamp_secs > 0
    assert tracker.snapshot() == ()


def test_read_delay_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NYDUS_ACTORS_TEST_READ_DELAY", raising=False)
    assert read_delay_from_env() == 0.0
    monkeypatch.setenv("NYDUS_ACTORS_TEST_READ_DELAY", "0.25")
    assert read_delay_from_env() == 0.25
    monkeypatch.setenv("NYDUS_ACTORS_TEST_READ_DELAY", "soon")
    assert read_delay_from_env() == 0.0


def test_init_calls_the_hook_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    calls = []
    VfsOperations(Vfs(), InflightTracker(), on_init=lambda: calls.append(1)).init()

    def broken() -> None:
        raise OSError(errno.EBADF, "bad fd")

    with caplog.at_level(logging.ERROR):
        VfsOperations(Vfs(), InflightTracker(), on_init=broken).init()

    assert calls == [1]
    assert "failed to initialize the FUSE session" in caplog.text


def test_entry_attributes_conversion_keeps_nanoseconds() -> None:
    fs = MemoryFs(root_ino=2)
    vfs = Vfs()
    vfs.attach("/", fs)

    entry = operations_module.entry_attributes(vfs.getattr(ROOT_ID))

    assert (entry.st_atime_ns, entry.st_mtime_ns, entry.st_ctime_ns) == (1, 2, 3)
    assert entry.st_blksize == 4096
