"""Prefetch planning: which chunks, merged into which requests."""

from __future__ import annotations

from pathlib import Path

from nydus_actors.rafs import ChunkInfo, RafsImage
from nydus_actors.rafs.builder import build
from nydus_actors.storage.prefetch import batches, chunks_of, files_to_nids

MIB = 1024 * 1024


def chunk(blob: int, offset: int, size: int, index: int = 0) -> ChunkInfo:
    return ChunkInfo(
        blob_index=blob,
        index=index,
        digest=b"",
        flags=1,
        compressed_offset=offset,
        compressed_size=size,
        uncompressed_offset=offset,
        uncompressed_size=size,
        file_offset=0,
    )


def test_adjacent_chunks_merge_up_to_the_batch_size() -> None:
    chunks = [chunk(0, i * MIB, MIB, i) for i in range(5)]
    assert [len(b) for b in batches(chunks, 2 * MIB)] == [2, 2, 1]
    assert [len(b) for b in batches(chunks, 8 * MIB)] == [5]
    assert [len(b) for b in batches(chunks, 1)] == [1] * 5


def test_blobs_and_far_chunks_do_not_merge() -> None:
    chunks = [chunk(0, 0, 100), chunk(1, 100, 100), chunk(1, 10 * MIB, 100)]
    assert [len(b) for b in batches(chunks, 64 * MIB)] == [1, 1, 1]


def test_files_and_directories_resolve_to_their_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "a").write_bytes(b"a" * (2 * MIB + 1))
    (src / "dir" / "sub" / "b").write_bytes(b"b" * 10)
    (src / "c").write_bytes(b"c" * 10)
    (tmp_path / "blobs").mkdir()
    result = build(src, tmp_path / "i.boot", tmp_path / "blobs", compressor="none")
    with RafsImage.open(str(result.bootstrap)) as image:
        nids = files_to_nids(image, ["/dir", "/missing", "/c"])
        assert len(nids) == 2
        only_dir = chunks_of(image, files_to_nids(image, ["/dir"]))
        everything = chunks_of(image, nids)
        assert len(everything) == len(only_dir) + 1
        offsets = [c.compressed_offset for c in everything]
        assert offsets == sorted(offsets)
