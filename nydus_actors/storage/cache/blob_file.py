"""One blob's cache: uncompressed chunks at their uncompressed offsets in a sparse file, plus its ChunkMap.

Files: `<work_dir>/<blob_id>.blob.data` and `<work_dir>/<blob_id>.chunk_map`.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from concurrent.futures import Future

from nydus_actors.rafs.blobtable import BlobInfo
from nydus_actors.rafs.chunks import ChunkInfo
from nydus_actors.rafs.errors import RafsError
from nydus_actors.storage.cache.chunk_map import ChunkMap

DATA_SUFFIX = ".blob.data"
MAP_SUFFIX = ".chunk_map"
#: A blob id becomes a file name in the work directory, so it must not be able to leave it.
_BLOB_ID = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")

#: What a chunk fill resolves to: the uncompressed bytes and whether their digest was checked.
FillResult = tuple[bytes, bool]


def check_blob_id(blob_id: str) -> None:
    """Refuse a blob id that cannot safely name a cache file."""
    if not _BLOB_ID.fullmatch(blob_id):
        raise RafsError(f"blob id {blob_id!r} cannot name a cache file")


def data_path(work_dir: str, blob_id: str) -> str:
    return os.path.join(work_dir, blob_id + DATA_SUFFIX)


def map_path(work_dir: str, blob_id: str) -> str:
    return os.path.join(work_dir, blob_id + MAP_SUFFIX)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CachedBlob:
    """The cache file and ready map of one blob id, shared by every image that uses the blob.

    Chunks are keyed by `ChunkInfo.index`, their position in the blob. `read` is lock-free;
    `store` may run in several threads at once. It also holds the blob's in-flight fills, so
    that concurrent misses for one chunk, from any image, fetch it once.
    """

    def __init__(self, work_dir: str, blob: BlobInfo, chunk_count: int) -> None:
        check_blob_id(blob.blob_id)
        self.blob_id = blob.blob_id
        self.chunk_count = chunk_count
        self.size = blob.uncompressed_size
        self.data_path = data_path(work_dir, blob.blob_id)
        self.map_path = map_path(work_dir, blob.blob_id)
        self._inflight: dict[int, Future[FillResult]] = {}
        self._inflight_lock = threading.Lock()
        self._write_lock = threading.Lock()
        # Chunks whose cached bytes passed a digest check in this process (one bit each). A
        # validating image checks the others on their first hit: another image, or another
        # daemon, may have filled them without checking.
        self._verified = bytearray((chunk_count + 7) // 8)
        self._verified_lock = threading.Lock()
        try:
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as ex:
            raise RafsError(f"failed to open cache file {self.data_path}: {ex.strerror}") from ex
        try:
            if os.fstat(self._fd).st_size != self.size:
                # A new or resized data file cannot back any bit of an old map. The map goes
                # first, durably: resizing first and crashing would leave bits over lost bytes.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.map_path)
                _fsync_dir(work_dir)
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, self.size)
            self.map = ChunkMap(self.map_path, chunk_count)
        except OSError as ex:
            os.close(self._fd)
            raise RafsError(f"failed to set up the cache of blob {self.blob_id}: {ex.strerror}") from ex
        except BaseException:
            os.close(self._fd)
            raise

    def check(self, chunk: ChunkInfo) -> None:
        """Refuse a chunk that does not fit this blob's map and cache file."""
        if not 0 <= chunk.index < self.chunk_count:
            raise RafsError(f"chunk {chunk.index} outside blob {self.blob_id} of {self.chunk_count} chunks")
        if chunk.uncompressed_offset + chunk.uncompressed_size > self.size:
            raise RafsError(
                f"chunk {chunk.index} at {chunk.uncompressed_offset}+{chunk.uncompressed_size} lies past "
                f"the uncompressed end of blob {self.blob_id} ({self.size} bytes)"
            )

    def is_ready(self, chunk: ChunkInfo) -> bool:
        """Whether `chunk` is in the cache file."""
        return 0 <= chunk.index < self.chunk_count and self.map.is_ready(chunk.index)

    def is_verified(self, chunk: ChunkInfo) -> bool:
        """Whether the cached bytes of `chunk` passed a digest check since this process opened them."""
        return bool(self._verified[chunk.index >> 3] & (1 << (chunk.index & 7)))

    def mark_verified(self, chunk: ChunkInfo) -> None:
        """Record that the cached bytes of a ready `chunk` match its digest."""
        with self._verified_lock:  # a read-modify-write of one byte shared with other chunks
            self._verified[chunk.index >> 3] |= 1 << (chunk.index & 7)

    def read(self, chunk: ChunkInfo, skip: int, length: int) -> bytes | None:
        """Return `length` cached bytes of `chunk` from `skip`, or None if the chunk is not ready."""
        if not self.is_ready(chunk):
            return None
        data = os.pread(self._fd, length, chunk.uncompressed_offset + skip)
        if len(data) != length:
            raise RafsError(f"short read of chunk {chunk.index} from cache file {self.data_path}")
        return data

    def store(self, chunk: ChunkInfo, data: bytes, *, replace: bool = False) -> bool:
        """Write the uncompressed `data` of `chunk`, make it durable, then mark it ready.

        Returns False if the chunk was ready already. Raises OSError when the cache file
        cannot be written; the chunk then stays not ready.
        """
        if not self.write(chunk, data, replace=replace):
            return False
        self.sync()
        return self.map.mark_ready(chunk.index)

    def write(self, chunk: ChunkInfo, data: bytes, *, replace: bool = False) -> bool:
        """Write a chunk's bytes without marking it; False if it is ready already.

        Several writes may share one `sync()` before their `mark_ready` calls.
        `replace` writes over a ready chunk whose cached bytes failed their digest check.
        """
        self.check(chunk)
        if len(data) != chunk.uncompressed_size:
            raise RafsError(
                f"chunk {chunk.index} of blob {self.blob_id} is {len(data)} bytes, "
                f"expected {chunk.uncompressed_size}"
            )
        if self.map.is_ready(chunk.index) and not replace:
            return False
        view = memoryview(data)
        offset = chunk.uncompressed_offset
        with self._write_lock:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        return True

    def sync(self) -> None:
        """Make the written bytes durable.

        The order is the whole crash-safety argument: the bytes reach the disk before the
        bit that vouches for them, so a crash at any point leaves at worst an unset bit
        over good bytes (fetched again), never a set bit over missing ones.
        """
        os.fdatasync(self._fd)

    def mark_ready(self, chunk: ChunkInfo) -> bool:
        """Set a chunk's ready bit; only after `sync()` covered its bytes."""
        return self.map.mark_ready(chunk.index)

    def begin_fill(self, chunk: ChunkInfo) -> tuple[Future[FillResult], bool]:
        """Join the fill of `chunk` in flight, or start one: returns (future, True if the caller owns it).

        The owner must resolve the future and then call `end_fill`.
        """
        with self._inflight_lock:
            future = self._inflight.get(chunk.index)
            if future is not None:
                return future, False
            future = Future()
            self._inflight[chunk.index] = future
            return future, True

    def end_fill(self, chunk: ChunkInfo, future: Future[FillResult]) -> None:
        """Forget a resolved fill, so that a failed chunk is fetched again by the next read."""
        with self._inflight_lock:
            if self._inflight.get(chunk.index) is future:
                del self._inflight[chunk.index]

    def close(self) -> None:
        """Close the data and map files; no read may be running or follow."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.map.close()
