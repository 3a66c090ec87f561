"""A stand-in for the FuseSession actor: the real VFS, no kernel mount."""

from __future__ import annotations

import os

import pykka

from nydus_actors.fs.vfs import Vfs
from nydus_actors.models import InflightRequest


class DummyFuseSession(pykka.ThreadingActor):
    """Keeps the FuseSession message surface and a real `Vfs`, without /dev/fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.vfs = Vfs()
        self.mounted = False
        self.serving = False
        self.busy: tuple[InflightRequest, ...] = ()
        self.calls: list[str] = []

    def mount(self) -> None:
        self.calls.append("mount")
        self.mounted = True

    def start_serving(self) -> None:
        self.calls.append("start_serving")
        self.serving = True

    def stop_serving(self) -> None:
        self.calls.append("stop_serving")
        self.serving = False

    def unmount(self) -> None:
        self.calls.append("unmount")
        self.mounted = False

    def attach(self, mountpoint, fs) -> None:
        self.vfs.attach(mountpoint, fs)

    def detach(self, mountpoint) -> None:
        self.vfs.detach(mountpoint)

    def replace(self, mountpoint, fs) -> int:
        self.vfs.detach(mountpoint)
        return self.vfs.attach(mountpoint, fs)

    def save_state(self) -> dict:
        return {"init": b"", "conn_id": 0, "fingerprint": "", "vfs": self.vfs.save_state()}

    def dup_fd(self) -> int:
        return os.open(os.devnull, os.O_RDONLY)

    def inflight(self):
        return self.busy

    def set_busy(self, busy) -> None:
        self.busy = tuple(busy)

    def initialized(self) -> bool:
        return self.serving

    def get_calls(self) -> list[str]:
        return list(self.calls)
