"""Which FUSE requests are being handled right now (`/api/v1/metrics/inflight`)."""

from __future__ import annotations

import contextlib
import enum
import itertools
import time
from typing import TYPE_CHECKING

from nydus_actors.models import InflightRequest

if TYPE_CHECKING:
    from collections.abc import Iterator


class FuseOpcode(enum.IntEnum):
    """FUSE opcodes of the requests this daemon handles (linux/fuse.h)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    READLINK = 5
    OPEN = 14
    READ = 15
    STATFS = 17
    RELEASE = 18
    GETXATTR = 22
    LISTXATTR = 23
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    READDIRPLUS = 44


class InflightTracker:
    """Records the requests in progress; written by the FUSE loop, read by anyone.

    pyfuse3 does not expose the kernel's `unique`, so a daemon-side sequence
    number stands in for it.
    """

    def __init__(self) -> None:
        self._active: dict[int, InflightRequest] = {}
        self._sequence = itertools.count(1)

    @contextlib.contextmanager
    def track(self, inode: int, opcode: int) -> Iterator[None]:
        """Register one request for the duration of the `with` block."""
        unique = next(self._sequence)
        self._active[unique] = InflightRequest(
            inode=inode, opcode=int(opcode), unique=unique, timestamp_secs=int(time.time())
        )
        try:
            yield
        finally:
            del self._active[unique]

    def snapshot(self) -> tuple[InflightRequest, ...]:
        """Return the requests in progress, oldest first; safe from any thread.

        The FUSE loop thread adds and removes entries while other threads call
        this. `dict.copy()` is a single C-level operation that holds the GIL
        throughout, so it never sees the dict mid-change and never raises
        "dictionary changed size during iteration"; iterating the copy is then
        private to the caller.
        """
        return tuple(sorted(self._active.copy().values(), key=lambda request: request.unique))
