"""One contract for every blob backend, each against real files or a real loopback server, plus faults.

http-proxy runs against nginx (TCP and unix socket) and tiny scripted servers, s3 against moto.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from botocore.config import Config
from botocore.session import Session

from nydus_actors.config import parse_config
from nydus_actors.exceptions import Unsupported
from nydus_actors.metrics import size_index
from nydus_actors.storage.backends.base import BackendError, BlobBackend
from nydus_actors.storage.backends.factory import open_backend

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
BLOB_A = "a1" * 32  # 64 hex digits, like a real blob id
BLOB_B = "b2" * 32
MISSING = "f0" * 32
BLOBS = {
    BLOB_A: random.Random(1).randbytes(300_000),  # spans several size buckets and nginx's sendfile
    BLOB_B: random.Random(2).randbytes(5_000),
}
BUCKET = "nydus-blobs"
PREFIX = "layers/"
S3_KEYS = {"access_key_id": "testing", "access_key_secret": "testing"}
METRIC_FIELDS = {
    "backend_type",
    "read_count",
    "read_errors",
    "read_amount_total",
    "read_cumulative_latency_millis_total",
    "read_cumulative_latency_millis_dist",
    "read_count_block_size_dist",
    "read_latency_sizes_dist",
}


def make_backend(kind: str, settings: dict, on_failure: Callable[[str], None] | None = None) -> BlobBackend:
    """Go the daemon's way: config text → FsConfig → factory."""
    text = json.dumps({"version": 2, "id": "/contract", "backend": {"type": kind, kind: settings}})
    return open_backend(parse_config(text), backend_id="/contract", on_failure=on_failure)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tempfile_dir() -> str:
    """A short directory of its own: unix socket paths are limited to 107 bytes."""
    return tempfile.mkdtemp(prefix="nyd-", dir="/tmp")


def write_blobs(where: Path, blobs: dict[str, bytes]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for blob_id, data in blobs.items():
        (where / blob_id).write_bytes(data)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Nginx:
    """A foreground nginx serving `root`, on 127.0.0.1 (`port`, 0 = pick a free one) and/or a unix socket."""

    def __init__(
        self,
        workdir: Path,
        root: Path,
        *,
        port: int | None = 0,
        unix_socket: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.workdir, self.root, self.port, self.unix_socket, self.tls = workdir, root, port, unix_socket, tls
        self.proc: subprocess.Popen | None = None
        self.workers: list[int] = []
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)

    def _config(self, port: int | None) -> str:
        d = self.workdir
        listens = (f"listen 127.0.0.1:{port}{' ssl' if self.tls else ''};" if port else "") + (
            f" listen unix:{self.unix_socket};" if self.unix_socket else ""
        )
        if self.tls:
            listens += f" ssl_certificate {self.tls[0]}; ssl_certificate_key {self.tls[1]};"
        temps = f"client_body_temp_path {d}/tmp/body;" + "".join(
            f" {sub}_temp_path {d}/tmp/{sub};" for sub in ("proxy", "fastcgi", "uwsgi", "scgi")
        )
        # The worker runs as root: pytest's temporary directories are 0700, so `nobody` could not read them.
        return (
            f"user root; worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log warn;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log off; {temps} default_type application/octet-stream; sendfile on;\n"
            f"  server {{ {listens} root {self.root}; }} }}\n"
        )

    def start(self) -> None:
        assert NGINX is not None
        attempts = 5 if self.port == 0 else 1
        for _ in range(attempts):
            port = free_port() if self.port == 0 else self.port
            conf = self.workdir / "nginx.conf"
            conf.write_text(self._config(port))
            log = self.workdir / "error.log"
            log.write_text("")
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.workdir), "-c", str(conf), "-e", str(log)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(port):
                if self.port == 0:
                    self.port = port  # a restart reuses it
                self.workers = self._children()
                return
            self.stop()
            if "Address already in use" not in log.read_text():
                break  # only a port clash is worth another try
        raise RuntimeError(f"failed to start nginx: {(self.workdir / 'error.log').read_text()}")

    def _wait_ready(self, port: int | None) -> bool:
        """Up means a worker answered HTTP (the listen backlog alone accepts before any worker runs)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if port:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                else:
                    sock = socket.socket(socket.AF_UNIX)
                    sock.settimeout(1)
                    sock.connect(self.unix_socket)
                with sock:
                    sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
                    if sock.recv(16).startswith(b"HTTP/"):
                        return True
            except OSError:
                time.sleep(0.01)
        return False

    def _children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        # The master reaps its worker on a clean stop; make sure, by PID, that none outlives the test.
        deadline = time.monotonic() + 2
        while any(pid_alive(pid) for pid in self.workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in self.workers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc, self.workers = None, []


@pytest.fixture(scope="module")
def nginx_blobs(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """One nginx on TCP and a unix socket; yields (`http://127.0.0.1:port`, socket path)."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    base = tmp_path_factory.mktemp("nginx")
    write_blobs(base / "www" / "blobs", BLOBS)  # TCP: <addr><path>/<id> with path /blobs
    write_blobs(base / "www", BLOBS)  # unix socket: /<id>, path ignored
    sock_dir = Path(tempfile_dir())
    server = Nginx(base, base / "www", unix_socket=str(sock_dir / "blobs.sock"))
    try:
        server.start()
        yield f"http://127.0.0.1:{server.port}", server.unix_socket
    finally:
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    """A moto S3 server holding BLOBS under `<BUCKET>/<PREFIX>`; yields `127.0.0.1:port`."""
    server_mod = pytest.importorskip("moto.server", reason="moto[s3] is not installed")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = s3_client(f"http://{host}:{port}", **S3_KEYS)
        client.create_bucket(Bucket=BUCKET)
        for blob_id, data in BLOBS.items():
            client.put_object(Bucket=BUCKET, Key=PREFIX + blob_id, Body=data)
        client.put_object(Bucket=BUCKET, Key="public/open", Body=b"readable by anyone", ACL="public-read")
        yield f"{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint_url: str, *, access_key_id: str, access_key_secret: str):
    return Session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=access_key_id,
        aws_secret_access_key=access_key_secret,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def s3_settings(endpoint: str, **overrides) -> dict:
    settings = {
        "scheme": "http",
        "endpoint": endpoint,
        "region": "us-east-1",
        "bucket_name": BUCKET,
        "object_prefix": PREFIX,
        **S3_KEYS,
    }
    return {**settings, **overrides}


