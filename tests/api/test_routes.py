"""Every route of reference §2 with good and bad input, through falcon.testing.

The daemon behind the app is the real `DaemonActor` with a FUSE stand-in that
keeps a real VFS but makes no kernel mount.
"""

from __future__ import annotations

import json
import re

import falcon
import falcon.testing
import pytest

from nydus_actors.actors.blob_cache import BlobCacheManagerActor
from nydus_actors.actors.daemon import DaemonActor, DaemonSettings
from nydus_actors.api.app import create_app
from nydus_actors.lifecycle import Lifecycle, ShutdownReason
from nydus_actors.models import InflightRequest
from nydus_actors.version import build_info
from tests.dummies import DummyFuseSession
from tests.paths import NYDUS_FIXTURES

MOUNTED_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{1,9} \+00:00:00$")


class Stack:
    def __init__(self, *, supervisor: str | None = None, boot: bool = True) -> None:
        self.lifecycle = Lifecycle()
        self.fuse = DummyFuseSession.start().proxy()
        settings = DaemonSettings(id="d1" if supervisor else None, supervisor=supervisor)
        self.cache = BlobCacheManagerActor.start().proxy()
        self.daemon = DaemonActor.start(settings, self.fuse, self.lifecycle, self.cache).proxy()
        if boot:
            self.daemon.boot(None).get(timeout=5)
        self.client = falcon.testing.TestClient(create_app(self.daemon, timeout=5))

    def call(
        self,
        method: str,
        path: str,
        *,
        query: str | None = None,
        body: object = None,
        raw: bytes | None = None,
    ):
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if raw else None
        return self.client.simulate_request(method, path, query_string=query, body=raw, headers=headers)


@pytest.fixture
def stack() -> Stack:
    return Stack()


def error_of(result) -> str:
    assert result.headers["content-type"] == "application/json"
    body = result.json
    assert set(body) == {"code", "message"}
    assert body["code"] == "UNDEFINED"
    return body["message"]


def assert_no_content(result) -> None:
    assert result.status_code == 204
    assert result.content == b""
    assert "content-type" not in result.headers
    assert result.headers["server"] == "Nydus API"


def mount_body(source: str, fs_type: str = "passthrough_fs", **extra) -> dict:
    return {"source": source, "fs_type": fs_type, "config": "", **extra}


# -- /api/v1/daemon and /api/v2/daemon ------------------------------------------


def test_daemon_info_v1(stack: Stack) -> None:
    result = stack.call("GET", "/api/v1/daemon")
    assert result.status_code == 200
    assert result.headers["server"] == "Nydus API"
    assert result.headers["content-type"] == "application/json"
    info = result.json
    assert list(info) == ["version", "id", "supervisor", "state", "backend_collection"]
    assert info["state"] == "RUNNING"
    assert info["backend_collection"] == {}
    assert info["id"] is None and info["supervisor"] is None
    assert set(info["version"]) == {"package_ver", "git_commit", "build_time", "profile", "rustc"}
    assert info["version"]["git_commit"] == build_info().git_commit


def test_daemon_info_v2_has_null_collection(stack: Stack, tmp_path) -> None:
    assert (
        stack.call("POST", "/api/v1/mount", query="mountpoint=/a", body=mount_body(str(tmp_path))).status_code
        == 204
    )
    info = stack.call("GET", "/api/v2/daemon").json
    assert "backend_collection" in info and info["backend_collection"] is None


def test_daemon_info_with_supervisor() -> None:
    info = Stack(supervisor="/run/sup.sock").call("GET", "/api/v1/daemon").json
    assert info["id"] == "d1" and info["supervisor"] == "/run/sup.sock"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_set_log_level(stack: Stack, version: str) -> None:
    assert_no_content(stack.call("PUT", f"/api/{version}/daemon", body={"log_level": "DEBUG"}))
    assert_no_content(stack.call("PUT", f"/api/{version}/daemon", body={"log_level": "info"}))


