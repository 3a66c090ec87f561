"""Real storage servers on 127.0.0.1 for backend tests: docker-registry (plain, Basic, Bearer, TLS, redirect).

Also small in-process HTTP servers: a token server, a forward proxy and a scripted blob server.
Every process started here is stopped by its PID when its `with` block or fixture ends.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from nydus_actors.config import _backend_section

REGISTRY_BIN = shutil.which("docker-registry")
NGINX_BIN = shutil.which("nginx")
OPENSSL_BIN = shutil.which("openssl")
requires_registry = pytest.mark.skipif(
    REGISTRY_BIN is None, reason="needs the docker-registry binary (apt-get install docker-registry)"
)
requires_nginx = pytest.mark.skipif(NGINX_BIN is None, reason="needs nginx (apt-get install nginx-light)")
requires_openssl = pytest.mark.skipif(OPENSSL_BIN is None, reason="needs the openssl command")

USER, PASSWORD = "testuser", "testpass"
SERVICE, ISSUER = "test-registry", "test-issuer"
START_TIMEOUT = 10.0
#: Every server process started here, so a test module can check that none outlived it.
STARTED_PIDS: list[int] = []
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade"}


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    """nydusd's `auth` value: base64 of `user:pass`."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot report an ephemeral one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def blob_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- processes ------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, then SIGKILL if it lingers; always reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, context: ssl.SSLContext | None = None) -> None:
    """Poll `url` until any HTTP answer arrives (401 means up too); fail fast if the process died."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"failed to start {proc.args[0]}: exited {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"failed to start {proc.args[0]}: {url} never answered") from None
            time.sleep(0.02)


def _wait_port_line(proc: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise RuntimeError(f"failed to start docker-registry: no 'listening on' line: {log.read_text()}")


def make_tls_cert(workdir: Path) -> tuple[Path, Path]:
    """A self-signed cert for 127.0.0.1/localhost that is its own CA file; returns (cert, key)."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [OPENSSL_BIN or "openssl", "req", "-x509", "-nodes",
         "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


# -- docker-registry ------------------------------------------------------------------------------------


