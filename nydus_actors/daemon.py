"""Run one daemon process: start the actors in order, serve, stop them in reverse.

Start-up follows nydusd (reference §4.3, §5.6): crash detection first; on a
normal start the FUSE mount and the start-up filesystem come up and the state
goes INIT -> RUNNING before the API socket exists; with `--upgrade`, or after a
crash of the previous daemon, nothing is mounted and the daemon waits in INIT.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from types import FrameType

import pykka

from nydus_actors._lib import logs, sdnotify
from nydus_actors.actors.api_server import ApiServerActor
from nydus_actors.actors.blob_cache import BlobCacheManagerActor
from nydus_actors.actors.daemon import DaemonActor, DaemonProxy, DaemonSettings
from nydus_actors.actors.fuse_session import start_fuse_session
from nydus_actors.exceptions import NydusError
from nydus_actors.fs import kernel
from nydus_actors.lifecycle import Lifecycle, ShutdownReason
from nydus_actors.models import FsType, MountCmd
from nydus_actors.version import build_info

logger = logging.getLogger(__name__)

#: Longest wait for start-up (kernel mount, first filesystem) and for stopping.
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """The checked command line of one daemon process."""

    mountpoint: str
    apisock: str | None = None
    id: str | None = None
    supervisor: str | None = None
    upgrade: bool = False
    failover_policy: str = "resend"
    fuse_threads: int = 4
    shared_dir: str | None = None
    bootstrap: str | None = None
    config_text: str = ""
    prefetch_files: tuple[str, ...] = ()
    virtual_mountpoint: str = "/"
    config: str | None = None
    log_level: int = logging.INFO
    log_file: str | None = None
    log_rotation_mb: int = 0
    log_json: bool = False
    rlimit_nofile: int = 1_000_000
    backend_source: str | None = None


def is_crashed(mountpoint: str, apisock: str) -> bool:
    """nydusd's failover detection: our mount is present but its API socket is dead.

    The mountpoint is never stat()ed: a supervisor may hold the crashed daemon's
    FUSE connection, and nobody serves it until this daemon takes it over.
    """
    if not kernel.is_mounted(mountpoint) or not os.path.exists(apisock):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(apisock)
        except OSError:
            return True
    return False


def _raise_nofile(limit: int) -> None:
    if limit <= 0:
        return
    try:
        with open("/proc/sys/fs/file-max", encoding="utf-8") as f:
            limit = min(limit, max(int(f.read()) - 16384, 1024))
    except (OSError, ValueError):
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))
        return
    except (OSError, ValueError) as ex:
        # without CAP_SYS_RESOURCE only the soft limit can rise, up to the hard one
        cause = ex
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
        logger.info("open-file limit raised to %d, not %d: %s", min(limit, hard), limit, cause)
    except (OSError, ValueError) as ex:
        logger.warning("failed to raise the open-file limit to %d: %s", limit, ex)


def _initial_mount(options: DaemonOptions) -> MountCmd | None:
    if options.bootstrap is not None:
        return MountCmd(
            fs_type=FsType.RAFS,
            source=options.bootstrap,
            config=options.config_text,
            mountpoint=options.virtual_mountpoint,
            prefetch_files=options.prefetch_files,
        )
    if options.shared_dir is None:
        return None  # shared-daemon mode: filesystems come through the API
    return MountCmd(
        fs_type=FsType.PASSTHROUGH,
        source=options.shared_dir,
        config="",
        mountpoint=options.virtual_mountpoint,
    )


def _stop_all_actors() -> None:
    """Stop what is left, loudly: every actor should have been stopped in order."""
    leftovers = pykka.ActorRegistry.get_all()
    if leftovers:
        logger.error("actors still alive at exit: %s", ", ".join(str(ref) for ref in leftovers))
        pykka.ActorRegistry.stop_all(block=True, timeout=STOP_TIMEOUT)


def _threads_left() -> list[str]:
    main = threading.main_thread()
    return [t.name for t in threading.enumerate() if t is not main and t.is_alive()]


def run(options: DaemonOptions) -> int:
    """Run the daemon until a signal, `PUT /daemon/exit` or the loss of the FUSE session."""
    try:
        logs.setup_logging(
            options.log_level,
            log_file=options.log_file,
            rotation_mb=options.log_rotation_mb,
            json_lines=options.log_json,
        )
    except OSError as ex:
        print(f"error: failed to open log file {options.log_file}: {ex.strerror}", file=sys.stderr)
        return 1
    info = build_info()
    logger.info(
        "nydus-actors %s (commit %s) starting, pid %d", info.package_ver, info.git_commit, os.getpid()
    )
    if options.backend_source:
        logger.warning(
            "--backend-source %s is ignored: this daemon has no backend-source feature",
            options.backend_source,
        )
    if options.config and options.shared_dir:
        logger.info("--config %s is not used by a passthrough filesystem", options.config)
    _raise_nofile(options.rlimit_nofile)

    lifecycle = Lifecycle()
    crashed = (
        bool(options.apisock) and not options.upgrade and is_crashed(options.mountpoint, options.apisock)
    )
    if crashed:
        logger.warning("previous daemon of %s crashed; waiting for takeover in INIT", options.mountpoint)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("received %s", signal.Signals(signum).name)
        lifecycle.request_shutdown(ShutdownReason.SIGNAL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    daemon: DaemonProxy | None = None
    fuse = None
    cache = None
    api = None
    reason: ShutdownReason | None = None
    code = 0
    try:
        daemon_box: list[DaemonProxy] = []
        fuse = start_fuse_session(
            options.mountpoint,
            threads=options.fuse_threads,
            on_session_ended=lambda: daemon_box[0].fuse_session_ended() if daemon_box else None,
        )
        cache = BlobCacheManagerActor.start(
            on_event=lambda line: daemon_box[0].record_event(line) if daemon_box else None
        ).proxy()
        settings = DaemonSettings(
            id=options.id, supervisor=options.supervisor, failover_policy=options.failover_policy
        )
        daemon = DaemonActor.start(settings, fuse, lifecycle, cache).proxy()
        daemon_box.append(daemon)
        if options.upgrade or crashed:
            logger.info("waiting in INIT for a takeover")
        else:
            daemon.boot(_initial_mount(options)).get(timeout=BOOT_TIMEOUT)
        if options.apisock:
            api = ApiServerActor.start(options.apisock, daemon).proxy()
            api.ping().get(timeout=BOOT_TIMEOUT)
        daemon.api_started().get(timeout=BOOT_TIMEOUT)
        reason = lifecycle.wait()
        logger.info("shutting down: %s", reason.value if reason else "unknown")
    except NydusError as ex:
        logger.error("failed to start: %s", ex)
        print(f"error: {ex}", file=sys.stderr)
        code = 1
    except OSError as ex:
        logger.error("failed to start: %s", ex)
        print(f"error: {ex}", file=sys.stderr)
        code = 1
    except Exception as ex:
        logger.exception("failed to start")
        print(f"error: failed to start: {ex!r}", file=sys.stderr)
        code = 1
    finally:
        sdnotify.notify("STOPPING=1")
        if api is not None:
            api.actor_ref.stop(timeout=STOP_TIMEOUT)  # closes the API socket and removes its file
        if daemon is not None and reason is not ShutdownReason.EXIT:
            try:
                daemon.do_stop().get(timeout=STOP_TIMEOUT)
            except Exception:
                logger.exception("failed to stop the daemon cleanly")
                code = code or 1
        if daemon is not None:
            daemon.actor_ref.stop(timeout=STOP_TIMEOUT)
        if fuse is not None:
            fuse.actor_ref.stop(timeout=STOP_TIMEOUT)
        if cache is not None:
            cache.actor_ref.stop(timeout=STOP_TIMEOUT)
        _stop_all_actors()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    left = _threads_left()
    if left:
        logger.error("threads still alive at exit: %s", ", ".join(left))
        logging.shutdown()
        os._exit(code or 1)
    logger.info("all actors and threads stopped; exit %d", code)
    if reason is ShutdownReason.EXIT:
        # A hot upgrade waits for this process to end before starting the new daemon;
        # with every thread stopped and the logs flushed, the interpreter's own
        # teardown (~60 ms of module cleanup) has nothing left to do.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