def test_set_log_level_bad_input(stack: Stack) -> None:
    result = stack.call("PUT", "/api/v1/daemon", body={"log_level": "loud"})
    assert result.status_code == 500
    assert error_of(result) == "Configure(ResponsePayloadType)"
    result = stack.call("PUT", "/api/v1/daemon")
    assert result.status_code == 400 and error_of(result) == "BadRequest"
    result = stack.call("PUT", "/api/v1/daemon", raw=b'{"log_level": ')
    assert result.status_code == 400
    assert error_of(result).startswith('ParseBody(Error("EOF while parsing a value", line: 1, column: ')
    result = stack.call("PUT", "/api/v1/daemon", body={"level": "info"})
    assert error_of(result).startswith('ParseBody(Error("missing field `log_level`"')
    result = stack.call("PUT", "/api/v1/daemon", body={"log_level": 3})
    assert error_of(result).startswith('ParseBody(Error("invalid type: integer `3`, expected a string"')
    result = stack.call("PUT", "/api/v1/daemon", body=["info"])
    assert error_of(result).startswith('ParseBody(Error("invalid type: sequence, expected struct DaemonConf"')


def test_daemon_wrong_methods(stack: Stack) -> None:
    for method in ("POST", "DELETE", "PATCH"):
        result = stack.call(method, "/api/v1/daemon")
        assert result.status_code == 400 and error_of(result) == "BadRequest"
    result = stack.call("GET", "/api/v1/daemon", body={"x": 1})
    assert result.status_code == 400 and error_of(result) == "BadRequest"


# -- events, backend ---------------------------------------------------------------


def test_events(stack: Stack) -> None:
    stack.daemon.record_event("Backend(Timeout)").get(timeout=5)
    events = stack.call("GET", "/api/v1/daemon/events").json
    assert events["max_errors"] == 500 and events["max_size"] == 51200
    assert events["total_errors"] == 1
    assert re.match(r"^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT - Backend\(Timeout\)$", events["errors"][0])
    assert events["total_size"] == len(events["errors"][0])
    assert error_of(stack.call("PUT", "/api/v1/daemon/events")) == "BadRequest"


def test_daemon_backend(stack: Stack, tmp_path) -> None:
    result = stack.call("GET", "/api/v1/daemon/backend")
    assert result.status_code == 400
    assert error_of(result) == "QueryString(\"'mountpoint' should be specified in query string\")"
    result = stack.call("PUT", "/api/v1/daemon/backend")  # method checked before the query here
    assert result.status_code == 400 and error_of(result) == "BadRequest"
    result = stack.call("GET", "/api/v1/daemon/backend", query="mountpoint=/nope")
    assert result.status_code == 500
    assert error_of(result) == 'FsBackendInfo(Metrics(Daemon(Other("object or filesystem doesn\'t exist"))))'
    stack.call("POST", "/api/v1/mount", query="mountpoint=/p", body=mount_body(str(tmp_path)))
    result = stack.call("GET", "/api/v1/daemon/backend", query="mountpoint=/p")
    assert result.status_code == 500
    assert (
        error_of(result) == 'FsBackendInfo(Metrics(Daemon(Other("filesystem type mismatch, expect RAFS"))))'
    )


# -- state machine routes ------------------------------------------------------------


def test_start_when_running_is_unexpected(stack: Stack) -> None:
    result = stack.call("PUT", "/api/v1/daemon/start")
    assert result.status_code == 400
    assert error_of(result) == 'Configure(DaemonAbnormal(UnexpectedEvent("Start")))'
    assert error_of(stack.call("PUT", "/api/v1/daemon/start", body={})) == "BadRequest"
    assert error_of(stack.call("GET", "/api/v1/daemon/start")) == "BadRequest"


def test_start_in_init_is_unexpected() -> None:
    stack = Stack(boot=False)
    assert stack.call("GET", "/api/v1/daemon").json["state"] == "INIT"
    result = stack.call("PUT", "/api/v1/daemon/start")
    assert error_of(result) == 'Configure(DaemonAbnormal(UnexpectedEvent("Start")))'


