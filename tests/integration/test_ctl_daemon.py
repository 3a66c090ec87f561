"""`nydus-actors ctl` against a real daemon over its real socket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nydus_actors", "ctl", "--sock", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_ctl_drives_the_daemon(spawn, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.txt").write_text("via ctl\n")
    daemon = spawn()
    daemon.wait_socket()

    out = ctl(daemon.apisock, "info")
    assert out.returncode == 0, out.stderr
    assert "RUNNING" in out.stdout

    out = ctl(daemon.apisock, "mount", "-s", str(source), "-m", "/via-ctl", "-t", "passthrough_fs")
    assert out.returncode == 0, out.stderr
    assert (daemon.mountpoint / "via-ctl" / "f.txt").read_text() == "via ctl\n"

    out = ctl(daemon.apisock, "--raw", "info")
    info = json.loads(out.stdout)
    assert info["backend_collection"]["/via-ctl"]["backend_type"] == "PassthroughFs"
    assert "/via-ctl" in ctl(daemon.apisock, "info").stdout

    assert ctl(daemon.apisock, "set", "log-level", "debug").returncode == 0
    out = ctl(daemon.apisock, "set", "log-level", "loud")
    assert out.returncode == 1 and "Configure(ResponsePayloadType)" in out.stderr

    out = ctl(daemon.apisock, "metrics", "inflight")
    assert out.returncode == 0 and "no in-flight requests" in out.stdout
    out = ctl(daemon.apisock, "metrics")
    assert out.returncode == 1 and "NoCounter" in out.stderr

    assert ctl(daemon.apisock, "umount", "-m", "/via-ctl").returncode == 0
    assert not (daemon.mountpoint / "via-ctl").exists()
    out = ctl(daemon.apisock, "umount", "-m", "/via-ctl")
    assert out.returncode == 1 and "doesn't exist" in out.stderr

    assert ctl(daemon.apisock, "exit").returncode == 0
    assert daemon.wait_exit() == 0


def test_ctl_without_daemon(tmp_path: Path) -> None:
    out = ctl(tmp_path / "absent.sock", "info")
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1
