"""`nydus-actors ctl`: a nydusctl-like client for the nydusd HTTP API on a unix socket.

Requests follow the nydusd API reference (§2, §8.2); output is human-readable unless `--raw` is given.
`upgrade` runs the snapshotter's whole hot-upgrade sequence (reference §5.7, `upgrade.rehearsal`).
"""

import argparse
import datetime
import http
import http.client
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from nydus_actors._lib.uds_http import DEFAULT_TIMEOUT, UdsHttpClient
from nydus_actors.upgrade import rehearsal

logger = logging.getLogger(__name__)

METRICS_PATHS = {
    "fsstats": "/api/v1/metrics",
    "backend": "/api/v1/metrics/backend",
    "cache": "/api/v1/metrics/blobcache",
    "blobcache": "/api/v1/metrics/blobcache",  # nydusctl's name for "cache"
    "inflight": "/api/v1/metrics/inflight",
    "files": "/api/v1/metrics/files",
    "pattern": "/api/v1/metrics/pattern",
}

# Bucket labels of the fixed-length metric arrays (reference §3.4, §3.7).
SIZE_BUCKETS = ("<1K", "1K~", "4K~", "16K~", "64K~", "128K~", "512K~", "1M~")
LATENCY_BUCKETS = ("<=200us", "<=1ms", "<=20ms", "<=50ms", "<=500ms", "<=1s", "<=2s", ">2s")
FOP_NAMES = (
    "Getattr", "Readlink", "Open", "Release", "Read", "Statfs", "Getxattr", "Listxattr",
    "Opendir", "Lookup", "Readdir", "Readdirplus", "Access", "Forget", "BatchForget",
)  # fmt: skip
READ_FOP = 4


class CtlError(Exception):
    """A failure reported as one `error: ...` line and exit status 1."""


