"""The raw kernel mount: /dev/fuse, mount(2) or fusermount3, and the saved FUSE_INIT."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from nydus_actors.exceptions import OtherError
from nydus_actors.fs import kernel
from tests.fs.mounting import MOUNT_MARKS, remove_mount


def mountinfo_dev(mountpoint: str) -> tuple[int, int]:
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == mountpoint:
                major, minor = fields[2].split(":")
                return int(major), int(minor)
    raise AssertionError(f"{mountpoint} is not mounted")


def test_missing_mountpoint_is_refused_before_mounting(tmp_path: Path) -> None:
    with pytest.raises(OtherError) as info:
        kernel.open_and_mount(str(tmp_path / "missing"))

    assert str(info.value) == f"failed to mount fuse at {tmp_path / 'missing'}: mountpoint does not exist"


def test_file_mountpoint_is_refused_before_mounting(tmp_path: Path) -> None:
    (tmp_path / "file").touch()

    with pytest.raises(OtherError, match="mountpoint is not a directory"):
        kernel.open_and_mount(str(tmp_path / "file"))

    assert not kernel.is_mounted(str(tmp_path / "file"))


def test_unmount_of_a_directory_that_is_not_mounted_is_fine(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        kernel.unmount(str(tmp_path))
    kernel.unmount(str(tmp_path), privileged=False)
    kernel.unmount(str(tmp_path / "missing"), privileged=os.geteuid() == 0)


def test_is_mounted_reads_the_mount_table() -> None:
    assert kernel.is_mounted("/")
    assert kernel.is_mounted("/proc")
    assert not kernel.is_mounted("/proc/self")


class TestRealMount:
    pytestmark = MOUNT_MARKS

    @pytest.mark.parametrize("privileged", [True, False], ids=["mount2", "fusermount3"])
    def test_mount_reads_fuse_init_and_unmount_removes_it(self, tmp_path: Path, privileged: bool) -> None:
        if not privileged and shutil.which("fusermount3") is None:
            pytest.skip("fusermount3 is not installed")
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        try:
            mount = kernel.open_and_mount(str(mountpoint), privileged=privileged)
            try:
                # Never stat the mount here: nobody answers its FUSE_INIT, so that would block.
                assert mount.mountpoint == os.path.realpath(tmp_path) + "/mnt"
                assert kernel.is_mounted(mount.mountpoint)
                length, opcode = struct.unpack_from("<II", mount.init_bytes)
                assert (length, opcode) == (len(mount.init_bytes), kernel.FUSE_INIT)
                major, minor = mountinfo_dev(mount.mountpoint)
                assert mount.conn_id == (major << 20) | minor
                assert not os.get_inheritable(mount.fd)
                with open("/proc/self/mountinfo") as mountinfo:
                    line = next(row for row in mountinfo if row.split()[4] == mount.mountpoint)
                assert " - fuse rafs " in line
                assert "ro," in line.split()[5] + ","
                kernel.unmount(mount.mountpoint, privileged=privileged)
                assert not kernel.is_mounted(mount.mountpoint)
            finally:
                os.close(mount.fd)
        finally:
            remove_mount(str(mountpoint))

    def test_mountpoint_with_a_space(self, tmp_path: Path) -> None:
        mountpoint = tmp_path / "with space"
        mountpoint.mkdir()
        try:
            mount = kernel.open_and_mount(str(mountpoint))
            os.close(mount.fd)
            assert kernel.is_mounted(str(mountpoint))
        finally:
            remove_mount(str(mountpoint))
        assert not kernel.is_mounted(str(mountpoint))
