"""Command line: nydusd's flags (reference §6) plus `ctl`, the nydusctl-like client.

`nydus-actors [fuse] [options]` and its alias `nydusd` start the daemon.
Options may come before or after the `fuse` word, as with nydusd. Every flag
nydus-snapshotter passes is either honoured, or rejected with a clear message,
or accepted with a logged warning; none is silently misread.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from collections.abc import Sequence
from typing import NoReturn

from nydus_actors._lib import logs
from nydus_actors.config import localfs_config_text
from nydus_actors.daemon import DaemonOptions, run
from nydus_actors.fs import kernel
from nydus_actors.version import build_info

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A command line the daemon cannot run with; printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _fuse_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Serve container images over FUSE (nydusd-compatible).")
    p.add_argument("command", nargs="?", choices=["fuse", "singleton", "virtiofs"], default="fuse")
    g = p.add_argument_group("global options")
    g.add_argument("-A", "--apisock", help="API socket path")
    g.add_argument("-C", "--config", help="filesystem config file")
    g.add_argument("--id", help="service id (requires --supervisor)")
    g.add_argument("--supervisor", help="supervisor socket (requires --id)")
    g.add_argument("--upgrade", action="store_true", help="start in INIT and wait for a takeover")
    g.add_argument("-l", "--log-level", default="info", help="trace, debug, info, warn or error")
    g.add_argument("-L", "--log-file", help="log file (.log is added if there is no extension)")
    g.add_argument("--log-rotation-size", type=int, default=0, help="rotate the log file at this many MB")
    g.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    g.add_argument("--rlimit-nofile", type=int, default=1_000_000, help="open-file limit; 0 keeps it")
    f = p.add_argument_group("filesystem options")
    f.add_argument("-M", "--mountpoint", help="host FUSE mountpoint")
    f.add_argument("--failover-policy", choices=["none", "resend", "flush"], default="resend")
    f.add_argument("--fuse-threads", "--thread-num", type=int, default=4, dest="fuse_threads")
    f.add_argument("--writable", action="store_true", help="not supported: images are served read-only")
    f.add_argument("-B", "--bootstrap", help="RAFS bootstrap to mount at --virtual-mountpoint")
    f.add_argument("-D", "--localfs-dir", help="blob directory for a generated localfs config")
    f.add_argument("-s", "--shared-dir", help="host directory to serve read-only (passthrough)")
    f.add_argument("--prefetch-files", help="file listing paths to prefetch (requires --bootstrap)")
    f.add_argument("-m", "--virtual-mountpoint", default="/", help="VFS path of the start-up filesystem")
    f.add_argument("--dedup-db", help="not supported")
    f.add_argument("--backend-source", help="accepted for nydus-snapshotter compatibility and ignored")
    return p


def _require_dir(path: str, what: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as ex:
        raise UsageError(f"{what} {path}: {ex.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{what} {path}: not a directory")


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as ex:
        raise UsageError(f"{what} {path}: {getattr(ex, 'strerror', None) or ex}") from None


def _options(args: argparse.Namespace) -> DaemonOptions:
    """Check the flag combinations nydusd checks, and the paths, before anything starts."""
    if args.command != "fuse":
        raise UsageError(f"the {args.command} subcommand is not supported; only fuse is")
    if bool(args.id) != bool(args.supervisor):
        raise UsageError("--id and --supervisor must be given together")
    if args.writable:
        raise UsageError("--writable is not supported: nydus-actors serves read-only filesystems")
    if args.dedup_db:
        raise UsageError("--dedup-db is not supported: this daemon has no dedup feature")
    if not 1 <= args.fuse_threads <= 1024:
        raise UsageError("--fuse-threads must be between 1 and 1024")
    if args.shared_dir and args.bootstrap:
        raise UsageError("--shared-dir conflicts with --bootstrap")
    if args.localfs_dir and args.config:
        raise UsageError("--localfs-dir conflicts with --config")
    if args.prefetch_files and not args.bootstrap:
        raise UsageError("--prefetch-files requires --bootstrap")
    if not args.mountpoint:
        raise UsageError("--mountpoint is required")
    try:
        level = logs.parse_level(args.log_level)
    except ValueError as ex:
        raise UsageError(str(ex)) from None
    # A mountpoint that is already mounted may be the FUSE mount of a crashed daemon whose
    # connection a supervisor still holds: a stat(2) there would wait for a server that is
    # not running yet, so only unmounted paths are checked.
    if not kernel.is_mounted(args.mountpoint):
        _require_dir(args.mountpoint, "mountpoint")
    if args.apisock:
        _require_dir(os.path.dirname(os.path.abspath(args.apisock)), "directory of the API socket")
    if args.shared_dir:
        _require_dir(args.shared_dir, "shared directory")
    if args.bootstrap and not (args.config or args.localfs_dir):
        raise UsageError("both --config and --localfs-dir are missing")
    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"config file {args.config}: no such file")
    config_text = ""
    if args.bootstrap:
        if not os.path.isfile(args.bootstrap):
            raise UsageError(f"bootstrap {args.bootstrap}: no such file")
        if args.localfs_dir:
            _require_dir(args.localfs_dir, "localfs directory")
            config_text = localfs_config_text(os.path.abspath(args.localfs_dir))
        else:
            config_text = _read_text(args.config, "config file")
    prefetch: tuple[str, ...] = ()
    if args.prefetch_files:
        prefetch = tuple(
            line.strip() for line in _read_text(args.prefetch_files, "prefetch list").splitlines()
        )
        prefetch = tuple(p for p in prefetch if p)
    log_file = logs.log_file_path(args.log_file) if args.log_file else None
    if log_file:
        _require_dir(os.path.dirname(os.path.abspath(log_file)), "directory of the log file")
    return DaemonOptions(
        mountpoint=os.path.abspath(args.mountpoint),
        apisock=os.path.abspath(args.apisock) if args.apisock else None,
        id=args.id,
        supervisor=args.supervisor,
        upgrade=args.upgrade,
        failover_policy=args.failover_policy,
        fuse_threads=args.fuse_threads,
        shared_dir=os.path.abspath(args.shared_dir) if args.shared_dir else None,
        bootstrap=os.path.abspath(args.bootstrap) if args.bootstrap else None,
        config_text=config_text,
        prefetch_files=prefetch,
        virtual_mountpoint=args.virtual_mountpoint,
        config=args.config,
        log_level=level,
        log_file=log_file,
        log_rotation_mb=args.log_rotation_size,
        log_json=args.log_format == "json",
        rlimit_nofile=args.rlimit_nofile,
        backend_source=args.backend_source,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0])
    if prog in ("", "__main__.py"):  # `python -m nydus_actors`
        prog = "nydus-actors"
    if argv and argv[0] == "ctl":
        from nydus_actors import ctl  # noqa: PLC0415 - the client needs none of the daemon

        return ctl.main(argv[1:])
    if argv and argv[0] == "supervisor":
        from nydus_actors import supervisor  # noqa: PLC0415 - the supervisor needs none of the daemon

        return supervisor.main(argv[1:])
    if argv and argv[0] == "image":
        from nydus_actors import image_cli  # noqa: PLC0415 - the builder needs none of the daemon

        return image_cli.main(argv[1:])
    if "-V" in argv or "--version" in argv:
        sys.stdout.write(build_info().version_text(prog))
        return 0
    try:
        args = _fuse_parser(prog).parse_intermixed_args(argv)
        options = _options(args)
    except UsageError as ex:
        print(f"{prog}: error: {ex}", file=sys.stderr)
        return 1
    return run(options)
