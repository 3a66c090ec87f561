"""CRC-32C (Castagnoli) as EROFS uses it for the superblock checksum."""

from __future__ import annotations


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Return the reflected CRC-32C of `data` from seed `crc`, without final inversion.

    EROFS seeds with ~0 and stores the raw register (the kernel's `crc32c(~0, ...)`).
    The span is one block at most, so a table loop is fast enough.
    """
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
