"""Thin pyfuse3 request handlers delegating to the pseudo-root VFS.

Errors become `FUSEError` in `_translate_error()` only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyfuse3
import trio

from nydus_actors.exceptions import NydusError
from nydus_actors.fs.inflight import FuseOpcode, InflightTracker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from nydus_actors.fs.base import InodeAttr, StatFs
    from nydus_actors.fs.vfs import Vfs

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _translate_error(request: str) -> Iterator[None]:
    """Turn the errors of one handler into the `FUSEError` pyfuse3 replies with.

    Anything else escaping a handler would end pyfuse3's main loop, so an
    unexpected exception becomes EIO and one error log line.
    """
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except NydusError as ex:
        raise pyfuse3.FUSEError(ex.errno) from None
    except OSError as ex:
        raise pyfuse3.FUSEError(ex.errno or errno.EIO) from None
    except Exception as ex:
        logger.error("failed to handle FUSE %s: %r", request, ex)
        logger.debug("traceback of the failed FUSE %s", request, exc_info=True)
        raise pyfuse3.FUSEError(errno.EIO) from None


def entry_attributes(attr: InodeAttr) -> pyfuse3.EntryAttributes:
    """Convert VFS attributes (whose `ino` is a node id) for pyfuse3."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0
    entry.entry_timeout = attr.entry_timeout
    entry.attr_timeout = attr.timeout
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blocks = attr.blocks
    entry.st_blksize = attr.blksize
    entry.st_atime_ns = attr.atime_ns
    entry.st_mtime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.ctime_ns
    return entry


def statvfs_data(stats: StatFs) -> pyfuse3.StatvfsData:
    """Convert filesystem statistics for pyfuse3."""
    data = pyfuse3.StatvfsData()
    data.f_bsize = stats.bsize
    data.f_frsize = stats.frsize
    data.f_blocks = stats.blocks
    data.f_bfree = stats.bfree
    data.f_bavail = stats.bavail
    data.f_files = stats.files
    data.f_ffree = stats.ffree
    data.f_favail = stats.favail
    data.f_namemax = stats.namemax
    return data


class VfsOperations(pyfuse3.Operations):
    """pyfuse3 handlers over a `Vfs`; file and directory handles are node ids.

    Handles carry no state because after a takeover the kernel sends requests
    on handles that a previous daemon issued.

    Args:
        vfs: the pseudo-root; only the FUSE loop thread touches it.
        inflight: where each handler registers itself while it runs.
        on_init: called synchronously from `init()`, while libfuse handles
            FUSE_INIT and before it writes the reply (the session adopts the
            /dev/fuse fd there).
        read_delay: seconds each `read` sleeps first. Test-only: the session
            sets it from `NYDUS_ACTORS_TEST_READ_DELAY` so integration tests can
            observe requests in flight.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        vfs: Vfs,
        inflight: InflightTracker,
        *,
        on_init: Callable[[], None] | None = None,
        read_delay: float = 0.0,
        fetch_threads: int = 8,
    ) -> None:
        super().__init__()
        self._vfs = vfs
        self._inflight = inflight
        self._on_init = on_init
        self._read_delay = read_delay
        # Reads that must wait for a backend run in these worker threads. They are this
        # object's own rather than trio's thread cache so that `close()` can end them.
        self._fetch_pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fuse-fetch")

    def close(self) -> None:
        """End the fetch threads (after the loop has stopped)."""
        self._fetch_pool.shutdown(wait=True, cancel_futures=True)

    async def _in_fetch_thread(self, fn: Callable[..., bytes], *args: object) -> bytes:
        """Run `fn` in a fetch thread and wait for it without blocking the loop."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = self._fetch_pool.submit(fn, *args)
        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    def init(self) -> None:
        # pyfuse3 calls this from a C callback that cannot propagate exceptions.
        if self._on_init is None:
            return
        try:
            self._on_init()
        except Exception as ex:
            logger.error("failed to initialize the FUSE session: %s", ex)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        with self._inflight.track(parent_inode, FuseOpcode.LOOKUP), _translate_error("lookup"):
            return entry_attributes(self._vfs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        first = inode_list[0][0] if inode_list else 0
        with self._inflight.track(first, FuseOpcode.FORGET):
            for inode, nlookup in inode_list:
                try:
                    self._vfs.forget(inode, nlookup)
                except Exception as ex:
                    # FORGET has no reply; an error here must not end the loop.
                    logger.error("failed to forget node %#x: %r", inode, ex)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        with self._inflight.track(inode, FuseOpcode.GETATTR), _translate_error("getattr"):
            return entry_attributes(self._vfs.getattr(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        with self._inflight.track(inode, FuseOpcode.READLINK), _translate_error("readlink"):
            return self._vfs.readlink(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        with self._inflight.track(inode, FuseOpcode.OPENDIR), _translate_error("opendir"):
            self._vfs.opendir(inode)
            return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # pyfuse3 serves only READDIRPLUS: each accepted entry other than "."
        # and ".." counts as a lookup of its node in the kernel.
        with self._inflight.track(fh, FuseOpcode.READDIRPLUS), _translate_error("readdir"):
            entries = self._vfs.readdir(fh, start_id)
            try:
                for entry in entries:
                    if not pyfuse3.readdir_reply(
                        token, entry.name, entry_attributes(entry.attr), entry.next_offset
                    ):
                        break
                    if entry.name not in (b".", b".."):
                        self._vfs.count_lookup(entry.attr.ino)
            finally:
                entries.close()

    async def releasedir(self, fh: int) -> None:
        with self._inflight.track(fh, FuseOpcode.RELEASEDIR), _translate_error("releasedir"):
            self._vfs.releasedir(fh)

    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        with self._inflight.track(inode, FuseOpcode.OPEN), _translate_error("open"):
            self._vfs.open(inode, flags)
            return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with self._inflight.track(fh, FuseOpcode.READ), _translate_error("read"):
            if self._read_delay > 0:
                await trio.sleep(self._read_delay)
            fs, inner = self._vfs.file_of(fh)
            data = fs.read_nowait(inner, off, size)
            if data is None:
                # a miss that must fetch from a backend: off the loop thread, so other
                # requests (cached reads included) go on meanwhile
                data = await self._in_fetch_thread(fs.read, inner, off, size)
            return data

    async def release(self, fh: int) -> None:
        with self._inflight.track(fh, FuseOpcode.RELEASE), _translate_error("release"):
            self._vfs.release(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        with self._inflight.track(pyfuse3.ROOT_INODE, FuseOpcode.STATFS), _translate_error("statfs"):
            return statvfs_data(self._vfs.statfs())

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        with self._inflight.track(inode, FuseOpcode.GETXATTR), _translate_error("getxattr"):
            return self._vfs.getxattr(inode, name)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> list[bytes]:
        with self._inflight.track(inode, FuseOpcode.LISTXATTR), _translate_error("listxattr"):
            return self._vfs.listxattr(inode)


def read_delay_from_env() -> float:
    """Return the test-only read delay from `NYDUS_ACTORS_TEST_READ_DELAY` (0 if unset)."""
    value = os.environ.get("NYDUS_ACTORS_TEST_READ_DELAY", "")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        logger.error("ignoring NYDUS_ACTORS_TEST_READ_DELAY=%r: not a number", value)
        return 0.0
