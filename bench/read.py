"""Read throughput of a RAFS image served by nydus-actors, against squashfuse, in one run.

Content: one 1 GiB file and a tree of 20k small files, built once into a RAFS
image (`nydus-actors image create`, uncompressed local blob) and into an
uncompressed squashfs image (`mksquashfs -noI -noD -noF -noX`). Each is
mounted (the daemon with `--bootstrap --localfs-dir`, `squashfuse`) and measured:
sequential 1 MiB reads of the big file with its page cache dropped before each
run, random 4 KiB read IOPS (cache dropped first), and a full `lstat` walk of the
tree with the dentry and inode caches dropped. Prints medians and the ratios
ours/squashfuse. Needs root, /dev/fuse, squashfs-tools and squashfuse.

    .venv/bin/python bench/read.py [--size-mib 1024] [--files 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
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


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def wait_mounted(path: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 60
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} was not mounted")
        time.sleep(0.05)


def make_content(root: Path, size_mib: int, files: int) -> None:
    root.mkdir()
    with open(root / "big.bin", "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size_mib):
            f.write(block[i % 251 :] + block[: i % 251])  # distinct chunks, cheap to make
    rng = random.Random(7)
    per_dir = 1000
    for i in range(files):
        d = root / "tree" / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}.txt").write_bytes(rng.randbytes(rng.randint(100, 4000)))


def sequential(path: Path, runs: int) -> float:
    rates = []
    size = path.stat().st_size
    for _ in range(runs):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        while os.read(fd, 1 << 20):
            pass
        rates.append(size / (time.perf_counter() - start) / 1e6)
        os.close(fd)
    return statistics.median(rates)


def random_iops(path: Path, runs: int, count: int = 5000) -> float:
    size = path.stat().st_size
    rng = random.Random(11)
    rates = []
    for _ in range(runs):
        offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        rates.append(count / (time.perf_counter() - start))
        os.close(fd)
    return statistics.median(rates)


def stat_walk(root: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        drop_caches()
        start = time.perf_counter()
        n = 0
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))
                n += 1
        times.append(n / (time.perf_counter() - start))
    return statistics.median(times)


def measure(name: str, mnt: Path, runs: int) -> dict[str, float]:
    result = {
        "seq MB/s": sequential(mnt / "big.bin", runs),
        "rand 4K IOPS": random_iops(mnt / "big.bin", runs),
        "stat walk entries/s": stat_walk(mnt / "tree", runs),
    }
    print(f"  {name:14s} " + "   ".join(f"{k} {v:10.1f}" for k, v in result.items()), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for tool in ("mksquashfs", "squashfuse"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install squashfs-tools squashfuse)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src, blobs, ours, theirs = tmp / "src", tmp / "blobs", tmp / "ours", tmp / "theirs"
        blobs.mkdir()
        ours.mkdir()
        theirs.mkdir()
        print(f"making {args.size_mib} MiB + {args.files} files ...", flush=True)
        make_content(src, args.size_mib, args.files)
        nydus = [sys.executable, "-m", "nydus_actors"]
        subprocess.run(
            [
                *nydus,
                "image",
                "create",
                "--bootstrap",
                str(tmp / "image.boot"),
                "--blob-dir",
                str(blobs),
                "--compressor",
                "none",
                str(src),
            ],
            check=True,
        )
        subprocess.run(
            ["mksquashfs", str(src), str(tmp / "image.sqfs"), "-noI", "-noD", "-noF", "-noX", "-quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(src)
        daemon = subprocess.Popen(
            [
                *nydus,
                "--bootstrap",
                str(tmp / "image.boot"),
                "--localfs-dir",
                str(blobs),
                "--mountpoint",
                str(ours),
                "--log-level",
                "warn",
            ],
            stderr=subprocess.PIPE,
        )
        squash = None
        try:
            wait_mounted(ours, daemon)
            squash = subprocess.Popen(["squashfuse", "-f", str(tmp / "image.sqfs"), str(theirs)])
            wait_mounted(theirs, squash)
            print(f"{args.runs} runs each, medians:")
            a = measure("nydus-actors", ours, args.runs)
            b = measure("squashfuse", theirs, args.runs)
            print("  ratio ours/squashfuse " + "   ".join(f"{k} {a[k] / b[k]:6.2f}x" for k in a))
            seq_ok = a["seq MB/s"] >= b["seq MB/s"]
            walk_ok = a["stat walk entries/s"] >= 0.5 * b["stat walk entries/s"]
            print(
                f"  targets: seq >= 1.0x: {'met' if seq_ok else 'NOT met'}; "
                f"stat walk >= 0.5x: {'met' if walk_ok else 'NOT met'}"
            )
        finally:
            if squash is not None:
                subprocess.run(["fusermount3", "-u", str(theirs)], check=False)
                squash.wait(timeout=30)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
