"""The registry backend against real docker-registry instances, a token server, nginx and injected faults."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from nydus_actors.storage.backends.base import BackendError
from nydus_actors.storage.backends.registry import RegistryBackend, check_auth, parse_challenge
from tests.storage import servers
from tests.storage.faultproxy import FaultProxy
from tests.storage.servers import (
    ISSUER,
    SERVICE,
    USER,
    BlobServer,
    ForwardProxy,
    Registry,
    basic_auth,
    registry_basic,
    registry_plain,
    registry_redirect,
    registry_tls,
    registry_token,
    requires_nginx,
    requires_openssl,
    requires_registry,
)

REPO = "library/x"
BLOB = random.Random(7).randbytes(300_000)
BLOB_ID = servers.blob_digest(BLOB)[len("sha256:") :]

# The fixtures imported from servers, so that linters see them as used.
__all__ = ["registry_basic", "registry_plain", "registry_redirect", "registry_tls", "registry_token"]

Factory = Callable[..., RegistryBackend]


@pytest.fixture(autouse=True, scope="module")
def _no_server_outlives_the_module() -> Iterator[None]:
    yield
    alive = []
    for pid in servers.STARTED_PIDS:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    assert not alive, f"server processes still running: {alive}"


@pytest.fixture
def failures() -> list[str]:
    """Lines the backends report through `on_failure`."""
    return []


@pytest.fixture
def make(failures: list[str]) -> Iterator[Factory]:
    """Open backends from settings; all are closed after the test."""
    opened: list[RegistryBackend] = []

    def factory(settings: dict) -> RegistryBackend:
        backend = RegistryBackend("/mnt", settings, on_failure=failures.append)
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        backend.close()


def pushed(registry: Registry, repo: str = REPO) -> Registry:
    registry.push_blob(repo, BLOB)
    return registry


def read_fails(backend: RegistryBackend, offset: int = 0, size: int = 4096) -> tuple[BackendError, float]:
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        backend.read_range(BLOB_ID, offset, size)
    return info.value, time.monotonic() - started


# -- pure helpers -------------------------------------------------------------------------------------------


def test_challenges_are_parsed_with_quotes_and_commas() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push",error="x"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "http://127.0.0.1:1/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
        "error": "x",
    }
    assert parse_challenge('Basic realm="test-registry"') == ("basic", {"realm": "test-registry"})


@pytest.mark.parametrize("bad", ["not base64!", "dXNlcnBhc3M="])  # the second decodes to "userpass"
def test_unusable_auth_is_refused(bad: str) -> None:
    with pytest.raises(BackendError, match="failed to decode registry auth"):
        check_auth(bad)
    with pytest.raises(BackendError):
        RegistryBackend("/m", {"scheme": "http", "host": "127.0.0.1:1", "repo": REPO, "auth": bad})


def test_redirect_targets_are_rewritten(make: Factory) -> None:
    base = {"scheme": "http", "host": "127.0.0.1:1", "repo": REPO}
    plain = make(base)
    assert plain._rewrite("http://a:9/x?y=1") == "http://a:9/x?y=1"
    both = make({**base, "blob_url_scheme": "https", "blob_redirected_host": "b.example:8443"})
    assert both._rewrite("http://a:9/x?y=1") == "https://b.example:8443/x?y=1"
    host_only = make({**base, "blob_redirected_host": "b.example"})
    assert host_only._rewrite("http://a:9/x") == "http://b.example:9/x"


def test_zero_timeouts_disable_them(make: Factory) -> None:
    backend = make(
        {"scheme": "http", "host": "127.0.0.1:1", "repo": REPO, "timeout": 0, "connect_timeout": 0}
    )
    timeout = backend._pool.connection_pool_kw["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout, backend._timeout) == (None, None, 0)


# -- plain registry -----------------------------------------------------------------------------------------


@requires_registry
def test_size_and_ranges_at_start_middle_end_and_whole(registry_plain: Registry, make: Factory) -> None:
    backend = make(pushed(registry_plain).settings(REPO, scheme="http"))
    assert backend.blob_size(BLOB_ID) == len(BLOB)
    for offset, size in [(0, 100), (150_001, 4096), (len(BLOB) - 10, 10), (0, len(BLOB))]:
        assert backend.read_range(BLOB_ID, offset, size) == BLOB[offset : offset + size]
    assert backend.read_range(BLOB_ID, 5, 0) == b""
    # The digest form is accepted as well as the bare hex id.
    assert backend.read_range("sha256:" + BLOB_ID, 1, 2) == BLOB[1:3]
    assert backend.metrics.export()["read_count"] == 6
    # Past the end: the registry's 416 announces a length it never sends, so its body is not read.
    with pytest.raises(BackendError, match=r"416 Requested Range Not Satisfiable.*bytes \*/300000") as info:
        backend.read_range(BLOB_ID, len(BLOB), 10)
    assert not info.value.temporary
    assert backend.read_range(BLOB_ID, 0, 3) == BLOB[:3]


@requires_registry
def test_concurrent_reads_from_threads(registry_plain: Registry, make: Factory) -> None:
    backend = make(pushed(registry_plain).settings(REPO))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15):
                offset = rng.randrange(len(BLOB) - 1)
                size = rng.randint(1, min(65536, len(BLOB) - offset))
                assert backend.read_range(BLOB_ID, offset, size) == BLOB[offset : offset + size]
        except BaseException as ex:  # the main thread reports it
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert backend.metrics.export()["read_count"] == 8 * 15


@requires_registry
def test_missing_blob_is_a_permanent_404(
    registry_plain: Registry, make: Factory, failures: list[str]
) -> None:
    backend = make(registry_plain.settings(REPO, retry_limit=3))
    error, elapsed = read_fails(backend)
    assert not error.temporary and elapsed < 1.0  # not retried
    assert f"failed to read blob {BLOB_ID} from {registry_plain.host}/{REPO}: 404 Not Found" in error.text
    assert "blob unknown" in error.text
    with pytest.raises(BackendError, match="404"):
        backend.blob_size(BLOB_ID)
    assert len(failures) == 2 and BLOB_ID in failures[0] and "404" in failures[0]


@requires_registry
def test_skip_verify_falls_back_from_https_to_http(registry_plain: Registry, make: Factory) -> None:
    backend = make(pushed(registry_plain).settings(REPO, scheme="https", skip_verify=True))
    assert backend.read_range(BLOB_ID, 10, 10) == BLOB[10:20]


# -- Basic auth ---------------------------------------------------------------------------------------------


@requires_registry
def test_basic_auth_with_the_right_credentials(registry_basic: Registry, make: Factory) -> None:
    backend = make(pushed(registry_basic).settings(REPO, auth=registry_basic.auth))
    assert backend.blob_size(BLOB_ID) == len(BLOB)
    assert backend.read_range(BLOB_ID, 100, 1000) == BLOB[100:1100]


@requires_registry
@pytest.mark.parametrize("auth", [basic_auth(USER, "wrong"), None])
def test_basic_auth_with_wrong_or_no_credentials_fails_fast(
    registry_basic: Registry, make: Factory, failures: list[str], auth: str | None
) -> None:
    backend = make(pushed(registry_basic).settings(REPO, auth=auth, retry_limit=2))
    error, elapsed = read_fails(backend)
    assert "401 Unauthorized" in error.text and BLOB_ID in error.text
    assert not error.temporary and elapsed < 2.0
    assert failures and "401" in failures[-1]


@requires_registry
def test_set_auth_replaces_wrong_credentials(registry_basic: Registry, make: Factory) -> None:
    backend = make(pushed(registry_basic).settings(REPO, auth=basic_auth(USER, "wrong")))
    error, _ = read_fails(backend)
    assert "401" in error.text
    backend.set_auth(registry_basic.auth)
    assert backend.read_range(BLOB_ID, 0, 64) == BLOB[:64]
    backend.set_auth(None)  # credentials removed again: the cached header goes too
    assert "401" in read_fails(backend)[0].text
    with pytest.raises(BackendError, match="failed to decode registry auth"):
        backend.set_auth("%%%")


# -- Bearer tokens ------------------------------------------------------------------------------------------


@requires_registry
def test_concurrent_first_reads_share_one_token(registry_token: Registry, make: Factory) -> None:
    tokens = pushed(registry_token).token_server
    assert tokens is not None
    issued_before, gets_before = tokens.issued, tokens.gets
    backend = make(registry_token.settings(REPO, auth=registry_token.auth))
    start = threading.Barrier(8)
    results: list[bool] = []

    def worker(index: int) -> None:
        start.wait()
        offset = index * 1000
        results.append(backend.read_range(BLOB_ID, offset, 500) == BLOB[offset : offset + 500])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [True] * 8
    assert tokens.issued - issued_before == 1
    assert (tokens.posts, tokens.gets) == (1, gets_before)  # the main path: a form POST
    assert backend.blob_size(BLOB_ID) == len(BLOB)
    assert tokens.issued - issued_before == 1


@requires_registry
def test_a_token_is_fetched_again_before_it_expires(registry_token: Registry, make: Factory) -> None:
    tokens = pushed(registry_token).token_server
    assert tokens is not None
    tokens.expires_in = 2  # renewed when less than half of it is left
    backend = make(registry_token.settings(REPO, auth=registry_token.auth))
    before = tokens.issued
    assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]
    assert backend.read_range(BLOB_ID, 10, 10) == BLOB[10:20]
    assert tokens.issued - before == 1
    time.sleep(1.2)
    assert backend.read_range(BLOB_ID, 20, 10) == BLOB[20:30]
    assert tokens.issued - before == 2


@requires_registry
def test_token_post_refused_falls_back_to_get_and_remembers(registry_token: Registry, make: Factory) -> None:
    tokens = pushed(registry_token).token_server
    assert tokens is not None
    tokens.allow_post = False
    tokens.expires_in = 2
    gets_before = tokens.gets
    backend = make(registry_token.settings(REPO, auth=registry_token.auth))
    assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]
    assert (tokens.posts, tokens.gets - gets_before) == (1, 1)
    time.sleep(1.2)
    assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]
    assert (tokens.posts, tokens.gets - gets_before) == (1, 2)  # no second POST


@requires_registry
def test_registry_token_given_up_front_is_used_as_is(registry_token: Registry, make: Factory) -> None:
    tokens = pushed(registry_token).token_server
    assert tokens is not None
    token = tokens.issue(USER, SERVICE, [{"type": "repository", "name": REPO, "actions": ["pull"]}])
    before = tokens.issued
    backend = make(registry_token.settings(REPO, registry_token=token))
    assert backend.read_range(BLOB_ID, 7, 70) == BLOB[7:77]
    assert tokens.issued == before
    assert ISSUER == "test-issuer"


@requires_registry
def test_token_server_refusing_credentials_is_a_permanent_401(
    registry_token: Registry, make: Factory
) -> None:
    pushed(registry_token)
    backend = make(registry_token.settings(REPO, auth=basic_auth(USER, "wrong"), retry_limit=2))
    error, elapsed = read_fails(backend)
    assert "failed to fetch a token" in error.text and "401" in error.text
    assert not error.temporary and elapsed < 2.0


# -- TLS ----------------------------------------------------------------------------------------------------


@requires_registry
@requires_openssl
def test_tls_with_the_ca_file_with_skip_verify_and_without_trust(
    registry_tls: Registry, make: Factory
) -> None:
    pushed(registry_tls)
    trusted = make(registry_tls.settings(REPO, scheme="https", ca_cert_files=[str(registry_tls.ca_file)]))
    assert trusted.read_range(BLOB_ID, 3, 300) == BLOB[3:303]
    skipping = make(registry_tls.settings(REPO, scheme="https", skip_verify=True))
    assert skipping.blob_size(BLOB_ID) == len(BLOB)
    assert skipping.read_range(BLOB_ID, 3, 300) == BLOB[3:303]
    untrusted = make(registry_tls.settings(REPO, scheme="https", retry_limit=2))
    error, elapsed = read_fails(untrusted)
    assert "tls handshake failed" in error.text and "certificate verify failed" in error.text
    assert not error.temporary and elapsed < 2.0


def test_an_unreadable_ca_file_is_refused(tmp_path) -> None:
    with pytest.raises(BackendError, match="failed to load ca cert"):
        RegistryBackend(
            "/m",
            {"scheme": "https", "host": "127.0.0.1:1", "repo": REPO, "ca_cert_files": [str(tmp_path / "no")]},
        )


# -- redirects ----------------------------------------------------------------------------------------------


@requires_registry
@requires_nginx
def test_redirect_is_followed_with_the_range_and_cached(registry_redirect: Registry, make: Factory) -> None:
    pushed(registry_redirect)
    with FaultProxy(("127.0.0.1", int(registry_redirect.host.rsplit(":", 1)[1]))) as front:
        backend = make(registry_redirect.settings(REPO, host=front.address))
        assert backend.blob_size(BLOB_ID) == len(BLOB)
        assert backend.read_range(BLOB_ID, 250_000, 5000) == BLOB[250_000:255_000]
        assert backend._redirects[BLOB_ID].startswith(str(registry_redirect.redirect_url))
        # With the registry gone, the cached redirect still serves the blob.
        front.set_mode("down")
        assert backend.read_range(BLOB_ID, 17, 1000) == BLOB[17:1017]
        assert backend.blob_size(BLOB_ID) == len(BLOB)


@requires_registry
@requires_nginx
def test_redirected_host_rewrite_no_auth_and_a_stale_redirect(
    registry_redirect: Registry, make: Factory
) -> None:
    pushed(registry_redirect)
    with BlobServer() as target:
        target.add(BLOB)
        settings = registry_redirect.settings(
            REPO, blob_redirected_host=f"127.0.0.1:{target.port}", registry_token="registry-only"
        )
        backend = make(settings)
        assert backend.read_range(BLOB_ID, 1000, 2000) == BLOB[1000:3000]
        assert target.requests == 1 and target.ranges == ["bytes=1000-2999"]
        assert "Authorization" not in target.seen_headers[0]
        assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]
        assert target.requests == 2  # straight to the cached target
        # An expired presigned URL: 403 once, then the registry is asked again.
        target.script = [403]
        assert backend.read_range(BLOB_ID, 10, 10) == BLOB[10:20]
        assert target.requests == 4 and target.ranges[-2:] == ["bytes=10-19", "bytes=10-19"]


# -- faults -------------------------------------------------------------------------------------------------


@pytest.fixture
def blob_server() -> Iterator[BlobServer]:
    with BlobServer() as server:
        server.add(BLOB)
        yield server


def served(server: BlobServer, **raw: object) -> dict:
    """Settings for the blob server posing as a plain-HTTP registry."""
    return {"scheme": "http", "host": f"127.0.0.1:{server.port}", "repo": REPO, **raw}


def test_5xx_is_retried_and_recovers(blob_server: BlobServer, make: Factory) -> None:
    blob_server.script = [503, 503]
    backend = make(served(blob_server, retry_limit=3))
    assert backend.read_range(BLOB_ID, 40, 400) == BLOB[40:440]
    assert blob_server.requests == 3


def test_5xx_after_the_retries_reports_the_failure(
    blob_server: BlobServer, make: Factory, failures: list[str]
) -> None:
    blob_server.script = [503, 502]
    backend = make(served(blob_server, retry_limit=1))
    error, _ = read_fails(backend)
    assert error.temporary and "502 Bad Gateway" in error.text
    assert failures == [f"registry backend: {error.text}"]
    assert error.text.count(BLOB_ID) == 1
    assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]  # the same backend, once the server is well
    assert backend.metrics.export()["read_errors"] == 1


def test_a_server_ignoring_range_is_sliced(blob_server: BlobServer, make: Factory) -> None:
    blob_server.honor_range = False
    backend = make(served(blob_server))
    assert backend.read_range(BLOB_ID, 1000, 100) == BLOB[1000:1100]
    assert backend.read_range(BLOB_ID, len(BLOB) - 5, 5) == BLOB[-5:]


@pytest.fixture
def fronted(registry_plain: Registry) -> Iterator[tuple[Registry, FaultProxy]]:
    """The plain registry, with the blob pushed, behind a fault proxy."""
    pushed(registry_plain)
    with FaultProxy(("127.0.0.1", int(registry_plain.host.rsplit(":", 1)[1]))) as proxy:
        yield registry_plain, proxy


#: fault proxy mode and options → the cause the error names.
NETWORK_FAULTS = {
    "down": ({}, "connection failed: [Errno 111] Connection refused"),
    "reset": ({}, "reset by peer"),
    "cut": ({"cut_after": 3000}, "body cut short"),
}


@requires_registry
@pytest.mark.parametrize("mode", list(NETWORK_FAULTS))
def test_network_faults_are_temporary_and_the_same_backend_recovers(
    fronted: tuple[Registry, FaultProxy], make: Factory, failures: list[str], mode: str
) -> None:
    options, cause = NETWORK_FAULTS[mode]
    registry, proxy = fronted
    backend = make(registry.settings(REPO, host=proxy.address, retry_limit=1))
    assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]  # a pooled connection exists
    proxy.set_mode(mode, **options)
    error, elapsed = read_fails(backend, 0, 100_000)
    assert error.temporary and cause in error.text and BLOB_ID in error.text, error.text
    assert elapsed < 3.0
    assert len(failures) == 1 and BLOB_ID in failures[0] and cause in failures[0]
    proxy.set_mode("pass")
    assert backend.read_range(BLOB_ID, 0, 100_000) == BLOB[:100_000]


@requires_registry
@pytest.mark.parametrize("mode", ["slow", "blackhole"])
def test_a_stalled_or_trickling_server_times_out(
    fronted: tuple[Registry, FaultProxy], make: Factory, mode: str
) -> None:
    registry, proxy = fronted
    timeout, retry_limit = 1, 1
    backend = make(registry.settings(REPO, host=proxy.address, timeout=timeout, retry_limit=retry_limit))
    proxy.set_mode(mode, rate=20_000)  # 200 kB would take 10 s
    error, elapsed = read_fails(backend, 0, 200_000)
    assert error.temporary and "timed out" in error.text, error.text
    budget = timeout * (retry_limit + 1) + 0.2  # plus the first backoff (at most 0.2 s)
    assert timeout * (retry_limit + 1) * 0.9 <= elapsed < 3 * budget
    proxy.set_mode("latency", latency=0.05)
    assert backend.read_range(BLOB_ID, 0, 200_000) == BLOB[:200_000]


# -- forward proxy (dfdaemon) -------------------------------------------------------------------------------


@requires_registry
def test_reads_go_through_the_proxy_and_fall_back_when_it_stops(
    registry_plain: Registry, make: Factory
) -> None:
    pushed(registry_plain)
    forward = ForwardProxy()
    try:
        proxy = {"url": forward.url, "ping_url": forward.url + "/ping", "check_interval": 1}
        backend = make(registry_plain.settings(REPO, proxy=proxy))
        assert backend.read_range(BLOB_ID, 5, 50) == BLOB[5:55]
        assert backend.blob_size(BLOB_ID) == len(BLOB)
        assert forward.requests == 2 and forward.pings == 1
        forward.fail_status = 500  # a proxy reply >= 500 sends the request to the registry
        assert backend.read_range(BLOB_ID, 5, 50) == BLOB[5:55]
        assert forward.requests == 3
    finally:
        forward.close()
    assert backend.read_range(BLOB_ID, 60, 50) == BLOB[60:110]
    assert backend.read_range(BLOB_ID, 60, 50) == BLOB[60:110]


@requires_registry
def test_no_fallback_means_proxy_failures_are_errors(registry_plain: Registry, make: Factory) -> None:
    pushed(registry_plain)
    with ForwardProxy() as forward:
        backend = make(registry_plain.settings(REPO, proxy={"url": forward.url, "fallback": False}))
        assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]
        forward.fail_status = 503
        assert "503" in read_fails(backend)[0].text


@requires_registry
def test_an_unhealthy_proxy_is_not_used(registry_plain: Registry, make: Factory) -> None:
    pushed(registry_plain)
    with ForwardProxy() as forward:
        proxy = {"url": forward.url, "ping_url": forward.url + "/not-ping"}  # answers 404
        backend = make(registry_plain.settings(REPO, proxy=proxy))
        assert backend.read_range(BLOB_ID, 0, 10) == BLOB[:10]
        assert forward.requests == 0 and forward.pings == 1
