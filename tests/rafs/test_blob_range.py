"""`LocalBlobSource.read_range`: in-place reads of uncompressed chunks, whole reads otherwise."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nydus_actors.rafs import LocalBlobSource, RafsError, RafsImage, read_file
from nydus_actors.rafs.builder import build


def make_image(tmp_path: Path, compressor: str):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 777)
    (src / "f").write_bytes(data)
    (tmp_path / "blobs").mkdir()
    result = build(src, tmp_path / "i.boot", tmp_path / "blobs", compressor=compressor)
    img = RafsImage.open(str(result.bootstrap))
    return img, img.lookup(img.root_nid, b"f"), data, result.blob_path


@pytest.mark.parametrize("compressor", ["none", "zstd"])
@pytest.mark.parametrize("validate", [False, True])
def test_ranges_equal_the_file(tmp_path: Path, compressor: str, validate: bool) -> None:
    img, nid, data, blob = make_image(tmp_path, compressor)
    rnd = random.Random(9)
    with LocalBlobSource(img, blob_files={img.blobs[0].blob_id: str(blob)}, validate=validate) as source:
        for _ in range(200):
            off = rnd.randrange(0, len(data))
            size = rnd.choice([1, 4096, 131072, 2 * 1024 * 1024])
            assert read_file(img, nid, off, size, source) == data[off : off + size]


def test_first_read_of_an_uncompressed_chunk_is_verified(tmp_path: Path) -> None:
    img, nid, data, blob = make_image(tmp_path, "none")
    damaged = tmp_path / "damaged"
    raw = bytearray(Path(blob).read_bytes())
    raw[1024 * 1024 + 10] ^= 0xFF  # inside the second chunk
    damaged.write_bytes(bytes(raw))
    files = {img.blobs[0].blob_id: str(damaged)}
    with LocalBlobSource(img, blob_files=files, validate=True) as source:
        assert read_file(img, nid, 0, 4096, source) == data[:4096]
        with pytest.raises(RafsError, match="digest mismatch"):
            read_file(img, nid, 1024 * 1024, 4096, source)
    with LocalBlobSource(img, blob_files=files, validate=False) as source:
        assert read_file(img, nid, 1024 * 1024 + 10, 1, source) != data[1024 * 1024 + 10 : 1024 * 1024 + 11]
    assert os.path.getsize(damaged) == os.path.getsize(blob)
