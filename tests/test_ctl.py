"""Tests of `nydus-actors ctl` against a real waitress server giving canned nydusd replies."""

import http
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_actors import ctl
from tests.wsgi_server import serve_unix

DAEMON_INFO = {
    "version": {
        "package_ver": "v2.4.4",
        "git_commit": "34e6071e556a0000000000000000000000000000",
        "build_time": "+002026-07-20T09:10:11.123456789Z",
        "profile": "release",
        "rustc": "rustc 1.84.0",
    },
    "id": "cq8abc",
    "supervisor": "/run/supervisor/cq8abc.sock",
    "state": "RUNNING",
    "backend_collection": {
        "/sub": {
            "backend_type": "Rafs",
            "mountpoint": "/sub",
            "mounted_time": "2026-07-20 09:10:11.5 +00:00:00",
            "config": {
                "version": 2,
                "id": "",
                "cache": {"type": "blobcache", "prefetch": {"enable": True, "batch_size": 1048576}},
                "rafs": {"mode": "direct"},
            },
        },
        "/pass": {
            "backend_type": "PassthroughFs",
            "mountpoint": "/pass",
            "mounted_time": "2026-07-20 09:11:00.25 +00:00:00",
            "config": None,
        },
    },
}

FS_STATS = {
    "files_account_enabled": False,
    "access_pattern_enabled": False,
    "record_latest_read_files_enabled": False,
    "measure_latency": True,
    "id": "/sub",
    "nr_opens": 3,
    "data_read": 3 * 1024 * 1024,
    "block_count_read": [1, 2, 3, 4, 5, 6, 7, 8],
    "fop_hits": [10, 0, 3, 2, 42, 0, 0, 0, 1, 9, 2, 0, 0, 0, 0],
    "fop_errors": [0, 0, 0, 0, 5, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
    "fop_cumulative_latency_total": [0] * 15,
    "read_latency_dist": [40, 2, 0, 0, 0, 0, 0, 0],
}

BACKEND_METRICS = {
    "backend_type": "registry",
    "read_count": 4,
    "read_errors": 1,
    "read_amount_total": 2 * 1024 * 1024,
    "read_cumulative_latency_millis_total": 120,
    "read_cumulative_latency_millis_dist": [0, 0, 0, 0, 0, 0, 120, 0],
    "read_count_block_size_dist": [0, 0, 0, 0, 0, 0, 4, 0],
    "read_latency_sizes_dist": [[0] * 8 for _ in range(8)],
}

BLOBCACHE_METRICS = {
    "underlying_files": ["/var/cache/blob-b", "/var/cache/blob-a"],
    "store_path": "/var/cache",
    "partial_hits": 1,
    "whole_hits": 7,
    "total": 8,
    "entries_count": 2,
    "prefetch_data_amount": 4096,
    "prefetch_requests_count": 2,
    "prefetch_workers": 4,
    "prefetch_unmerged_chunks": 0,
    "prefetch_cumulative_time_millis": 30,
    "prefetch_begin_time_secs": 100,
    "prefetch_begin_time_millis": 0,
    "prefetch_end_time_secs": 102,
    "prefetch_end_time_millis": 0,
    "buffered_backend_size": 0,
    "data_all_ready": False,
}

EVENTS = {
    "max_errors": 500,
    "total_errors": 1,
    "max_size": 51200,
    "total_size": 64,
    "errors": ["Sun, 06 Nov 1994 08:49:37 GMT - Backend(Registry(...))"],
}

MOUNT_EXISTS = {
    "code": "UNDEFINED",
    "message": 'Mount(MountFilesystem(Other("object or filesystem already exists")))',
}

NO_ROUTE = (404, b'{"code":"UNDEFINED","message":"NoRoute"}')


def as_body(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it."""

    method: str
    uri: str
    body: bytes
    content_type: str
    content_length: str


class CannedApi:
    """A WSGI app answering from `replies[(method, path)]` and recording every request."""

    def __init__(self) -> None:
        self.replies: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.requests: list[Recorded] = []

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        self.requests.append(
            Recorded(
                method=method,
                uri=environ["REQUEST_URI"],
                body=environ["wsgi.input"].read(length),
                content_type=environ.get("CONTENT_TYPE", ""),
                content_length=environ.get("CONTENT_LENGTH", ""),
            )
        )
        status, payload = self.replies.get((method, path), NO_ROUTE)
        # nydusd sends Content-Type and Content-Length only with a body (reference §1.4).
        headers = (
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))] if payload else []
        )
        start_response(f"{status} {http.HTTPStatus(status).phrase}", headers)
        return [payload]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[CannedApi]:
    app = CannedApi()
    with serve_unix(app, tmp_path / "api.sock"):
        yield app


@pytest.fixture
def sock(tmp_path: Path, api: CannedApi) -> str:
    return str(tmp_path / "api.sock")


def run_ctl(sock: str, *args: str, sleep: Callable[[float], None] | None = None) -> int:
    if sleep is None:
        return ctl.main(["--sock", sock, *args])
    return ctl.main(["--sock", sock, *args], sleep=sleep)


# ---------------------------------------------------------------------------------------------------------
# info


def test_info_prints_version_state_and_instances(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api.replies["GET", "/api/v1/daemon"] = (200, as_body(DAEMON_INFO))

    assert run_ctl(sock, "info") == 0

    assert capsys.readouterr().out == (
        "Version:        v2.4.4\n"
        "Git Commit:     34e6071e556a0000000000000000000000000000\n"
        "Profile:        release\n"
        "State:          RUNNING\n"
        "ID:             cq8abc\n"
        "Supervisor:     /run/supervisor/cq8abc.sock\n"
        "\n"
        "Instance:       /sub\n"
        "  Backend Type:           Rafs\n"
        "  Mountpoint:             /sub\n"
        "  Mounted Time:           2026-07-20 09:10:11.5 +00:00:00\n"
        "  Mode:                   direct\n"
        "  Prefetch:               true\n"
        "  Prefetch Merging Size:  1048576\n"
        "\n"
        "Instance:       /pass\n"
        "  Backend Type:           PassthroughFs\n"
        "  Mountpoint:             /pass\n"
        "  Mounted Time:           2026-07-20 09:11:00.25 +00:00:00\n"
    )
    assert api.requests == [Recorded("GET", "/api/v1/daemon", b"", "", "")]


def test_info_raw_prints_body_as_received(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    body = as_body(DAEMON_INFO)
    api.replies["GET", "/api/v1/daemon"] = (200, body)

    assert run_ctl(sock, "--raw", "info") == 0
    assert run_ctl(sock, "info", "--raw") == 0

    assert capsys.readouterr().out == (body.decode() + "\n") * 2


def test_info_without_instances(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    info = {**DAEMON_INFO, "id": None, "supervisor": None, "state": "INIT", "backend_collection": None}
    api.replies["GET", "/api/v1/daemon"] = (200, as_body(info))

    assert run_ctl(sock, "info") == 0

    out = capsys.readouterr().out
    assert "State:          INIT" in out
    assert "ID:" not in out
    assert "Instance" not in out


# ---------------------------------------------------------------------------------------------------------
# metrics


def test_metrics_defaults_to_fsstats(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    api.replies["GET", "/api/v1/metrics"] = (200, as_body(FS_STATS))

    assert run_ctl(sock, "metrics") == 0

    out = capsys.readouterr().out
    assert "Read Errors:    5" in out
    assert "Read Data:      3145728 Bytes (3.00 MB)" in out
    assert "Open Files:     3" in out
    assert "Read(42)" in out
    assert "Lookup(9)" in out
    assert "Reads Count:    40       2        0" in out
    assert api.requests[0].uri == "/api/v1/metrics"


def test_metrics_id_is_url_encoded(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    api.replies["GET", "/api/v1/metrics/backend"] = (200, as_body(BACKEND_METRICS))

    assert run_ctl(sock, "metrics", "backend", "--id", "/snap 1") == 0

    assert api.requests[0].uri == "/api/v1/metrics/backend?id=%2Fsnap+1"
    out = capsys.readouterr().out
    assert "Backend Type:       registry" in out
    assert "Read Amount:        2097152 Bytes (2.00 MB)" in out
    assert "Read Errors:        1" in out
    assert "Average Latency(millis):  0        0        0        0        0        0        30       0" in out


def test_metrics_cache(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    api.replies["GET", "/api/v1/metrics/blobcache"] = (200, as_body(BLOBCACHE_METRICS))

    assert run_ctl(sock, "metrics", "cache") == 0

    out = capsys.readouterr().out
    assert "Whole Hits:               7" in out
    assert "Files:                    2\n  /var/cache/blob-a\n  /var/cache/blob-b" in out
    assert "Prefetch Duration:        2.000 Seconds" in out
    assert "Prefetch Average Size:    2048 Bytes" in out


def test_metrics_inflight_idle(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    api.replies["GET", "/api/v1/metrics/inflight"] = (204, b"")

    assert run_ctl(sock, "metrics", "inflight") == 0

    assert capsys.readouterr().out == "no in-flight requests\n"


def test_metrics_inflight_busy(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    busy = [{"inode": 7, "opcode": 15, "unique": 99, "timestamp_secs": 0}]
    api.replies["GET", "/api/v1/metrics/inflight"] = (200, as_body(busy))

    assert run_ctl(sock, "metrics", "inflight") == 0

    out = capsys.readouterr().out
    assert "7           15       99       1970-01-01 00:00:00.000000 UTC" in out


def test_metrics_files_and_latest(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    per_file = {
        "12": {
            "total_fops": 6,
            "data_read": 8192,
            "block_count_read": [0] * 8,
            "fop_hits": [0, 0, 1, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "fop_errors": [0] * 15,
        }
    }
    api.replies["GET", "/api/v1/metrics/files"] = (200, as_body(per_file))
    assert run_ctl(sock, "metrics", "files", "--id", "/sub") == 0
    assert "12          6        4        0        8192" in capsys.readouterr().out

    api.replies["GET", "/api/v1/metrics/files"] = (200, as_body([[1, 5], [8]]))
    assert run_ctl(sock, "metrics", "files", "--id", "/sub", "--latest") == 0
    assert capsys.readouterr().out == "Inodes read since the last query: 1-5 8\n"

    assert [r.uri for r in api.requests] == [
        "/api/v1/metrics/files?id=%2Fsub",
        "/api/v1/metrics/files?id=%2Fsub&latest=true",
    ]


def test_metrics_pattern(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        {"ino": 3, "nr_read": 2, "first_access_time_secs": 86400, "first_access_time_nanos": 500_000_000}
    ]
    api.replies["GET", "/api/v1/metrics/pattern"] = (200, as_body(records))

    assert run_ctl(sock, "metrics", "pattern") == 0

    assert "3           2        1970-01-02 00:00:00.500000 UTC" in capsys.readouterr().out


def test_metrics_interval_repeats_until_ctrl_c(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api.replies["GET", "/api/v1/metrics"] = (200, as_body(FS_STATS))
    waits: list[float] = []

    def fake_sleep(secs: float) -> None:
        waits.append(secs)
        if len(waits) == 3:
            raise KeyboardInterrupt

    assert run_ctl(sock, "--raw", "metrics", "-I", "0.5", sleep=fake_sleep) == 0

    assert waits == [0.5, 0.5, 0.5]
    assert len(api.requests) == 3
    assert capsys.readouterr().out == (as_body(FS_STATS).decode() + "\n") * 3


def test_metrics_id_does_not_apply_to_inflight(api: CannedApi, sock: str) -> None:
    assert run_ctl(sock, "metrics", "inflight", "--id", "/") == 2
    assert api.requests == []


# ---------------------------------------------------------------------------------------------------------
# mount, umount, set, start, exit, events


def test_mount_sends_config_file_text_as_a_string(
    api: CannedApi, sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_text = '{"device":{"backend":{"type":"localfs","config":{"dir":"/blobs"}}},"mode":"direct"}\n'
    config_file = tmp_path / "config.json"
    config_file.write_text(config_text)
    api.replies["POST", "/api/v1/mount"] = (204, b"")

    assert (
        run_ctl(sock, "mount", "-s", "/img/image.boot", "-c", str(config_file), "-m", "/sub", "-t", "rafs")
        == 0
    )

    (request,) = api.requests
    assert request.method == "POST"
    assert request.uri == "/api/v1/mount?mountpoint=%2Fsub"
    assert request.content_type == "application/json"
    assert json.loads(request.body) == {"source": "/img/image.boot", "fs_type": "rafs", "config": config_text}
    assert capsys.readouterr().out == ""


def test_mount_passthrough_without_config_sends_empty_string(api: CannedApi, sock: str) -> None:
    api.replies["POST", "/api/v1/mount"] = (204, b"")

    assert run_ctl(sock, "mount", "-s", "/srv/shared", "-m", "/pass", "-t", "passthrough_fs") == 0

    assert json.loads(api.requests[0].body) == {
        "source": "/srv/shared",
        "fs_type": "passthrough_fs",
        "config": "",
    }


def test_mount_rafs_needs_a_config(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(sock, "mount", "-s", "/img/image.boot", "-m", "/sub") == 2

    assert "needs -c CFGFILE" in capsys.readouterr().err
    assert api.requests == []


def test_mount_unreadable_config(
    api: CannedApi, sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"

    assert run_ctl(sock, "mount", "-s", "/img/image.boot", "-c", str(missing), "-m", "/sub") == 1

    assert capsys.readouterr().err == f"error: failed to read config {missing}: No such file or directory\n"
    assert api.requests == []


def test_umount(api: CannedApi, sock: str) -> None:
    api.replies["DELETE", "/api/v1/mount"] = (204, b"")

    assert run_ctl(sock, "umount", "-m", "/sub") == 0

    assert api.requests == [Recorded("DELETE", "/api/v1/mount?mountpoint=%2Fsub", b"", "", "")]


def test_set_log_level(api: CannedApi, sock: str) -> None:
    api.replies["PUT", "/api/v1/daemon"] = (204, b"")

    assert run_ctl(sock, "set", "log-level", "debug") == 0

    (request,) = api.requests
    assert (request.method, request.uri) == ("PUT", "/api/v1/daemon")
    assert json.loads(request.body) == {"log_level": "debug"}


@pytest.mark.parametrize("command", ["start", "exit"])
def test_daemon_actions_send_put_without_body(api: CannedApi, sock: str, command: str) -> None:
    api.replies["PUT", f"/api/v1/daemon/{command}"] = (204, b"")

    assert run_ctl(sock, command) == 0

    assert api.requests == [Recorded("PUT", f"/api/v1/daemon/{command}", b"", "", "0")]


def test_events(api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    api.replies["GET", "/api/v1/daemon/events"] = (200, as_body(EVENTS))

    assert run_ctl(sock, "events") == 0

    out = capsys.readouterr().out
    assert "Total Errors:   1 (kept at most 500)" in out
    assert "  Sun, 06 Nov 1994 08:49:37 GMT - Backend(Registry(...))" in out
    assert api.requests[0].uri == "/api/v1/daemon/events"


# ---------------------------------------------------------------------------------------------------------
# errors


def test_error_reply_prints_message_and_exits_1(
    api: CannedApi, sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.replies["POST", "/api/v1/mount"] = (500, as_body(MOUNT_EXISTS))

    assert run_ctl(sock, "mount", "-s", "/srv", "-m", "/sub", "-t", "passthrough_fs") == 1

    captured = capsys.readouterr()
    assert captured.err == 'error: 500 Mount(MountFilesystem(Other("object or filesystem already exists")))\n'
    assert captured.out == ""


def test_unknown_route_reports_no_route(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_ctl(sock, "metrics", "cache") == 1

    assert capsys.readouterr().err == "error: 404 NoRoute\n"


def test_non_json_error_body_is_printed_raw(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    library_error = b'{ "error": "Invalid request.\nAll previous unanswered requests will be dropped." }'
    api.replies["GET", "/api/v1/daemon"] = (400, library_error)

    assert run_ctl(sock, "info") == 1

    assert capsys.readouterr().err == f"error: 400 {library_error.decode()}\n"


def test_error_without_body_uses_status_phrase(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api.replies["PUT", "/api/v1/daemon/start"] = (503, b"")

    assert run_ctl(sock, "start") == 1

    assert capsys.readouterr().err == "error: 503 Service Unavailable\n"


def test_unexpected_reply_shape_exits_1(
    api: CannedApi, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api.replies["GET", "/api/v1/metrics"] = (200, b'{"id":"/"}')

    assert run_ctl(sock, "metrics") == 1

    assert capsys.readouterr().err.startswith("error: unexpected reply to GET /api/v1/metrics: KeyError")


def test_unreachable_socket_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.sock"

    assert run_ctl(str(missing), "info") == 1

    err = capsys.readouterr().err
    assert err.startswith(f"error: failed to talk to nydusd at {missing}: ")
    assert err.count("\n") == 1


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--help"]) == 0
    assert "nydus-actors ctl" in capsys.readouterr().out


def test_missing_command_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--sock", str(tmp_path / "api.sock")]) == 2
    assert "usage:" in capsys.readouterr().err