def test_empty_body_counts_as_no_body(stack: Stack) -> None:
    result = stack.client.simulate_request(
        "PUT", "/api/v1/daemon/fuse/takeover", headers={"Content-Length": "0"}
    )
    assert error_of(result) == 'Upgrade(DaemonAbnormal(UnexpectedEvent("Takeover")))'


NO_SUPERVISOR = (
    'Upgrade(DaemonAbnormal(UpgradeManager("StorageBackendError(CreateUnixStream(Os { code: 2, '
    'kind: NotFound, message: \\"No such file or directory\\" }))")))'
)


def test_sendfd(stack: Stack) -> None:
    result = stack.call("PUT", "/api/v1/daemon/fuse/sendfd")
    assert result.status_code == 500
    assert error_of(result) == 'Upgrade(DaemonAbnormal(UpgradeManager("MissingSupervisorPath")))'
    with_supervisor = Stack(supervisor="/nonexistent/sup.sock")
    result = with_supervisor.call("PUT", "/api/v1/daemon/fuse/sendfd")
    assert result.status_code == 500 and error_of(result) == NO_SUPERVISOR
    not_serving = Stack(supervisor="/nonexistent/sup.sock", boot=False)
    result = not_serving.call("PUT", "/api/v1/daemon/fuse/sendfd")
    assert result.status_code == 503 and error_of(result) == "Upgrade(DaemonAbnormal(NotReady))"


def test_takeover(stack: Stack) -> None:
    result = stack.call("PUT", "/api/v1/daemon/fuse/takeover")
    assert result.status_code == 400
    assert error_of(result) == 'Upgrade(DaemonAbnormal(UnexpectedEvent("Takeover")))'
    waiting = Stack(boot=False)
    result = waiting.call("PUT", "/api/v1/daemon/fuse/takeover")
    assert result.status_code == 500
    assert error_of(result) == 'Upgrade(DaemonAbnormal(UpgradeManager("MissingSupervisorPath")))'
    assert waiting.call("GET", "/api/v1/daemon").json["state"] == "INIT"  # a failed action does not move
    waiting = Stack(supervisor="/nonexistent/sup.sock", boot=False)
    result = waiting.call("PUT", "/api/v1/daemon/fuse/takeover")
    assert result.status_code == 500 and error_of(result) == NO_SUPERVISOR
    assert waiting.call("GET", "/api/v1/daemon").json["state"] == "INIT"


def test_exit_stops_serving_without_unmount(stack: Stack) -> None:
    assert_no_content(stack.call("PUT", "/api/v1/daemon/exit"))
    assert stack.lifecycle.wait(0) is ShutdownReason.EXIT
    assert stack.call("GET", "/api/v1/daemon").json["state"] == "STOPPED"
    calls = stack.fuse.get_calls().get(timeout=5)
    assert calls == ["mount", "start_serving", "stop_serving"]
    # a second exit is harmless; other inputs meet the stopped machine
    assert_no_content(stack.call("PUT", "/api/v1/daemon/exit"))
    result = stack.call("PUT", "/api/v1/daemon/start")
    assert result.status_code == 500 and "failed to send message to channel" in error_of(result)


def test_exit_from_init() -> None:
    stack = Stack(boot=False)
    assert_no_content(stack.call("PUT", "/api/v1/daemon/exit"))
    assert stack.call("GET", "/api/v1/daemon").json["state"] == "STOPPED"
    assert stack.fuse.get_calls().get(timeout=5) == []


# -- /api/v1/mount ---------------------------------------------------------------------


