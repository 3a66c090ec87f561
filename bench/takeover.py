"""Read stall of hot upgrades and failovers, measured by a reader that never stops reading.

A passthrough daemon serves a small tree of a temporary directory (`--shared-dir`) with
`--id`/`--supervisor`, next to the `nydus-actors supervisor` program. A reader process loops
over the files through the mount: 4 KiB preads at random offsets, with O_DIRECT so that every
read reaches the daemon instead of the page cache, each one timed (start and end on the system's
monotonic clock, which this process shares) and checked against the tree's bytes.

Failovers (first, so that each new daemon has the original command line and detects the crash):
SIGKILL the serving daemon, start the same command line at once, takeover, start, sendfd. The
stall is from the kill to the end of the first read answered after the killed process was gone.

Hot upgrades: `upgrade.rehearsal.hot_upgrade`, as `nydus-actors ctl upgrade` runs it. The stall
is the longest read latency overlapping the upgrade call. Also shown: the control plane's bound
(exit request to the old daemon -> new daemon RUNNING) and the step durations.

Targets: upgrade stall p99 <= 50 ms; failover stall <= 1 s (every run). Needs root and /dev/fuse.

    .venv/bin/python bench/takeover.py [--upgrades 100] [--failovers 20]
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import itertools
import json
import math
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nydus_actors._lib.uds_http import UdsHttpClient  # noqa: E402 - after the path is set
from nydus_actors.upgrade import rehearsal  # noqa: E402

BLOCK = 4096
FILES = 6
FILE_SIZE = 1 << 20
UPGRADE_TARGET_MS = 50.0
FAILOVER_TARGET_MS = 1000.0
PAUSE = 0.2  # reads between switches, so that every stall stands alone


# ---------------------------------------------------------------------------------------------------------
# The reader (a separate process: `takeover.py --reader SPEC`)


def reader_main(spec_path: str) -> int:
    """Read until the stop file exists; write timestamps and counts to the spec's outputs."""
    spec = json.loads(Path(spec_path).read_text())
    expected = [Path(p).read_bytes() for p in spec["sources"]]
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in spec["files"]]
    # O_DIRECT wants an aligned buffer; an anonymous mapping is page-aligned.
    buf = mmap.mmap(-1, BLOCK)
    view = memoryview(buf)
    rnd = random.Random(1)
    starts, ends = array.array("d"), array.array("d")
    counts = {"reads": 0, "wrong": 0, "errors": 0, "messages": []}
    stop, ready = spec["stop"], spec["ready"]
    i = 0
    while True:
        if i % 64 == 0 and os.path.exists(stop):
            break
        if i == 200:
            Path(ready).touch()
        n = i % len(fds)
        offset = rnd.randrange(len(expected[n]) // BLOCK) * BLOCK
        started = time.monotonic()
        try:
            got = os.preadv(fds[n], [view], offset)
        except OSError as ex:
            ended = time.monotonic()
            counts["errors"] += 1
            if len(counts["messages"]) < 20:
                counts["messages"].append(f"{spec['files'][n]}@{offset}: {ex}")
        else:
            ended = time.monotonic()
            if view[:got] != expected[n][offset : offset + BLOCK]:
                counts["wrong"] += 1
        starts.append(started)
        ends.append(ended)
        counts["reads"] += 1
        i += 1
    for fd in fds:
        os.close(fd)
    view.release()
    buf.close()
    with open(spec["times"], "wb") as f:
        starts.tofile(f)
        ends.tofile(f)
    Path(spec["counts"]).write_text(json.dumps(counts))
    return 0


def load_times(path: Path) -> tuple[array.array, array.array]:
    values = array.array("d")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    half = len(values) // 2
    return values[:half], values[half:]


# ---------------------------------------------------------------------------------------------------------
# Processes


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def wait_listening(sock: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not rehearsal.is_listening(sock):
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.pid} ({proc.args[3:5]}...) exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{sock} did not appear")
        time.sleep(0.005)


def api(sock: str, method: str, path: str) -> dict | None:
    with UdsHttpClient(sock, timeout=30) as client:
        status, _, data = client.request(method, path)
    if status >= 300:
        raise SystemExit(f"{method} {path} on {sock}: {status} {data.decode(errors='replace')}")
    return json.loads(data) if data else None


def wait_state(sock: str, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (state := api(sock, "GET", "/api/v1/daemon")["state"]) != want:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise SystemExit(f"{sock} is {state}, expected {want}")
        time.sleep(0.002)


class Processes:
    """Every process the bench starts, so that `finally` can end each by pid."""

    def __init__(self) -> None:
        self.daemons: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []

    def daemon(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.daemons.append(proc)
        return proc

    def reap(self) -> None:
        """Collect daemons that exited (hot upgrades leave one behind each time)."""
        self.daemons = [p for p in self.daemons if p.poll() is None]

    def end_all(self, serving: subprocess.Popen | None) -> None:
        """End every process by pid: daemons first, then the supervisor that holds their fd."""
        # The serving daemon gets SIGTERM so that it unmounts; the others serve nothing.
        for proc in self.daemons:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is serving else signal.SIGKILL)
        for proc in self.daemons:
            _wait_or_kill(proc)
        for proc in self.others:
            if proc.poll() is None:
                proc.terminate()
            _wait_or_kill(proc)


def _wait_or_kill(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# Figures


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def longest_overlapping(starts: array.array, ends: array.array, begin: float, end: float) -> int | None:
    """The index of the longest read among reads that overlap [begin, end].

    One reader thread: starts and ends both ascend, so the overlapping reads are one slice.
    """
    first, last = bisect.bisect_right(ends, begin), bisect.bisect_left(starts, end)
    return max(range(first, last), key=lambda i: ends[i] - starts[i], default=None)


def step_at(moment: float, begin: float, durations: dict[str, float]) -> str:
    """The upgrade step running at `moment`; the steps ran back to back from `begin`."""
    elapsed = (moment - begin) * 1000
    if elapsed < 0:
        return "before"
    for key in rehearsal.STEPS:
        elapsed -= durations[key]
        if elapsed < 0:
            return key
    return "after"


def first_answer_after(ends: array.array, moment: float) -> float | None:
    index = bisect.bisect_right(ends, moment)
    return ends[index] if index < len(ends) else None


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---------------------------------------------------------------------------------------------------------
# The runs


def make_tree(tree: Path) -> list[Path]:
    tree.mkdir()
    rnd = random.Random(5)
    paths = []
    for i in range(FILES):
        path = tree / f"f{i}.bin"
        path.write_bytes(rnd.randbytes(FILE_SIZE))
        paths.append(path)
    return paths


def failover(
    procs: Processes, serving: subprocess.Popen, cmd: list[str], sock: str, log: Path
) -> tuple[subprocess.Popen, float, float]:
    """Kill the serving daemon and bring up its successor; return it, the kill and death times."""
    killed_at = time.monotonic()
    serving.kill()
    serving.wait(timeout=10)
    dead_at = time.monotonic()
    new = procs.daemon(cmd, log)
    wait_listening(sock, new)
    wait_state(sock, "INIT")
    api(sock, "PUT", "/api/v1/daemon/fuse/takeover")
    api(sock, "PUT", "/api/v1/daemon/start")
    wait_state(sock, "RUNNING")
    api(sock, "PUT", "/api/v1/daemon/fuse/sendfd")  # the snapshotter's SendStates after a start
    procs.reap()
    return new, killed_at, dead_at


def run(upgrades: int, failovers: int, work: Path) -> int:
    tree = work / "tree"
    sources = make_tree(tree)
    mnt, sup, sock0, log = work / "mnt", work / "supervisor.sock", str(work / "api.sock"), work / "daemon.log"
    mnt.mkdir()
    procs = Processes()
    serving: subprocess.Popen | None = None
    reader: subprocess.Popen | None = None
    spec = {
        "files": [str(mnt / p.name) for p in sources],
        "sources": [str(p) for p in sources],
        "stop": str(work / "reader-stop"),
        "ready": str(work / "reader-ready"),
        "times": str(work / "reader-times.bin"),
        "counts": str(work / "reader-counts.json"),
    }
    cmd = [
        sys.executable, "-m", "nydus_actors", "--mountpoint", str(mnt), "--apisock", sock0,
        "--log-file", str(log), "--log-level", "info", "--id", "bench", "--supervisor", str(sup),
        "--shared-dir", str(tree),
    ]  # fmt: skip
    try:
        with open(work / "supervisor.log", "wb") as out:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "nydus_actors", "supervisor", "--sock", str(sup)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        procs.others.append(supervisor)
        wait_listening(str(sup), supervisor)
        serving = procs.daemon(cmd, work / "daemon.out")
        wait_listening(sock0, serving)
        wait_state(sock0, "RUNNING")
        api(sock0, "PUT", "/api/v1/daemon/fuse/sendfd")

        (work / "reader.json").write_text(json.dumps(spec))
        reader = subprocess.Popen([sys.executable, __file__, "--reader", str(work / "reader.json")])
        procs.others.append(reader)
        deadline = time.monotonic() + 30
        while not os.path.exists(spec["ready"]):
            if reader.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the reader did not start reading")
            time.sleep(0.01)
        time.sleep(PAUSE)

        kills: list[tuple[float, float]] = []
        print(f"{failovers} failovers, then {upgrades} hot upgrades, under the reader", file=sys.stderr)
        for _ in range(failovers):
            serving, killed_at, dead_at = failover(procs, serving, cmd, sock0, work / "daemon.out")
            kills.append((killed_at, dead_at))
            time.sleep(PAUSE)

        windows: list[tuple[float, float]] = []
        steps: list[dict[str, float]] = []
        old_sock = sock0
        for _ in range(upgrades):
            new_sock = rehearsal.default_new_sock(old_sock)
            spawned: list[subprocess.Popen] = []
            lines: list[str] = []

            def started(proc: subprocess.Popen, spawned: list[subprocess.Popen] = spawned) -> None:
                spawned.append(proc)
                procs.daemons.append(proc)  # at once: a failed upgrade may leave it running

            begin = time.monotonic()
            try:
                durations = rehearsal.hot_upgrade(
                    old_sock, str(sup), None, new_sock, log=lines.append, on_spawn=started
                )
            except rehearsal.UpgradeFailed:
                print("\n".join(lines), file=sys.stderr)
                raise
            windows.append((begin, time.monotonic()))
            steps.append(durations)
            serving, old_sock = spawned[0], new_sock
            procs.reap()
            time.sleep(PAUSE)

        Path(spec["stop"]).touch()
        reader.wait(timeout=60)
        counts = json.loads(Path(spec["counts"]).read_text())
        starts, ends = load_times(Path(spec["times"]))
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()  # it may be waiting on a mount nobody serves
        procs.end_all(serving)
        for _ in range(5):
            if not is_mounted(mnt):
                break
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
            time.sleep(0.1)

    report(counts=counts, starts=starts, ends=ends, windows=windows, steps=steps, kills=kills)
    return 0


def report(
    *,
    counts: dict,
    starts: array.array,
    ends: array.array,
    windows: list[tuple[float, float]],
    steps: list[dict[str, float]],
    kills: list[tuple[float, float]],
) -> None:
    elapsed = ends[-1] - starts[0] if len(ends) else 0.0
    latencies = sorted((e - s) * 1000 for s, e in zip(starts, ends, strict=True))
    print(
        f"reader: {counts['reads']} reads of 4 KiB (O_DIRECT) in {elapsed:.0f} s, "
        f"{counts['errors']} errors, {counts['wrong']} wrong; "
        f"latency p50 {percentile(latencies, 50):.3f} ms, p99 {percentile(latencies, 99):.3f} ms"
    )
    for message in counts["messages"]:
        print(f"  {message}")
    if windows:
        stalls, spans = [], collections.Counter()
        for (begin, end), durations in zip(windows, steps, strict=True):
            i = longest_overlapping(starts, ends, begin, end)
            stalls.append(0.0 if i is None else (ends[i] - starts[i]) * 1000)
            if i is not None:
                first, last = step_at(starts[i], begin, durations), step_at(ends[i], begin, durations)
                spans[first if first == last else f"{first}..{last}"] += 1
        # A read still unanswered when the next upgrade begins was taken off /dev/fuse and dropped by
        # the exiting daemon; only the next takeover's FUSE_NOTIFY_RESEND brings it back.
        stranded = set()
        for (_, end), (next_begin, _) in itertools.pairwise(windows):
            i = longest_overlapping(starts, ends, end - 1e-3, end)
            if i is not None and ends[i] > next_begin:
                stranded.add(i)
        bounds = [s["stall_bound"] for s in steps]
        p99 = percentile(stalls, 99)
        print(f"\nhot upgrade x {len(windows)} (rehearsal.hot_upgrade):")
        print(
            f"  read stall (longest read overlapping each upgrade): p50 {percentile(stalls, 50):.1f} ms, "
            f"p99 {p99:.1f} ms, max {max(stalls):.1f} ms"
        )
        print(
            f"  stall bound (exit request to old -> new RUNNING):    p50 {percentile(bounds, 50):.1f} ms, "
            f"p99 {percentile(bounds, 99):.1f} ms, max {max(bounds):.1f} ms"
        )
        print("  step medians: " + ", ".join(
            f"{key} {statistics.median(s[key] for s in steps):.1f}" for key in [*rehearsal.STEPS, "total"]
        ) + " (ms)")  # fmt: skip
        print("  steps the longest read of each upgrade spanned: " + ", ".join(
            f"{span} x{count}" for span, count in spans.most_common()
        ))  # fmt: skip
        print(
            f"  reads left unanswered by an upgrade until the next one's takeover: {len(stranded)} "
            f"of {len(windows) - 1} upgrades"
        )
        worst = sorted(range(len(stalls)), key=stalls.__getitem__)[-3:][::-1]
        print("  worst: " + "; ".join(
            f"#{n + 1} {stalls[n]:.1f} ms (bound {bounds[n]:.1f}, spawn {steps[n]['spawn']:.0f}, "
            f"exit_old {steps[n]['exit_old']:.1f})"
            for n in worst
        ))  # fmt: skip
        print(
            f"  target: upgrade stall p99 <= {UPGRADE_TARGET_MS:.0f} ms: {verdict(p99 <= UPGRADE_TARGET_MS)}"
        )
    if kills:
        stalls = []
        for killed_at, dead_at in kills:
            answered = first_answer_after(ends, dead_at)
            stalls.append(math.inf if answered is None else (answered - killed_at) * 1000)
        worst = max(stalls)
        print(f"\nfailover x {len(kills)} (SIGKILL, same command line, takeover, start):")
        print(
            f"  read stall (kill -> first read answered after it): p50 {percentile(stalls, 50):.1f} ms, "
            f"max {worst:.1f} ms"
        )
        print(
            f"  target: failover stall <= {FAILOVER_TARGET_MS:.0f} ms: {verdict(worst <= FAILOVER_TARGET_MS)}"
        )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--reader":
        return reader_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=100)
    parser.add_argument("--failovers", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("needs root and /dev/fuse")
    work = Path(tempfile.mkdtemp(prefix="nydus-takeover-"))
    try:
        return run(args.upgrades, args.failovers, work)
    finally:
        if is_mounted(work / "mnt"):
            print(f"warning: {work / 'mnt'} is still mounted; {work} left in place", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
