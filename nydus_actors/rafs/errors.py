"""The one error kind of the image reader: a bad, unsupported or unreadable image."""

from __future__ import annotations

import errno as _errno

from nydus_actors.exceptions import OtherError


class RafsError(OtherError):
    """A RAFS v6 / EROFS image is malformed, unsupported, or its data cannot be read.

    `errno` defaults to EIO; callers that misuse an inode (a lookup in a file, a
    readlink of a directory) get a more precise one so the FUSE layer can pass it on.
    """

    def __init__(self, text: str, *, errno: int = _errno.EIO) -> None:
        super().__init__(text)
        self.errno = errno


def corrupt(path: str, detail: str) -> RafsError:
    """Build the error for a malformed image: "invalid rafs image <path>: <detail>"."""
    return RafsError(f"invalid rafs image {path}: {detail}")
