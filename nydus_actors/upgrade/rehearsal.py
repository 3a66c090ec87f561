"""Hot upgrade of a running daemon, step by step, the way nydus-snapshotter drives it (reference §5.7).

`hot_upgrade` moves the FUSE connection of a RUNNING daemon to a new daemon process: the old
daemon hands its state and /dev/fuse fd to the supervisor (sendfd), a new daemon started with
`--upgrade` and its own API socket takes them over (INIT -> READY), the old daemon exits without
unmounting, and the new one starts serving (RUNNING). Each step is timed. From the moment the old
daemon is asked to exit until the new one is RUNNING nobody reads /dev/fuse, so that window bounds
how long a read through the mount can stall.

If a step fails before the old daemon was asked to exit, the new daemon is killed and the old one
keeps serving as if nothing happened. `nydus-actors ctl upgrade` and `bench/takeover.py` use this.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from nydus_actors._lib.uds_http import DEFAULT_TIMEOUT, UdsHttpClient

#: How `python -m` runs the daemon, and the names its entry points are installed under.
DAEMON_MODULE = "nydus_actors"
DAEMON_PROGRAMS = frozenset({"nydusd", "nydus-actors"})
#: A new daemon has to start an interpreter, import everything and open its API socket.
START_TIMEOUT = 30.0
#: How long a state change may take to show in `GET /api/v1/daemon`.
STATE_TIMEOUT = 10.0
#: State polls are this close together because the stall window is what is being measured
#: (the snapshotter polls every 100 ms).
POLL_INTERVAL = 0.002

#: Step keys of the returned durations, in order, with the labels printed for them.
STEPS: dict[str, str] = {
    "check": "check old daemon",
    "sendfd": "sendfd",
    "spawn": "spawn new daemon",
    "init": "wait INIT",
    "takeover": "takeover",
    "ready": "wait READY",
    "exit_old": "exit old daemon",
    "start": "start new daemon",
    "running": "wait RUNNING",
}

# Options of the Python interpreter that take a separate value (`python -X dev -m nydus_actors`).
_INTERPRETER_OPTIONS_WITH_VALUE = frozenset({"-X", "-W", "--check-hash-based-pycs"})


class UpgradeFailed(Exception):
    """A step of the hot upgrade failed.

    Attributes:
        step: The key of the failed step (see `STEPS`).
        error: What went wrong.
        durations: Milliseconds of the steps that finished before it.
    """

    def __init__(self, step: str, error: str, durations: dict[str, float]) -> None:
        super().__init__(f"step {step} failed: {error}")
        self.step = step
        self.error = error
        self.durations = durations


class _Failure(Exception):
    """A failed check inside a step; its message is the whole explanation."""


# ---------------------------------------------------------------------------------------------------------
# The daemon's process and command line


def peer_pid(sock_path: str, timeout: float = 5.0) -> int:
    """Return the pid of the process listening on the unix socket `sock_path`.

    SO_PEERCRED of a connected stream socket names the process that called listen(),
    which is the daemon whatever wrapper started it or whatever the pid file says.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