@dataclass
class Registry:
    """A running docker-registry."""

    host: str
    scheme: str
    data_dir: Path
    log: Path
    pid: int
    ca_file: Path | None = None
    user: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    redirect_url: str | None = None  # where blob reads are redirected to (nginx)
    last_authorization: str | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def auth(self) -> str | None:
        return basic_auth(self.user, self.password) if self.user and self.password else None

    def settings(self, repo: str, **raw: object) -> dict:
        """Registry backend settings as the daemon's config normalizes them."""
        return _backend_section("registry", {"scheme": self.scheme, "host": self.host, "repo": repo, **raw})

    def _context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def _call(
        self, method: str, url: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict, bytes]:
        headers = dict(headers or {})
        for _ in range(2):
            request = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10, context=self._context()) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as ex:
                status, reply_headers, data = ex.code, dict(ex.headers), ex.read()
            if status != 401 or "Authorization" in headers:
                return status, reply_headers, data
            headers["Authorization"] = self._answer(reply_headers.get("Www-Authenticate", ""))
            # Kept for the upload's PUT: sent without it, the registry answers 401 before
            # reading the body and the client may see a broken pipe instead of the 401.
            self.last_authorization = headers["Authorization"]
        return status, reply_headers, data

    def _answer(self, challenge: str) -> str:
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            return f"Basic {self.auth}"
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        query = f"service={params.get('service', '')}&scope={params.get('scope', '')}"
        request = urllib.request.Request(f"{params['realm']}?{query}")
        if self.auth:
            request.add_header("Authorization", f"Basic {self.auth}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return "Bearer " + json.loads(resp.read())["token"]

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload a blob (POST + monolithic PUT) and return its digest `sha256:<hex>`."""
        digest = blob_digest(data)
        status, headers, body = self._call("POST", f"{self.url}/v2/{repo}/blobs/uploads/")
        if status != 202:
            raise RuntimeError(f"failed to start an upload to {repo}: {status} {body[:200]!r}")
        location = urljoin(self.url, headers["Location"])
        location += ("&" if "?" in location else "?") + f"digest={digest}"
        # Without the content type the registry parses the body as a form and rejects the digest.
        headers = {"Content-Type": "application/octet-stream"}
        if self.last_authorization:
            headers["Authorization"] = self.last_authorization
        status, _, body = self._call("PUT", location, data, headers)
        if status != 201:
            raise RuntimeError(f"failed to upload a blob to {repo}: {status} {body[:200]!r}")
        return digest

    def delete_blob(self, repo: str, digest: str) -> None:
        status, _, body = self._call("DELETE", f"{self.url}/v2/{repo}/blobs/{digest}")
        if status != 202:
            raise RuntimeError(f"failed to delete blob {digest}: {status} {body[:200]!r}")


def _registry_config(
    data_dir: Path, *, tls: tuple[Path, Path] | None, auth: str, redirect_url: str | None
) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",  # the 'listening on' line is logged at info
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {data_dir}",
        "  delete:",
        "    enabled: true",
        "http:",
        "  addr: 127.0.0.1:0",
        "  secret: test-only-secret",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if auth:
        lines += ["auth:", *("  " + line for line in auth.splitlines())]
    if redirect_url:
        lines += [
            "middleware:",
            "  storage:",
            "    - name: redirect",
            "      options:",
            f"        baseurl: {redirect_url}",
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_registry(
    workdir: Path,
    *,
    auth_block: str = "",
    tls: bool = False,
    redirect_url: str | None = None,
    data_dir: Path | None = None,
) -> Iterator[Registry]:
    """Start docker-registry with a config of its own on an ephemeral port; stop it on exit."""
    if REGISTRY_BIN is None:
        pytest.skip("needs the docker-registry binary (apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    cert = make_tls_cert(workdir) if tls else None
    config = workdir / "config.yml"
    config.write_text(_registry_config(data_dir, tls=cert, auth=auth_block, redirect_url=redirect_url))
    log = workdir / "registry.log"
    # The registry panics at start when AWS_CA_BUNDLE is set (test-servers §1.6).
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    STARTED_PIDS.append(proc.pid)
    try:
        port = _wait_port_line(proc, log)
        registry = Registry(
            host=f"127.0.0.1:{port}",
            scheme="https" if tls else "http",
            data_dir=data_dir,
            log=log,
            pid=proc.pid,
            ca_file=cert[0] if cert else None,
            redirect_url=redirect_url,
        )
        _wait_http(f"{registry.url}/v2/", proc, log, registry._context())
        yield registry
    finally:
        _stop(proc)


def _htpasswd_line(user: str, password: str) -> str:
    try:
        import bcrypt  # noqa: PLC0415 - optional; htpasswd does the same
    except ImportError:
        out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
        return out.stdout.strip()
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}"


@contextlib.contextmanager
def registry_server(workdir: Path, variant: str = "plain", **token_options: object) -> Iterator[Registry]:
    """A registry in one of the variants plain / basic / token / tls / redirect.

    `token` also starts a `TokenServer` (options passed on) reachable as `registry.token_server`;
    `redirect` also starts nginx serving the registry's data directory, which blob reads are sent to.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if variant in ("plain", "tls"):
        with run_registry(workdir, tls=variant == "tls") as registry:
            yield registry
    elif variant == "basic":
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(_htpasswd_line(USER, PASSWORD) + "\n")
        block = f"htpasswd:\n  realm: test-registry\n  path: {htpasswd}"
        with run_registry(workdir, auth_block=block) as registry:
            registry.user, registry.password = USER, PASSWORD
            yield registry
    elif variant == "token":
        with TokenServer({USER: PASSWORD}, **token_options) as tokens:  # type: ignore[arg-type]
            bundle = workdir / "token.crt"
            bundle.write_bytes(tokens.cert_pem)
            block = (
                f"token:\n  realm: {tokens.realm}\n  service: {SERVICE}\n"
                f"  issuer: {ISSUER}\n  rootcertbundle: {bundle}"
            )
            with run_registry(workdir, auth_block=block) as registry:
                registry.user, registry.password = USER, PASSWORD
                registry.token_server = tokens
                yield registry
    elif variant == "redirect":
        data_dir = workdir / "data"
        data_dir.mkdir(exist_ok=True)
        with (
            run_nginx(data_dir, workdir / "nginx") as base,
            run_registry(workdir, redirect_url=base + "/", data_dir=data_dir) as registry,
        ):
            yield registry
    else:
        raise ValueError(f"unknown registry variant {variant!r}")


# -- nginx ----------------------------------------------------------------------------------------------


def _nginx_config(workdir: Path, root: Path, port: int) -> str:
    temp = workdir / "tmp"
    return f"""
user root;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;  proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;   uwsgi_temp_path {temp}/uwsgi;  scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def run_nginx(root: Path, workdir: Path) -> Iterator[str]:
    """Serve `root` with Range support; yields the base URL `http://127.0.0.1:<port>`."""
    if NGINX_BIN is None:
        pytest.skip("needs nginx (apt-get install nginx-light)")
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    log = workdir / "nginx.log"
    for attempt in range(3):
        port = free_port()  # nginx cannot report an ephemeral port: retry if someone took it meanwhile
        config = workdir / "nginx.conf"
        config.write_text(_nginx_config(workdir, root, port))
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [NGINX_BIN, "-p", str(workdir), "-c", str(config), "-e", "stderr", "-g", "daemon off;"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        STARTED_PIDS.append(proc.pid)
        try:
            try:
                _wait_http(f"http://127.0.0.1:{port}/", proc, log)
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            yield f"http://127.0.0.1:{port}"
            return
        finally:
            _stop(proc)


# -- small in-process HTTP servers ----------------------------------------------------------------------


class _TrackingServer(ThreadingHTTPServer):
    """Knows its open connections, so that stopping it also drops keep-alive clients."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: object) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # Clients that hang up mid-exchange (closed pools, aborted reads) are expected here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(
        self, status: int, body: bytes = b"", headers: dict | None = None, *, length: int | None = None
    ):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def request_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        self.server.owner.handle(self)  # type: ignore[attr-defined]

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET


