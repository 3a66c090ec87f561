"""Tests of the unix-socket HTTP client against a real waitress server in a temp dir."""

import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nydus_actors._lib.uds_http import UdsHttpClient
from tests.wsgi_server import serve_unix

WsgiApp = Callable[..., list[bytes]]


def echo_app(environ: dict, start_response: Callable) -> list[bytes]:
    """Reply with a JSON description of the request (204 and no body for `/empty`)."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    doc = {
        "method": environ["REQUEST_METHOD"],
        "uri": environ["REQUEST_URI"],
        "content_type": environ.get("CONTENT_TYPE", ""),
        "content_length": environ.get("CONTENT_LENGTH", ""),
        "body": environ["wsgi.input"].read(length).decode(),
    }
    if environ["PATH_INFO"] == "/empty":
        start_response("204 No Content", [])
        return [b""]
    payload = json.dumps(doc).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    start_response("200 OK", headers)
    return [payload]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "api.sock"
    with serve_unix(echo_app, path):
        yield path


def test_get_returns_status_headers_and_body(sock_path: Path) -> None:
    with UdsHttpClient(str(sock_path), timeout=5) as client:
        status, headers, body = client.request("GET", "/api/v1/daemon?id=%2Fsub")

    assert status == 200
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["method"] == "GET"
    assert doc["uri"] == "/api/v1/daemon?id=%2Fsub"
    assert doc["body"] == ""


def test_body_is_sent_as_json(sock_path: Path) -> None:
    with UdsHttpClient(str(sock_path), timeout=5) as client:
        status, _, body = client.request("POST", "/api/v1/mount", b'{"source":"/b"}')

    assert status == 200
    doc = json.loads(body)
    assert doc["content_type"] == "application/json"
    assert doc["body"] == '{"source":"/b"}'


def test_put_without_body_sends_content_length_zero(sock_path: Path) -> None:
    with UdsHttpClient(str(sock_path), timeout=5) as client:
        _, _, body = client.request("PUT", "/api/v1/daemon/start")

    doc = json.loads(body)
    assert doc["content_length"] == "0"
    assert doc["content_type"] == ""


def test_no_content_reply_has_empty_body(sock_path: Path) -> None:
    with UdsHttpClient(str(sock_path), timeout=5) as client:
        status, headers, body = client.request("GET", "/empty")

    assert status == 204
    assert body == b""
    assert "Content-Type" not in headers


def test_connection_is_kept_alive_between_requests(sock_path: Path) -> None:
    with UdsHttpClient(str(sock_path), timeout=5) as client:
        client.request("GET", "/a")
        first = client._conn.sock
        client.request("GET", "/b")

        assert first is not None
        assert client._conn.sock is first


def test_reconnects_after_server_closes_connection(sock_path: Path) -> None:
    with UdsHttpClient(str(sock_path), timeout=5) as client:
        _, headers, _ = client.request("GET", "/first", headers={"Connection": "close"})
        assert headers["Connection"] == "close"
        status, _, body = client.request("GET", "/again")

    assert status == 200
    assert json.loads(body)["uri"] == "/again"


def test_retries_once_on_stale_keep_alive_connection(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    client = UdsHttpClient(str(path), timeout=5)
    try:
        with serve_unix(echo_app, path):
            client.request("GET", "/first")
        # A new server on the same path: the client's idle connection is now dead.
        with serve_unix(echo_app, path):
            status, _, body = client.request("GET", "/second")
    finally:
        client.close()

    assert status == 200
    assert json.loads(body)["uri"] == "/second"


def test_missing_socket_raises_oserror(tmp_path: Path) -> None:
    with UdsHttpClient(str(tmp_path / "absent.sock"), timeout=5) as client, pytest.raises(FileNotFoundError):
        client.request("GET", "/api/v1/daemon")


def test_slow_reply_times_out(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_app(environ: dict, start_response: Callable) -> list[bytes]:
        release.wait(timeout=5)
        start_response("204 No Content", [])
        return [b""]

    path = tmp_path / "api.sock"
    with serve_unix(slow_app, path):
        try:
            with UdsHttpClient(str(path), timeout=0.2) as client, pytest.raises(TimeoutError):
                client.request("GET", "/slow")
        finally:
            release.set()


def test_malformed_reply_raises_http_exception(tmp_path: Path) -> None:
    path = tmp_path / "bad.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(5)

        def answer_garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"garbage\r\n\r\n")

        thread = threading.Thread(target=answer_garbage)
        thread.start()
        try:
            with UdsHttpClient(str(path), timeout=5) as client, pytest.raises(http.client.HTTPException):
                client.request("GET", "/api/v1/daemon")
        finally:
            thread.join(timeout=5)
