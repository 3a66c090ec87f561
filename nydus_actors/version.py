"""Build information: what `--version` prints and `GET /api/v1/daemon` reports.

nydus-snapshotter compares the `Git Commit:` line of `--version` with
`version.git_commit` of each running daemon and hot-upgrades those that differ,
so both come from `build_info()` here. Inside a git work tree that is the HEAD
commit; an installed copy has no git, so it is a SHA-1 over the package's own
source files, which changes exactly when the code does.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from nydus_actors import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """The fields of nydusd's `BuildTimeInfo`."""

    package_ver: str
    git_commit: str
    build_time: str
    profile: str
    rustc: str  # nydusd's field name; holds the Python runtime here

    def as_json(self) -> dict[str, str]:
        """Return the `version` object of DaemonInfo."""
        return {
            "package_ver": self.package_ver,
            "git_commit": self.git_commit,
            "build_time": self.build_time,
            "profile": self.profile,
            "rustc": self.rustc,
        }

    def version_text(self, prog: str) -> str:
        """Return the `--version` text in nydusd's layout (reference §6)."""
        return (
            f"{prog} \rVersion: \t{self.package_ver}\nGit Commit: \t{self.git_commit}\n"
            f"Build Time: \t{self.build_time}\nProfile: \t{self.profile}\nRustc: \t\t{self.rustc}\n"
        )


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _source_digest() -> tuple[str, float]:
    digest = hashlib.sha1(usedforsecurity=False)
    newest = 0.0
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0")
        digest.update(path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    return digest.hexdigest(), newest


@functools.cache
def build_info() -> BuildInfo:
    """Return this build's information, computed once per process."""
    commit = None
    build_time = None
    toplevel = _git("rev-parse", "--show-toplevel")
    if toplevel is not None and PACKAGE_DIR.parent == Path(toplevel).resolve():
        commit = _git("rev-parse", "HEAD")
        build_time = _git("log", "-1", "--format=%cI")
    if commit is None:
        commit, newest = _source_digest()
        build_time = datetime.fromtimestamp(newest, UTC).isoformat()
    return BuildInfo(
        package_ver=f"v{__version__}",
        git_commit=commit,
        build_time=build_time or "",
        profile="release",
        rustc=f"{platform.python_implementation()} {platform.python_version()}",
    )