class _HttpService:
    """An in-process HTTP server on 127.0.0.1:0 run by a thread; use as a context manager."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._server = _TrackingServer(_Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, request: _Handler) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.lru_cache(maxsize=1)
def _signing_material() -> tuple[object, bytes, bytes]:
    """An RSA key and a self-signed cert for it (PEM and DER), made once per test run."""
    from cryptography import x509  # noqa: PLC0415 - only token tests need it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-token-issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(_HttpService):
    """A Bearer token server for docker-registry's `auth.token` (RS256 JWTs with an x5c header).

    `GET /token?service=&scope=` and `POST /token` (form body). Known users get what they ask for,
    anonymous callers only `pull`, wrong passwords a 401. Counters: `issued`, `posts`, `gets`.
    Knobs: `expires_in`, `allow_post` (False answers POST with 405), `fail_status`.
    """

    def __init__(self, users: dict[str, str] | None = None, *, expires_in: int = 300) -> None:
        self.users = dict(users or {})
        self.expires_in = expires_in
        self.allow_post = True
        self.fail_status: int | None = None
        self.issued = self.posts = self.gets = 0
        self._key, self.cert_pem, self._cert_der = _signing_material()
        super().__init__()

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def issue(self, subject: str, service: str, access: list[dict]) -> str:
        """A signed JWT granting `access` (`[{"type","name","actions"}]`)."""
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

        now = int(time.time())
        claims = {
            "iss": ISSUER, "sub": subject, "aud": service, "iat": now, "nbf": now - 10,
            "exp": now + self.expires_in, "jti": uuid.uuid4().hex, "access": access,
        }  # fmt: skip
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[attr-defined]
        return f"{signing_input}.{_b64url(signature)}"

    def handle(self, request: _Handler) -> None:
        parts = urlsplit(request.path)
        if parts.path != "/token":
            request.reply(404)
            return
        if request.command == "POST":
            body = request.request_body().decode()
            with self.lock:
                self.posts += 1
            if not self.allow_post:
                request.reply(405)
                return
            params = parse_qs(body)
        else:
            with self.lock:
                self.gets += 1
            params = parse_qs(parts.query)
        if self.fail_status:
            request.reply(self.fail_status, b'{"error":"injected failure"}')
            return
        subject = self._user(request.headers.get("Authorization", ""))
        if subject is None:
            request.reply(401, b'{"error":"bad credentials"}')
            return
        access = []
        for scope in " ".join(params.get("scope", [])).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = [a for a in wanted if a in ("pull", "push", "delete", "*")] if subject else ["pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        token = self.issue(subject, params.get("service", [""])[0], access)
        with self.lock:
            self.issued += 1
        issued_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps(
            {"token": token, "access_token": token, "expires_in": self.expires_in, "issued_at": issued_at}
        ).encode()
        request.reply(200, body, {"Content-Type": "application/json"})

    def _user(self, authorization: str) -> str | None:
        """The user name, "" for anonymous, None for wrong credentials."""
        if not authorization.lower().startswith("basic "):
            return ""
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password else None


class ForwardProxy(_HttpService):
    """A plain HTTP forward proxy (what dfdaemon looks like to nydusd); `/ping` answers 200.

    Counts proxied `requests`; `fail_status` makes it answer that status instead of forwarding.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.pings = 0
        self.fail_status: int | None = None
        super().__init__()

    def handle(self, request: _Handler) -> None:
        if not request.path.startswith("http://"):
            with self.lock:
                self.pings += 1
            request.reply(200 if request.path == "/ping" else 404, b"pong")
            return
        with self.lock:
            self.requests += 1
        body = request.request_body() if request.headers.get("Content-Length") else None
        if self.fail_status:
            request.reply(self.fail_status, b"injected proxy failure")
            return
        parts = urlsplit(request.path)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        conn = http.client.HTTPConnection(parts.netloc, timeout=10)
        try:
            conn.request(
                request.command, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers
            )
            resp = conn.getresponse()
            try:
                data = resp.read()
            except http.client.IncompleteRead as ex:  # the registry's 416 announces more than it sends
                data = ex.partial
            passed = {
                k: v
                for k, v in resp.getheaders()
                if k.lower() not in _HOP_HEADERS | {"content-length", "transfer-encoding"}
            }
            length = int(resp.getheader("Content-Length") or 0) if request.command == "HEAD" else None
            request.reply(resp.status, data, passed, length=length)
        except OSError:
            request.reply(502, b"upstream unreachable")
        finally:
            conn.close()


