"""Helpers for tests that mount a real FUSE filesystem."""

from __future__ import annotations

import os

import pytest

from nydus_actors.fs import kernel


def _why_not_mountable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "mounting FUSE with mount(2) needs root"
    return None


#: Marks a test module that mounts FUSE, and skips it where that cannot work.
MOUNT_MARKS = [
    pytest.mark.mount,
    pytest.mark.skipif(_why_not_mountable() is not None, reason=_why_not_mountable() or ""),
]


def remove_mount(mountpoint: str) -> None:
    """Lazily unmount whatever a failed test left at `mountpoint`."""
    while kernel.is_mounted(mountpoint):
        kernel.unmount(mountpoint)
