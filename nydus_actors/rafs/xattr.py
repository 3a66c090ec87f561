"""Extended attributes: the inline area after an inode and the shared-xattr area.

Format doc §7. Listing follows the kernel: inline entries first, then shared ones,
and entries whose prefix index the kernel has no handler for are skipped.
"""

from __future__ import annotations

import struct

from nydus_actors.rafs.errors import RafsError

XATTR_HEADER_SIZE = 12
_ENTRY = struct.Struct("<BBH")

#: Name prefixes by `e_name_index` (1 user, 2/3 POSIX ACLs as whole names, 4 trusted, 6 security).
PREFIXES = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}
_LONG_PREFIX_FLAG = 0x80


def _entry(buf: bytes | memoryview, pos: int, limit: int, where: str) -> tuple[bytes | None, bytes, int]:
    """Decode the entry at `pos` (ending before `limit`): (name or None, value, padded size)."""
    if pos + _ENTRY.size > limit:
        raise RafsError(f"{where}: xattr entry header at byte {pos} is cut off")
    name_len, index, value_size = _ENTRY.unpack_from(buf, pos)
    body = pos + _ENTRY.size
    end = body + name_len + value_size
    if end > limit:
        raise RafsError(f"{where}: xattr entry at byte {pos} runs past its area")
    if index & _LONG_PREFIX_FLAG:
        raise RafsError(f"{where}: xattr long name prefixes are not supported")
    prefix = PREFIXES.get(index)
    name = None if prefix is None else prefix + bytes(buf[body : body + name_len])
    value = bytes(buf[body + name_len : end])
    return name, value, (end - pos + 3) & ~3


def read_xattrs(
    buf: bytes | memoryview,
    *,
    file_size: int,
    inode_end: int,
    xattr_size: int,
    shared_base: int,
    where: str,
) -> dict[bytes, bytes]:
    """Return all xattrs of an inode whose inline area spans `[inode_end, inode_end + xattr_size)`.

    `shared_base` is the byte offset of the shared-xattr area (`xattr_blkaddr x bs`).
    The first occurrence of a name wins, as with the kernel's getxattr.
    """
    if not xattr_size:
        return {}
    limit = inode_end + xattr_size
    if xattr_size < XATTR_HEADER_SIZE or limit > file_size:
        raise RafsError(f"{where}: inline xattr area of {xattr_size} bytes is invalid")
    shared_count = buf[inode_end + 4]
    pos = inode_end + XATTR_HEADER_SIZE
    if pos + 4 * shared_count > limit:
        raise RafsError(f"{where}: {shared_count} shared xattr ids overflow the inline area")
    shared_ids = struct.unpack_from(f"<{shared_count}I", buf, pos)
    pos += 4 * shared_count
    result: dict[bytes, bytes] = {}
    while pos < limit:
        name, value, size = _entry(buf, pos, limit, where)
        if name is not None:
            result.setdefault(name, value)
        pos += size
    for xid in shared_ids:
        name, value, _ = _entry(buf, shared_base + 4 * xid, file_size, where)
        if name is not None:
            result.setdefault(name, value)
    return result
