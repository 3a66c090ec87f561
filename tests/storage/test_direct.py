"""DirectChunkSource: chunks from a backend on every miss (cache type "" / dummycache)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nydus_actors.rafs import RafsError, RafsImage, read_file
from nydus_actors.rafs.builder import build
from nydus_actors.storage.direct import DirectChunkSource

MIB = 1024 * 1024


@pytest.fixture
def image(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(4).randbytes(3 * MIB + 17)
    (src / "f").write_bytes(data)
    (tmp_path / "blobs").mkdir()
    result = build(src, tmp_path / "i.boot", tmp_path / "blobs", compressor="zstd")
    with RafsImage.open(str(result.bootstrap)) as img:
        yield img, img.lookup(img.root_nid, b"f"), data, Path(result.blob_path).read_bytes()


def test_reads_fetch_each_chunk_once_while_recent(image) -> None:
    img, nid, data, blob = image
    fetched: list[int] = []

    def fetch(blob_info, chunk) -> bytes:
        fetched.append(chunk.index)
        return blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]

    source = DirectChunkSource(img.blobs, fetch, validate=True)
    for off in range(0, len(data), 128 * 1024):
        assert read_file(img, nid, off, 128 * 1024, source) == data[off : off + 128 * 1024]
    assert sorted(fetched) == sorted({c.index for c in img.chunks()})
    source.close()


def test_digest_mismatch_is_an_error_and_reported(image) -> None:
    img, nid, _, blob = image
    errors: list[str] = []

    def fetch(blob_info, chunk) -> bytes:
        raw = bytearray(blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size])
        raw[-1] ^= 0xFF
        return bytes(raw)

    source = DirectChunkSource(img.blobs, fetch, validate=True, on_error=errors.append)
    with pytest.raises(RafsError):
        read_file(img, nid, 0, 10, source)
    assert errors and img.blobs[0].blob_id in errors[0]
