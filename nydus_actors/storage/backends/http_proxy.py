"""The `http-proxy` backend: `HEAD` and ranged `GET` against an HTTP(S) server or a unix socket (§7.5).

Also holds `RangedHttpBackend`, the urllib3 request, error mapping and exact body reads S3 shares.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    InsecureRequestWarning,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.response import BaseHTTPResponse
from urllib3.util.ssl_ import create_urllib3_context

from nydus_actors.storage.backends.base import BackendError, BlobBackend

logger = logging.getLogger(__name__)

#: Connections kept per server; above the fetch concurrency so busy pools never drop sockets.
POOL_SIZE = 16
#: Bytes of an unread response body still worth draining to keep its connection; larger ones are closed.
DRAIN_LIMIT = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def http_timeout(settings: dict) -> urllib3.Timeout:
    """The urllib3 timeout for the `timeout` / `connect_timeout` settings (0 disables one)."""
    connect = float(settings.get("connect_timeout", 5)) or None
    read = float(settings.get("timeout", 5)) or None
    return urllib3.Timeout(connect=connect, read=read)


def pool_manager(settings: dict) -> urllib3.PoolManager:
    """A PoolManager honouring `skip_verify` and `ca_cert_files`; urllib3 itself never retries.

    Raises:
        BackendError: (permanent) a CA file cannot be loaded.
    """
    options: dict = {
        "maxsize": POOL_SIZE,
        "block": False,
        "retries": False,
        "timeout": http_timeout(settings),
    }
    if settings.get("skip_verify"):
        options["cert_reqs"] = "CERT_NONE"
        # Verification is off on purpose; urllib3 would otherwise warn on every single request.
        urllib3.disable_warnings(InsecureRequestWarning)
    elif settings.get("ca_cert_files"):
        context = create_urllib3_context()
        # The CA files add to the system roots, as reqwest's add_root_certificate does in nydusd.
        context.load_default_certs()
        for path in settings["ca_cert_files"]:
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as ex:
                raise BackendError(f"failed to load CA certificates from {path}: {ex}") from ex
        options["ssl_context"] = context
    return urllib3.PoolManager(**options)


def transport_cause(ex: Exception) -> tuple[str, bool]:
    """Describe a failed exchange with a server; say whether retrying may help."""
    if isinstance(ex, SSLError):
        inner = ex.args[0] if ex.args else ex
        # A certificate that does not verify stays so; other TLS failures may be a restarting server.
        return f"tls failure: {inner}", not isinstance(inner, ssl.SSLCertVerificationError)
    if isinstance(ex, NewConnectionError):
        return f"failed to connect: {ex.__cause__ or ex}", True
    if isinstance(ex, ConnectTimeoutError):
        return "timed out connecting", True
    if isinstance(ex, ReadTimeoutError):
        return "timed out waiting for the server", True
    return f"connection broken: {ex}", True


def status_temporary(status: int) -> bool:
    """Whether an HTTP error status is worth retrying (server trouble, not a wrong request)."""
    return status >= 500 or status in (408, 429)


def finish_response(resp: BaseHTTPResponse) -> None:
    """Give a response's connection back to its pool, or close it if the rest of the body is large."""
    remaining = resp.length_remaining
    if remaining is None or remaining > DRAIN_LIMIT:
        resp.close()
        resp.release_conn()
        return
    try:
        resp.drain_conn()
    except (HTTPError, OSError):
        resp.close()
        resp.release_conn()