@dataclass
class Case:
    """One backend setup of the contract: how to build it, what it holds and how to ask for a missing blob."""

    kind: str
    backend_type: str
    settings: dict
    blobs: dict[str, bytes]
    missing: tuple[str, dict] = (MISSING, {})
    opened: list[BlobBackend] = field(default_factory=list)

    def make(self, on_failure: Callable[[str], None] | None = None, **overrides) -> BlobBackend:
        backend = make_backend(self.kind, {**self.settings, **overrides}, on_failure)
        self.opened.append(backend)
        return backend


CASES = ["localfs-blob_file", "localfs-dir", "localfs-alt_dirs", "http-proxy-tcp", "http-proxy-unix", "s3"]


@pytest.fixture(params=CASES)
def case(request, tmp_path) -> Iterator[Case]:
    name = request.param
    if name == "localfs-blob_file":
        write_blobs(tmp_path, {BLOB_A: BLOBS[BLOB_A]})
        made = Case(
            "localfs",
            "localfs",
            {"blob_file": str(tmp_path / BLOB_A)},
            {BLOB_A: BLOBS[BLOB_A]},
            (BLOB_A, {"blob_file": str(tmp_path / "absent")}),
        )
    elif name == "localfs-dir":
        write_blobs(tmp_path / "dir", BLOBS)
        made = Case("localfs", "localfs", {"dir": str(tmp_path / "dir")}, BLOBS)
    elif name == "localfs-alt_dirs":
        write_blobs(tmp_path / "dir", {})
        write_blobs(tmp_path / "alt1", {BLOB_A: BLOBS[BLOB_A]})
        write_blobs(tmp_path / "alt2", {BLOB_B: BLOBS[BLOB_B]})
        alt = [str(tmp_path / "alt1"), str(tmp_path / "alt2")]
        made = Case("localfs", "localfs", {"dir": str(tmp_path / "dir"), "alt_dirs": alt}, BLOBS)
    elif name == "http-proxy-tcp":
        addr, _ = request.getfixturevalue("nginx_blobs")
        made = Case("http-proxy", "http-proxy", {"addr": addr, "path": "/blobs", "retry_limit": 2}, BLOBS)
    elif name == "http-proxy-unix":
        _, sock = request.getfixturevalue("nginx_blobs")
        made = Case("http-proxy", "http-proxy", {"addr": sock, "path": "/ignored", "retry_limit": 2}, BLOBS)
    else:
        made = Case("s3", "oss", s3_settings(request.getfixturevalue("moto_s3"), retry_limit=2), BLOBS)
    yield made
    for backend in made.opened:
        backend.close()