class BlobServer(_HttpService):
    """Serves blobs at any path containing their sha256 hex, with single-range support.

    `script` holds statuses to answer the next requests with (e.g. `[503, 503]`) before serving normally;
    `requests` counts every request; `ranges` and `seen_headers` record their Range and all headers.
    """

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.script: list[int] = []
        self.requests = 0
        self.ranges: list[str | None] = []
        self.seen_headers: list[dict[str, str]] = []
        self.honor_range = True  # False: answer 200 with the whole blob, like a server without Range support
        super().__init__()

    def add(self, data: bytes) -> str:
        """Serve `data`; returns its hex digest (the blob id)."""
        hexdigest = hashlib.sha256(data).hexdigest()
        self.blobs[hexdigest] = data
        return hexdigest

    def handle(self, request: _Handler) -> None:
        with self.lock:
            self.requests += 1
            self.ranges.append(request.headers.get("Range"))
            self.seen_headers.append(dict(request.headers.items()))
            status = self.script.pop(0) if self.script else None
        if status is not None:
            request.reply(status, json.dumps({"errors": [{"message": "injected failure"}]}).encode())
            return
        match = re.search(r"([0-9a-f]{64})", request.path)
        data = self.blobs.get(match.group(1)) if match else None
        if data is None:
            request.reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}')
            return
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if not wanted or not self.honor_range:
            request.reply(200, data)
            return
        start = int(wanted.group(1))
        end = min(int(wanted.group(2) or len(data) - 1), len(data) - 1)
        if start >= len(data):
            request.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        request.reply(206, data[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})


# -- pytest fixtures (import them into a test module to use them) --------------------------------------


@pytest.fixture
def registry_plain(tmp_path: Path) -> Iterator[Registry]:
    with registry_server(tmp_path / "plain", "plain") as registry:
        yield registry


@pytest.fixture
def registry_basic(tmp_path: Path) -> Iterator[Registry]:
    with registry_server(tmp_path / "basic", "basic") as registry:
        yield registry


@pytest.fixture
def registry_token(tmp_path: Path) -> Iterator[Registry]:
    with registry_server(tmp_path / "token", "token") as registry:
        yield registry


@pytest.fixture
def registry_tls(tmp_path: Path) -> Iterator[Registry]:
    with registry_server(tmp_path / "tls", "tls") as registry:
        yield registry


@pytest.fixture
def registry_redirect(tmp_path: Path) -> Iterator[Registry]:
    with registry_server(tmp_path / "redirect", "redirect") as registry:
        yield registry