def main(argv: list[str], *, sleep: Callable[[float], None] = time.sleep) -> int:
    """Run `nydus-actors ctl` with `argv` (the arguments after ``ctl``).

    Args:
        argv: Command-line arguments, e.g. ``["--sock", "/run/api.sock", "info"]``.
        sleep: Waits between repeated `metrics -I` reports (injected by tests).

    Returns:
        0 on success, 1 on a failed request or an unreachable socket,
        2 on a usage error, 130 on Ctrl-C (except during `metrics -I`).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(parser, args)
    except SystemExit as ex:
        # argparse exits on --help and on usage errors; a caller of main() wants a status instead.
        return ex.code if isinstance(ex.code, int) else 2
    with UdsHttpClient(args.sock, timeout=args.timeout) as client:
        try:
            if args.command == "metrics":
                return _cmd_metrics(client, args, sleep)
            return _COMMANDS[args.command](client, args)
        except CtlError as ex:
            print(f"error: {ex}", file=sys.stderr)
        except OSError as ex:
            print(f"error: failed to talk to nydusd at {args.sock}: {ex}", file=sys.stderr)
        except http.client.HTTPException as ex:
            print(f"error: invalid HTTP reply from {args.sock}: {ex!r}", file=sys.stderr)
        except KeyboardInterrupt:
            return 130
    return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nydus-actors ctl", description="Query and configure a running nydusd / nydus-actors daemon."
    )
    parser.add_argument("-S", "--sock", required=True, help="the daemon's API socket (its --apisock)")
    parser.add_argument("-r", "--raw", action="store_true", help="print JSON replies as received")
    parser.add_argument(
        "--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, help="seconds per request (default 30)"
    )
    # Also accept --raw after the command; SUPPRESS keeps the global value when it is absent there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-r", "--raw", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("info", parents=[common], help="show version, state and mounted instances")

    metrics = commands.add_parser("metrics", parents=[common], help="show metrics")
    metrics.add_argument("category", nargs="?", default="fsstats", choices=list(METRICS_PATHS))
    metrics.add_argument("--id", help="instance id (the VFS mountpoint, e.g. / or /<snapshot>)")
    metrics.add_argument("--latest", action="store_true", help="files: inodes read since the last query")
    metrics.add_argument(
        "-I",
        "--interval",
        type=_positive_float,
        help="repeat every SECS seconds until Ctrl-C",
        metavar="SECS",
    )

    mount = commands.add_parser("mount", parents=[common], help="mount a filesystem instance")
    mount.add_argument("-s", "--source", required=True, help="RAFS bootstrap, or the passthrough directory")
    mount.add_argument("-c", "--config", help="config file, sent verbatim as a string (required for rafs)")
    mount.add_argument("-m", "--mountpoint", required=True, help="VFS path inside the daemon's mount")
    mount.add_argument("-t", "--type", default="rafs", choices=["rafs", "passthrough_fs"], dest="fs_type")

    umount = commands.add_parser("umount", parents=[common], help="unmount a filesystem instance")
    umount.add_argument("-m", "--mountpoint", required=True)

    set_ = commands.add_parser("set", parents=[common], help="configure the daemon: set log-level LEVEL")
    set_.add_argument("item", choices=["log-level"])
    set_.add_argument("value", help="off, error, warn, info, debug or trace")

    commands.add_parser("events", parents=[common], help="show recorded backend errors")
    commands.add_parser("start", parents=[common], help="start serving after a takeover (-> RUNNING)")
    commands.add_parser("exit", parents=[common], help="exit without unmounting (hot upgrade)")

    upgrade = commands.add_parser(
        "upgrade",
        help="hot-upgrade the daemon: a new daemon process takes over its mount",
        description="Run the whole hot upgrade against the RUNNING daemon on --sock: sendfd, start a new "
        "daemon with --upgrade, takeover, exit the old one, start the new one. Prints every step's duration.",
    )
    upgrade.add_argument(
        "--supervisor", required=True, help="the supervisor socket the daemon was started with"
    )
    upgrade.add_argument("--new-sock", help="API socket of the new daemon (default: --sock with .1, .2, ...)")
    upgrade.add_argument(
        "--daemon-cmd",
        help="command of the new daemon, one shell-quoted string (default: this program with the old "
        "daemon's arguments); --apisock and --upgrade are added when missing",
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "mount" and args.fs_type == "rafs" and args.config is None:
        parser.error("mount -t rafs needs -c CFGFILE")
    if args.command == "metrics":
        if args.id is not None and args.category == "inflight":
            parser.error("--id does not apply to inflight metrics")
        if args.latest and args.category != "files":
            parser.error("--latest applies only to files metrics")
    if args.command == "upgrade" and args.daemon_cmd is not None:
        try:
            args.daemon_cmd = shlex.split(args.daemon_cmd)
        except ValueError as ex:
            parser.error(f"--daemon-cmd: {ex}")
        if not args.daemon_cmd:
            parser.error("--daemon-cmd is empty")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Requests


def _call(client: UdsHttpClient, method: str, path: str, doc: object = None) -> tuple[int, bytes]:
    """Send one request; turn a status >= 400 into `CtlError`."""
    body = None if doc is None else json.dumps(doc).encode()
    logger.debug("%s %s", method, path)
    status, _, data = client.request(method, path, body)
    if status >= 400:
        raise CtlError(f"{status} {_error_message(status, data)}")
    return status, data


def _error_message(status: int, data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    if not text:
        try:
            return http.HTTPStatus(status).phrase
        except ValueError:
            return ""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return doc["message"]
    return text


def _parse_json(path: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as ex:
        raise CtlError(f"failed to parse the reply to GET {path}: {ex}") from ex


def _with_query(path: str, **params: str | None) -> str:
    # urlencode percent-encodes "/" in mountpoints and ids, as Go's url.Values does for the snapshotter.
    present = {key: value for key, value in params.items() if value is not None}
    return f"{path}?{urlencode(present)}" if present else path


def _print_raw(data: bytes) -> None:
    if not data:
        return
    text = data.decode(errors="replace")
    print(text, end="" if text.endswith("\n") else "\n")


# ---------------------------------------------------------------------------------------------------------
# Commands


def _cmd_info(client: UdsHttpClient, args: argparse.Namespace) -> int:
    path = "/api/v1/daemon"
    _, data = _call(client, "GET", path)
    if args.raw:
        _print_raw(data)
    else:
        print(_render(path, _format_info, _parse_json(path, data)))
    return 0


def _cmd_metrics(client: UdsHttpClient, args: argparse.Namespace, sleep: Callable[[float], None]) -> int:
    path = _with_query(METRICS_PATHS[args.category], id=args.id, latest="true" if args.latest else None)
    if args.interval is None:
        _show_metrics(client, path, args)
        return 0
    try:
        while True:
            _show_metrics(client, path, args)
            sleep(args.interval)
            if not args.raw:
                print()
    except KeyboardInterrupt:
        # Ctrl-C is the way to end an interval report, not a failure.
        return 0


def _show_metrics(client: UdsHttpClient, path: str, args: argparse.Namespace) -> None:
    status, data = _call(client, "GET", path)
    if args.raw:
        _print_raw(data)
    elif args.category == "inflight" and (status == 204 or not data):
        # The inflight metrics answer 204 with no body when no FUSE request is in progress.
        print("no in-flight requests")
    else:
        print(_render(path, _METRICS_FORMATTERS[args.category], _parse_json(path, data)))


def _cmd_mount(client: UdsHttpClient, args: argparse.Namespace) -> int:
    if args.config is None:
        config = ""  # passthroughfs ignores the config; clients send an empty string
    else:
        try:
            config = Path(args.config).read_text()
        except OSError as ex:
            raise CtlError(f"failed to read config {args.config}: {ex.strerror or ex}") from ex
    doc = {"source": args.source, "fs_type": args.fs_type, "config": config}
    _, data = _call(client, "POST", _with_query("/api/v1/mount", mountpoint=args.mountpoint), doc)
    if args.raw:
        _print_raw(data)
    return 0


def _cmd_umount(client: UdsHttpClient, args: argparse.Namespace) -> int:
    _, data = _call(client, "DELETE", _with_query("/api/v1/mount", mountpoint=args.mountpoint))
    if args.raw:
        _print_raw(data)
    return 0


def _cmd_set(client: UdsHttpClient, args: argparse.Namespace) -> int:
    # "log-level" is the only item; the daemon validates the level itself.
    _, data = _call(client, "PUT", "/api/v1/daemon", {"log_level": args.value})
    if args.raw:
        _print_raw(data)
    return 0


def _cmd_events(client: UdsHttpClient, args: argparse.Namespace) -> int:
    path = "/api/v1/daemon/events"
    _, data = _call(client, "GET", path)
    if args.raw:
        _print_raw(data)
    else:
        print(_render(path, _format_events, _parse_json(path, data)))
    return 0


def _cmd_start(client: UdsHttpClient, args: argparse.Namespace) -> int:
    _, data = _call(client, "PUT", "/api/v1/daemon/start")
    if args.raw:
        _print_raw(data)
    return 0


def _cmd_exit(client: UdsHttpClient, args: argparse.Namespace) -> int:
    _, data = _call(client, "PUT", "/api/v1/daemon/exit")
    if args.raw:
        _print_raw(data)
    return 0


def _cmd_upgrade(client: UdsHttpClient, args: argparse.Namespace) -> int:
    del client  # the rehearsal talks to the old and the new daemon with clients of its own
    try:
        rehearsal.hot_upgrade(
            args.sock,
            args.supervisor,
            args.daemon_cmd,
            args.new_sock,
            log=lambda line: print(line, flush=True),  # a step can take seconds: show each at once
            timeout=args.timeout,
        )
    except rehearsal.UpgradeFailed as ex:
        raise CtlError(f"upgrade failed at step {ex.step} ({rehearsal.STEPS[ex.step]}): {ex.error}") from None
    return 0


_COMMANDS: dict[str, Callable[[UdsHttpClient, argparse.Namespace], int]] = {
    "info": _cmd_info,
    "mount": _cmd_mount,
    "umount": _cmd_umount,
    "set": _cmd_set,
    "events": _cmd_events,
    "start": _cmd_start,
    "exit": _cmd_exit,
    "upgrade": _cmd_upgrade,
}


# ---------------------------------------------------------------------------------------------------------
# Human-readable output


def _render(path: str, formatter: Callable[[Any], list[str]], doc: Any) -> str:
    try:
        return "\n".join(formatter(doc))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as ex:
        raise CtlError(f"unexpected reply to GET {path}: {type(ex).__name__}: {ex}") from ex


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _field(label: str, value: object, width: int = 16) -> str:
    return f"{label + ':':<{width}}{_value(value)}"


def _row(label: str, values: list[object] | tuple[object, ...], width: int = 26) -> str:
    return f"{label:<{width}}" + "".join(f"{_value(v):<9}" for v in values).rstrip()


def _mib(amount: int) -> str:
    return f"{amount} Bytes ({amount / 1024 / 1024:.2f} MB)"


def _utc(secs: float) -> str:
    return datetime.datetime.fromtimestamp(secs, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def _format_info(info: dict[str, Any]) -> list[str]:
    version = info["version"]
    lines = [
        _field("Version", version["package_ver"]),
        _field("Git Commit", version["git_commit"]),
        _field("Profile", version["profile"]),
        _field("State", info["state"]),
    ]
    if info.get("id") is not None:
        lines.append(_field("ID", info["id"]))
    if info.get("supervisor") is not None:
        lines.append(_field("Supervisor", info["supervisor"]))
    for key, backend in (info.get("backend_collection") or {}).items():
        lines += [
            "",
            _field("Instance", key),
            _field("  Backend Type", backend["backend_type"], 26),
            _field("  Mountpoint", backend["mountpoint"], 26),
            _field("  Mounted Time", backend["mounted_time"], 26),
        ]
        # The normalized ConfigV2 may lack sections (nydusctl fails then); show what is there.
        config = backend.get("config") or {}
        if (config.get("rafs") or {}).get("mode") is not None:
            lines.append(_field("  Mode", config["rafs"]["mode"], 26))
        prefetch = (config.get("cache") or {}).get("prefetch") or {}
        if "enable" in prefetch:
            lines.append(_field("  Prefetch", prefetch["enable"], 26))
        if "batch_size" in prefetch:
            lines.append(_field("  Prefetch Merging Size", prefetch["batch_size"], 26))
    return lines


def _format_fsstats(m: dict[str, Any]) -> list[str]:
    hits, errors = m["fop_hits"], m["fop_errors"]
    return [
        _field("Instance", m["id"]),
        _field("Open Files", m["nr_opens"]),
        _field("Read Data", _mib(m["data_read"])),
        _field("Read Errors", errors[READ_FOP]),
        "",
        _row("Read Latency:", LATENCY_BUCKETS, 16),
        _row("Reads Count:", m["read_latency_dist"], 16),
        "",
        _row("Read Sizes:", SIZE_BUCKETS, 16),
        _row("Reads Count:", m["block_count_read"], 16),
        "",
        "FOP Counters:",
        " ".join(f"{name}({hits[i]})" for i, name in enumerate(FOP_NAMES[:8])),
        " ".join(f"{name}({hits[i + 8]})" for i, name in enumerate(FOP_NAMES[8:])),
        "FOP Errors:",
        " ".join(f"{name}({errors[i]})" for i, name in enumerate(FOP_NAMES[:8])),
        " ".join(f"{name}({errors[i + 8]})" for i, name in enumerate(FOP_NAMES[8:])),
    ]


def _format_backend(m: dict[str, Any]) -> list[str]:
    latency = m["read_cumulative_latency_millis_dist"]
    counts = m["read_count_block_size_dist"]
    averages = [total // count if count else 0 for total, count in zip(latency, counts, strict=True)]
    return [
        _field("Backend Type", m["backend_type"], 20),
        _field("Read Amount", _mib(m["read_amount_total"]), 20),
        _field("Read Count", m["read_count"], 20),
        _field("Read Errors", m["read_errors"], 20),
        _field("Read Latency", f"{m['read_cumulative_latency_millis_total']} millis (total)", 20),
        "",
        _row("Block Sizes:", SIZE_BUCKETS),
        _row("Average Latency(millis):", averages),
        _row("Request Count:", counts),
    ]


def _format_cache(m: dict[str, Any]) -> list[str]:
    begin = m["prefetch_begin_time_secs"] + m["prefetch_begin_time_millis"] / 1000
    end = m["prefetch_end_time_secs"] + m["prefetch_end_time_millis"] / 1000
    duration = max(end - begin, 0.0)
    amount, requests = m["prefetch_data_amount"], m["prefetch_requests_count"]
    bandwidth = f"{amount / 1024 / 1024 / duration:.2f} MB/s" if duration else "-"
    lines = [
        _field("Partial Hits", m["partial_hits"], 26),
        _field("Whole Hits", m["whole_hits"], 26),
        _field("Total Read", m["total"], 26),
        _field("Entries", m["entries_count"], 26),
        _field("Data All Ready", m["data_all_ready"], 26),
        _field("Persister Buffer", m["buffered_backend_size"], 26),
        _field("Directory", m["store_path"], 26),
        _field("Files", len(m["underlying_files"]), 26),
        *(f"  {name}" for name in sorted(m["underlying_files"])),
        "",
        _field("Prefetch Workers", m["prefetch_workers"], 26),
        _field("Prefetch Amount", f"{amount} Bytes ({amount / 1024:.1f} KB)", 26),
        _field("Prefetch Requests", requests, 26),
        _field("Prefetch Average Size", f"{amount // requests if requests else 0} Bytes", 26),
        _field("Prefetch Duration", f"{duration:.3f} Seconds", 26),
        _field("Prefetch Bandwidth", bandwidth, 26),
        _field("Prefetch Unmerged", m["prefetch_unmerged_chunks"], 26),
    ]
    if requests:
        latency = m["prefetch_cumulative_time_millis"] / requests / 1000
        lines.append(_field("Prefetch Request Latency", f"{latency:.3f} Seconds", 26))
    return lines


def _format_inflight(requests: list[dict[str, Any]]) -> list[str]:
    lines = [_row("Inode", ("Opcode", "Unique", "Started"), 12)]
    lines += [
        _row(str(r["inode"]), (r["opcode"], r["unique"], _utc(r["timestamp_secs"])), 12) for r in requests
    ]
    return lines


def _format_files(files: dict[str, dict[str, Any]] | list[list[int]]) -> list[str]:
    if isinstance(files, list):
        # latest=true: inode ranges read since the last query, [a, b] inclusive or [a].
        if not files:
            return ["no files read since the last query"]
        return ["Inodes read since the last query: " + " ".join("-".join(map(str, r)) for r in files)]
    if not files:
        return ["no per-file metrics (is iostats_files enabled?)"]
    lines = [_row("Inode", ("FOPs", "Reads", "Errors", "Data Read"), 12)]
    for ino in sorted(files, key=int):
        f = files[ino]
        values = (f["total_fops"], f["fop_hits"][READ_FOP], f["fop_errors"][READ_FOP], f["data_read"])
        lines.append(_row(ino, values, 12))
    return lines


def _format_pattern(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["no access pattern records (is access_pattern enabled?)"]
    lines = [_row("Inode", ("Reads", "First Access"), 12)]
    for r in records:
        first = r["first_access_time_secs"] + r["first_access_time_nanos"] / 1e9
        lines.append(_row(str(r["ino"]), (r["nr_read"], _utc(first)), 12))
    return lines


def _format_events(events: dict[str, Any]) -> list[str]:
    lines = [
        _field("Total Errors", f"{events['total_errors']} (kept at most {events['max_errors']})"),
        _field("Total Size", f"{events['total_size']} Bytes (kept at most {events['max_size']})"),
    ]
    if not events["errors"]:
        return [*lines, "no errors recorded"]
    return [*lines, "Errors:", *(f"  {error}" for error in events["errors"])]


_METRICS_FORMATTERS: dict[str, Callable[[Any], list[str]]] = {
    "fsstats": _format_fsstats,
    "backend": _format_backend,
    "cache": _format_cache,
    "blobcache": _format_cache,
    "inflight": _format_inflight,
    "files": _format_files,
    "pattern": _format_pattern,
}
