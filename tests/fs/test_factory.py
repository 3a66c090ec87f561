"""open_filesystem: passthrough opens a directory; RAFS needs a usable config."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydus_actors.config import ConfigError
from nydus_actors.exceptions import OtherError
from nydus_actors.fs.factory import open_filesystem
from nydus_actors.fs.passthrough import PassthroughFs
from nydus_actors.models import FsType, MountCmd


def cmd(fs_type: FsType, source: str) -> MountCmd:
    return MountCmd(fs_type=fs_type, source=source, config="", mountpoint="/")


def test_passthrough_opens_the_shared_directory(tmp_path: Path) -> None:
    fs = open_filesystem(cmd(FsType.PASSTHROUGH, str(tmp_path)))

    assert isinstance(fs, PassthroughFs)
    assert fs.fs_type is FsType.PASSTHROUGH
    fs.close()


@pytest.mark.parametrize(
    ("name", "cause"), [("missing", "No such file or directory"), ("file", "Not a directory")]
)
def test_passthrough_source_must_be_a_directory(tmp_path: Path, name: str, cause: str) -> None:
    (tmp_path / "file").touch()
    source = str(tmp_path / name)

    with pytest.raises(OtherError) as info:
        open_filesystem(cmd(FsType.PASSTHROUGH, source))

    assert str(info.value) == f"failed to open shared directory {source}: {cause}"


def test_rafs_with_an_unusable_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_filesystem(cmd(FsType.RAFS, str(tmp_path / "image.boot")))

    assert str(info.value) == (
        "RAFS failed to handle request, Failed to load config: failed to parse configuration information`"
    )