def test_mount_lifecycle(stack: Stack, tmp_path) -> None:
    assert_no_content(
        stack.call("POST", "/api/v1/mount", query="mountpoint=/b", body=mount_body(str(tmp_path)))
    )
    entry = stack.call("GET", "/api/v1/daemon").json["backend_collection"]["/b"]
    assert entry["backend_type"] == "PassthroughFs"
    assert entry["mountpoint"] == "/b"
    assert MOUNTED_TIME.match(entry["mounted_time"])
    assert entry["config"] is None
    result = stack.call("POST", "/api/v1/mount", query="mountpoint=/b", body=mount_body(str(tmp_path)))
    assert result.status_code == 500
    assert error_of(result) == 'Mount(MountFilesystem(Other("object or filesystem already exists")))'
    result = stack.call("PUT", "/api/v1/mount", query="mountpoint=/b", body=mount_body(str(tmp_path), "rafs"))
    assert error_of(result) == 'Mount(MountFilesystem(Other("filesystem type mismatch, expect RAFS")))'
    assert_no_content(stack.call("DELETE", "/api/v1/mount", query="mountpoint=/b"))
    assert stack.call("GET", "/api/v1/daemon").json["backend_collection"] == {}
    result = stack.call("DELETE", "/api/v1/mount", query="mountpoint=/b")
    assert result.status_code == 500
    assert error_of(result) == 'Mount(MountFilesystem(Other("object or filesystem doesn\'t exist")))'
    result = stack.call("PUT", "/api/v1/mount", query="mountpoint=/b", body=mount_body(str(tmp_path), "rafs"))
    assert error_of(result) == 'Mount(MountFilesystem(Other("object or filesystem doesn\'t exist")))'


def test_mount_query_is_checked_before_method(stack: Stack) -> None:
    for method in ("GET", "POST", "DELETE", "PUT"):
        result = stack.call(method, "/api/v1/mount")
        assert result.status_code == 400
        assert error_of(result) == "QueryString(\"'mountpoint' should be specified in query string\")"
    assert error_of(stack.call("GET", "/api/v1/mount", query="mountpoint=/x")) == "BadRequest"
    assert error_of(stack.call("POST", "/api/v1/mount", query="mountpoint=/x")) == "BadRequest"
    assert error_of(stack.call("DELETE", "/api/v1/mount", query="mountpoint=/x", body={})) == "BadRequest"


@pytest.mark.parametrize(
    ("fs_type", "message"),
    [
        ("xfs", "invalid argument `only 'rafs' and 'passthrough_fs' are supported, but xfs was specified`"),
        ("", "invalid argument `only 'rafs' and 'passthrough_fs' are supported, but  was specified`"),
        (
            "rafs",
            "RAFS failed to handle request, Failed to load config: "
            "failed to parse configuration information`",
        ),
    ],
)
def test_mount_unusable_fs_type(stack: Stack, tmp_path, fs_type: str, message: str) -> None:
    result = stack.call(
        "POST", "/api/v1/mount", query="mountpoint=/c", body=mount_body(str(tmp_path), fs_type)
    )
    assert result.status_code == 500
    assert error_of(result) == f"Mount(MountFilesystem(Other({json.dumps(message)})))"
    assert stack.call("GET", "/api/v1/daemon").json["backend_collection"] == {}


def test_mount_bad_input(stack: Stack, tmp_path) -> None:
    result = stack.call("POST", "/api/v1/mount", query="mountpoint=/c", body={"source": str(tmp_path)})
    assert result.status_code == 400
    assert error_of(result).startswith('ParseBody(Error("missing field `config`"')
    result = stack.call(
        "POST", "/api/v1/mount", query="mountpoint=/c", body={"source": str(tmp_path), "config": {}}
    )
    assert error_of(result).startswith('ParseBody(Error("invalid type: map, expected a string"')
    result = stack.call("POST", "/api/v1/mount", query="mountpoint=/c", raw=b"{not json")
    assert result.status_code == 400 and error_of(result).startswith("ParseBody(Error(")
    missing = tmp_path / "missing"
    result = stack.call("POST", "/api/v1/mount", query="mountpoint=/c", body=mount_body(str(missing)))
    assert result.status_code == 500
    assert "failed to open shared directory" in error_of(result)
    for bad in ("c", "/c/../d", "/c/", "//c", ""):
        result = stack.call(
            "POST", "/api/v1/mount", query=f"mountpoint={bad}", body=mount_body(str(tmp_path))
        )
        assert result.status_code == 500, bad
        assert "VFS failed to handle request" in error_of(result), bad
    result = stack.call(
        "POST", "/api/v1/mount", query="mountpoint=/c", body=mount_body(str(tmp_path), prefetch_files=["rel"])
    )
    assert error_of(result) == 'Mount(MountFilesystem(Other("invalid prefetch file list")))'
    assert stack.call("GET", "/api/v1/daemon").json["backend_collection"] == {}