class _UnixSocketConnection(HTTPConnection):
    """An urllib3 connection whose socket is a unix stream socket; the host only fills `Host`."""

    def __init__(self, *args, socket_path: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except TimeoutError as ex:
            sock.close()
            raise ConnectTimeoutError(self, f"timed out connecting to {self.socket_path}") from ex
        except OSError as ex:
            sock.close()
            raise NewConnectionError(self, f"failed to connect to {self.socket_path}: {ex}") from ex
        return sock


class UnixSocketConnectionPool(HTTPConnectionPool):
    """An urllib3 connection pool whose connections go to one unix socket path."""

    ConnectionCls = _UnixSocketConnection

    def __init__(self, socket_path: str, **kwargs) -> None:
        # Extra keywords reach every connection's constructor through urllib3's `conn_kw`.
        super().__init__("localhost", socket_path=socket_path, **kwargs)
        self.socket_path = socket_path


class RangedHttpBackend(BlobBackend):
    """A backend reading blobs with `HEAD` (size) and ranged `GET` (data) over urllib3.

    Subclasses say where a blob lives (`_prepare`) and may explain error bodies (`_status_cause`).
    """

    def __init__(
        self, backend_id: str, settings: dict, *, on_failure: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(backend_id, retry_limit=int(settings.get("retry_limit", 0)), on_failure=on_failure)
        self._timeout = http_timeout(settings)

    @abc.abstractmethod
    def _prepare(
        self, method: str, blob_id: str, headers: dict[str, str]
    ) -> tuple[HTTPConnectionPool, str, dict[str, str]]:
        """Return the pool, the request target (path) and the final headers for one request."""

    @abc.abstractmethod
    def _where(self, blob_id: str) -> str:
        """Name the server (and place) of a blob for error texts."""

    def _status_cause(self, resp: BaseHTTPResponse) -> tuple[str, bool]:
        """Describe an unexpected status; say whether retrying may help."""
        return f"HTTP {resp.status} {resp.reason or ''}".rstrip(), status_temporary(resp.status)

    def _error(self, what: str, blob_id: str, cause: str, *, temporary: bool) -> BackendError:
        return BackendError(
            f"failed to {what} blob {blob_id} from {self._where(blob_id)}: {cause}", temporary=temporary
        )

    def _send(self, method: str, blob_id: str, headers: dict[str, str], what: str) -> BaseHTTPResponse:
        pool, target, headers = self._prepare(method, blob_id, headers)
        try:
            return pool.urlopen(
                method,
                target,
                headers=headers,
                retries=False,
                redirect=False,
                timeout=self._timeout,
                preload_content=False,
                release_conn=False,
            )
        except (HTTPError, OSError) as ex:
            cause, temporary = transport_cause(ex)
            raise self._error(what, blob_id, cause, temporary=temporary) from ex

    def _blob_size(self, blob_id: str) -> int:
        resp = self._send("HEAD", blob_id, {}, "stat")
        try:
            if resp.status != 200:
                cause, temporary = self._status_cause(resp)
                raise self._error("stat", blob_id, cause, temporary=temporary)
            length = resp.headers.get("Content-Length", "")
        finally:
            finish_response(resp)
        if not length.isdigit():
            raise self._error("stat", blob_id, f"bad Content-Length {length!r}", temporary=False)
        return int(length)

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        what = f"read {size} bytes at {offset} of"
        last = offset + size - 1
        resp = self._send("GET", blob_id, {"Range": f"bytes={offset}-{last}"}, what)
        try:
            if resp.status == 206:
                self._check_content_range(resp, offset, last, what, blob_id)
            elif resp.status == 200:
                # The server ignored Range and sends the whole blob: skip to the offset.
                self._skip(resp, offset)
            else:
                cause, temporary = self._status_cause(resp)
                raise self._error(what, blob_id, cause, temporary=temporary)
            return resp.read(size)
        except (HTTPError, OSError) as ex:
            cause, temporary = transport_cause(ex)
            raise self._error(what, blob_id, f"reading the body: {cause}", temporary=temporary) from ex
        finally:
            finish_response(resp)

    def _check_content_range(
        self, resp: BaseHTTPResponse, offset: int, last: int, what: str, blob_id: str
    ) -> None:
        header = resp.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            raise self._error(what, blob_id, f"bad Content-Range {header!r}", temporary=False)
        first, end, total = int(match[1]), int(match[2]), match[3]
        if first != offset:
            raise self._error(what, blob_id, f"the server sent range {first}-{end}", temporary=False)
        if end < last:
            # Servers clamp a range that runs past the end; that read can never succeed.
            raise self._error(what, blob_id, f"the range ends past the blob (size {total})", temporary=False)

    @staticmethod
    def _skip(resp: BaseHTTPResponse, count: int) -> None:
        while count > 0:
            part = resp.read(min(count, 1 << 20))
            if not part:
                return
            count -= len(part)


class HttpProxyBackend(RangedHttpBackend):
    """Reads blobs from a plain HTTP(S) server, or an HTTP server on a unix socket.

    `addr` is an `http://` or `https://` URL (blobs at `<addr><path>/<blob_id>`) or an absolute
    unix socket path (blobs at `/<blob_id>` on that socket; `path` is ignored there).

    Args:
        backend_id: the id the metrics are keyed by.
        settings: the `http-proxy` section from `FsConfig.backend()`.
        on_failure: called with one line when a read fails for good.

    Raises:
        BackendError: (permanent) `addr` is neither, or a CA file cannot be loaded.
    """

    backend_type = "http-proxy"

    def __init__(
        self, backend_id: str, settings: dict, *, on_failure: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(backend_id, settings, on_failure=on_failure)
        addr = str(settings.get("addr", ""))
        self._manager: urllib3.PoolManager | None = None
        if addr.startswith(("http://", "https://")):
            split = urlsplit(addr)
            self._manager = pool_manager(settings)
            self._pool: HTTPConnectionPool = self._manager.connection_from_url(addr)
            parts = (split.path.strip("/"), str(settings.get("path", "")).strip("/"))
            prefix = "/".join(p for p in parts if p)
            self._prefix = f"/{prefix}/" if prefix else "/"
            self._server = f"{split.scheme}://{split.netloc}{self._prefix.rstrip('/')}"
        elif os.path.isabs(addr):
            self._pool = UnixSocketConnectionPool(
                addr, maxsize=POOL_SIZE, block=False, retries=False, timeout=self._timeout
            )
            self._prefix = "/"
            self._server = f"unix socket {addr}"
        else:
            raise BackendError(
                f"failed to configure http-proxy backend: addr {addr!r} is neither an http(s) URL "
                "nor an absolute unix socket path"
            )
        logger.debug("http-proxy backend %s reads blobs from %s", backend_id, self._server)

    def _prepare(
        self, method: str, blob_id: str, headers: dict[str, str]
    ) -> tuple[HTTPConnectionPool, str, dict[str, str]]:
        return self._pool, self._prefix + quote(blob_id, safe=""), headers

    def _where(self, blob_id: str) -> str:
        return self._server

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.close()
        if self._manager is not None:
            self._manager.clear()