# ---- the contract ------------------------------------------------------------------------------------


def test_blob_size_is_the_file_size(case: Case) -> None:
    backend = case.make()
    assert backend.backend_type == case.backend_type
    for blob_id, data in case.blobs.items():
        assert backend.blob_size(blob_id) == len(data)


def test_reads_return_exact_bytes(case: Case) -> None:
    backend = case.make()
    for blob_id, data in case.blobs.items():
        size = len(data)
        spans = [(0, 1), (0, 4096), (size // 2 - 777, 1555), (size - 1000, 1000), (size - 1, 1), (0, size)]
        for offset, length in spans:
            assert backend.read_range(blob_id, offset, length) == data[offset : offset + length], (
                offset,
                length,
            )


def test_concurrent_reads_from_8_threads(case: Case) -> None:
    backend = case.make()
    blob_ids = sorted(case.blobs)
    start = threading.Barrier(8)

    def worker(seed: int) -> int:
        rng = random.Random(seed)
        start.wait(5)
        checked = 0
        for _ in range(20):
            blob_id = rng.choice(blob_ids)
            data = case.blobs[blob_id]
            offset = rng.randrange(len(data))
            length = rng.randint(1, min(65536, len(data) - offset))
            assert backend.read_range(blob_id, offset, length) == data[offset : offset + length]
            checked += 1
        return checked

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 160
    assert backend.metrics.export()["read_count"] == 160


def test_missing_blob_is_a_permanent_error_and_reported(case: Case) -> None:
    lines: list[str] = []
    blob_id, overrides = case.missing
    backend = case.make(on_failure=lines.append, **overrides)
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.read_range(blob_id, 0, 100)
    with pytest.raises(BackendError) as stat_caught:
        backend.blob_size(blob_id)
    assert time.monotonic() - started < 5  # permanent: no retries, no waiting
    for error in (caught.value, stat_caught.value):
        assert not error.temporary and blob_id in error.text
    assert len(lines) == 2
    assert all(blob_id in line and line.startswith(f"{case.backend_type} backend:") for line in lines)


def test_read_past_the_end_is_a_permanent_error(case: Case) -> None:
    backend = case.make()
    blob_id, data = next(iter(case.blobs.items()))
    for offset, length in ((len(data) - 10, 20), (len(data), 10)):
        with pytest.raises(BackendError) as caught:
            backend.read_range(blob_id, offset, length)
        assert not caught.value.temporary and blob_id in caught.value.text


def test_metrics_count_reads_bytes_and_errors(case: Case) -> None:
    backend = case.make()
    blob_id, data = max(case.blobs.items(), key=lambda item: len(item[1]))
    sizes = [100, 4096, 70_000, len(data)]
    for size in sizes:
        backend.read_range(blob_id, 0, size)
    with pytest.raises(BackendError):
        backend.read_range(blob_id, len(data), 1)
    out = backend.metrics.export()
    assert set(out) == METRIC_FIELDS
    assert out["backend_type"] == case.backend_type
    assert (out["read_count"], out["read_errors"], out["read_amount_total"]) == (4, 1, sum(sizes))
    for name in ("read_cumulative_latency_millis_dist", "read_count_block_size_dist"):
        assert len(out[name]) == 8
    assert len(out["read_latency_sizes_dist"]) == 8 and all(
        len(row) == 8 for row in out["read_latency_sizes_dist"]
    )
    expected = [0] * 8
    for size in sizes:
        expected[size_index(size)] += 1
    assert out["read_count_block_size_dist"] == expected
    assert [sum(row) for row in out["read_latency_sizes_dist"]] == expected


# ---- localfs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("blob_id", ["../etc", "a/b", ".", "..", ""])
def test_localfs_rejects_ids_that_are_not_plain_names(tmp_path: Path, blob_id: str) -> None:
    backend = make_backend("localfs", {"dir": str(tmp_path)})
    with pytest.raises(BackendError) as caught:
        backend.read_range(blob_id, 0, 1)
    assert not caught.value.temporary and "not a plain blob id" in caught.value.text


def test_localfs_prefers_dir_and_keeps_its_descriptor(tmp_path: Path) -> None:
    (tmp_path / "main").mkdir()
    (tmp_path / "alt").mkdir()
    (tmp_path / "main" / BLOB_A).write_bytes(b"from dir")
    (tmp_path / "alt" / BLOB_A).write_bytes(b"from alt")
    backend = make_backend("localfs", {"dir": str(tmp_path / "main"), "alt_dirs": [str(tmp_path / "alt")]})
    assert backend.read_range(BLOB_A, 0, 8) == b"from dir"
    # The descriptor is cached: the blob stays readable after its name goes away.
    (tmp_path / "main" / BLOB_A).unlink()
    assert backend.read_range(BLOB_A, 5, 3) == b"dir"
    backend.close()
    assert backend.read_range(BLOB_A, 0, 8) == b"from alt"
    backend.close()


# ---- http-proxy faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_http_proxy_server_down_then_back(tmp_path: Path, transport: str) -> None:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    write_blobs(tmp_path / "www", BLOBS)
    sock_dir = Path(tempfile_dir())
    sock = str(sock_dir / "down.sock")
    server = Nginx(tmp_path, tmp_path / "www", port=0 if transport == "tcp" else None, unix_socket=sock)
    lines: list[str] = []
    timeout, retry_limit = 1, 2
    try:
        server.start()
        addr = f"http://127.0.0.1:{server.port}" if transport == "tcp" else sock
        settings = {"addr": addr, "timeout": timeout, "connect_timeout": timeout, "retry_limit": retry_limit}
        backend = make_backend("http-proxy", settings, lines.append)
        assert backend.read_range(BLOB_B, 10, 20) == BLOBS[BLOB_B][10:30]
        server.stop()
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            backend.read_range(BLOB_B, 10, 20)
        elapsed = time.monotonic() - started
        # Each attempt may take the timeout; the backoff before retries 1 and 2 is at most 0.2 + 0.4 s.
        assert elapsed < timeout * (retry_limit + 1) + 0.6 + 2.0
        assert caught.value.temporary and BLOB_B in caught.value.text
        assert "failed to connect" in caught.value.text
        assert len(lines) == 1 and BLOB_B in lines[0]
        server.start()  # same port or socket path
        assert backend.read_range(BLOB_B, 10, 20) == BLOBS[BLOB_B][10:30]
        out = backend.metrics.export()
        assert (out["read_count"], out["read_errors"]) == (2, 1)
        backend.close()
    finally:
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_http_proxy_timeouts_bound_the_failure() -> None:
    # A listener that never accepts: connects succeed through the backlog, answers never come.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        timeout, retry_limit = 1, 1
        settings = {
            "addr": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "timeout": timeout,
            "connect_timeout": timeout,
            "retry_limit": retry_limit,
        }
        backend = make_backend("http-proxy", settings)
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            backend.read_range(BLOB_A, 0, 10)
        elapsed = time.monotonic() - started
        backend.close()
    assert caught.value.temporary and "timed out" in caught.value.text
    assert timeout * (retry_limit + 1) * 0.9 <= elapsed < timeout * (retry_limit + 1) + 0.2 + 2.0


class ScriptedServer:
    """A tiny HTTP server serving BLOBS; each GET takes the next scripted action ('ok' once it runs out).

    Actions: an int status to answer with, 'ignore-range' (200 with the whole blob), 'short' (206 whose
    body stops halfway), 'ok' (206 with the range).
    """

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, str, str | None]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:
                owner.requests.append(("HEAD", self.path, None))
                data = BLOBS.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()

            def do_GET(self) -> None:
                owner.requests.append(("GET", self.path, self.headers.get("Range")))
                action = owner.script.pop(0) if owner.script else "ok"
                data = BLOBS[self.path.rsplit("/", 1)[-1]]
                if isinstance(action, int):
                    body = b"scripted failure"
                    self.send_response(action)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                first, last = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
                if action == "ignore-range":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                part = data[first : last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                self.wfile.write(part[: len(part) // 2] if action == "short" else part)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for the loop to notice.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.addr = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self) -> int:
        return sum(1 for method, _, _ in self.requests if method == "GET")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def scripted() -> Iterator[Callable[[list], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: list) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_http_proxy_retries_recover_from_503(scripted) -> None:
    server = scripted([503, 503])
    lines: list[str] = []
    backend = make_backend("http-proxy", {"addr": server.addr, "path": "/v1", "retry_limit": 3}, lines.append)
    assert backend.read_range(BLOB_A, 1000, 5000) == BLOBS[BLOB_A][1000:6000]
    assert server.gets() == 3 and lines == []
    assert server.requests[-1] == ("GET", f"/v1/{BLOB_A}", "bytes=1000-5999")
    out = backend.metrics.export()
    assert (out["read_count"], out["read_errors"], out["read_amount_total"]) == (1, 0, 5000)
    backend.close()


@pytest.mark.parametrize(("status", "temporary"), [(403, False), (404, False), (416, False), (500, True)])
def test_http_proxy_status_mapping(scripted, status: int, temporary: bool) -> None:
    server = scripted([status] * 5)
    lines: list[str] = []
    backend = make_backend("http-proxy", {"addr": server.addr, "retry_limit": 1}, lines.append)
    with pytest.raises(BackendError) as caught:
        backend.read_range(BLOB_B, 0, 10)
    assert caught.value.temporary is temporary
    assert server.gets() == (2 if temporary else 1)  # permanent errors are not retried
    text = caught.value.text
    assert BLOB_B in text and server.addr in text and f"HTTP {status}" in text
    assert len(lines) == 1 and BLOB_B in lines[0]
    backend.close()


def test_http_proxy_short_body_is_temporary_and_retried(scripted) -> None:
    server = scripted(["short", "short"])
    backend = make_backend("http-proxy", {"addr": server.addr, "retry_limit": 0})
    with pytest.raises(BackendError) as caught:
        backend.read_range(BLOB_A, 0, 100_000)
    assert caught.value.temporary and "reading the body" in caught.value.text
    retrying = make_backend("http-proxy", {"addr": server.addr, "retry_limit": 1})
    assert retrying.read_range(BLOB_A, 0, 100_000) == BLOBS[BLOB_A][:100_000]
    backend.close()
    retrying.close()


def test_http_proxy_copes_with_a_server_ignoring_range(scripted) -> None:
    server = scripted(["ignore-range", "ignore-range"])
    backend = make_backend("http-proxy", {"addr": server.addr})
    assert backend.read_range(BLOB_A, 123_456, 1000) == BLOBS[BLOB_A][123_456:124_456]
    assert backend.read_range(BLOB_A, 0, 10) == BLOBS[BLOB_A][:10]
    assert backend.blob_size(BLOB_A) == len(BLOBS[BLOB_A])
    backend.close()


def test_http_proxy_over_tls_verifies_the_server(tmp_path: Path) -> None:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    # An EC key is fast to make; the IP SAN is what a client connecting to 127.0.0.1 checks.
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    write_blobs(tmp_path / "www", BLOBS)
    server = Nginx(tmp_path, tmp_path / "www", tls=(cert, key))
    try:
        server.start()
        addr = f"https://127.0.0.1:{server.port}"
        trusting = make_backend("http-proxy", {"addr": addr, "ca_cert_files": [str(cert)]})
        assert trusting.read_range(BLOB_A, 7, 70) == BLOBS[BLOB_A][7:77]
        insecure = make_backend("http-proxy", {"addr": addr, "skip_verify": True})
        assert insecure.blob_size(BLOB_B) == len(BLOBS[BLOB_B])
        strict = make_backend("http-proxy", {"addr": addr, "retry_limit": 2})
        with pytest.raises(BackendError) as caught:
            strict.read_range(BLOB_A, 0, 10)
        assert not caught.value.temporary and "tls failure" in caught.value.text
        for backend in (trusting, insecure, strict):
            backend.close()
    finally:
        server.stop()


def test_http_proxy_rejects_a_relative_addr() -> None:
    with pytest.raises(BackendError, match="neither an http"):
        make_backend("http-proxy", {"addr": "relative/path.sock"})


# ---- s3 ----------------------------------------------------------------------------------------------


def test_s3_wrong_bucket_is_a_clear_permanent_error(moto_s3: str) -> None:
    backend = make_backend("s3", s3_settings(moto_s3, bucket_name="no-such-bucket", retry_limit=2))
    with pytest.raises(BackendError) as stat:
        backend.blob_size(BLOB_A)
    with pytest.raises(BackendError) as read:
        backend.read_range(BLOB_A, 0, 10)
    for caught in (stat, read):
        assert not caught.value.temporary and BLOB_A in caught.value.text
        assert "no-such-bucket" in caught.value.text and "404" in caught.value.text
    assert "NoSuchBucket" in read.value.text
    backend.close()


def test_s3_anonymous_reads_public_objects_only(moto_s3: str) -> None:
    backend = make_backend(
        "s3", s3_settings(moto_s3, object_prefix="public/", access_key_id="", access_key_secret="")
    )
    assert backend.read_range("open", 0, 8) == b"readable"
    private = make_backend("s3", s3_settings(moto_s3, access_key_id="", access_key_secret=""))
    with pytest.raises(BackendError) as caught:
        private.read_range(BLOB_B, 0, 8)
    assert not caught.value.temporary and "403" in caught.value.text
    backend.close()
    private.close()


@pytest.fixture
def moto_checking_signatures(tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """A moto_server verifying SigV4 (test-servers.md §6.4); yields its endpoint and a working key pair."""
    pytest.importorskip("moto.server", reason="moto[s3] is not installed")
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not os.access(binary, os.X_OK):
        pytest.skip("moto_server is not installed")
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(tmp_path / "moto.log", "wb") as log:
        proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "moto.log").read_text()
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.05)
        keys = signed_moto_account(url)
        client = s3_client(url, **keys)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=PREFIX + "odd name~1", Body=BLOBS[BLOB_B])
        yield f"127.0.0.1:{port}", keys
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def signed_moto_account(url: str) -> dict:
    """Spend moto's three unauthenticated calls on an IAM user allowed s3:*, and return its keys."""
    iam = Session().create_client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
        config=Config(retries={"max_attempts": 1}),
    )
    iam.create_user(UserName="ci")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="ci", PolicyName="all-s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="ci")["AccessKey"]
    return {"access_key_id": key["AccessKeyId"], "access_key_secret": key["SecretAccessKey"]}


def test_s3_signatures_are_verified(moto_checking_signatures) -> None:
    endpoint, keys = moto_checking_signatures
    backend = make_backend("s3", s3_settings(endpoint, **keys))
    # The key holds a space and a `~`: the signed path must be escaped exactly as S3 expects.
    assert backend.blob_size("odd name~1") == len(BLOBS[BLOB_B])
    assert backend.read_range("odd name~1", 100, 50) == BLOBS[BLOB_B][100:150]
    forged = make_backend(
        "s3", s3_settings(endpoint, access_key_id=keys["access_key_id"], access_key_secret="x")
    )
    with pytest.raises(BackendError) as caught:
        forged.read_range("odd name~1", 0, 10)
    assert not caught.value.temporary and "SignatureDoesNotMatch" in caught.value.text
    backend.close()
    forged.close()


# ---- factory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("oss", {"endpoint": "oss.example.com", "bucket_name": "b"}),
        ("localdisk", {"device_path": "/dev/null"}),
    ],
)
def test_factory_refuses_unsupported_kinds(kind: str, settings: dict) -> None:
    with pytest.raises(Unsupported, match=kind):
        make_backend(kind, settings)


def test_factory_opens_the_registry_backend() -> None:
    pytest.importorskip(
        "nydus_actors.storage.backends.registry", reason="the registry backend is not there yet"
    )
    backend = make_backend("registry", {"scheme": "http", "host": "127.0.0.1:1", "repo": "library/x"})
    assert type(backend).__name__ == "RegistryBackend" and backend.backend_type == "registry"
    backend.close()
