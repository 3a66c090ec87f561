"""Crash safety: a process filling the cache is SIGKILLed at random moments; every chunk marked ready
must then hold exactly its bytes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nydus_actors.storage.cache import CachedBlob
from nydus_actors.storage.cache.blob_file import data_path, map_path
from nydus_actors.storage.cache.chunk_map import HEADER, MAGIC, VERSION
from tests.storage.cache import Built, build_image

REPO = Path(__file__).resolve().parents[3]

#: Fills the cache of the image from several threads, in an order set by the seed.
CHILD = """
import os, random, sys, threading
boot, blob_path, work, seed = sys.argv[1:5]
from nydus_actors.rafs import RafsImage
from nydus_actors.storage.cache import BlobCacheRegistry, CachedChunkSource

image = RafsImage.open(boot)
chunks = list({c.index: c for c in image.chunks()}.values())
random.Random(int(seed)).shuffle(chunks)
fd = os.open(blob_path, os.O_RDONLY)

def fetch(blob, chunk):
    return os.pread(fd, chunk.compressed_size, chunk.compressed_offset)

print("go", flush=True)
source = CachedChunkSource(image.blobs, work, fetch, validate=True, registry=BlobCacheRegistry(work))

def fill(part):
    for chunk in part:
        source.read_chunk(chunk)

threads = [threading.Thread(target=fill, args=(chunks[n::4],)) for n in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(tmp_path_factory.mktemp("image"), chunk_size=0x4000, scale=80)


def run_child(built: Built, work: str, seed: int, kill_after: float | None) -> tuple[bool, float]:
    """Run the filler; SIGKILL it `kill_after` seconds after it starts work. Returns (finished, work time)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, built.bootstrap, built.blob_path, work, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline() == b"go\n", proc.stderr.read().decode()
        started = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            # The child is not reaped before wait(), so this pid is still the one we started.
            proc.kill()
        out = proc.stdout.read()
        proc.wait(timeout=30)
        elapsed = time.perf_counter() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    finished = out == b"done\n"
    if kill_after is None:
        assert finished and proc.returncode == 0, stderr
    elif not finished:
        # (A kill that lands after "done", during interpreter shutdown, may leave either code.)
        assert proc.returncode == -9, stderr
    return finished, elapsed


def ready_in_file(built: Built, work: str) -> set[int]:
    """The bits of the map file as left on disk, if it is a map this version would read."""
    try:
        raw = Path(map_path(work, built.blob.blob_id)).read_bytes()
    except FileNotFoundError:
        return set()
    count = built.blob.chunk_count
    if len(raw) != HEADER.size + (count + 7) // 8 or HEADER.unpack_from(raw) != (MAGIC, VERSION, count):
        return set()
    bits = raw[HEADER.size :]
    return {i for i in range(count) if bits[i >> 3] & (1 << (i & 7))}


def check_cache(built: Built, work: str) -> int:
    """Assert every ready chunk holds its bytes, on disk and after reopening; return how many are ready."""
    on_disk = ready_in_file(built, work)
    if on_disk:
        with open(data_path(work, built.blob.blob_id), "rb") as data:
            for index in on_disk:
                chunk = built.chunks[index]
                data.seek(chunk.uncompressed_offset)
                assert data.read(chunk.uncompressed_size) == built.expected[index], f"chunk {index}"
    cached = CachedBlob(work, built.blob, built.blob.chunk_count)
    try:
        ready = [c for c in built.chunks if cached.is_ready(c)]
        for chunk in ready:
            assert cached.read(chunk, 0, chunk.uncompressed_size) == built.expected[chunk.index]
        # Reopening may only forget chunks, never add any.
        assert {c.index for c in ready} <= on_disk
        return len(ready)
    finally:
        cached.close()


def test_sigkill_never_leaves_a_ready_bit_over_wrong_bytes(built: Built, tmp_path: Path) -> None:
    count = built.blob.chunk_count
    assert count > 200
    finished, work_time = run_child(built, str(tmp_path / "calibrate"), 0, None)
    assert finished and check_cache(built, str(tmp_path / "calibrate")) == count
    rnd = random.Random(int.from_bytes(os.urandom(4)))
    partial = 0
    for round_ in range(6):
        work = str(tmp_path / f"round{round_}")
        ready = 0
        for _ in range(3):
            # Kill anywhere from before the cache files exist to about the end of the work left.
            window = work_time * (1 - ready / count)
            finished, _ = run_child(built, work, rnd.randrange(1000), rnd.uniform(0, 1.05 * window))
            now = check_cache(built, work)
            # A SIGKILL loses no page-cache write, so no mark is ever lost either.
            assert now >= ready
            partial += 0 < now < count
            ready = now
        run_child(built, work, round_, None)
        assert check_cache(built, work) == count
    # Most kills land while chunks are being stored; make sure some did.
    assert partial >= 3, f"only {partial} kills landed mid-fill (work time {work_time:.3f}s)"
