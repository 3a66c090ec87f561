"""`nydus-actors ctl upgrade` (`upgrade.rehearsal`): command-line derivation, and real hot upgrades.

The mount tests run the ctl as a subprocess, as an operator would, against a passthrough daemon
started through the integration harness, while a reader process checks every byte through the
mount. The daemons the ctl starts are not the harness's: this module becomes their subreaper
while a test runs, so that it can end and reap them by pid.

A request the exiting daemon takes off /dev/fuse without answering waits for the next takeover's
FUSE_NOTIFY_RESEND (a daemon bug this module does not own): when the reader is left waiting after
the last upgrade, a third upgrade must free it, and the test is then an expected failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_actors import ctl
from nydus_actors._lib.uds_http import UdsHttpClient
from nydus_actors.upgrade import rehearsal
from tests.integration.harness import force_unmount, is_mounted, needs_fuse, run_supervisor, spawn  # noqa: F401

READER = Path(__file__).resolve().parents[1] / "integration" / "reader.py"
PR_SET_CHILD_SUBREAPER = 36
STEP_LABELS = list(rehearsal.STEPS.values())


# ---------------------------------------------------------------------------------------------------------
# Without a mount


@pytest.mark.parametrize(
    ("cmdline", "args"),
    [
        (["/venv/bin/python3", "-m", "nydus_actors", "--id", "x"], ["--id", "x"]),
        (["python", "-X", "dev", "-u", "-mnydus_actors", "fuse", "-A", "a"], ["fuse", "-A", "a"]),
        (["/usr/bin/python3", "/venv/bin/nydusd", "--apisock", "s"], ["--apisock", "s"]),
        (["/usr/local/bin/nydusd", "fuse", "--id", "y"], ["fuse", "--id", "y"]),
    ],
)
def test_daemon_args_from_command_lines(cmdline: list[str], args: list[str]) -> None:
    assert rehearsal.daemon_args(cmdline) == args


@pytest.mark.parametrize(
    "cmdline",
    [[], ["python", "-m", "http.server"], ["python", "-c", "pass"], ["python", "/srv/other.py", "-A", "s"]],
)
def test_daemon_args_refuses_other_programs(cmdline: list[str]) -> None:
    with pytest.raises(ValueError, match="command line"):
        rehearsal.daemon_args(cmdline)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--apisock", "/r/old", "--id", "x"], ["--apisock", "/r/new", "--id", "x", "--upgrade"]),
        (["--id", "x", "--apisock=/r/old"], ["--id", "x", "--apisock", "/r/new", "--upgrade"]),
        (["-A", "/r/old", "--upgrade"], ["--apisock", "/r/new", "--upgrade"]),
        (["-A/r/old", "-l", "info", "-A=/r/x"], ["--apisock", "/r/new", "-l", "info", "--upgrade"]),
        (["--id", "x"], ["--id", "x", "--apisock", "/r/new", "--upgrade"]),
    ],
)
def test_upgrade_args_replace_the_socket_and_add_upgrade(args: list[str], expected: list[str]) -> None:
    assert rehearsal.upgrade_args(args, "/r/new") == expected


def test_find_option_forms() -> None:
    args = ["-L", "a.log", "--log-file=b.log", "-Lc.log", "--log-level", "x", "--", "-L", "d"]
    assert [value for _, _, value in rehearsal.find_option(args, "--log-file", "-L")] == [
        "a.log",
        "b.log",
        "c.log",
    ]


def test_default_new_sock_numbers_from_the_base_name(tmp_path: Path) -> None:
    old = str(tmp_path / "api.sock")
    assert rehearsal.default_new_sock(old) == f"{old}.1"
    (tmp_path / "api.sock.1").touch()
    assert rehearsal.default_new_sock(old) == f"{old}.2"
    # upgrading the upgraded daemon goes on counting instead of growing the name
    assert rehearsal.default_new_sock(f"{old}.1") == f"{old}.2"
    (tmp_path / "api.sock.2").touch()
    assert rehearsal.default_new_sock(f"{old}.2") == f"{old}.3"


def test_peer_pid_names_the_listening_process(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        assert rehearsal.peer_pid(path) == os.getpid()
        assert rehearsal.is_listening(path)
    assert not rehearsal.is_listening(path)


def test_process_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert not rehearsal.process_gone(os.getpid())
    deadline = time.monotonic() + 10
    while not rehearsal.process_gone(proc.pid):  # a zombie counts as gone
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.wait()
    assert rehearsal.process_gone(proc.pid)


def test_ctl_upgrade_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "api.sock")
    assert ctl.main(["--sock", sock, "upgrade"]) == 2
    assert "--supervisor" in capsys.readouterr().err
    assert ctl.main(["--sock", sock, "upgrade", "--supervisor", "s", "--daemon-cmd", "'unclosed"]) == 2
    assert "--daemon-cmd" in capsys.readouterr().err


def test_ctl_upgrade_of_an_unreachable_daemon_fails_at_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "api.sock")
    assert ctl.main(["--sock", sock, "upgrade", "--supervisor", str(tmp_path / "sup.sock")]) == 1
    out, err = capsys.readouterr()
    assert re.search(
        rf"check old daemon\s+[\d.]+ ms  FAILED: cannot connect to {re.escape(sock)}: No such file", out
    )
    assert err.startswith(f"error: upgrade failed at step check (check old daemon): cannot connect to {sock}")


# ---------------------------------------------------------------------------------------------------------
# Real mounts


class Orphans:
    """Daemons `ctl upgrade` started: the ctl exits, so they become this process's children."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def track(self, pid: int) -> None:
        if pid not in self.pids:
            self.pids.append(pid)

    def reap(self, pid: int, timeout: float = 20) -> int:
        """Wait for `pid` to exit; return its exit status and forget it (its pid may be reused)."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                with contextlib.suppress(ValueError):
                    self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, f"pid {pid} did not exit"
            time.sleep(0.01)

    def end_all(self) -> None:
        """SIGTERM the newest (it serves, and unmounts on SIGTERM), SIGKILL the rest, reap all."""
        for i, pid in enumerate(reversed(self.pids)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if i == 0 else signal.SIGKILL)
        for pid in list(self.pids):
            try:
                self.reap(pid, timeout=15)
            except ChildProcessError:
                self.pids.remove(pid)  # not ours after all: someone else reaped it
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
                self.reap(pid, timeout=5)


@pytest.fixture
def orphans() -> Iterator[Orphans]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    tracked = Orphans()
    try:
        yield tracked
    finally:
        try:
            tracked.end_all()
        finally:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class CheckingReader:
    """tests/integration/reader.py looping over the mount, checking every byte, until `finish`."""

    def __init__(self, tmp_path: Path, files: dict[str, str], held: str, held_dir: str) -> None:
        spec = tmp_path / "reader.json"
        spec.write_text(json.dumps({"files": files, "held": held, "dir": held_dir}))
        self.result, self.stop = tmp_path / "reader-result.json", tmp_path / "reader-stop"
        self.proc = subprocess.Popen(
            [sys.executable, str(READER), str(spec), str(self.result), str(self.stop)]
        )

    def finish(self, timeout: float) -> dict | None:
        """Ask it to stop; return its counts, or None while it is still busy after `timeout`."""
        self.stop.touch()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return json.loads(self.result.read_text())

    def end(self, timeout: float = 5) -> None:
        # A request a daemon already took is waited for even through SIGKILL: the reader ends
        # only once the connection goes away with the daemons and the supervisor.
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)


def make_tree(tmp_path: Path) -> Path:
    rnd = random.Random(7)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(5):
        (tree / f"f{i}.bin").write_bytes(rnd.randbytes(rnd.randint(1000, 400_000)))
    (tree / "sub" / "nested.txt").write_text("nested\n" * 500)
    return tree


def digests(mnt: Path, tree: Path) -> dict[str, str]:
    return {
        str(mnt / p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tree.rglob("*"))
        if p.is_file()
    }


def assert_serves(files: dict[str, str]) -> None:
    for path, sha in files.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha, path


def daemon_state(sock: str) -> str:
    with UdsHttpClient(sock, timeout=10) as client:
        status, _, data = client.request("GET", "/api/v1/daemon")
    assert status == 200
    return json.loads(data)["state"]


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    # The new daemon writes to a file of its own, never to these pipes, so run() returns.
    return subprocess.run(
        [sys.executable, "-m", "nydus_actors", "ctl", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def start_daemon(spawn, tmp_path: Path, sup: Path, tree: Path):  # noqa: F811 - the fixture
    (tmp_path / "mnt").mkdir()
    daemon = spawn(
        "--id", "rh1", "--supervisor", str(sup), "--shared-dir", str(tree), mountpoint=tmp_path / "mnt"
    )
    assert daemon.state() == "RUNNING"
    return daemon


@needs_fuse
@pytest.mark.mount
def test_ctl_upgrade_twice_keeps_the_mount_serving(
    spawn,  # noqa: F811 - the fixture
    orphans: Orphans,
    tmp_path: Path,
) -> None:
    sup = tmp_path / "supervisor.sock"
    tree = make_tree(tmp_path)
    reader: CheckingReader | None = None
    try:
        with run_supervisor(sup):
            try:
                first = start_daemon(spawn, tmp_path, sup, tree)
                files = digests(first.mountpoint, tree)
                held = next(iter(files))
                old_sock, old_pid = str(first.apisock), first.proc.pid
                reader = CheckingReader(tmp_path, files, held, str(first.mountpoint / "sub"))
                time.sleep(0.2)
                for n in (1, 2):
                    done = run_ctl("--sock", old_sock, "upgrade", "--supervisor", str(sup))
                    new_sock = f"{first.apisock}.{n}"
                    if os.path.exists(new_sock) and rehearsal.is_listening(new_sock):
                        orphans.track(rehearsal.peer_pid(new_sock))  # before any assertion can fail
                    assert done.returncode == 0, done.stdout + done.stderr
                    lines = done.stdout.splitlines()
                    steps = [line.split("  ")[1] for line in lines if line.startswith("  ")]
                    assert [s.strip() for s in steps] == STEP_LABELS, done.stdout
                    assert all(re.search(r"\d+\.\d ms", line) for line in lines if line.startswith("  "))
                    new_pid = rehearsal.peer_pid(new_sock)
                    assert (
                        f"upgraded daemon rh1: pid {old_pid} -> pid {new_pid}, {old_sock} -> {new_sock}"
                        in done.stdout
                    )
                    assert re.search(r"total [\d.]+ ms; read stall bound .* [\d.]+ ms", done.stdout)
                    assert daemon_state(new_sock) == "RUNNING"
                    # the old daemon exited 0 and left the mount in place
                    if n == 1:
                        assert first.wait_exit(timeout=10) == 0
                    else:
                        assert orphans.reap(old_pid) == 0
                    assert rehearsal.process_gone(old_pid)
                    assert not os.path.exists(old_sock)
                    assert is_mounted(first.mountpoint)
                    assert_serves(files)
                    old_sock, old_pid = new_sock, new_pid
                time.sleep(0.2)
                outcome = reader.finish(timeout=10)
                # the reader stops by itself: no request through the mount stayed unanswered
                assert outcome is not None, "a request through the mount stayed unanswered after the upgrades"
                assert outcome["errors"] == 0, outcome["messages"]
                assert outcome["wrong"] == 0, outcome["messages"]
                assert outcome["reads"] > 20
            finally:
                if reader is not None:
                    reader.end()
                orphans.end_all()
                force_unmount(tmp_path / "mnt")
    finally:
        if reader is not None:
            reader.end(timeout=15)  # the connection is gone now, whatever it waited for
    assert not is_mounted(tmp_path / "mnt")


@needs_fuse
@pytest.mark.mount
def test_ctl_upgrade_with_the_wrong_supervisor_changes_nothing(
    spawn,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    sup = tmp_path / "supervisor.sock"
    tree = make_tree(tmp_path)
    with run_supervisor(sup):
        try:
            daemon = start_daemon(spawn, tmp_path, sup, tree)
            files = digests(daemon.mountpoint, tree)
            done = run_ctl(
                "--sock", str(daemon.apisock), "upgrade", "--supervisor", str(tmp_path / "other.sock")
            )
            assert done.returncode == 1, done.stdout + done.stderr
            assert re.search(
                r"check old daemon\s+[\d.]+ ms  FAILED: the old daemon's supervisor is", done.stdout
            )
            assert "error: upgrade failed at step check" in done.stderr
            assert "sendfd" not in done.stdout  # nothing after the check ran
            assert not os.path.lexists(f"{daemon.apisock}.1")
            assert daemon.proc.poll() is None
            assert daemon.state() == "RUNNING"
            assert_serves(files)
        finally:
            daemon.stop()
            force_unmount(tmp_path / "mnt")


@needs_fuse
@pytest.mark.mount
def test_ctl_upgrade_kills_a_new_daemon_that_cannot_take_over(
    spawn,  # noqa: F811 - the fixture
    orphans: Orphans,
    tmp_path: Path,
) -> None:
    sup = tmp_path / "supervisor.sock"
    tree = make_tree(tmp_path)
    with run_supervisor(sup):
        try:
            daemon = start_daemon(spawn, tmp_path, sup, tree)
            files = digests(daemon.mountpoint, tree)
            # Another id: it would fetch another daemon's state, so the check after INIT refuses it.
            wrong = [
                sys.executable, "-m", "nydus_actors", "--mountpoint", str(daemon.mountpoint),
                "--id", "someone-else", "--supervisor", str(sup), "--log-file", str(tmp_path / "wrong.log"),
            ]  # fmt: skip
            done = run_ctl(
                "--sock",
                str(daemon.apisock),
                "upgrade",
                "--supervisor",
                str(sup),
                "--daemon-cmd",
                shlex.join(wrong),
            )
            match = re.search(r"killed the new daemon \(pid (\d+)\)", done.stdout)
            if match and not rehearsal.process_gone(int(match.group(1))):
                orphans.track(int(match.group(1)))  # the kill failed: it is ours to end now
            assert done.returncode == 1, done.stdout + done.stderr
            assert re.search(
                r"wait INIT\s+[\d.]+ ms  FAILED: the new daemon's id is someone-else", done.stdout
            )
            assert match, done.stdout
            assert rehearsal.process_gone(int(match.group(1)))
            assert not os.path.lexists(f"{daemon.apisock}.1")  # its stale socket file went with it
            assert "waiting in INIT for a takeover" in (tmp_path / "wrong.log").read_text()
            assert daemon.state() == "RUNNING"
            assert_serves(files)
        finally:
            orphans.end_all()
            daemon.stop()
            force_unmount(tmp_path / "mnt")
