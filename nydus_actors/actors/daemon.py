"""DaemonActor: the state machine, the mount table, events, runtime config.

Every state-changing API request is one message here, so the actor's mailbox
serializes them, as nydusd's single API thread does. Requests go down to the
`FuseSession` actor and wait on its future; nothing below calls back into this
actor except with `tell` (`fuse_session_ended`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pykka
from pykka.typing import ActorMemberMixin, proxy_method

from nydus_actors import state
from nydus_actors._lib import logs, sdnotify
from nydus_actors.actors.fuse_session import capability_fingerprint
from nydus_actors.events import ErrorHolder
from nydus_actors.exceptions import (
    AlreadyExists,
    NoCounter,
    NotFound,
    NotReady,
    OtherError,
    ResponsePayloadType,
    Unsupported,
    UpgradeManagerError,
)
from nydus_actors.fs.factory import open_filesystem
from nydus_actors.fs.rafs import RafsFs
from nydus_actors.lifecycle import Lifecycle, ShutdownReason
from nydus_actors.metrics import FsIoStats
from nydus_actors.models import DaemonState, FsType, InflightRequest, MountCmd
from nydus_actors.state_machine import Action, DaemonStateMachine, Input
from nydus_actors.upgrade import protocol
from nydus_actors.version import build_info

logger = logging.getLogger(__name__)

#: Longest wait for the FUSE session actor (mounting, draining the FUSE loop).
FUSE_TIMEOUT = 30.0

#: Keys `PUT /api/v1/config` accepts (reference §2.1).
CONFIG_KEYS = frozenset({"registry_auth", "proxy_url", "dragonfly_scheduler_endpoint"})


def format_mounted_time(ns: int) -> str:
    """Format a time like the `time` crate's human-readable serde form (reference §3.1).

    `YYYY-MM-DD HH:MM:SS.<frac> +HH:MM:SS`, `<frac>` the shortest 1 to 9 digits;
    nydusctl parses this back.
    """
    stamp = datetime.fromtimestamp(ns // 1_000_000_000, UTC)
    frac = f"{ns % 1_000_000_000:09d}".rstrip("0") or "0"
    return f"{stamp:%Y-%m-%d %H:%M:%S}.{frac} +00:00:00"


@dataclass(frozen=True, slots=True)
class MountRecord:
    """One mounted filesystem instance, as `backend_collection` describes it."""

    cmd: MountCmd
    mounted_ns: int
    #: RAFS only: the normalized config without secrets, the superblock metadata
    #: and the instance's I/O statistics (written by the FUSE thread, read here).
    config: dict[str, Any] | None = None
    super_meta: dict[str, Any] | None = None
    stats: FsIoStats | None = None

    def descriptor(self) -> dict[str, Any]:
        return {
            "backend_type": self.cmd.fs_type.value,
            "mountpoint": self.cmd.mountpoint,
            "mounted_time": format_mounted_time(self.mounted_ns),
            "config": self.config,
        }


def _write_control(conn_id: int, name: str) -> None:
    """nydusd's fallback: write 1 to the connection's `resend` or `flush` control file."""
    for root in ("/proc/sys/fs/fuse/connections", "/sys/fs/fuse/connections"):
        path = f"{root}/{conn_id}/{name}"
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write("1")
        except OSError:
            continue
        logger.info("wrote 1 to %s", path)
        return
    logger.warning("failed to %s fuse connection %d: no control file (vendor kernels only)", name, conn_id)


def _record(cmd: MountCmd, fs: Any, mounted_ns: int) -> MountRecord:
    if isinstance(fs, RafsFs):
        meta = fs.image.super_meta(attr_timeout=fs.attr_timeout, entry_timeout=fs.entry_timeout)
        return MountRecord(cmd, mounted_ns, fs.config.redacted(), meta, fs.stats)
    return MountRecord(cmd, mounted_ns)


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """What the daemon actor needs from the command line."""

    id: str | None = None
    supervisor: str | None = None
    failover_policy: str = "resend"


class DaemonActor(pykka.ThreadingActor):
    """Owns the daemon state machine and everything the API reads or changes."""

    def __init__(self, settings: DaemonSettings, fuse: Any, lifecycle: Lifecycle, cache: Any = None) -> None:
        super().__init__()
        self._settings = settings
        self._fuse = fuse
        self._cache = cache  # the BlobCacheManager proxy; None serves RAFS only from plain EROFS
        self._lifecycle = lifecycle
        self._fsm = DaemonStateMachine()
        self._mounts: dict[str, MountRecord] = {}
        self._events = ErrorHolder()
        self._config: dict[str, str] = {}
        self._api_ready = False
        self._ready_notified = False
        # a taken-over connection whose interrupted requests are to be resent once serving
        self._drain_conn: int | None = None

    # -- state machine ------------------------------------------------------

    def _run_action(self, action: Action) -> None:
        if action is Action.START_SERVICE:
            self._fuse.start_serving().get(timeout=FUSE_TIMEOUT)
            if self._drain_conn is not None:
                # Only now: the previous daemon has exited (or died), so the kernel's
                # requests it had read and not answered can be given to this one without
                # taking live requests away from it.
                self._drain(self._drain_conn)
                self._drain_conn = None
            self._notify_ready()
        elif action is Action.TERMINATE_SERVICE:
            self._fuse.stop_serving().get(timeout=FUSE_TIMEOUT)
        elif action is Action.UMOUNT:
            self._fuse.stop_serving().get(timeout=FUSE_TIMEOUT)
            self._fuse.unmount().get(timeout=FUSE_TIMEOUT)
        elif action is Action.RESTORE:
            self._restore()
        # NONE and STOP_STATE_MACHINE have nothing to do here.

    def _fire(self, event: Input) -> DaemonState:
        return self._fsm.fire(event, self._run_action)

    def _notify_ready(self) -> None:
        if self._api_ready and self._fsm.state is DaemonState.RUNNING and not self._ready_notified:
            self._ready_notified = True
            sdnotify.notify("READY=1")

    def boot(self, initial: MountCmd | None) -> DaemonState:
        """Normal start: kernel mount, the start-up filesystem, then Mount and Start."""
        self._fuse.mount().get(timeout=FUSE_TIMEOUT)
        try:
            if initial is not None:
                self.mount(initial)
            self._fire(Input.MOUNT)
            return self._fire(Input.START)
        except Exception:
            self._fuse.unmount().get(timeout=FUSE_TIMEOUT)
            raise

    def api_started(self) -> None:
        """The API socket is up; tell the service manager once RUNNING."""
        self._api_ready = True
        self._notify_ready()

    def do_start(self) -> None:
        """`PUT /api/v1/daemon/start`."""
        started = time.perf_counter()
        self._fire(Input.START)
        self._log_step("start", started)

    def _log_step(self, step: str, started: float) -> None:
        logger.info(
            "upgrade step %s: daemon %s done in %.1f ms",
            step,
            self._settings.id,
            (time.perf_counter() - started) * 1000,
        )

    def do_exit(self) -> None:
        """`PUT /api/v1/daemon/exit`: stop serving without unmounting, then end the process."""
        started = time.perf_counter()
        state = self._fsm.state
        if state is not DaemonState.STOPPED:
            if state is DaemonState.INIT:
                self._fire(Input.STOP)
            else:
                if state is DaemonState.RUNNING:
                    self._fire(Input.STOP)
                self._fire(Input.EXIT)
        self._log_step("exit", started)
        self._lifecycle.request_shutdown(ShutdownReason.EXIT)

    def do_stop(self) -> None:
        """SIGTERM/SIGINT or a lost FUSE session: stop serving and unmount."""
        state = self._fsm.state
        if state is DaemonState.STOPPED:
            return
        if state is DaemonState.RUNNING:
            self._fire(Input.STOP)
        self._fire(Input.STOP)

    def fuse_session_ended(self) -> None:
        """The FUSE loop ended without being asked (told from the FUSE thread)."""
        if self._fsm.state is DaemonState.RUNNING:
            logger.warning("FUSE session ended by the kernel (mount removed?); shutting down")
            self._lifecycle.request_shutdown(ShutdownReason.FUSE_ENDED)

    def do_takeover(self) -> None:
        """`PUT /api/v1/daemon/fuse/takeover`."""
        self._fire(Input.TAKEOVER)

    def do_send_fd(self) -> None:
        """`PUT /api/v1/daemon/fuse/sendfd`: hand the state and the /dev/fuse fd to the supervisor.

        No state transition: the daemon keeps serving. The snapshotter calls this
        after start, after every mount change and after its own restart.
        """
        if not self._fuse.initialized().get(timeout=FUSE_TIMEOUT):
            raise NotReady
        if self._settings.supervisor is None:
            raise UpgradeManagerError("MissingSupervisorPath")
        started = time.perf_counter()
        data = self._save_state()
        fd = self._fuse.dup_fd().get(timeout=FUSE_TIMEOUT)
        try:
            protocol.send_state(self._settings.supervisor, data, fd)
        finally:
            os.close(fd)
        logger.info(
            "upgrade step sendfd: daemon %s sent %d bytes of state and the fuse fd to %s in %.1f ms",
            self._settings.id,
            len(data),
            self._settings.supervisor,
            (time.perf_counter() - started) * 1000,
        )

    def _save_state(self) -> bytes:
        fuse = self._fuse.save_state().get(timeout=FUSE_TIMEOUT)
        vfs = fuse.pop("vfs")
        mounts = []
        for mp, record in self._mounts.items():
            cmd = record.cmd
            mounts.append(
                {
                    "mountpoint": mp,
                    "fs_type": cmd.fs_type.value,
                    "source": cmd.source,
                    "config": cmd.config,
                    "prefetch_files": list(cmd.prefetch_files),
                    "mounted_ns": record.mounted_ns,
                    **vfs.get(mp, {}),
                }
            )
        return state.encode({"id": self._settings.id}, fuse, mounts, {})

    def _restore(self) -> None:
        """The takeover: fetch state and fd, check them, adopt the connection, restore every mount."""
        if self._settings.supervisor is None:
            raise UpgradeManagerError("MissingSupervisorPath")
        started = time.perf_counter()
        data, fd = protocol.receive_state(self._settings.supervisor)
        adopted = False
        try:
            envelope = state.decode(data)
            fuse = envelope["fuse"]
            theirs, ours = fuse.get("fingerprint"), capability_fingerprint()
            if theirs != ours:
                raise UpgradeManagerError(f'Incompatible("fuse capabilities differ: {theirs} != {ours}")')
            self._fuse.adopt(fd, fuse["init"], fuse["conn_id"]).get(timeout=FUSE_TIMEOUT)
            adopted = True
            for entry in envelope["mounts"]:
                self._restore_mount(entry)
        except BaseException as ex:
            logger.error(
                "upgrade step takeover: daemon %s failed, staying in INIT: %s", self._settings.id, ex
            )
            for mp in list(self._mounts):
                with contextlib.suppress(Exception):
                    self.umount(mp)
            if adopted:
                self._fuse.release_connection().get(timeout=FUSE_TIMEOUT)
            else:
                os.close(fd)
            raise
        self._drain_conn = fuse["conn_id"]
        logger.info(
            "upgrade step takeover: daemon %s restored %d mounts from %s in %.1f ms",
            self._settings.id,
            len(self._mounts),
            self._settings.supervisor,
            (time.perf_counter() - started) * 1000,
        )

    def _restore_mount(self, entry: dict[str, Any]) -> None:
        cmd = MountCmd(
            fs_type=FsType(entry["fs_type"]),
            source=entry["source"],
            config=entry["config"],
            mountpoint=entry["mountpoint"],
            prefetch_files=tuple(entry.get("prefetch_files", ())),
        )
        fs = open_filesystem(cmd, self._source_opener(cmd))
        fs.restore_state(entry.get("fs", {}))
        record = _record(cmd, fs, int(entry.get("mounted_ns", time.time_ns())))
        self._fuse.attach(cmd.mountpoint, fs, slot=entry.get("slot"), inos=entry.get("inos")).get(
            timeout=FUSE_TIMEOUT
        )
        self._mounts[cmd.mountpoint] = record

    def _drain(self, conn_id: int) -> None:
        """Requests the previous daemon read but never answered, per `--failover-policy`."""
        policy = self._settings.failover_policy
        if policy == "resend":
            if not self._fuse.notify_resend().get(timeout=FUSE_TIMEOUT):
                _write_control(conn_id, "resend")
        elif policy == "flush":
            _write_control(conn_id, "flush")

    def state(self) -> DaemonState:
        return self._fsm.state

    # -- info and configuration ---------------------------------------------

    def info(self, *, v2: bool = False) -> dict[str, Any]:
        """DaemonInfo (reference §3.1); v2 never lists backends."""
        return {
            "version": build_info().as_json(),
            "id": self._settings.id,
            "supervisor": self._settings.supervisor,
            "state": self._fsm.state.name,
            "backend_collection": None
            if v2
            else {mp: record.descriptor() for mp, record in self._mounts.items()},
        }

    def configure(self, log_level: str) -> None:
        """`PUT /api/v1/daemon`: change the log level."""
        try:
            level = logs.parse_level(log_level)
        except ValueError as ex:
            logger.warning("failed to set log level: %s", ex)
            raise ResponsePayloadType from None
        logs.set_level(level)
        logger.warning("log level set to %s", log_level.lower())

    def events(self) -> dict[str, Any]:
        return self._events.export()

    def record_event(self, error: str) -> None:
        """Add one line to the events ring (told by lower layers)."""
        self._events.push(error)

    def get_config(self, config_id: str | None) -> dict[str, str]:
        """`GET /api/v1/config`: all keys, or one id's keys without the prefix."""
        if config_id is None:
            return dict(self._config)
        prefix = f"{config_id}:"
        return {key[len(prefix) :]: value for key, value in self._config.items() if key.startswith(prefix)}

    def set_config(self, config_id: str, items: dict[str, str]) -> None:
        """`PUT /api/v1/config`: set known keys for one id.

        Unlike nydusd, which applies keys in hash order up to the first unknown
        one, an unknown key rejects the whole request, so the outcome never
        depends on ordering.
        """
        unknown = sorted(set(items) - CONFIG_KEYS)
        if unknown:
            logger.warning("failed to update config %r: unknown keys %s", config_id, unknown)
            raise ResponsePayloadType
        for key, value in items.items():
            self._config[f"{config_id}:{key}"] = value
        if "registry_auth" in items and self._cache is not None:
            # hot reload: the registry backends of that mount use the new credentials from now on
            self._cache.set_registry_auth(config_id, items["registry_auth"]).get(timeout=FUSE_TIMEOUT)
        logger.info("config of %r updated: %s", config_id, ", ".join(sorted(items)))

    # -- filesystem instances -----------------------------------------------

    def mount(self, cmd: MountCmd) -> None:
        """`POST /api/v1/mount`: attach a new filesystem instance."""
        if cmd.mountpoint in self._mounts:
            raise AlreadyExists
        if any(not path.startswith("/") for path in cmd.prefetch_files):
            raise OtherError("invalid prefetch file list")
        fs = open_filesystem(cmd, self._source_opener(cmd))
        record = _record(cmd, fs, time.time_ns())
        try:
            self._fuse.attach(cmd.mountpoint, fs).get(timeout=FUSE_TIMEOUT)
        except Exception:
            self._close_source(cmd.mountpoint)
            raise
        self._mounts[cmd.mountpoint] = record
        logger.info("mounted %s %s at %s", cmd.fs_type.value, cmd.source, cmd.mountpoint)

    def remount(self, cmd: MountCmd) -> None:
        """`PUT /api/v1/mount`: swap the bootstrap of a RAFS instance."""
        record = self._mounts.get(cmd.mountpoint)
        if record is None:
            raise NotFound
        if record.cmd.fs_type is not FsType.RAFS or cmd.fs_type is not FsType.RAFS:
            raise OtherError("filesystem type mismatch, expect RAFS")
        if any(not path.startswith("/") for path in cmd.prefetch_files):
            raise OtherError("invalid prefetch file list")
        fs = open_filesystem(cmd, self._source_opener(cmd))
        if record.stats is not None:
            fs.stats = record.stats  # the instance's counters survive the swap, as in nydusd
        new_record = _record(cmd, fs, record.mounted_ns)
        self._fuse.replace(cmd.mountpoint, fs).get(timeout=FUSE_TIMEOUT)
        if self._cache is not None:
            self._cache.retire(cmd.mountpoint).get(timeout=FUSE_TIMEOUT)
        self._mounts[cmd.mountpoint] = new_record
        logger.info("remounted %s with bootstrap %s", cmd.mountpoint, cmd.source)

    def umount(self, mountpoint: str) -> None:
        """`DELETE /api/v1/mount`: detach a filesystem instance."""
        if mountpoint not in self._mounts:
            raise NotFound
        self._fuse.detach(mountpoint).get(timeout=FUSE_TIMEOUT)
        self._close_source(mountpoint)
        record = self._mounts.pop(mountpoint)
        logger.info("umounted %s from %s", record.cmd.source, mountpoint)

    def _source_opener(self, cmd: MountCmd) -> Any:
        """The function the filesystem factory calls to get a RAFS mount's chunk source."""

        def open_source(mount_id: str, image: Any, config: Any) -> Any:
            if self._cache is None:
                raise Unsupported
            opened = self._cache.open_source(mount_id, image, config, cmd.prefetch_files)
            return opened.get(timeout=FUSE_TIMEOUT)

        return open_source

    def _close_source(self, mount_id: str) -> None:
        if self._cache is not None:
            self._cache.close_source(mount_id).get(timeout=FUSE_TIMEOUT)

    def backend_info(self, mountpoint: str) -> dict[str, Any]:
        """`GET /api/v1/daemon/backend`: the RAFS superblock of one instance."""
        record = self._mounts.get(mountpoint)
        if record is None:
            raise NotFound
        if record.super_meta is None:
            raise OtherError("filesystem type mismatch, expect RAFS")
        return record.super_meta

    # -- metrics ---------------------------------------------------------------

    def metrics(self, kind: str, metrics_id: str | None, *, latest: bool = False) -> Any:
        """Export one metrics instance: by exact id, or the only one (reference §3.4)."""
        if kind in ("backend", "blobcache"):
            if self._cache is None:
                raise NoCounter
            export = self._cache.backend_metrics if kind == "backend" else self._cache.blobcache_metrics
            return export(metrics_id).get(timeout=FUSE_TIMEOUT)
        table: dict[str, Any] = {mp: r.stats for mp, r in self._mounts.items() if r.stats is not None}
        if metrics_id is not None:
            instance = table.get(metrics_id)
        elif len(table) == 1:
            instance = next(iter(table.values()))
        else:
            instance = None
        if instance is None:
            raise NoCounter
        if kind == "global":
            return instance.export()
        if kind == "files":
            return instance.export_files(latest=latest)
        return instance.export_pattern()

    def inflight(self) -> tuple[InflightRequest, ...]:
        """FUSE requests being handled right now."""
        return self._fuse.inflight().get(timeout=FUSE_TIMEOUT)

    # -- API v2 blob objects ---------------------------------------------------

    def create_blob(self, blob_type: str, blob_id: str, domain_id: str, config: dict[str, Any]) -> None:
        """`PUT /api/v2/blobs`: register a bootstrap blob object and its data blobs."""
        if self._cache is None:
            raise Unsupported
        self._cache.add_blob_object(blob_type, blob_id, domain_id, config).get(timeout=FUSE_TIMEOUT)

    def get_blobs(self, domain_id: str, blob_id: str | None) -> Any:
        """`GET /api/v2/blobs`: the objects of a domain (nydusd panics here; we answer)."""
        if self._cache is None:
            raise Unsupported
        return self._cache.get_blob_objects(domain_id, blob_id).get(timeout=FUSE_TIMEOUT)

    def delete_blobs(self, domain_id: str, blob_id: str | None) -> None:
        """`DELETE /api/v2/blobs?domain_id=`: remove one object or a whole domain."""
        if self._cache is None:
            raise Unsupported
        self._cache.remove_blob_objects(domain_id, blob_id).get(timeout=FUSE_TIMEOUT)

    def delete_blob_file(self, blob_id: str) -> None:
        """`DELETE /api/v2/blobs?blob_id=`: a FUSE daemon has no blob files to cull.

        nydusd's FUSE daemon answers 204 here without doing anything (its
        default `delete_blob`), and clients rely on that reply.
        """
        logger.info("blob file %s: no fscache blob files in a FUSE daemon, nothing to cull", blob_id)

    def ping(self) -> bool:
        return True


