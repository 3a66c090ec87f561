"""How the main thread learns that the daemon process should end, and why."""

from __future__ import annotations

import enum
import threading


class ShutdownReason(enum.Enum):
    """Why the process is ending; it decides whether the FUSE mount is removed."""

    SIGNAL = "signal"  # SIGTERM/SIGINT: stop, unmount, remove the socket
    EXIT = "exit"  # PUT /api/v1/daemon/exit: FUSE already stopped, mount kept
    FUSE_ENDED = "fuse-ended"  # the kernel ended the FUSE session (external umount)


class Lifecycle:
    """A one-shot, thread-safe shutdown request; the first reason wins."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._reason: ShutdownReason | None = None

    def request_shutdown(self, reason: ShutdownReason) -> None:
        """Ask the main thread to end the process (safe from any thread or signal handler)."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
        self._event.set()

    def wait(self, timeout: float | None = None) -> ShutdownReason | None:
        """Block until a shutdown is requested; return its reason (None on timeout)."""
        self._event.wait(timeout)
        return self._reason
