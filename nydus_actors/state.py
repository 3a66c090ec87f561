"""The state a daemon hands to the next one: one versioned msgpack envelope (design §7).

`{"format": "nydus-actors/state", "version": 1, "daemon": {...}, "fuse": {...},
"mounts": [...], "blob_cache": {...}}`. Each actor fills its own slice. The
fd travels beside these bytes (SCM_RIGHTS); the bytes never name it. A newer
daemon reads every version it claims; an unknown one is a clear error that
leaves the new daemon waiting and the old one serving. No pickle.
"""

from __future__ import annotations

from typing import Any

import msgpack

from nydus_actors.exceptions import UpgradeManagerError

FORMAT = "nydus-actors/state"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


def encode(
    daemon: dict[str, Any], fuse: dict[str, Any], mounts: list[dict[str, Any]], blob_cache: dict
) -> bytes:
    """Pack the state slices into the envelope."""
    envelope = {
        "format": FORMAT,
        "version": VERSION,
        "daemon": daemon,
        "fuse": fuse,
        "mounts": mounts,
        "blob_cache": blob_cache,
    }
    return msgpack.packb(envelope, use_bin_type=True, strict_types=False)


def decode(data: bytes) -> dict[str, Any]:
    """Unpack and check an envelope.

    Raises:
        UpgradeManagerError: not our format, or a version this daemon does not read.
    """
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as ex:
        raise UpgradeManagerError(f'Deserialize("not a nydus-actors state: {ex}")') from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise UpgradeManagerError('Deserialize("not a nydus-actors state")')
    version = envelope.get("version")
    if version not in SUPPORTED_VERSIONS:
        known = sorted(SUPPORTED_VERSIONS)
        raise UpgradeManagerError(
            f'Deserialize("state version {version} is not supported; this daemon reads {known}")'
        )
    for key in ("daemon", "fuse", "mounts", "blob_cache"):
        if key not in envelope:
            raise UpgradeManagerError(f'Deserialize("state has no {key} slice")')
    return envelope