class DaemonProxy(ActorMemberMixin, pykka.ActorProxy[DaemonActor]):
    boot = proxy_method(DaemonActor.boot)
    api_started = proxy_method(DaemonActor.api_started)
    do_start = proxy_method(DaemonActor.do_start)
    do_exit = proxy_method(DaemonActor.do_exit)
    do_stop = proxy_method(DaemonActor.do_stop)
    fuse_session_ended = proxy_method(DaemonActor.fuse_session_ended)
    do_takeover = proxy_method(DaemonActor.do_takeover)
    do_send_fd = proxy_method(DaemonActor.do_send_fd)
    state = proxy_method(DaemonActor.state)
    info = proxy_method(DaemonActor.info)
    configure = proxy_method(DaemonActor.configure)
    events = proxy_method(DaemonActor.events)
    record_event = proxy_method(DaemonActor.record_event)
    get_config = proxy_method(DaemonActor.get_config)
    set_config = proxy_method(DaemonActor.set_config)
    mount = proxy_method(DaemonActor.mount)
    remount = proxy_method(DaemonActor.remount)
    umount = proxy_method(DaemonActor.umount)
    backend_info = proxy_method(DaemonActor.backend_info)
    metrics = proxy_method(DaemonActor.metrics)
    inflight = proxy_method(DaemonActor.inflight)
    create_blob = proxy_method(DaemonActor.create_blob)
    get_blobs = proxy_method(DaemonActor.get_blobs)
    delete_blobs = proxy_method(DaemonActor.delete_blobs)
    delete_blob_file = proxy_method(DaemonActor.delete_blob_file)
    ping = proxy_method(DaemonActor.ping)
