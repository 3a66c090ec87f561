"""The persisted ready-chunk bitmap of one cached blob (`<blob_id>.chunk_map`).

A set bit promises that the chunk's uncompressed bytes are durable in the cache file.
"""

from __future__ import annotations

import os
import struct
import threading

MAGIC = b"NYACMAP\0"
VERSION = 1
#: magic, version, chunk count
HEADER = struct.Struct("<8sII")


class ChunkMap:
    """One bit per chunk, kept in memory and written through to `path` one byte at a time.

    A file whose header or size does not match `chunk_count` is discarded and recreated
    with no chunk ready: a map that cannot be checked is never trusted.
    """

    def __init__(self, path: str, chunk_count: int) -> None:
        if chunk_count < 0:
            raise ValueError(f"chunk count {chunk_count} is negative")
        self.path = path
        self.chunk_count = chunk_count
        self._size = HEADER.size + (chunk_count + 7) // 8
        # Only mark_ready takes it: is_ready reads one byte of the bytearray, which is atomic.
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            bits = self._load()
            if bits is None:
                bits = self._recreate()
        except BaseException:
            os.close(self._fd)
            raise
        self._bits = bits
        self._ready = int.from_bytes(bits, "little").bit_count()

    def _load(self) -> bytearray | None:
        """Return the bitmap of a valid file, or None."""
        if os.fstat(self._fd).st_size != self._size:
            return None
        raw = os.pread(self._fd, self._size, 0)
        if len(raw) != self._size:
            return None
        magic, version, count = HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION or count != self.chunk_count:
            return None
        bits = bytearray(raw[HEADER.size :])
        tail = self.chunk_count % 8
        # Bits past the last chunk are never set by mark_ready: a set one means garbage.
        if tail and bits[-1] >> tail:
            return None
        return bits

    def _recreate(self) -> bytearray:
        # Truncating first clears every old bit, so a crash part-way leaves a file that
        # fails the size check on the next open rather than one with stale bits.
        os.ftruncate(self._fd, 0)
        bits = bytearray((self.chunk_count + 7) // 8)
        os.pwrite(self._fd, HEADER.pack(MAGIC, VERSION, self.chunk_count) + bits, 0)
        return bits

    def _check(self, index: int) -> None:
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} outside a map of {self.chunk_count} chunks")

    def is_ready(self, index: int) -> bool:
        """Whether chunk `index` is in the cache file."""
        self._check(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def mark_ready(self, index: int) -> bool:
        """Set the bit of chunk `index`; return False if it was set already.

        The caller must have made the chunk's bytes durable first (write, then fdatasync):
        the bit is the only thing that makes cache bytes look valid after a crash.
        """
        self._check(index)
        pos, bit = index >> 3, 1 << (index & 7)
        with self._lock:
            if self._bits[pos] & bit:
                return False
            # The byte is written under the lock so that two bits of one byte set by two
            # threads cannot reach the file in the wrong order and lose one.
            value = self._bits[pos] | bit
            os.pwrite(self._fd, bytes((value,)), HEADER.size + pos)
            self._bits[pos] = value
            self._ready += 1
            return True

    def ready_count(self) -> int:
        """How many chunks are ready."""
        return self._ready

    def all_ready(self) -> bool:
        """Whether every chunk is ready."""
        return self._ready == self.chunk_count

    def close(self) -> None:
        """Close the map file; the object is unusable afterwards."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
