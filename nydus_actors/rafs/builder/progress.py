"""A one-line progress bar on stderr, drawn only for large sources on a terminal."""

from __future__ import annotations

import time
from typing import TextIO

#: below this much work (bytes) a build is quick enough to stay silent
LARGE = 64 << 20
_INTERVAL = 0.1
_WIDTH = 30


class Progress:
    """Files processed and bytes chunked, with a bar over `done / total`.

    `total` is in whatever unit the source can measure up front: content bytes for a
    directory, archive bytes for a tar stream.
    """

    def __init__(self, stream: TextIO | None, threshold: int = LARGE) -> None:
        self.stream = stream
        self.threshold = threshold
        self.enabled = False
        self.total = 0
        self.done = 0
        self.files = 0
        self.nbytes = 0
        self._last = 0.0
        self._drawn = False
        self._width = 0

    def start(self, total: int) -> None:
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and total >= self.threshold
        self.total = total

    def update(self, done: int, files: int = 0, nbytes: int = 0) -> None:
        self.done = done
        self.files += files
        self.nbytes += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= _INTERVAL:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        fill = int(frac * _WIDTH)
        bar = "#" * fill + "-" * (_WIDTH - fill)
        line = f"[{bar}] {frac * 100:5.1f}%  {self.files} files  {self.nbytes / (1 << 20):.1f} MiB"
        # Pad to the previous width so a shorter line leaves no stale characters behind.
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn)."""
        if self.enabled:
            self.done = self.total
            self._draw()
        if self._drawn:
            assert self.stream is not None
            self.stream.write("\n")
            self.stream.flush()