def test_mount_nested_and_url_encoded(stack: Stack, tmp_path) -> None:
    assert_no_content(
        stack.call("POST", "/api/v1/mount", query="mountpoint=%2Fsnap%2F12", body=mount_body(str(tmp_path)))
    )
    assert list(stack.call("GET", "/api/v1/daemon").json["backend_collection"]) == ["/snap/12"]


# -- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "wrapper"),
    [
        ("/api/v1/metrics", "GlobalMetrics"),
        ("/api/v1/metrics/files", "FsFilesMetrics"),
        ("/api/v1/metrics/pattern", "Pattern"),
        ("/api/v1/metrics/backend", "BackendMetrics"),
        ("/api/v1/metrics/blobcache", "BlobcacheMetrics"),
    ],
)
def test_metrics_without_instance(stack: Stack, tmp_path, path: str, wrapper: str) -> None:
    stack.call("POST", "/api/v1/mount", query="mountpoint=/p", body=mount_body(str(tmp_path)))
    for query in (None, "id=/p", "id=/nope", "id=/p&latest=true"):
        result = stack.call("GET", path, query=query)
        assert result.status_code == 404
        assert error_of(result) == f"{wrapper}(Metrics(Stats(NoCounter)))"
    assert error_of(stack.call("PUT", path, body={})) == "BadRequest"


def test_inflight(stack: Stack) -> None:
    assert_no_content(stack.call("GET", "/api/v1/metrics/inflight"))
    busy = InflightRequest(inode=7, opcode=15, unique=42, timestamp_secs=1_700_000_000)
    stack.fuse.set_busy([busy]).get(timeout=5)
    result = stack.call("GET", "/api/v1/metrics/inflight")
    assert result.status_code == 200
    assert result.json == [{"inode": 7, "opcode": 15, "unique": 42, "timestamp_secs": 1_700_000_000}]
    assert error_of(stack.call("DELETE", "/api/v1/metrics/inflight")) == "BadRequest"


# -- config ------------------------------------------------------------------------------------


def test_config_store(stack: Stack) -> None:
    assert stack.call("GET", "/api/v1/config").json == {}
    assert_no_content(stack.call("PUT", "/api/v1/config", query="id=/snap", body={"registry_auth": "dTpw"}))
    assert_no_content(stack.call("PUT", "/api/v1/config", body={"proxy_url": "http://127.0.0.1:1"}))
    assert stack.call("GET", "/api/v1/config", query="id=/snap").json == {"registry_auth": "dTpw"}
    assert stack.call("GET", "/api/v1/config").json == {
        "/snap:registry_auth": "dTpw",
        ":proxy_url": "http://127.0.0.1:1",
    }
    assert stack.call("GET", "/api/v1/config", query="id=/other").json == {}


def test_config_bad_input(stack: Stack) -> None:
    result = stack.call("PUT", "/api/v1/config", query="id=/s", body={"registry_auth": "a", "color": "red"})
    assert result.status_code == 500 and error_of(result) == "Configure(ResponsePayloadType)"
    assert stack.call("GET", "/api/v1/config").json == {}
    result = stack.call("PUT", "/api/v1/config", body={"registry_auth": 1})
    assert result.status_code == 400
    assert error_of(result).startswith('ParseBody(Error("invalid type: integer `1`, expected a string"')
    assert error_of(stack.call("PUT", "/api/v1/config")) == "BadRequest"
    assert error_of(stack.call("DELETE", "/api/v1/config")) == "BadRequest"


