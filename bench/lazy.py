"""Lazy loading against a plain pull, in one run: time to first byte of an image served from a registry.

Content: one layer's worth (~1 GiB) of files: a 704 MiB and a 256 MiB file of distinct
random-looking 1 MiB chunks (cheap rotations of one random block, so neither gzip nor chunk
dedup shrinks them), ~2000 small random files and one small target file. It becomes both a
`.tar.gz` (`tar | gzip -1`) and a zstd RAFS image (`nydus_actors.rafs.builder.build`); both blobs
are pushed into a local docker-registry (plain HTTP on 127.0.0.1). Then:

  (c) plain pull: HTTP GET of the tarball from the registry (sha256 checked on the way, as a pull
      does) streamed into `tar -xzf` in a fresh directory, until tar is done;
  (a) lazy start: in a fresh daemon, from `POST /api/v1/mount?mountpoint=/img` (registry backend,
      blob cache in an empty work_dir) to the first byte of the target file read through the mount;
  (b) the target read again after dropping its page cache (served from the blob cache);
  cold sequential throughput: the 256 MiB file read with 1 MiB reads through a fresh mount with an
      empty cache (page cache dropped), every chunk fetched from the registry.

(a), (b) and the throughput get `--runs` fresh daemons, mountpoints and cache dirs each and report
medians, as does (c). Targets: (a)/(c) <= 1/20 and cold throughput >= 200 MB/s. Needs root,
/dev/fuse and docker-registry. Run from the repository root:

    .venv/bin/python bench/lazy.py [--runs 3] [--validate]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests` belongs to the checkout and is not installed

from nydus_actors._lib.uds_http import UdsHttpClient  # noqa: E402
from nydus_actors.rafs.builder import build  # noqa: E402
from tests.storage.servers import REGISTRY_BIN, Registry, registry_server  # noqa: E402

REPO = "library/lazy-bench"
MIB = 1 << 20
BIG_MIB, SEQ_MIB = 704, 256
SMALL_FILES = 2000
TARGET = "etc/target.conf"
SEQ = "data/seq.bin"


# -- content ---------------------------------------------------------------------------------------------


def make_tree(src: Path) -> None:
    """~1 GiB of files whose 1 MiB chunks are all distinct; written at disk speed, not urandom speed."""
    block = os.urandom(MIB)
    rotation = 0
    for name, mib in (("data/big.bin", BIG_MIB), (SEQ, SEQ_MIB)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        with open(src / name, "wb") as f:
            for _ in range(mib):
                rotation += 1  # one rotation per chunk across both files: no two chunks are equal
                f.write(block[rotation:] + block[:rotation])
    rng = random.Random(5)
    for i in range(SMALL_FILES):
        d = src / "usr" / f"lib{i // 200:02d}"
        if i % 200 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:04d}.so").write_bytes(rng.randbytes(rng.randint(200, 4000)))
    (src / TARGET).parent.mkdir(parents=True)
    (src / TARGET).write_bytes(b"listen = 0.0.0.0:8080\nworkers = 4\n" * 20)


def start_tarball(src: Path, out: Path) -> subprocess.Popen:
    """`tar | gzip -1` in the background, so it runs on the second core while the RAFS image builds."""
    with out.open("wb") as sink:
        tar = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
        gzip = subprocess.Popen(["gzip", "-1"], stdin=tar.stdout, stdout=sink)
    assert tar.stdout is not None
    tar.stdout.close()  # gzip holds the pipe now; tar gets SIGPIPE if gzip dies
    gzip.tar = tar  # type: ignore[attr-defined]
    return gzip


def finish_tarball(gzip: subprocess.Popen) -> None:
    tar = gzip.tar  # type: ignore[attr-defined]
    if tar.wait() != 0 or gzip.wait() != 0:
        raise SystemExit(f"tar | gzip failed: tar {tar.returncode}, gzip {gzip.returncode}")


# -- (c) plain pull ---------------------------------------------------------------------------------------


def plain_pull(registry: Registry, digest: str, dest: Path) -> float:
    """GET the tarball and untar it as it arrives; seconds until tar has written the last file."""
    dest.mkdir()
    url = f"{registry.url}/v2/{REPO}/blobs/{digest}"
    started = time.perf_counter()
    tar = subprocess.Popen(["tar", "-xzf", "-", "-C", str(dest)], stdin=subprocess.PIPE)
    assert tar.stdin is not None
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            while data := resp.read(MIB):
                sha.update(data)
                tar.stdin.write(data)
        tar.stdin.close()
        if tar.wait() != 0:
            raise SystemExit(f"tar -x failed with {tar.returncode}")
        elapsed = time.perf_counter() - started
    finally:
        if tar.poll() is None:  # a failed download: do not leave tar waiting on its stdin
            tar.kill()
            tar.wait()
    if "sha256:" + sha.hexdigest() != digest:
        raise SystemExit("plain pull: the tarball's digest does not match")
    return elapsed


# -- the daemon -------------------------------------------------------------------------------------------


class Daemon:
    """One `python -m nydus_actors` with an empty pseudo-root, its own mountpoint, socket and log."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        self.workdir = workdir
        self.mountpoint = workdir / "mnt"
        self.mountpoint.mkdir()
        self.apisock = workdir / "api.sock"
        self.log = workdir / "daemon.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nydus_actors", "--mountpoint", str(self.mountpoint),
                 "--apisock", str(self.apisock), "--log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        self.client: UdsHttpClient | None = None
        try:
            self._wait_socket()
        except BaseException:
            self.stop()
            raise
        self.client = UdsHttpClient(str(self.apisock), timeout=120)

    def _wait_socket(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}: {self.log.read_text()}")
            with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                probe.connect(str(self.apisock))
                return
            time.sleep(0.02)
        raise SystemExit("the daemon's API socket never appeared")

    def mount(self, bootstrap: str, config: str) -> None:
        assert self.client is not None
        body = json.dumps({"source": bootstrap, "fs_type": "rafs", "config": config}).encode()
        status, _, reply = self.client.request("POST", "/api/v1/mount?mountpoint=/img", body)
        if status != 204:
            raise SystemExit(f"mount failed: {status} {reply[:300]!r}")

    def stop(self) -> None:
        """SIGTERM by PID (it unmounts itself); lazily unmount whatever a dead daemon left."""
        if self.client is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == str(path) for line in f)


