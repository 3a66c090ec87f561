"""Blob cache tests; shared here: a small RAFS image and a counting fake `fetch` over its blob file."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nydus_actors.rafs import LocalBlobSource, RafsImage
from nydus_actors.rafs.blobtable import BlobInfo
from nydus_actors.rafs.builder import build
from nydus_actors.rafs.chunks import ChunkInfo


@dataclass
class Built:
    image: RafsImage
    bootstrap: str
    blob: BlobInfo
    blob_path: str
    #: one ChunkInfo per chunk index, in index order
    chunks: list[ChunkInfo]
    #: chunk index -> uncompressed bytes, read and verified by the rafs reader
    expected: dict[int, bytes]
    #: file name -> content
    files: dict[str, bytes]


def build_image(
    root: Path,
    *,
    chunk_size: int = 0x10000,
    scale: int = 1,
    seed: int = 1,
    compressor: str = "zstd",
    digester: str = "blake3",
) -> Built:
    """Random (stored raw) and zero (compressed) chunks, a short tail and a duplicate file."""
    rnd = random.Random(seed)
    src, blobs = root / "src", root / "blobs"
    src.mkdir(parents=True)
    blobs.mkdir()
    files = {
        "random": rnd.randbytes(5 * chunk_size * scale + 123),
        "mixed": bytes(2 * chunk_size * scale) + rnd.randbytes(chunk_size * scale) + b"x" * 999,
        "small": b"hello cache\n",
    }
    files["copy"] = files["random"]
    for name, data in files.items():
        (src / name).write_bytes(data)
    result = build(
        src, root / "image.boot", blobs, chunk_size=chunk_size, compressor=compressor, digester=digester
    )
    image = RafsImage.open(result.bootstrap)
    [blob] = image.blobs
    chunks = sorted({c.index: c for c in image.chunks()}.values(), key=lambda c: c.index)
    assert [c.index for c in chunks] == list(range(blob.chunk_count))
    with LocalBlobSource(image, blob_files={blob.blob_id: result.blob_path}, validate=True) as local:
        expected = {c.index: local.read_chunk(c) for c in chunks}
    return Built(image, result.bootstrap, blob, result.blob_path, chunks, expected, files)


class Fetcher:
    """Returns raw chunk bytes from the blob file, counting calls per chunk index.

    `damage[index] = n` flips a byte of the next `n` fetches of that chunk; `error`, when
    set, is raised instead; `delay` holds each fetch that long (to let misses pile up).
    """

    def __init__(self, blob_path: str, *, delay: float = 0.0) -> None:
        self._fd = os.open(blob_path, os.O_RDONLY)
        self.delay = delay
        self.calls: Counter[int] = Counter()
        self.damage: dict[int, int] = {}
        self.error: Exception | None = None
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __call__(self, blob: BlobInfo, chunk: ChunkInfo) -> bytes:
        with self._lock:
            self.calls[chunk.index] += 1
            damaged = self.damage.get(chunk.index, 0) > 0
            if damaged:
                self.damage[chunk.index] -= 1
        if self.delay:
            time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        raw = os.pread(self._fd, chunk.compressed_size, chunk.compressed_offset)
        if damaged:
            raw = bytes([raw[0] ^ 0xFF]) + raw[1:]
        return raw

    def close(self) -> None:
        os.close(self._fd)
