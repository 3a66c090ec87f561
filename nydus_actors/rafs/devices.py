"""A `DeviceReader` over local files: the image as device 0, extra devices by path."""

from __future__ import annotations

import os
from collections.abc import Sequence

from nydus_actors.rafs.errors import RafsError


class LocalDeviceReader:
    """Reads device 0 from `image_path` and device k from `device_paths[k - 1]`.

    The paths follow device-table order, like the kernel's `-o device=` options.
    Files are opened on first use and stay open until `close`.
    """

    def __init__(self, image_path: str, device_paths: Sequence[str] = ()) -> None:
        self._paths = (image_path, *device_paths)
        self._fds: dict[int, int] = {}

    def pread(self, device: int, offset: int, size: int) -> bytes:
        """Return up to `size` bytes of `device` at `offset`."""
        if not 0 <= device < len(self._paths):
            raise RafsError(f"no file is configured for device {device}")
        fd = self._fds.get(device)
        try:
            if fd is None:
                fd = self._fds[device] = os.open(self._paths[device], os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(fd, size, offset)
        except OSError as ex:
            raise RafsError(f"failed to read device {device} at {self._paths[device]}: {ex.strerror}") from ex

    def close(self) -> None:
        """Close every file opened so far."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> LocalDeviceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
