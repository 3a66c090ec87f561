"""Bad command lines end with one clear line on stderr and exit code 1, mounting nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nydus_actors", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    return mnt, src


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shared-dir", "{tmp}/missing"], "shared directory {tmp}/missing: No such file or directory"),
        (["--shared-dir", "{src}", "--apisock", "{tmp}/nodir/api.sock"], "directory of the API socket"),
        (["--shared-dir", "{src}", "--writable"], "--writable is not supported"),
        (["--shared-dir", "{src}", "--bootstrap", "{tmp}/x.boot"], "--shared-dir conflicts with --bootstrap"),
        (["--bootstrap", "{tmp}/x.boot"], "both --config and --localfs-dir are missing"),
        (["--bootstrap", "{tmp}/x.boot", "--localfs-dir", "{src}"], "bootstrap {tmp}/x.boot: no such file"),
        (["--bootstrap", "{src}", "--config", "{tmp}/none.json"], "config file {tmp}/none.json: no such"),
        (["--id", "x"], "--id and --supervisor must be given together"),
        (["--thread-num", "0"], "--fuse-threads must be between 1 and 1024"),
        (["--log-level", "loud"], "invalid log level"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["singleton"], "the singleton subcommand is not supported"),
        (["--prefetch-files", "{tmp}/list"], "--prefetch-files requires --bootstrap"),
    ],
)
def test_bad_flags(dirs, tmp_path: Path, args: list[str], message: str) -> None:
    mnt, src = dirs
    fill = {"tmp": str(tmp_path), "src": str(src)}
    result = run_cli("--mountpoint", str(mnt), *[a.format(**fill) for a in args])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message.format(**fill) in lines[0]


def test_mountpoint_must_be_a_directory(tmp_path: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    result = run_cli("--mountpoint", str(not_dir), "--shared-dir", str(tmp_path))
    assert result.returncode == 1 and "not a directory" in result.stderr
    result = run_cli("--shared-dir", str(tmp_path))
    assert result.returncode == 1 and "--mountpoint is required" in result.stderr


def test_version_layout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nydus_actors", "--version"], capture_output=True, check=True
    )
    lines = result.stdout.decode().split("\n")
    assert lines[0] == "nydus-actors \rVersion: \tv0.1.0"
    assert lines[1].startswith("Git Commit: \t") and len(lines[1].split("\t")[1]) == 40
    assert lines[2].startswith("Build Time: \t")
    assert lines[3] == "Profile: \trelease"
