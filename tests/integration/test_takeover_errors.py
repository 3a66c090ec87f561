"""Takeovers that must fail cleanly: the new daemon stays in INIT with a clear error, nothing mounted.

The state is served the way nydus-snapshotter's supervisor serves it (`SendStatesTimeout`),
with crafted contents.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nydus_actors import state
from nydus_actors.actors.fuse_session import capability_fingerprint
from tests.integration.harness import is_mounted, needs_fuse
from tests.upgrade.snapshotter_supervisor import send_states_timeout

pytestmark = [needs_fuse, pytest.mark.mount]


def envelope(*, fingerprint: str | None = None) -> bytes:
    fuse = {"init": b"\0" * 64, "conn_id": 1, "fingerprint": fingerprint or capability_fingerprint()}
    return state.encode({"id": "t1"}, fuse, [], {})


def newer_version() -> bytes:
    import msgpack  # noqa: PLC0415

    return msgpack.packb(
        {"format": state.FORMAT, "version": 99, "daemon": {}, "fuse": {}, "mounts": [], "blob_cache": {}}
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (newer_version(), "state version 99 is not supported"),
        (b"\x93not msgpack of ours", "not a nydus-actors state"),
        (envelope(fingerprint="libfuse=1;pyfuse3=0"), "fuse capabilities differ"),
        (envelope(), "is not /dev/fuse"),
    ],
)
def test_bad_takeover_leaves_the_daemon_waiting(spawn, tmp_path: Path, data: bytes, message: str) -> None:
    sup = tmp_path / "supervisor.sock"
    daemon = spawn("--id", "t1", "--supervisor", str(sup), "--upgrade")
    assert daemon.state() == "INIT"
    read_end, write_end = os.pipe()  # an fd that is not a FUSE connection
    try:
        sender = send_states_timeout(str(sup), data, read_end, timeout=10)
        status, _, body = daemon.request("PUT", "/api/v1/daemon/fuse/takeover")
        sender.wait()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert status == 500 and message in body["message"], body
    assert daemon.state() == "INIT"
    assert not is_mounted(daemon.mountpoint)
    assert daemon.request("GET", "/api/v1/daemon")[2]["backend_collection"] == {}
    assert message in daemon.log()
