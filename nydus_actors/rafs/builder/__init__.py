"""Build a Nydus RAFS v6 image (bootstrap + one blob) from a directory or an OCI layer tarball.

`build()` is the whole pipeline: read the source into a tree while chunking file data into the
blob, then lay out and write the bootstrap.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TextIO

from nydus_actors.rafs.builder import writer
from nydus_actors.rafs.builder.chunker import BlobWriter
from nydus_actors.rafs.builder.codec import COMPRESSORS, DIGESTERS
from nydus_actors.rafs.builder.errors import BuildError
from nydus_actors.rafs.builder.layer import load_tar
from nydus_actors.rafs.builder.progress import Progress
from nydus_actors.rafs.builder.source import load_directory

__all__ = ["DEFAULT_CHUNK_SIZE", "BuildError", "BuildResult", "build", "check_chunk_size"]

DEFAULT_CHUNK_SIZE = 0x100000
MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x1000000


@dataclass(frozen=True)
class BuildResult:
    bootstrap: str
    blob_id: str
    blob_path: str
    chunk_count: int
    #: blob file size (compressed chunk bytes) and its uncompressed space
    compressed_size: int
    uncompressed_size: int


def check_chunk_size(chunk_size: int) -> None:
    """Refuse a chunk size that is not a power of two in [4 KiB, 16 MiB]."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise BuildError(
            f"chunk size {chunk_size:#x} must be a power of two in [{MIN_CHUNK_SIZE:#x}, {MAX_CHUNK_SIZE:#x}]"
        )


def build(
    source: str | os.PathLike[str],
    bootstrap: str | os.PathLike[str],
    blob_dir: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compressor: str = "zstd",
    digester: str = "blake3",
    progress: TextIO | None = None,
) -> BuildResult:
    """Build `bootstrap` and `<blob_dir>/<blob id>` from `source` (directory or layer tarball).

    `progress` is the stream for a progress bar (drawn only if it is a terminal and the source
    large). Raises `BuildError` with a one-line message on any failure; no partial files remain.
    """
    source, bootstrap, blob_dir = os.fspath(source), os.fspath(bootstrap), os.fspath(blob_dir)
    check_chunk_size(chunk_size)
    if compressor not in COMPRESSORS:
        raise BuildError(f"unknown compressor {compressor!r} (choose from {', '.join(COMPRESSORS)})")
    if digester not in DIGESTERS:
        raise BuildError(f"unknown digester {digester!r} (choose from {', '.join(DIGESTERS)})")
    comp, dig = COMPRESSORS[compressor], DIGESTERS[digester]
    try:
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    except OSError as ex:
        raise BuildError(f"source {source}: {ex.strerror}") from None
    if not os.path.isdir(blob_dir):
        raise BuildError(f"blob directory {blob_dir}: not a directory")

    bar = Progress(progress)
    blobs = BlobWriter(blob_dir, chunk_size, comp, dig)
    try:
        root = load_directory(source, blobs, bar) if is_dir else load_tar(source, blobs, bar)
        blob = blobs.seal()
        data = writer.render(root, blob, chunk_size, comp, dig)
        blobs.commit(blob)
    except BaseException:
        blobs.abort()
        raise
    finally:
        bar.close()
    writer.write_file(bootstrap, data)
    return BuildResult(
        bootstrap, blob.blob_id, blob.path, len(blob.chunks), blob.compressed_size, blob.uncompressed_size
    )
