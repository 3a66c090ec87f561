"""Run the real daemon as a subprocess through its CLI and talk to its unix socket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nydus_actors._lib.uds_http import UdsHttpClient

HAS_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0
needs_fuse = pytest.mark.skipif(not HAS_FUSE, reason="needs /dev/fuse and root to mount FUSE")


def is_mounted(path: str | Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mount_dir = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if mount_dir == target:
                return True
    return False


def force_unmount(path: str | Path) -> None:
    """Remove a mount a test left behind, even a dead FUSE connection."""
    for _ in range(5):
        if not is_mounted(path):
            return
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        time.sleep(0.05)


class Daemon:
    """One daemon process with its own mountpoint, API socket and log file."""

    def __init__(
        self,
        root: Path,
        *args: str,
        env: dict[str, str] | None = None,
        name: str = "d",
        mountpoint: Path | None = None,
    ) -> None:
        self.root = root
        self.mountpoint = mountpoint or root / f"{name}-mnt"
        if not is_mounted(self.mountpoint):  # a crashed daemon's mount must not be stat()ed
            self.mountpoint.mkdir(exist_ok=True)
        self.apisock = root / f"{name}-api.sock"
        self.log_file = root / f"{name}.log"
        self.args = [
            sys.executable,
            "-m",
            "nydus_actors",
            "--mountpoint",
            str(self.mountpoint),
            "--apisock",
            str(self.apisock),
            "--log-file",
            str(self.log_file),
            "--log-level",
            "debug",
            *args,
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(self.args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._client: UdsHttpClient | None = None

    def wait_socket(self, timeout: float = 20) -> None:
        """Wait until the API socket accepts connections (a stale file may exist before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.apisock))
                except OSError:
                    pass
                else:
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.02)
        raise AssertionError("API socket did not appear")

    @property
    def client(self) -> UdsHttpClient:
        if self._client is None:
            self.wait_socket()
            self._client = UdsHttpClient(str(self.apisock), timeout=10)
        return self._client

    def request(self, method: str, path: str, body: object = None) -> tuple[int, dict, object]:
        raw = None if body is None else json.dumps(body).encode()
        status, headers, data = self.client.request(method, path, raw)
        return status, headers, (json.loads(data) if data else None)

    def state(self) -> str:
        return self.request("GET", "/api/v1/daemon")[2]["state"]

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def stop(self) -> None:
        """End the process (SIGTERM, then SIGKILL) and remove whatever it left."""
        if self._client is not None:
            self._client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        force_unmount(self.mountpoint)
        with contextlib.suppress(FileNotFoundError):
            self.apisock.unlink()


@pytest.fixture
def spawn(tmp_path: Path):
    """Start daemons; every one is stopped and unmounted when the test ends."""
    started: list[Daemon] = []

    def start(
        *args: str, env: dict[str, str] | None = None, name: str = "d", mountpoint: Path | None = None
    ) -> Daemon:
        daemon = Daemon(tmp_path, *args, env=env, name=name, mountpoint=mountpoint)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        # newest first: after a takeover the newest daemon serves the mount
        for daemon in reversed(started):
            daemon.stop()


@contextlib.contextmanager
def run_supervisor(path: Path):
    """`nydus-actors supervisor --sock PATH` as a subprocess, ended when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nydus_actors", "supervisor", "--sock", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    probe.shutdown(socket.SHUT_WR)  # a fetch the supervisor answers at once
                    break
                except OSError:
                    pass
            assert proc.poll() is None, "the supervisor exited"
            assert time.monotonic() < deadline, "the supervisor socket did not appear"
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
