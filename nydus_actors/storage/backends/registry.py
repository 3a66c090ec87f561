"""The OCI registry backend: HEAD for blob sizes, ranged GETs, token auth, redirects and a proxy.

It follows nydusd's `storage/src/backend/registry.rs` as the reference describes it (§7.5, §7.6).
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import urllib3
from urllib3 import exceptions as u3

from nydus_actors.storage.backends.base import BackendError, BlobBackend

logger = logging.getLogger(__name__)

CLIENT_ID = "nydus-registry-client"
#: Lifetime assumed for a token whose reply has no `expires_in` (nydusd's default).
DEFAULT_TOKEN_TTL = 600
#: A token is fetched again this long before it expires (at most half its lifetime).
REFRESH_MARGIN = 20.0
#: Error bodies longer than this are not read (the connection is closed instead).
MAX_ERROR_BODY = 16 * 1024
READ_CHUNK = 256 * 1024
#: Hops followed after the registry's own redirect (S3-like stores may redirect again).
MAX_EXTRA_HOPS = 3

_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/")


class _TlsError(BackendError):
    """A TLS handshake failed (permanent; with `skip_verify` it may mean the registry speaks HTTP)."""


@dataclass
class _Reply:
    status: int
    headers: urllib3.HTTPHeaderDict
    body: bytes = b""


@dataclass
class _Credential:
    """A cached `Authorization` value; Bearer tokens also know when and how to renew themselves."""

    value: str
    expires_at: float | None = None
    margin: float = REFRESH_MARGIN
    challenge: dict[str, str] = field(default_factory=dict)

    def stale(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at - self.margin


def status_text(status: int) -> str:
    """`401 Unauthorized` for 401."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """Split a `WWW-Authenticate` value into its lower-case scheme and its parameters."""
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    params = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
    return scheme.lower(), params


def check_auth(auth: str | None) -> str | None:
    """Validate nydusd's `auth` (base64 of `user:pass`) and return it, as nydusd does at start."""
    if not auth:
        return None
    try:
        plain = base64.b64decode(auth, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as ex:
        raise BackendError(f"failed to decode registry auth: {ex}") from ex
    if ":" not in plain:
        raise BackendError("failed to decode registry auth: no ':' between user and password")
    return auth


def _error_detail(body: bytes) -> str:
    """The registry's error message (`{"errors":[{"message":…}]}`), or the start of the body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        errors = json.loads(text).get("errors") or []
        return "; ".join(str(err.get("message") or err.get("code")) for err in errors) or text[:200]
    except (ValueError, AttributeError):
        return " ".join(text.split())[:200]


def _describe(ex: Exception) -> tuple[str, bool]:
    """A short cause for a transport failure and whether retrying may help."""
    text = str(ex)
    if text.startswith(("HTTPConnection(", "HTTPSConnection(")) and "): " in text:
        text = text.split("): ", 1)[1]
    if isinstance(ex, u3.SSLError):
        return f"tls handshake failed: {ex.args[0] if ex.args else ex}", False
    if isinstance(ex, u3.ProxyError):
        return f"proxy unreachable: {ex.args[1] if len(ex.args) > 1 else ex}", True
    if isinstance(ex, u3.NewConnectionError):
        return f"connection failed: {text.replace('Failed to establish a new connection: ', '')}", True
    if isinstance(ex, u3.ConnectTimeoutError):
        return "connect timed out", True
    if isinstance(ex, u3.ReadTimeoutError):
        return "timed out waiting for data", True
    if isinstance(ex, u3.ProtocolError) and len(ex.args) == 2:
        inner = ex.args[1]
        if isinstance(inner, u3.IncompleteRead):
            return f"body cut short: {inner.partial} bytes read, {inner.expected} more expected", True
        return f"{str(ex.args[0]).rstrip('.').lower()}: {inner}", True
    return f"{type(ex).__name__}: {text}", True


def _pool_options(settings: dict) -> dict:
    """Connection options shared by the direct pool and the proxy pool."""
    timeout = float(settings.get("timeout", 5) or 0)
    connect = float(settings.get("connect_timeout", 5) or 0)
    options: dict = {
        "num_pools": 16,
        "maxsize": 32,
        "block": False,
        "retries": False,  # the base class retries whole reads
        "timeout": urllib3.Timeout(connect=connect or None, read=timeout or None),
    }
    if settings.get("skip_verify"):
        options.update(cert_reqs="CERT_NONE", assert_hostname=False)
        # Verification is off on purpose; urllib3 would otherwise warn on every request.
        urllib3.disable_warnings(u3.InsecureRequestWarning)
        return options
    context = ssl.create_default_context()
    for path in settings.get("ca_cert_files") or []:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as ex:
            raise BackendError(f"failed to load ca cert {path}: {ex}") from ex
    options["ssl_context"] = context
    return options


class _Proxy:
    """nydusd's `proxy` section: a plain forward proxy (e.g. dfdaemon) used while it looks healthy."""

    def __init__(self, raw: dict, options: dict, direct: urllib3.PoolManager) -> None:
        self.url = str(raw["url"])
        self.ping_url = str(raw.get("ping_url") or "")
        self.fallback = bool(raw.get("fallback", True))
        self.use_http = bool(raw.get("use_http", False))
        self.interval = float(raw.get("check_interval", 5) or 5)
        self.manager = urllib3.ProxyManager(self.url, **options)
        self._direct = direct
        self._healthy = True
        self._next_check = 0.0
        self._check_lock = threading.Lock()

    def usable(self) -> bool:
        """Whether to send through the proxy; one caller re-checks health once per interval."""
        if time.monotonic() >= self._next_check and self._check_lock.acquire(blocking=False):
            try:
                healthy = self._ping() if self.ping_url else True
                if healthy != self._healthy:
                    logger.info("registry proxy %s is %s", self.url, "healthy" if healthy else "unhealthy")
                self._healthy = healthy
                self._next_check = time.monotonic() + self.interval
            finally:
                self._check_lock.release()
        return self._healthy

    def mark_down(self) -> None:
        """Go direct until the next health check, instead of paying for a failing proxy each time."""
        self._healthy = False
        self._next_check = time.monotonic() + self.interval

    def target(self, url: str) -> str:
        # dfdaemon wants plain HTTP requests it can cache, not CONNECT tunnels.
        if self.use_http and url.startswith("https://"):
            return "http://" + url[len("https://") :]
        return url

    def _ping(self) -> bool:
        try:
            resp = self._direct.request("GET", self.ping_url, redirect=False)
        except u3.HTTPError as ex:
            logger.debug("registry proxy ping %s failed: %s", self.ping_url, ex)
            return False
        return 200 <= resp.status < 300


class RegistryBackend(BlobBackend):
    """Blobs of one repository of an OCI registry, read by `sha256` digest.

    Thread-safe: one pool manager with keep-alive connections serves every thread.
    """

    backend_type = "registry"

    def __init__(
        self, backend_id: str, settings: dict, *, on_failure: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(backend_id, retry_limit=int(settings.get("retry_limit", 0)), on_failure=on_failure)
        self._scheme = "http" if settings.get("scheme") == "http" else "https"
        self._host = str(settings["host"])
        self._repo = str(settings["repo"]).strip("/")
        self._where = f"{self._host}/{self._repo}"
        self._timeout = float(settings.get("timeout", 5) or 0)
        self._skip_verify = bool(settings.get("skip_verify", False))
        self._blob_url_scheme = str(settings.get("blob_url_scheme") or "")
        self._blob_redirected_host = str(settings.get("blob_redirected_host") or "")
        options = _pool_options(settings)
        self._pool = urllib3.PoolManager(**options)
        proxy = settings.get("proxy") or {}
        self._proxy = _Proxy(proxy, options, self._pool) if proxy.get("url") else None

        self._state_lock = threading.Lock()
        # Held while answering a challenge, and around the first request, so that
        # concurrent readers wait for one token instead of each fetching their own.
        self._auth_lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._basic = check_auth(settings.get("auth"))
        token = settings.get("registry_token")
        self._cred: _Credential | None = _Credential(f"Bearer {token}") if token else None
        self._generation = 0
        self._settled = False
        self._token_by_get: set[str] = set()
        self._redirects: dict[str, str] = {}

    # -- public --------------------------------------------------------------------------------------

    def set_auth(self, auth_b64: str | None) -> None:
        """Replace the Basic credentials (hot reload) and forget every cached token and header."""
        auth = check_auth(auth_b64)
        with self._state_lock:
            self._basic = auth
            self._cred = None
            self._generation += 1
            self._settled = False
        logger.info("registry %s: credentials replaced", self._where)

    def close(self) -> None:
        self._pool.clear()
        if self._proxy is not None:
            self._proxy.manager.clear()

    # -- BlobBackend ---------------------------------------------------------------------------------

    def _blob_size(self, blob_id: str) -> int:
        try:
            reply = self._fetch("HEAD", blob_id, {}, limit=0)
            if reply.status != 200:
                raise self._status_error(reply)
            length = reply.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise BackendError(f"no Content-Length in the reply (got {length!r})")
            return int(length)
        except BackendError as ex:
            raise self._wrap("stat", blob_id, ex) from ex

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        try:
            reply = self._fetch("GET", blob_id, headers, limit=offset + size)
            return self._ranged_body(reply, offset, size)
        except BackendError as ex:
            raise self._wrap("read", blob_id, ex) from ex

    # -- blob requests -------------------------------------------------------------------------------

    def _wrap(self, verb: str, blob_id: str, ex: BackendError) -> BackendError:
        return BackendError(
            f"failed to {verb} blob {blob_id} from {self._where}: {ex.text}", temporary=ex.temporary
        )

    def _blob_url(self, blob_id: str) -> str:
        digest = blob_id if blob_id.startswith("sha256:") else f"sha256:{blob_id}"
        return f"{self._scheme}://{self._host}/v2/{self._repo}/blobs/{digest}"

    def _status_error(self, reply: _Reply) -> BackendError:
        detail = _error_detail(reply.body) if reply.body else ""
        text = status_text(reply.status) + (f": {detail}" if detail else "")
        if reply.status == 416:
            text += f" (Content-Range {reply.headers.get('Content-Range', '?')})"
        return BackendError(text, temporary=reply.status >= 500 or reply.status in (408, 429))

    def _ranged_body(self, reply: _Reply, offset: int, size: int) -> bytes:
        if reply.status == 206:
            crange = reply.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.match(crange)
            if match and int(match.group(1)) != offset:
                raise BackendError(f"asked for bytes from {offset} but got Content-Range {crange!r}")
            data = reply.body
        elif reply.status == 200:
            # A server that ignores Range sends the whole blob; only its start was read.
            data = reply.body[offset : offset + size]
        else:
            raise self._status_error(reply)
        if len(data) != size:
            raise BackendError(f"short read: {len(data)} of {size} bytes at {offset}", temporary=True)
        return data

    def _fetch(self, method: str, blob_id: str, headers: dict, *, limit: int) -> _Reply:
        """A blob request through the cached redirect if any, else through the registry."""
        cached = self._redirects.get(blob_id)
        if cached is not None:
            try:
                reply = self._follow(method, cached, headers, limit)
                if reply.status < 300:
                    return reply
                why = status_text(reply.status)
            except BackendError as ex:
                why = ex.text
            # Presigned URLs expire; the registry hands out a fresh one.
            logger.info("blob %s: dropping the cached redirect (%s), asking the registry again", blob_id, why)
            self._redirects.pop(blob_id, None)
        url = self._blob_url(blob_id)
        reply = self._authorized(method, url, headers, limit)
        location = reply.headers.get("Location")
        if 300 <= reply.status < 400 and location:
            target = self._rewrite(urljoin(url, location))
            reply = self._follow(method, target, headers, limit)
            if reply.status < 300:
                self._redirects[blob_id] = target
                logger.debug("blob %s: redirected to %s", blob_id, target)
        return reply

    def _rewrite(self, url: str) -> str:
        """Apply `blob_url_scheme` and `blob_redirected_host` to a redirect target."""
        parts = urlsplit(url)
        scheme, netloc = parts.scheme, parts.netloc
        if self._blob_url_scheme:
            scheme = self._blob_url_scheme
        if self._blob_redirected_host:
            # "host" keeps the target's port, "host:port" replaces both.
            netloc = self._blob_redirected_host
            if ":" not in netloc and parts.port is not None:
                netloc = f"{netloc}:{parts.port}"
        return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))

    def _follow(self, method: str, url: str, headers: dict, limit: int) -> _Reply:
        """Request a redirect target without the registry's credentials, following further hops."""
        reply = self._send(method, url, headers, limit=limit)
        for _ in range(MAX_EXTRA_HOPS):
            location = reply.headers.get("Location")
            if not (300 <= reply.status < 400 and location):
                break
            url = urljoin(url, location)
            reply = self._send(method, url, headers, limit=limit)
        return reply

    # -- authentication ------------------------------------------------------------------------------

    def _authorized(self, method: str, url: str, headers: dict, limit: int) -> _Reply:
        if self._settled:
            return self._authorized_once(method, url, headers, limit)
        with self._auth_lock:
            return self._authorized_once(method, url, headers, limit)

    def _authorized_once(self, method: str, url: str, headers: dict, limit: int) -> _Reply:
        sent, generation = self._credential()
        reply = self._send_registry(method, url, self._with_auth(headers, sent), limit)
        if reply.status != 401:
            self._settled = True  # the registry answered without a challenge: auth is in place
            return reply
        with self._auth_lock:
            current, generation = self._credential()
            if current is not None and current is not sent:
                # Another thread answered the challenge meanwhile: use its credential.
                reply = self._send_registry(method, url, self._with_auth(headers, current), limit)
                if reply.status != 401:
                    return reply
            if sent is not None or current is not None:
                # A rejected header may earn a 401 without a usable challenge (Harbor): ask anonymously.
                reply = self._send_registry(method, url, headers, limit)
                if reply.status != 401:
                    return reply
            cred = self._answer(reply.headers.get("WWW-Authenticate", ""))
            if cred is None:
                return reply
            reply = self._send_registry(method, url, self._with_auth(headers, cred), limit)
            if reply.status != 401:  # accepted, even if the blob then turns out missing
                self._store(cred, generation)
            return reply

    @staticmethod
    def _with_auth(headers: dict, cred: _Credential | None) -> dict:
        return {**headers, "Authorization": cred.value} if cred is not None else headers

    def _credential(self) -> tuple[_Credential | None, int]:
        """The cached credential, renewed first when it is a token about to expire."""
        with self._state_lock:
            cred, generation, basic = self._cred, self._generation, self._basic
        if cred is None or not cred.stale() or not cred.challenge:
            return cred, generation
        if not self._refresh_lock.acquire(blocking=False):
            return cred, generation  # someone else renews it; the old token is still valid a while
        try:
            with self._state_lock:
                if self._cred is not cred:
                    return self._cred, self._generation
            try:
                fresh = self._fetch_token(cred.challenge, basic)
            except BackendError as ex:
                logger.warning("registry %s: failed to renew the token: %s", self._where, ex.text)
                return cred, generation
            self._store(fresh, generation)
            return fresh, generation
        finally:
            self._refresh_lock.release()

    def _store(self, cred: _Credential, generation: int) -> None:
        with self._state_lock:
            # Credentials replaced by set_auth meanwhile must not be overwritten by an old answer.
            if generation == self._generation:
                self._cred = cred
                self._settled = True

    def _answer(self, challenge: str) -> _Credential | None:
        scheme, params = parse_challenge(challenge)
        with self._state_lock:
            basic = self._basic
        if scheme == "basic":
            return _Credential(f"Basic {basic}") if basic else None
        if scheme == "bearer" and params.get("realm"):
            return self._fetch_token(params, basic)
        logger.warning("registry %s: cannot answer the challenge %r", self._where, challenge)
        return None

    def _fetch_token(self, challenge: dict[str, str], basic: str | None) -> _Credential:
        realm = challenge["realm"]
        form = {
            "service": challenge.get("service", ""),
            "scope": challenge.get("scope") or f"repository:{self._repo}:pull",
            "client_id": CLIENT_ID,
        }
        headers = {"Authorization": f"Basic {basic}"} if basic else {}
        token_host = urlsplit(realm).netloc
        reply = None
        if token_host not in self._token_by_get:
            post_headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
            try:
                reply = self._send("POST", realm, post_headers, body=urlencode(form), limit=MAX_ERROR_BODY)
                failure = "" if reply.status == 200 else status_text(reply.status)
            except BackendError as ex:
                failure = ex.text
            if failure:
                logger.info("token POST to %s failed (%s), using GET from now on", realm, failure)
                self._token_by_get.add(token_host)
                reply = None
        if reply is None:
            separator = "&" if "?" in realm else "?"
            reply = self._send("GET", realm + separator + urlencode(form), headers, limit=MAX_ERROR_BODY)
        if reply.status != 200:
            cause = self._status_error(reply)
            raise BackendError(
                f"failed to fetch a token from {realm}: {cause.text}", temporary=cause.temporary
            )
        try:
            data = json.loads(reply.body)
            token = data.get("token") or data.get("access_token")
            ttl = float(data.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError) as ex:
            raise BackendError(f"failed to parse the token reply from {realm}: {ex}") from ex
        if not token:
            raise BackendError(f"failed to parse the token reply from {realm}: no token")
        logger.debug("registry %s: got a token valid %ss from %s", self._where, ttl, realm)
        return _Credential(
            f"Bearer {token}",
            expires_at=time.monotonic() + ttl,
            margin=min(REFRESH_MARGIN, ttl / 2),
            challenge=dict(challenge),
        )

    # -- transport -----------------------------------------------------------------------------------

    def _send_registry(self, method: str, url: str, headers: dict, limit: int) -> _Reply:
        try:
            return self._send(method, url, headers, limit=limit)
        except _TlsError as ex:
            if not (self._skip_verify and self._scheme == "https"):
                raise
            # nydusd lets skip_verify registries fall back to plain HTTP on TLS errors.
            logger.warning("registry %s: %s; falling back to http", self._where, ex.text)
            self._scheme = "http"
            return self._send(method, "http://" + url[len("https://") :], headers, limit=limit)

    def _send(self, method: str, url: str, headers: dict, *, body: str | None = None, limit: int) -> _Reply:
        """One exchange, through the proxy while it is usable, falling back to direct if allowed."""
        proxy = self._proxy
        if proxy is not None and proxy.usable():
            try:
                reply = self._exchange(
                    proxy.manager, method, proxy.target(url), headers, body=body, limit=limit
                )
            except BackendError as ex:
                if not proxy.fallback:
                    raise
                proxy.mark_down()
                logger.warning("registry proxy %s failed, going direct: %s", proxy.url, ex.text)
            else:
                if reply.status < 500 or not proxy.fallback:
                    return reply
                logger.warning("registry proxy %s answered %d, going direct", proxy.url, reply.status)
        return self._exchange(self._pool, method, url, headers, body=body, limit=limit)

    def _exchange(
        self,
        manager: urllib3.PoolManager,
        method: str,
        url: str,
        headers: dict,
        *,
        body: str | None,
        limit: int,
    ) -> _Reply:
        """Send one request and read at most `limit` bytes of a 2xx body within `timeout`."""
        deadline = time.monotonic() + self._timeout if self._timeout else None
        try:
            resp = manager.request(
                method,
                url,
                headers=headers,
                body=body,
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
        except u3.HTTPError as ex:
            cause, temporary = _describe(ex)
            if isinstance(ex, u3.ReadTimeoutError):
                cause = f"timed out after {self._timeout:g}s waiting for the response"
            if isinstance(ex, u3.SSLError):
                raise _TlsError(cause) from ex
            raise BackendError(cause, temporary=temporary) from ex
        reusable = False
        try:
            if method == "HEAD" or resp.status in (204, 304):
                data, reusable = b"", True
            elif 200 <= resp.status < 300:
                data, reusable = self._read_body(resp, limit, deadline)
            elif resp.status != 416 and (resp.length_remaining or 0) <= MAX_ERROR_BODY:
                # 416 from the registry announces the blob's length but sends 33 bytes: never read it.
                data, reusable = self._read_body(resp, MAX_ERROR_BODY, deadline)
            else:
                data = b""
            return _Reply(resp.status, resp.headers, data)
        finally:
            if not reusable:
                resp.close()  # unread data would corrupt the next request on this connection
            resp.release_conn()

    def _read_body(
        self, resp: urllib3.BaseHTTPResponse, limit: int, deadline: float | None
    ) -> tuple[bytes, bool]:
        """Read up to `limit` bytes; say whether the body was read to its end (the connection is reusable).

        `timeout` bounds the whole exchange, as in nydusd: a peer trickling bytes
        would otherwise reset the per-read socket timeout forever.
        """
        expected = resp.length_remaining
        want = limit if expected is None else min(limit, expected)
        parts: list[bytes] = []
        got = 0
        try:
            while got < want:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BackendError(
                            f"timed out after {self._timeout:g}s with {got} of {want} bytes", temporary=True
                        )
                    sock = getattr(resp.connection, "sock", None)
                    if sock is not None:
                        sock.settimeout(left)
                chunk = resp.read1(min(READ_CHUNK, want - got))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except u3.ReadTimeoutError as ex:
            raise BackendError(
                f"timed out after {self._timeout:g}s with {got} of {want} bytes", temporary=True
            ) from ex
        except u3.HTTPError as ex:
            cause, temporary = _describe(ex)
            if not cause.startswith("body"):
                cause = f"failed to read the body: {cause}"
            raise BackendError(cause, temporary=temporary) from ex
        except OSError as ex:
            raise BackendError(f"failed to read the body: {ex}", temporary=True) from ex
        if expected is not None and got < want:
            raise BackendError(f"body cut short: {got} of {want} bytes", temporary=True)
        return b"".join(parts), expected is not None and got == expected
