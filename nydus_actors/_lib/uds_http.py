"""A small HTTP/1.1 client over a unix stream socket (the nydusd API transport).

Used by `nydus-actors ctl`, the tests and the benchmarks; one keep-alive connection per client.
"""

import http.client
import logging
import socket

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds; nydus-snapshotter's total request timeout (reference §8.1)

# Failures that mean "the server closed the idle keep-alive connection before reading the request".
_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An `http.client.HTTPConnection` that connects to a unix socket path."""

    def __init__(self, sock_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        # The host only fills the Host header; nydusd ignores it.
        super().__init__("localhost", timeout=timeout)
        self.sock_path = sock_path

    def connect(self) -> None:
        """Open the unix stream socket (called lazily by `http.client`)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.sock_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UdsHttpClient:
    """A keep-alive HTTP/1.1 client bound to one unix socket path.

    Not thread-safe: use one client per thread.

    Args:
        sock_path: Path of the server's unix stream socket.
        timeout: Seconds allowed for connecting and for each socket read or write.
    """

    def __init__(self, sock_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock_path = sock_path
        self._conn = UnixHTTPConnection(sock_path, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request and read the whole response.

        A body is sent with `Content-Type: application/json` unless `headers`
        says otherwise; PUT/POST/PATCH without a body send `Content-Length: 0`,
        as Go clients do.

        Args:
            method: HTTP method, e.g. ``"GET"``.
            path: Origin-form target including any query, e.g. ``"/api/v1/daemon"``.
            body: Request body, or None for none.
            headers: Extra request headers.

        Returns:
            ``(status, headers, body)``; the headers are case-insensitive.

        Raises:
            OSError: The socket could not be reached or failed (timeouts included).
            http.client.HTTPException: The reply was not valid HTTP.
        """
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        reused = self._conn.sock is not None
        try:
            return self._exchange(method, path, body, all_headers)
        except _STALE_CONNECTION_ERRORS:
            self._conn.close()
            # A reused connection may have been closed by the server while idle, before it read
            # anything, so one retry on a fresh connection is safe; a fresh one failing is real.
            if not reused:
                raise
            logger.debug("keep-alive connection to %s was closed, reconnecting", self.sock_path)
            return self._exchange(method, path, body, all_headers)

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        try:
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
            # Reading to the end is what frees the connection for the next request.
            data = response.read()
        except BaseException:
            # After a timeout or a half-sent request the connection state is unknown.
            self._conn.close()
            raise
        return response.status, response.headers, data

    def close(self) -> None:
        """Close the connection; a later request reconnects."""
        self._conn.close()

    def __enter__(self) -> "UdsHttpClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