def registry_config(registry: Registry, work_dir: Path, validate: bool) -> str:
    """A v1 config as nydus-snapshotter writes it for a registry image with a blob cache."""
    backend = {"scheme": "http", "host": registry.host, "repo": REPO, "timeout": 30, "retry_limit": 2}
    return json.dumps(
        {
            "device": {
                "backend": {"type": "registry", "config": backend},
                "cache": {"type": "blobcache", "config": {"work_dir": str(work_dir)}},
            },
            "mode": "direct",
            "digest_validate": validate,
        }
    )


def read_dropped(fd: int, size: int) -> bytes:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, size, 0)


def lazy_start(daemon: Daemon, bootstrap: str, config: str, expected: bytes) -> tuple[float, float]:
    """(a) seconds from the mount request to the target's first byte, (b) seconds for a warm re-read."""
    started = time.perf_counter()
    daemon.mount(bootstrap, config)
    fd = os.open(daemon.mountpoint / "img" / TARGET, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        first = os.read(fd, 1)
        cold = time.perf_counter() - started
        if first + os.read(fd, len(expected)) != expected:
            raise SystemExit("lazy start: the target file read back wrong")
        started = time.perf_counter()
        again = read_dropped(fd, len(expected))
        warm = time.perf_counter() - started
    finally:
        os.close(fd)
    if again != expected:
        raise SystemExit("warm read: the target file read back wrong")
    return cold, warm


def sequential(path: Path) -> tuple[float, str]:
    """MB/s of 1 MiB reads of `path` with its page cache dropped, and the sha256 of what was read."""
    fd = os.open(path, os.O_RDONLY)
    sha = hashlib.sha256()
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total = 0
        started = time.perf_counter()
        while data := os.read(fd, MIB):
            total += len(data)
        elapsed = time.perf_counter() - started
        # Hash outside the timed loop, from a second pass, so hashing does not slow the measured one.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        while data := os.read(fd, MIB):
            sha.update(data)
    finally:
        os.close(fd)
    return total / elapsed / 1e6, sha.hexdigest()


# -- main -------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh daemons per measurement (medians)")
    parser.add_argument("--validate", action="store_true", help="mount with digest_validate (off by default)")
    args = parser.parse_args()
    if REGISTRY_BIN is None:
        raise SystemExit("docker-registry is missing (apt-get install docker-registry)")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("needs root and /dev/fuse")

    tmp = Path(tempfile.mkdtemp(prefix="lazy-bench-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    try:
        src = tmp / "src"
        began = time.perf_counter()
        make_tree(src)
        seq_sha = hashlib.sha256((src / SEQ).read_bytes()).hexdigest()
        target = (src / TARGET).read_bytes()
        gzip = start_tarball(src, tmp / "layer.tar.gz")
        (tmp / "blobs").mkdir()
        image = build(src, tmp / "image.boot", tmp / "blobs", compressor="zstd")
        finish_tarball(gzip)
        shutil.rmtree(src)
        tgz_size = (tmp / "layer.tar.gz").stat().st_size
        print(
            f"content: {BIG_MIB + SEQ_MIB} MiB in 2 files + {SMALL_FILES} small files + target; "
            f"tar.gz {tgz_size / MIB:.0f} MiB, RAFS blob {image.compressed_size / MIB:.0f} MiB "
            f"({image.chunk_count} chunks), built in {time.perf_counter() - began:.0f} s",
            flush=True,
        )

        with registry_server(tmp / "registry", "plain") as registry:
            began = time.perf_counter()
            tgz_digest = registry.push_blob(REPO, (tmp / "layer.tar.gz").read_bytes())
            registry.push_blob(REPO, Path(image.blob_path).read_bytes())
            (tmp / "layer.tar.gz").unlink()
            print(f"pushed both blobs to docker-registry in {time.perf_counter() - began:.0f} s", flush=True)

            pulls = []
            for run in range(args.runs):
                dest = tmp / f"pull-{run}"
                pulls.append(plain_pull(registry, tgz_digest, dest))
                shutil.rmtree(dest)

            starts, warms = [], []
            for run in range(args.runs):
                daemon = Daemon(tmp / f"lazy-{run}")
                daemons.append(daemon)
                config = registry_config(registry, daemon.workdir / "cache", args.validate)
                cold, warm = lazy_start(daemon, image.bootstrap, config, target)
                starts.append(cold)
                warms.append(warm)
                daemon.stop()

            rates = []
            for run in range(args.runs):
                daemon = Daemon(tmp / f"seq-{run}")
                daemons.append(daemon)
                config = registry_config(registry, daemon.workdir / "cache", args.validate)
                daemon.mount(image.bootstrap, config)
                rate, digest = sequential(daemon.mountpoint / "img" / SEQ)
                if digest != seq_sha:
                    raise SystemExit("cold sequential read: the 256 MiB file read back wrong")
                rates.append(rate)
                daemon.stop()

        a, b, c = statistics.median(starts), statistics.median(warms), statistics.median(pulls)
        rate = statistics.median(rates)
        print(f"medians of {args.runs} runs (digest_validate {str(args.validate).lower()}):")
        print(f"  (c) plain pull: GET + gunzip + untar of {tgz_size / MIB:.0f} MiB  {c * 1000:10.1f} ms")
        print(f"  (a) lazy: mount request -> first byte of the target {a * 1000:10.1f} ms")
        print(f"  (b) warm re-read of the target (blob cache)        {b * 1000:10.3f} ms")
        print(f"  cold sequential read, {SEQ_MIB} MiB through the registry {rate:8.1f} MB/s")
        print(f"  every run: (c) {fmt(pulls)} s; (a) {fmt(starts)} s; (b) {fmt(warms, 5)} s")
        print(f"             cold {fmt(rates, 1)} MB/s")
        print(f"  ratio (a)/(c) = {a / c:.4f} (1/{c / a:.0f}); target <= 1/20: {verdict(a / c <= 1 / 20)}")
        print(f"  cold throughput {rate:.1f} MB/s; target >= 200 MB/s: {verdict(rate >= 200)}")
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def fmt(values: list[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