# -- /api/v2/blobs -------------------------------------------------------------------------------

BOOTSTRAP = NYDUS_FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
DATA_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


def blob_entry(blob_id: str = "img", domain: str = "dom", metadata: str = str(BOOTSTRAP), **extra) -> dict:
    return {
        "type": "bootstrap",
        "id": blob_id,
        "domain_id": domain,
        "config": {
            "id": blob_id,
            "backend_type": "localfs",
            "backend_config": {"dir": str(NYDUS_FIXTURES / "blobs")},
            "cache_type": "fscache",
            "cache_config": {"work_dir": "/var/cache/fscache"},
            "metadata_path": metadata,
            **extra,
        },
    }


def test_blob_objects(stack: Stack) -> None:
    assert error_of(stack.call("GET", "/api/v2/blobs")) == "BadRequest"
    assert stack.call("GET", "/api/v2/blobs", query="domain_id=dom").json == []
    assert_no_content(stack.call("PUT", "/api/v2/blobs", body=blob_entry()))
    listed = stack.call("GET", "/api/v2/blobs", query="domain_id=dom").json
    assert [(o["type"], o["id"], o["domain_id"]) for o in listed] == [
        ("bootstrap", "img", "dom"),
        ("datablob", DATA_BLOB, "dom"),
    ]
    assert listed[0]["config_v2"]["backend"]["type"] == "localfs"
    assert listed[0]["config_v2"]["cache"]["fscache"]["work_dir"] == "/var/cache/fscache/dom"  # per domain
    assert len(stack.call("GET", "/api/v2/blobs", query="domain_id=dom&blob_id=img").json) == 1
    result = stack.call("PUT", "/api/v2/blobs", body=blob_entry())
    assert result.status_code == 500
    assert (
        error_of(result)
        == 'CreateBlobObject(DaemonAbnormal(Other("blob_cache: bootstrap blob already exists")))'
    )
    # a second bootstrap of the same image in the same domain shares the data blob
    assert_no_content(stack.call("PUT", "/api/v2/blobs", body=blob_entry("img2")))
    assert len(stack.call("GET", "/api/v2/blobs", query="domain_id=dom").json) == 3
    assert_no_content(stack.call("PUT", "/api/v2/blobs", body=blob_entry(domain="other")))
    assert len(stack.call("GET", "/api/v2/blobs", query="domain_id=other").json) == 2
    assert_no_content(stack.call("DELETE", "/api/v2/blobs", query="domain_id=dom&blob_id=img"))
    assert [o["id"] for o in stack.call("GET", "/api/v2/blobs", query="domain_id=dom").json] == [
        "img2",
        DATA_BLOB,
    ]
    result = stack.call("DELETE", "/api/v2/blobs", query="domain_id=dom&blob_id=img")
    assert result.status_code == 500
    assert (
        error_of(result)
        == 'DeleteBlobObject(DaemonAbnormal(Other("No such file or directory (os error 2)")))'
    )
    assert_no_content(stack.call("DELETE", "/api/v2/blobs", query="domain_id=dom"))
    assert stack.call("GET", "/api/v2/blobs", query="domain_id=dom").json == []
    assert len(stack.call("GET", "/api/v2/blobs", query="domain_id=other").json) == 2
    assert_no_content(stack.call("DELETE", "/api/v2/blobs", query="blob_id=img"))
    assert error_of(stack.call("DELETE", "/api/v2/blobs")) == "BadRequest"


