"""The `localfs` backend: blobs are plain files in local directories (reference §7.5).

Either one `blob_file` serves every blob id, or `<dir>/<blob_id>` is tried, then each of `alt_dirs`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from nydus_actors.storage.backends.base import BackendError, BlobBackend

logger = logging.getLogger(__name__)


def check_blob_id(blob_id: str) -> None:
    """Reject blob ids that are not plain file names.

    Raises:
        BackendError: (permanent) the id is empty, `.`/`..` or holds `/` or NUL.
    """
    if not blob_id or blob_id in (".", "..") or "/" in blob_id or "\0" in blob_id:
        raise BackendError(f"failed to look up blob {blob_id!r}: not a plain blob id")


def blob_candidates(settings: dict, blob_id: str) -> list[str]:
    """Where a `localfs` backend looks: `blob_file` for any id, else `<dir>/<id>`, then `alt_dirs`."""
    if settings.get("blob_file"):
        return [str(settings["blob_file"])]
    dirs = [d for d in [settings.get("dir") or "", *settings.get("alt_dirs", [])] if d]
    return [os.path.join(d, blob_id) for d in dirs]


def find_blob(settings: dict, blob_id: str) -> str | None:
    """The first existing file a `localfs` backend would read for `blob_id`, or None."""
    if not settings.get("blob_file"):
        try:
            check_blob_id(blob_id)
        except BackendError:
            return None
    return next((path for path in blob_candidates(settings, blob_id) if os.path.isfile(path)), None)


class LocalfsBackend(BlobBackend):
    """Reads blobs from local files; one file descriptor per blob is opened once and kept.

    Args:
        backend_id: the id the metrics are keyed by.
        settings: the `localfs` section from `FsConfig.backend()`: `blob_file`, `dir`, `alt_dirs`.
        on_failure: called with one line when a read fails for good.
    """

    backend_type = "localfs"

    def __init__(
        self, backend_id: str, settings: dict, *, on_failure: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(backend_id, retry_limit=int(settings.get("retry_limit", 0)), on_failure=on_failure)
        self._settings = settings
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        logger.debug("localfs backend %s reads blobs from %s", backend_id, blob_candidates(settings, "<id>"))

    def _candidates(self, blob_id: str) -> list[str]:
        return blob_candidates(self._settings, blob_id)

    def _fd(self, blob_id: str) -> int:
        check_blob_id(blob_id)
        with self._lock:
            fd = self._fds.get(blob_id)
            if fd is not None:
                return fd
            # Opening under the lock keeps concurrent first reads of one blob from leaking a descriptor.
            for path in self._candidates(blob_id):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as ex:
                    raise BackendError(f"failed to open blob {blob_id} at {path}: {ex.strerror}") from ex
                logger.debug("Opened blob %s at %s", blob_id, path)
                self._fds[blob_id] = fd
                return fd
        places = ", ".join(self._candidates(blob_id)) or "no configured directory"
        raise BackendError(f"failed to find blob {blob_id}: no such file ({places})")

    def _blob_size(self, blob_id: str) -> int:
        fd = self._fd(blob_id)
        try:
            return os.fstat(fd).st_size
        except OSError as ex:
            raise BackendError(f"failed to stat blob {blob_id}: {ex.strerror}") from ex

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        fd = self._fd(blob_id)
        parts: list[bytes] = []
        done = 0
        # pread may return less than asked without being at the end; loop until EOF or done.
        while done < size:
            try:
                part = os.pread(fd, size - done, offset + done)
            except OSError as ex:
                raise BackendError(
                    f"failed to read {size} bytes at {offset} of blob {blob_id}: {ex.strerror}"
                ) from ex
            if not part:
                raise BackendError(
                    f"failed to read {size} bytes at {offset} of blob {blob_id}: "
                    f"the blob ends at {offset + done}"
                )
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def close(self) -> None:
        """Close every cached file descriptor."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
