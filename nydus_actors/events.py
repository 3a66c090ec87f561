"""The bounded ring of error events behind `GET /api/v1/daemon/events`."""

from __future__ import annotations

import logging
from collections import deque
from email.utils import formatdate

logger = logging.getLogger(__name__)

MAX_ERRORS = 500
MAX_SIZE = 51_200


class ErrorHolder:
    """Keeps the newest error lines, bounded by count and by total bytes.

    Mirrors nydusd's `ErrorHolder`: each line is `<IMF-fixdate> - <error>`;
    the oldest lines go first when either bound would be exceeded, and a line
    larger than the whole budget is refused.
    """

    def __init__(self, max_errors: int = MAX_ERRORS, max_size: int = MAX_SIZE) -> None:
        self._max_errors = max_errors
        self._max_size = max_size
        self._errors: deque[str] = deque()
        self._total_size = 0

    def push(self, error: str, *, now: float | None = None) -> bool:
        """Record one error line; return False if it alone exceeds the byte budget."""
        line = f"{formatdate(now, usegmt=True)} - {error}"
        size = len(line.encode())
        if size > self._max_size:
            logger.warning("event of %d bytes dropped: larger than the %d-byte ring", size, self._max_size)
            return False
        while self._errors and (
            self._total_size + size > self._max_size or len(self._errors) >= self._max_errors
        ):
            self._total_size -= len(self._errors.popleft().encode())
        self._errors.append(line)
        self._total_size += size
        return True

    def export(self) -> dict:
        """Return the JSON shape of nydusd's events reply."""
        return {
            "max_errors": self._max_errors,
            "total_errors": len(self._errors),
            "max_size": self._max_size,
            "total_size": self._total_size,
            "errors": list(self._errors),
        }