def test_blob_objects_bad_input(stack: Stack, tmp_path) -> None:
    einval = 'CreateBlobObject(DaemonAbnormal(Other("Invalid argument (os error 22)")))'
    result = stack.call("PUT", "/api/v2/blobs", body=blob_entry(metadata=str(tmp_path / "missing.boot")))
    assert result.status_code == 500 and error_of(result) == einval
    result = stack.call("PUT", "/api/v2/blobs", body={**blob_entry(), "type": "datablob"})
    assert result.status_code == 500 and error_of(result) == einval
    result = stack.call("PUT", "/api/v2/blobs", body=blob_entry(domain="a/b"))
    assert result.status_code == 500 and error_of(result) == einval
    result = stack.call("PUT", "/api/v2/blobs", body={"type": "bootstrap", "id": "img"})
    assert result.status_code == 400 and error_of(result) == "BadRequest"
    result = stack.call("PUT", "/api/v2/blobs", body=blob_entry(backend_type="nfs"))
    assert result.status_code == 400 and error_of(result) == "BadRequest"
    result = stack.call("PUT", "/api/v2/blobs", body={"type": "bootstrap"})
    assert error_of(result).startswith('ParseBody(Error("missing field `id`"')
    garbage = tmp_path / "garbage.boot"
    garbage.write_bytes(b"\0" * 8192)
    result = stack.call("PUT", "/api/v2/blobs", body=blob_entry(metadata=str(garbage)))
    assert result.status_code == 500 and "magic" in error_of(result)
    assert stack.call("GET", "/api/v2/blobs", query="domain_id=dom").json == []


def test_blob_objects_without_a_cache_manager() -> None:
    stack = Stack()
    stack.daemon.actor_ref.stop()
    settings = DaemonSettings()
    stack.daemon = DaemonActor.start(settings, stack.fuse, stack.lifecycle).proxy()
    stack.client = falcon.testing.TestClient(create_app(stack.daemon, timeout=5))
    result = stack.call("GET", "/api/v2/blobs", query="domain_id=dom")
    assert result.status_code == 501 and error_of(result) == "GetBlobObjects(DaemonAbnormal(Unsupported))"


# -- framing -------------------------------------------------------------------------------------


def test_unknown_routes(stack: Stack) -> None:
    for path in ("/api/v1/nothing", "/api/v1/daemon/", "/", "/api/v3/daemon", "/api/v2/mount"):
        result = stack.call("GET", path)
        assert result.status_code == 404, path
        assert error_of(result) == "NoRoute"


def test_unknown_method(stack: Stack) -> None:
    result = stack.call("OPTIONS", "/api/v1/daemon")
    assert result.status_code == 400
    assert error_of(result) == "Invalid HTTP Method: OPTIONS"


def test_body_limit_and_content_type(stack: Stack) -> None:
    big = json.dumps({"log_level": "info", "pad": "x" * 51_200}).encode()
    result = stack.call("PUT", "/api/v1/daemon", raw=big)
    assert result.status_code == 400
    assert error_of(result) == (
        f"Request payload with size {len(big)} is larger than the limit of 51200 allowed by server."
    )
    result = stack.client.simulate_put(
        "/api/v1/daemon", body=b'{"log_level":"info"}', headers={"Content-Type": "text/html"}
    )
    assert result.status_code == 400 and "Invalid header" in error_of(result)
    result = stack.client.simulate_put(
        "/api/v1/daemon", body=b'{"log_level":"info"}', headers={"Content-Type": "text/plain"}
    )
    assert result.status_code == 204


def test_server_header_everywhere(stack: Stack) -> None:
    for method, path in (("GET", "/api/v1/daemon"), ("GET", "/nope"), ("PUT", "/api/v1/daemon/start")):
        assert stack.call(method, path).headers["server"] == "Nydus API"


def test_actor_gone_is_503(stack: Stack) -> None:
    stack.daemon.actor_ref.stop()
    result = stack.call("GET", "/api/v1/daemon")
    assert result.status_code == 503
    assert error_of(result) == "DaemonInfo(DaemonAbnormal(NotReady))"
    assert falcon.HTTP_503.startswith("503")