def read_cmdline(pid: int) -> list[str]:
    """Return the command line of process `pid` from /proc."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"process {pid} has no command line (exited?)")
    return [os.fsdecode(arg) for arg in raw.rstrip(b"\0").split(b"\0")]


def daemon_args(cmdline: Sequence[str]) -> list[str]:
    """Return the daemon's own arguments from its full command line.

    Understands `python [OPTIONS] -m nydus_actors ARGS`, `python [OPTIONS] /path/nydusd ARGS`
    (an installed entry point run through its interpreter, which is what /proc shows for a
    script with a shebang) and `nydusd ARGS`.

    Raises:
        ValueError: The command line runs something else.
    """
    if not cmdline:
        raise ValueError("empty command line")
    if os.path.basename(cmdline[0]) in DAEMON_PROGRAMS:
        return list(cmdline[1:])
    i = 1
    while i < len(cmdline):
        arg = cmdline[i]
        if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
            module, rest = (
                (cmdline[i + 1], i + 2) if arg == "-m" and i + 1 < len(cmdline) else (arg[2:], i + 1)
            )
            if module == DAEMON_MODULE:
                return list(cmdline[rest:])
            break
        if arg in _INTERPRETER_OPTIONS_WITH_VALUE:
            i += 2
        elif arg.startswith("-") and arg != "-":
            i += 1
        else:
            if os.path.basename(arg) in DAEMON_PROGRAMS:
                return list(cmdline[i + 1 :])
            break
    raise ValueError(f"not a nydus-actors daemon command line: {shlex.join(cmdline)}")


def find_option(args: Sequence[str], long: str, short: str | None = None) -> list[tuple[int, int, str]]:
    """Find every `--long V`, `--long=V`, `-S V` and `-SV` in `args`.

    Returns:
        ``(index, number of arguments, value)`` for each occurrence, in order.
    """
    found = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if arg in (long, short) and i + 1 < len(args):
            found.append((i, 2, args[i + 1]))
            i += 2
            continue
        if arg.startswith(long + "="):
            found.append((i, 1, arg[len(long) + 1 :]))
        elif short and arg.startswith(short) and not arg.startswith("--") and len(arg) > len(short):
            # argparse reads `-A=PATH` as PATH, clap too
            found.append((i, 1, arg[len(short) :].removeprefix("=")))
        i += 1
    return found


def replace_option(args: Sequence[str], long: str, short: str | None, value: str) -> list[str]:
    """Return `args` with every occurrence of the option replaced by one `long value`.

    The option goes where it was first found, or at the end if it was not there.
    """
    found = find_option(args, long, short)
    result = list(args)
    for index, count, _ in reversed(found):
        del result[index : index + count]
    at = found[0][0] if found else len(result)
    result[at:at] = [long, value]
    return result


def upgrade_args(args: Sequence[str], new_sock: str) -> list[str]:
    """The arguments of the new daemon: the old ones with `--apisock new_sock` and `--upgrade`."""
    result = replace_option(args, "--apisock", "-A", new_sock)
    if "--upgrade" not in result:
        result.append("--upgrade")
    return result


def default_new_sock(old_sock: str) -> str:
    """The first free `OLD_SOCK.N` (N = 1, 2, ...), after dropping a numeric suffix of OLD_SOCK.

    Dropping the suffix makes a chain of upgrades go api.sock -> api.sock.1 -> api.sock.2
    instead of growing the name each time.
    """
    base = re.sub(r"\.\d+$", "", old_sock)
    n = 1
    while True:
        candidate = f"{base}.{n}"
        if candidate != old_sock and not os.path.lexists(candidate):
            return candidate
        n += 1


def is_listening(sock_path: str) -> bool:
    """Tell whether a process accepts connections on the unix socket `sock_path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(sock_path)
        except OSError:
            return False
    return True


def process_gone(pid: int) -> bool:
    """Tell whether `pid` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state follows the parenthesized command name, which may itself contain ")".
    return stat[stat.rfind(")") + 2 :][:1] in ("Z", "X")


class _ExitWatch:
    """Notices the exit of a process that is not necessarily our child.

    A pidfd, taken while the process is known to be the daemon, cannot be fooled by pid
    reuse; /proc polling is the fallback on kernels before 5.3.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1
        self._gone = False
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
        except (AttributeError, OSError):
            pass

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the exit; tell whether it happened."""
        if self._gone:
            return True
        if self._fd >= 0:
            self._gone = bool(select.select([self._fd], [], [], timeout)[0])
            return self._gone
        deadline = time.monotonic() + timeout
        while not process_gone(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        self._gone = True
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---------------------------------------------------------------------------------------------------------
# The daemons' API


def _reply_message(status: int, data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return f"{status} {text}".rstrip()
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return f"{status} {doc['message']}"
    return f"{status} {text}"


class _Api:
    """The requests the upgrade makes to one daemon."""

    def __init__(self, sock_path: str, timeout: float) -> None:
        self.sock_path = sock_path
        self._client = UdsHttpClient(sock_path, timeout=timeout)

    def info(self) -> dict[str, Any]:
        status, _, data = self._client.request("GET", "/api/v1/daemon")
        if status != 200:
            raise _Failure(f"GET /api/v1/daemon on {self.sock_path}: {_reply_message(status, data)}")
        try:
            doc = json.loads(data)
        except ValueError as ex:
            raise _Failure(f"GET /api/v1/daemon on {self.sock_path}: not JSON: {ex}") from None
        if not isinstance(doc, dict):
            raise _Failure(f"GET /api/v1/daemon on {self.sock_path}: not an object: {doc!r}")
        return doc

    def put(self, path: str) -> None:
        status, _, data = self._client.request("PUT", path)
        if not 200 <= status < 300:
            raise _Failure(f"PUT {path} on {self.sock_path}: {_reply_message(status, data)}")

    def wait_state(self, want: str, timeout: float, *, allowed: Sequence[str] = ()) -> None:
        """Poll until the daemon reports `want`; any state not in `allowed` fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.info().get("state")
            if state == want:
                return
            if state not in allowed:
                raise _Failure(f"{self.sock_path} is {state}, expected {want}")
            if time.monotonic() >= deadline:
                raise _Failure(f"{self.sock_path} still {state} after {timeout:.0f} s, expected {want}")
            time.sleep(POLL_INTERVAL)

    def close(self) -> None:
        self._client.close()


def _describe(ex: BaseException) -> str:
    if isinstance(ex, _Failure):
        return str(ex)
    if isinstance(ex, OSError) and ex.strerror:
        where = f" ({ex.filename})" if ex.filename else ""
        return f"{type(ex).__name__}: {ex.strerror}{where}"
    if isinstance(ex, http.client.HTTPException):
        return f"invalid HTTP reply: {ex!r}"
    return f"{type(ex).__name__}: {ex}"


def _same_path(a: str, b: str, base: str | None = None) -> bool:
    def resolve(path: str) -> str:
        return os.path.realpath(os.path.join(base, path) if base else path)

    return os.path.normpath(a) == os.path.normpath(b) or resolve(a) == resolve(b)


def _tail(stream: IO[bytes] | None, limit: int = 2000) -> str:
    if stream is None:
        return ""
    try:
        stream.flush()
        size = stream.seek(0, os.SEEK_END)
        stream.seek(max(0, size - limit))
        return stream.read().decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------
# The sequence


def hot_upgrade(
    old_sock: str,
    supervisor: str,
    new_cmd: Sequence[str] | None,
    new_sock: str | None,
    *,
    log: Callable[[str], object] = print,
    timeout: float = DEFAULT_TIMEOUT,
    start_timeout: float = START_TIMEOUT,
    on_spawn: Callable[[subprocess.Popen], object] | None = None,
) -> dict[str, float]:
    """Hot-upgrade the RUNNING daemon on `old_sock` to a new daemon process.

    Args:
        old_sock: API socket of the running daemon.
        supervisor: The supervisor socket the daemon must have been started with.
        new_cmd: Command of the new daemon, or None for this interpreter running
            ``-m nydus_actors`` with the old daemon's arguments (from /proc, in its working
            directory). `--apisock` and `--upgrade` are added when missing.
        new_sock: API socket of the new daemon; None for the `--apisock` of `new_cmd`,
            else `default_new_sock(old_sock)`.
        log: Receives one line per step and a summary.
        timeout: Seconds allowed per API request and for the old daemon to exit.
        start_timeout: Seconds allowed for the new daemon to open its API socket.
        on_spawn: Called with the new daemon's `Popen` as soon as it is started, so that a
            caller can reap it later; the process is in its own session and outlives us.

    Returns:
        Milliseconds per step (keys of `STEPS`), ``total``, and ``stall_bound``: from the
        exit request to the old daemon until the new one reported RUNNING.

    Raises:
        UpgradeFailed: A step failed (already logged). If the old daemon had not been told to
            exit, the new daemon was killed and the old one still serves.
    """
    upgrade = _Upgrade(
        old_sock,
        supervisor,
        new_cmd,
        new_sock,
        log=log,
        timeout=timeout,
        start_timeout=start_timeout,
        on_spawn=on_spawn,
    )
    return upgrade.run()


class _Upgrade:
    """One hot upgrade: the steps, and what a failure has to undo."""

    def __init__(
        self,
        old_sock: str,
        supervisor: str,
        new_cmd: Sequence[str] | None,
        new_sock: str | None,
        *,
        log: Callable[[str], object],
        timeout: float,
        start_timeout: float,
        on_spawn: Callable[[subprocess.Popen], object] | None,
    ) -> None:
        self.old_sock = os.path.abspath(old_sock)
        self.supervisor = os.path.abspath(supervisor)
        self.given_cmd = list(new_cmd) if new_cmd is not None else None
        self.new_sock = os.path.abspath(new_sock) if new_sock else None
        self.log = log
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.on_spawn = on_spawn
        self.durations: dict[str, float] = {}
        self.marks: dict[str, tuple[float, float]] = {}
        self.old_api = _Api(self.old_sock, timeout)
        self.new_api: _Api | None = None
        self.old_pid = 0
        self.old_id = ""
        self.old_supervisor = ""
        self.old_cwd: str | None = None
        self.old_exit: _ExitWatch | None = None
        self.cmd: list[str] = []
        self.cwd: str | None = None
        self.proc: subprocess.Popen | None = None
        self.output: IO[bytes] | None = None
        self.output_path: str | None = None
        self.old_told_to_exit = False

    def run(self) -> dict[str, float]:
        begun = time.monotonic()
        self.log(f"hot upgrade of the daemon on {self.old_sock} (supervisor {self.supervisor})")
        try:
            self._check()
            self._sendfd()
            self._spawn()
            self._wait_init()
            self._takeover()
            self._exit_old()
            self._start()
        except BaseException:
            # Ctrl-C included: a half-started new daemon must not outlive a cancelled upgrade.
            self._undo()
            raise
        finally:
            self.old_api.close()
            if self.new_api is not None:
                self.new_api.close()
            if self.old_exit is not None:
                self.old_exit.close()
            if self.output is not None:
                self.output.close()
        self.durations["total"] = (time.monotonic() - begun) * 1000
        self.durations["stall_bound"] = (self.marks["running"][1] - self.marks["exit_old"][0]) * 1000
        assert self.proc is not None
        self.log(
            f"upgraded daemon {self.old_id}: pid {self.old_pid} -> pid {self.proc.pid}, "
            f"{self.old_sock} -> {self.new_sock}"
        )
        if self.output_path:
            self.log(f"the new daemon logs to {self.output_path} (the old one had no --log-file)")
        self.log(
            f"total {self.durations['total']:.1f} ms; read stall bound (old daemon's exit -> "
            f"new daemon RUNNING) {self.durations['stall_bound']:.1f} ms"
        )
        return dict(self.durations)

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[list[str]]:
        """Time a step and print it; turn any error into `UpgradeFailed`."""
        label = STEPS[name]
        started = time.monotonic()
        detail: list[str] = []
        try:
            yield detail
        except Exception as ex:
            elapsed = (time.monotonic() - started) * 1000
            error = _describe(ex)
            self.log(f"  {label:<18}{elapsed:9.1f} ms  FAILED: {error}")
            raise UpgradeFailed(name, error, dict(self.durations)) from ex
        ended = time.monotonic()
        self.marks[name] = (started, ended)
        self.durations[name] = (ended - started) * 1000
        self.log(f"  {label:<18}{self.durations[name]:9.1f} ms  {', '.join(detail)}".rstrip())

    # -- steps ---------------------------------------------------------------------------------------------

    def _check(self) -> None:
        with self._step("check") as detail:
            try:
                self.old_pid = peer_pid(self.old_sock)
            except OSError as ex:
                raise _Failure(f"cannot connect to {self.old_sock}: {ex.strerror or ex}") from None
            with contextlib.suppress(OSError):
                self.old_cwd = os.readlink(f"/proc/{self.old_pid}/cwd")
            info = self.old_api.info()
            ident, supervisor, state = info.get("id"), info.get("supervisor"), info.get("state")
            if not ident:
                raise _Failure("the old daemon has no --id: a hot upgrade needs --id and --supervisor")
            if not supervisor or not _same_path(supervisor, self.supervisor, self.old_cwd):
                raise _Failure(f"the old daemon's supervisor is {supervisor}, not {self.supervisor}")
            if state != "RUNNING":
                raise _Failure(f"the old daemon is {state}, not RUNNING")
            self.old_id, self.old_supervisor = ident, supervisor
            # Taken now, while the pid is known to be the daemon: the exit is awaited later.
            self.old_exit = _ExitWatch(self.old_pid)
            self.cmd, self.cwd = self._new_command()
            assert self.new_sock is not None
            if self.new_sock == self.old_sock:
                raise _Failure("the new daemon needs an API socket of its own, not the old one's")
            if is_listening(self.new_sock):
                raise _Failure(f"another process is listening on {self.new_sock}")
            detail.append(f"daemon {ident}, pid {self.old_pid}, RUNNING")

    def _new_command(self) -> tuple[list[str], str | None]:
        """The new daemon's command and working directory; settles `self.new_sock`."""
        if self.given_cmd is None:
            try:
                args = daemon_args(read_cmdline(self.old_pid))
            except (OSError, ValueError) as ex:
                raise _Failure(
                    f"cannot reuse the old daemon's command line ({ex}); give --daemon-cmd"
                ) from None
            self.new_sock = self.new_sock or default_new_sock(self.old_sock)
            # The old daemon's relative paths are relative to its own working directory.
            return [sys.executable, "-m", DAEMON_MODULE, *upgrade_args(args, self.new_sock)], self.old_cwd
        if not self.given_cmd:
            raise _Failure("the new daemon's command is empty")
        found = find_option(self.given_cmd, "--apisock", "-A")
        if found:
            theirs = os.path.abspath(found[-1][2])
            if self.new_sock and self.new_sock != theirs:
                raise _Failure(
                    f"the daemon command's --apisock is {theirs}, but the new socket is {self.new_sock}"
                )
            self.new_sock = theirs
        else:
            self.new_sock = self.new_sock or default_new_sock(self.old_sock)
        return upgrade_args(self.given_cmd, self.new_sock), None

    def _sendfd(self) -> None:
        with self._step("sendfd"):
            self.old_api.put("/api/v1/daemon/fuse/sendfd")

    def _spawn(self) -> None:
        with self._step("spawn") as detail:
            assert self.new_sock is not None
            if find_option(self.cmd, "--log-file", "-L"):
                # Only start-up errors land here (the log goes to the file): kept unlinked, shown on failure.
                self.output = tempfile.TemporaryFile(prefix="nydus-actors-upgrade-")  # noqa: SIM115 - run() closes it
            else:
                # The daemon logs to stderr, so that is its log: keep it where it can be read.
                fd, self.output_path = tempfile.mkstemp(prefix=f"nydus-actors-{self.old_id}-", suffix=".log")
                self.output = os.fdopen(fd, "w+b")
            # Its own session: a Ctrl-C or hangup aimed at this command must not reach the daemon.
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=self.output,
                stderr=self.output,
                start_new_session=True,
            )
            if self.on_spawn is not None:
                self.on_spawn(self.proc)
            deadline = time.monotonic() + self.start_timeout
            while not is_listening(self.new_sock):
                code = self.proc.poll()
                if code is not None:
                    raise _Failure(f"the new daemon exited with status {code}: {_tail(self.output)}")
                if time.monotonic() >= deadline:
                    raise _Failure(f"{self.new_sock} did not appear within {self.start_timeout:.0f} s")
                time.sleep(POLL_INTERVAL)
            self.new_api = _Api(self.new_sock, self.timeout)
            detail.append(f"pid {self.proc.pid}, {self.new_sock}")

    def _wait_init(self) -> None:
        with self._step("init") as detail:
            assert self.new_api is not None
            self.new_api.wait_state("INIT", STATE_TIMEOUT)
            info = self.new_api.info()
            base = self.cwd or os.getcwd()
            # A different id or supervisor would fetch another daemon's state, or none.
            if info.get("id") != self.old_id:
                raise _Failure(f"the new daemon's id is {info.get('id')}, not {self.old_id}")
            theirs = info.get("supervisor") or ""
            if not _same_path(theirs, self.old_supervisor, base) and not _same_path(
                theirs, self.supervisor, base
            ):
                raise _Failure(f"the new daemon's supervisor is {theirs or None}, not {self.supervisor}")
            detail.append("INIT")

    def _takeover(self) -> None:
        assert self.new_api is not None
        with self._step("takeover"):
            self.new_api.put("/api/v1/daemon/fuse/takeover")
        with self._step("ready"):
            self.new_api.wait_state("READY", STATE_TIMEOUT, allowed=("INIT",))

    def _exit_old(self) -> None:
        assert self.old_exit is not None
        with self._step("exit_old") as detail:
            # Set first: if the request times out the old daemon may still have acted on it.
            self.old_told_to_exit = True
            self.old_api.put("/api/v1/daemon/exit")
            if not self.old_exit.wait(self.timeout):
                raise _Failure(
                    f"the old daemon (pid {self.old_pid}) did not exit within {self.timeout:.0f} s"
                )
            detail.append(f"pid {self.old_pid} exited")

    def _start(self) -> None:
        assert self.new_api is not None
        with self._step("start"):
            self.new_api.put("/api/v1/daemon/start")
        with self._step("running") as detail:
            self.new_api.wait_state("RUNNING", STATE_TIMEOUT, allowed=("READY",))
            detail.append("RUNNING")

    # -- failure -------------------------------------------------------------------------------------------

    def _old_still_serving(self) -> bool:
        if self.old_exit is None or self.old_exit.wait(0):
            return False
        try:
            return self.old_api.info().get("state") == "RUNNING"
        except (OSError, http.client.HTTPException, _Failure):
            return False

    def _undo(self) -> None:
        """After a failed step: keep the old daemon serving, and the new one only if it must serve."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self.old_told_to_exit and not self._old_still_serving():
                # The old daemon no longer serves: the new one holds the connection and is the
                # mount's only chance; killing it would leave every read hanging.
                self.log(
                    f"  the new daemon (pid {proc.pid}) is left running: the old daemon was told to exit; "
                    f"finish with `nydus-actors ctl --sock {self.new_sock} start`"
                )
                return
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            self.log(
                f"  killed the new daemon (pid {proc.pid}); the old daemon (pid {self.old_pid}) keeps serving"
            )
        # A killed daemon leaves its socket file; nobody listens there now.
        if self.new_sock and os.path.lexists(self.new_sock) and not is_listening(self.new_sock):
            with contextlib.suppress(OSError):
                os.unlink(self.new_sock)
        if self.output_path:
            with contextlib.suppress(OSError):
                os.unlink(self.output_path)
