"""FuseSessionActor: owns /dev/fuse, the kernel mount, the VFS and the FUSE loop thread.

`_FuseLoop` adopts the connection (design §4) and holds every trio↔pykka crossing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import socket
import stat
import struct
import threading
from typing import TYPE_CHECKING, TypeVar, cast

import pyfuse3
import pykka
import trio
from pykka.typing import ActorMemberMixin, proxy_method

from nydus_actors.exceptions import NotFound, OtherError
from nydus_actors.fs import kernel
from nydus_actors.fs.inflight import InflightTracker
from nydus_actors.fs.operations import VfsOperations, read_delay_from_env
from nydus_actors.fs.vfs import ROOT_SLOT, SUB_SLOTS, Vfs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

    from nydus_actors.fs.base import Filesystem
    from nydus_actors.fs.kernel import KernelMount
    from nydus_actors.fs.vfs import Invalidation
    from nydus_actors.models import InflightRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest wait for libfuse to handle the replayed FUSE_INIT.
START_TIMEOUT = 10.0
#: Longest wait for in-flight handlers to finish when the loop is stopped.
STOP_TIMEOUT = 60.0
#: Read-ahead of the mount's kernel bdi. The kernel starts FUSE mounts at 128 KiB,
#: so a sequential read reaches the daemon as 128 KiB requests; with 1 MiB (the
#: largest request libfuse negotiates, 256 pages) each request carries eight times
#: the data for the same per-request cost, which is what a Python daemon pays most.
READ_AHEAD_KB = 1024

# pyfuse3 keeps its session in module globals: one loop per process at a time.
_SESSION_LOCK = threading.Lock()


class _FuseLoop:
    """The thread running pyfuse3's trio loop, and every crossing into or out of it.

    Crossings, all here:
    - actor → loop: `run_sync()` (VFS mutations) and `stop()` (`pyfuse3.terminate`)
      go through `trio.from_thread.run_sync` with the loop's trio token, so the
      loop thread is the only one touching the VFS while it runs;
    - loop → actor: `Operations.init()` calls `_adopt()` in the loop thread, which
      sets a `threading.Event` that `start()` waits on;
    - loop → daemon: `on_ended` is called from the loop thread when the loop
      returns without `stop()` (e.g. the mount was removed from outside);
    - the actor sends kernel invalidations itself (`invalidate()`): they may block
      until related requests are answered, which the loop does meanwhile.
    The loop never waits on a pykka future. `InflightTracker.snapshot()` is read
    from other threads; its docstring says why that is safe.

    Adoption: libfuse is given `/dev/fd/N` for one end of a socketpair holding
    the saved FUSE_INIT, and `_adopt()` dup2s the /dev/fuse fd onto N while
    libfuse handles that INIT, so the reply and all later traffic go to the
    kernel. After `pyfuse3.init` libfuse owns fd N and closes it in
    `pyfuse3.close`; the /dev/fuse fd passed in stays the caller's.
    """

    def __init__(
        self,
        vfs: Vfs,
        inflight: InflightTracker,
        *,
        fuse_fd: int,
        init_bytes: bytes,
        max_tasks: int,
        on_ended: Callable[[], None] | None,
    ) -> None:
        self._vfs = vfs
        self._inflight = inflight
        self._fuse_fd = fuse_fd
        self._init_bytes = init_bytes
        self._max_tasks = max_tasks
        self._on_ended = on_ended
        self._libfuse_fd = -1
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._settled = threading.Event()  # INIT handled, or the loop ended first
        self._ended = threading.Event()
        self._initialized = False
        self._stop_requested = False
        self._session_open = False
        self._ops: VfsOperations | None = None

    def is_alive(self) -> bool:
        """Tell whether the loop is still serving requests."""
        return self._thread is not None and not self._ended.is_set()

    def start(self, timeout: float) -> None:
        """Adopt the connection and run the loop; return once INIT is handled.

        Raises:
            OtherError: another session is active in this process, libfuse
                refused the fd, or INIT was not handled within `timeout`.
        """
        if not _SESSION_LOCK.acquire(blocking=False):
            raise OtherError("failed to start serving fuse: another FUSE session is active in this process")
        try:
            self._open_session()
        except BaseException:
            _SESSION_LOCK.release()
            raise
        self._thread = threading.Thread(target=self._run, name="fuse-loop")
        self._thread.start()
        self._settled.wait(timeout)
        if self._initialized:
            return
        cause = "the FUSE loop ended" if self._ended.is_set() else f"no reply within {timeout:g} s"
        try:
            self.stop(STOP_TIMEOUT)
        except OtherError as ex:
            logger.error("%s", ex)
        raise OtherError(f"failed to start serving fuse: FUSE_INIT was not handled: {cause}")

    def run_sync(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the loop thread, or here once the loop has finished."""
        if self._token is not None and not self._ended.is_set():
            try:
                return trio.from_thread.run_sync(fn, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        # No loop is running, so no other thread touches the VFS.
        return fn()

    def invalidate(self, invalidations: Iterable[Invalidation]) -> None:
        """Tell the kernel to forget directory entries (from the actor thread)."""
        for item in invalidations:
            try:
                pyfuse3.invalidate_entry(item.parent, item.name)
            except FileNotFoundError:
                logger.debug("kernel had no entry %r in node %#x", item.name, item.parent)
            except OSError as ex:
                logger.warning("failed to invalidate entry %r in node %#x: %s", item.name, item.parent, ex)

    def stop(self, timeout: float) -> None:
        """Stop reading requests, wait for handlers in flight, close the libfuse session.

        Requests not yet read stay queued in the kernel; the /dev/fuse fd of the
        caller stays open.

        Raises:
            OtherError: the loop did not end within `timeout`.
        """
        self._stop_requested = True
        if self._token is not None and not self._ended.is_set():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise OtherError(
                    f"failed to stop serving fuse: the FUSE loop is still busy after {timeout:g} s"
                )
        self._close_session()

    def _open_session(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with ours:
                sent = ours.send(self._init_bytes)
            if sent != len(self._init_bytes):
                raise OSError(f"sent {sent} of {len(self._init_bytes)} FUSE_INIT bytes")
        except OSError as ex:
            theirs.close()
            raise OtherError(f"failed to start serving fuse: {ex}") from ex
        # Closing our end now is fine: the INIT message stays readable, and if
        # adoption fails libfuse then reads EOF and its loop ends instead of hanging.
        self._libfuse_fd = theirs.detach()
        ops = VfsOperations(self._vfs, self._inflight, on_init=self._adopt, read_delay=read_delay_from_env())
        self._ops = ops
        try:
            pyfuse3.init(ops, f"/dev/fd/{self._libfuse_fd}", set())
        except RuntimeError as ex:
            # pyfuse3 raises this text when fuse_session_new() succeeded but the
            # fd was refused: that session exists, must be destroyed, owns no fd.
            if "fuse_session_mount" in str(ex):
                pyfuse3.close(unmount=False)
            os.close(self._libfuse_fd)
            raise OtherError(f"failed to start serving fuse: {ex}") from ex
        self._session_open = True

    def _adopt(self) -> None:
        """Point libfuse's fd at /dev/fuse (loop thread, inside FUSE_INIT handling)."""
        os.dup2(self._fuse_fd, self._libfuse_fd, inheritable=False)
        self._initialized = True
        self._settled.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        await pyfuse3.main(min_tasks=1, max_tasks=self._max_tasks)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except Exception as ex:
            logger.error("FUSE loop failed: %r", ex)
        finally:
            unasked = not self._stop_requested
            self._ended.set()
            self._settled.set()
        if unasked and self._initialized:
            logger.info("FUSE loop ended without being stopped")
            if self._on_ended is not None:
                try:
                    self._on_ended()
                except Exception as ex:
                    logger.error("failed to report the end of the FUSE session: %r", ex)

    def _close_session(self) -> None:
        if self._ops is not None:
            self._ops.close()
            self._ops = None
        if not self._session_open:
            return
        self._session_open = False
        try:
            pyfuse3.close(unmount=False)
        finally:
            _SESSION_LOCK.release()


class FuseSessionActor(pykka.ThreadingActor):
    """Owns the FUSE connection of one mountpoint and serves it through a VFS.

    Args:
        mountpoint: host directory to mount FUSE on.
        threads: most concurrent request handlers (`--fuse-threads`).
        on_session_ended: called from the FUSE loop thread when the loop ends
            without `stop_serving()` (the kernel connection went away). It must be
            cheap and thread-safe, e.g. a pykka `tell`.
    """

    def __init__(
        self,
        mountpoint: str,
        *,
        threads: int = 4,
        on_session_ended: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._mountpoint = mountpoint
        self._threads = threads
        self._on_session_ended = on_session_ended
        self._vfs = Vfs()
        self._inflight = InflightTracker()
        self._kernel: KernelMount | None = None
        self._loop: _FuseLoop | None = None
        self._initialized = False

    # -- lifecycle -----------------------------------------------------------

    def on_stop(self) -> None:
        self._shut_down()

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        """Stop serving and close fds; never unmount (that is an explicit message)."""
        try:
            self.stop_serving()
        except Exception as ex:
            # The loop thread still uses the VFS; leave it to the process exit.
            logger.error("failed to stop serving fuse at %s: %s", self._mountpoint, ex)
        else:
            self._vfs.close()
        if self._kernel is not None:
            os.close(self._kernel.fd)
            self._kernel = None

    # -- messages --------------------------------------------------------------

    def ping(self) -> bool:
        """Answer True once the actor runs."""
        return True

    def mount(self) -> KernelMount:
        """Mount FUSE at the mountpoint and keep the fd and the FUSE_INIT bytes."""
        if self._kernel is not None:
            raise OtherError(f"failed to mount fuse at {self._mountpoint}: already mounted")
        self._kernel = kernel.open_and_mount(self._mountpoint)
        return self._kernel

    def start_serving(self) -> None:
        """Adopt the connection and start the FUSE loop; return once INIT is handled."""
        if self._kernel is None:
            raise OtherError(f"failed to start serving fuse at {self._mountpoint}: not mounted")
        if self._loop is not None:
            if self._loop.is_alive():
                return
            self.stop_serving()  # the loop ended by itself; clean it up first
        loop = _FuseLoop(
            self._vfs,
            self._inflight,
            fuse_fd=self._kernel.fd,
            init_bytes=self._kernel.init_bytes,
            max_tasks=self._threads,
            on_ended=self._on_session_ended,
        )
        loop.start(START_TIMEOUT)
        self._loop = loop
        self._initialized = True
        # After INIT: the kernel sets the bdi read-ahead while handling the INIT reply.
        _set_read_ahead(self._kernel.conn_id, READ_AHEAD_KB)
        logger.info("serving fuse at %s with up to %d threads", self._mountpoint, self._threads)

    def stop_serving(self) -> None:
        """Stop the FUSE loop without unmounting; requests queue in the kernel."""
        if self._loop is None:
            return
        self._loop.stop(STOP_TIMEOUT)
        self._loop = None
        logger.info("stopped serving fuse at %s", self._mountpoint)

    def unmount(self) -> None:
        """Stop serving, unmount the kernel mount and close the /dev/fuse fd."""
        self.stop_serving()
        if self._kernel is None:
            return
        try:
            kernel.unmount(self._kernel.mountpoint)
        finally:
            os.close(self._kernel.fd)
            self._kernel = None
            self._initialized = False

    def attach(
        self, mountpoint: str, fs: Filesystem, *, slot: int | None = None, inos: list | None = None
    ) -> int:
        """Attach `fs` at `mountpoint` in the VFS; return its slot.

        The session owns `fs` from now on: it is closed on failure or detach.
        A takeover passes the previous daemon's `slot` and remapped `inos`.
        """

        def attach() -> int:
            attached = self._vfs.attach(mountpoint, fs, slot=slot)
            if inos:
                self._vfs.restore_inos(mountpoint, inos)
            return attached

        try:
            return self._in_loop(attach)
        except BaseException:
            fs.close()
            raise

    # -- handover ----------------------------------------------------------------

    def save_state(self) -> dict:
        """The FUSE slice of the handover state: INIT bytes, connection, mounts' VFS state."""
        if self._kernel is None:
            raise OtherError("failed to save fuse state: no fuse connection")
        return {
            "init": self._kernel.init_bytes,
            "conn_id": self._kernel.conn_id,
            "fingerprint": capability_fingerprint(),
            "vfs": self._in_loop(self._vfs.save_state),
        }

    def dup_fd(self) -> int:
        """A new fd of the /dev/fuse connection, for the supervisor (the caller closes it)."""
        if self._kernel is None:
            raise OtherError("failed to export the fuse connection: not mounted")
        return os.dup(self._kernel.fd)

    def adopt(self, fd: int, init_bytes: bytes, conn_id: int) -> None:
        """Take a connection a previous daemon handed over, instead of mounting.

        `start_serving` then replays `init_bytes` into libfuse exactly as on a
        fresh mount (design §4); the kernel, which answered that INIT long ago,
        ignores the reply.
        """
        if self._kernel is not None:
            raise OtherError("failed to adopt a fuse connection: this session already has one")
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (10, 229):
            raise OtherError("failed to adopt a fuse connection: the fd received is not /dev/fuse")
        path = os.path.abspath(self._mountpoint)  # never stat()ed: nobody serves it yet
        self._kernel = kernel.KernelMount(fd=fd, mountpoint=path, init_bytes=init_bytes, conn_id=conn_id)
        logger.info("adopted fuse connection %d at %s", conn_id, path)

    def release_connection(self) -> None:
        """Forget an adopted connection without unmounting (a takeover that failed)."""
        self.stop_serving()
        if self._kernel is not None:
            os.close(self._kernel.fd)
            self._kernel = None
            self._initialized = False

    def notify_resend(self) -> bool:
        """Ask the kernel to queue again the requests a dead daemon read but never answered.

        FUSE_NOTIFY_RESEND (Linux 6.9+): an out-header alone, error = 7, unique = 0.
        """
        if self._kernel is None:
            return False
        try:
            os.write(self._kernel.fd, struct.pack("<IiQ", 16, 7, 0))
        except OSError as ex:
            logger.warning("failed to notify the kernel to resend requests: %s", ex.strerror)
            return False
        logger.info("kernel asked to resend interrupted requests")
        return True

    def detach(self, mountpoint: str) -> None:
        """Detach the filesystem at `mountpoint` and invalidate its kernel entries."""
        invalidations = self._in_loop(functools.partial(self._vfs.detach, mountpoint))
        if self._loop is not None and self._loop.is_alive():
            self._loop.invalidate(invalidations)

    def replace(self, mountpoint: str, fs: Filesystem) -> int:
        """Swap the filesystem at `mountpoint` for `fs` in one step of the loop; return its slot.

        A sub-mount moves to another slot, so node ids the kernel cached for the old
        filesystem can never reach the new one; the kernel forgets the old entries.
        """

        def swap() -> tuple[int, tuple[Invalidation, ...]]:
            old_slot = self._vfs.slots().get(mountpoint)
            if old_slot is None:
                raise NotFound
            free = [s for s in SUB_SLOTS if s != old_slot and s not in self._vfs.slots().values()]
            invalidations = self._vfs.detach(mountpoint)
            slot = self._vfs.attach(mountpoint, fs, slot=None if old_slot == ROOT_SLOT else free[0])
            return slot, invalidations

        try:
            slot, invalidations = self._in_loop(swap)
        except BaseException:
            fs.close()
            raise
        if self._loop is not None and self._loop.is_alive():
            self._loop.invalidate(invalidations)
        return slot

    def slots(self) -> tuple[tuple[str, int], ...]:
        """Return (mountpoint, slot) of every attached filesystem."""
        return tuple(sorted(self._in_loop(self._vfs.slots).items()))

    def inflight(self) -> tuple[InflightRequest, ...]:
        """Return the FUSE requests being handled right now."""
        return self._inflight.snapshot()

    def initialized(self) -> bool:
        """Tell whether the FUSE_INIT handshake of the connection is done."""
        return self._initialized

    def serving(self) -> bool:
        """Tell whether the FUSE loop is running."""
        return self._loop is not None and self._loop.is_alive()

    def _in_loop(self, fn: Callable[[], T]) -> T:
        if self._loop is None:
            return fn()
        return self._loop.run_sync(fn)


def capability_fingerprint() -> str:
    """What the INIT negotiation depends on: libfuse, pyfuse3 and the capability wants.

    A takeover replays the old daemon's INIT into this process's libfuse; if
    either side would negotiate differently the connection would be misread.
    """
    try:
        libfuse = ctypes.CDLL("libfuse3.so.3").fuse_version()
    except (OSError, AttributeError):
        libfuse = 0
    return (
        f"libfuse={libfuse};pyfuse3={pyfuse3.__version__};dot_lookup={VfsOperations.supports_dot_lookup};"
        f"writeback={VfsOperations.enable_writeback_cache};acl={VfsOperations.enable_acl}"
    )


def _set_read_ahead(conn_id: int, kib: int) -> None:
    """Set the read-ahead of the FUSE connection's bdi (`/sys/class/bdi/<major>:<minor>`)."""
    path = f"/sys/class/bdi/{conn_id >> 20}:{conn_id & 0xFFFFF}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{kib}\n")
    except OSError as ex:
        # unprivileged, or sysfs not mounted: sequential reads stay at 128 KiB requests
        logger.info("read-ahead of the mount left as it is: failed to write %s: %s", path, ex.strerror)
        return
    logger.debug("read-ahead of the mount set to %d KiB", kib)


class FuseSessionProxy(ActorMemberMixin, pykka.ActorProxy[FuseSessionActor]):
    """Typed proxy of `FuseSessionActor`."""

    ping = proxy_method(FuseSessionActor.ping)
    mount = proxy_method(FuseSessionActor.mount)
    start_serving = proxy_method(FuseSessionActor.start_serving)
    stop_serving = proxy_method(FuseSessionActor.stop_serving)
    unmount = proxy_method(FuseSessionActor.unmount)
    attach = proxy_method(FuseSessionActor.attach)
    detach = proxy_method(FuseSessionActor.detach)
    replace = proxy_method(FuseSessionActor.replace)
    save_state = proxy_method(FuseSessionActor.save_state)
    dup_fd = proxy_method(FuseSessionActor.dup_fd)
    adopt = proxy_method(FuseSessionActor.adopt)
    notify_resend = proxy_method(FuseSessionActor.notify_resend)
    release_connection = proxy_method(FuseSessionActor.release_connection)
    slots = proxy_method(FuseSessionActor.slots)
    inflight = proxy_method(FuseSessionActor.inflight)
    initialized = proxy_method(FuseSessionActor.initialized)
    serving = proxy_method(FuseSessionActor.serving)


def start_fuse_session(
    mountpoint: str,
    *,
    threads: int = 4,
    on_session_ended: Callable[[], None] | None = None,
) -> FuseSessionProxy:
    """Start a `FuseSessionActor` and return its typed proxy."""
    ref = FuseSessionActor.start(mountpoint, threads=threads, on_session_ended=on_session_ended)
    return cast("FuseSessionProxy", ref.proxy())
