"""Immutable values passed between actors: requests, replies and records."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DaemonState(enum.Enum):
    """The exposed daemon state, serialized by name (reference §4.1)."""

    INIT = 1
    RUNNING = 2
    READY = 3
    STOPPED = 4
    UNKNOWN = 5


class FsType(enum.Enum):
    """Filesystem kinds a mount request can name; values are nydusd's variant names."""

    RAFS = "Rafs"
    PASSTHROUGH = "PassthroughFs"


#: Request spellings of `fs_type` accepted by nydusd (reference §2.3).
FS_TYPE_BY_NAME = {
    "rafs": FsType.RAFS,
    "passthrough": FsType.PASSTHROUGH,
    "passthroughfs": FsType.PASSTHROUGH,
    "passthrough_fs": FsType.PASSTHROUGH,
}


@dataclass(frozen=True, slots=True)
class MountCmd:
    """Request to mount one filesystem instance at a path of the pseudo-root."""

    fs_type: FsType
    source: str  # bootstrap path for RAFS, host directory for passthrough
    config: str  # the filesystem config text, kept verbatim
    mountpoint: str  # absolute path inside the FUSE mount, "/" for the root
    prefetch_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InflightRequest:
    """One FUSE request being handled right now (`/api/v1/metrics/inflight`)."""

    inode: int
    opcode: int
    unique: int
    timestamp_secs: int
