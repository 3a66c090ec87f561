"""The kernel side of a FUSE mount: open /dev/fuse, mount, read FUSE_INIT, unmount.

No libfuse here: the daemon keeps the fd and the INIT bytes to hand over (design §4).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import select
import socket
import struct
import subprocess
from dataclasses import dataclass

from nydus_actors.exceptions import OtherError

logger = logging.getLogger(__name__)

#: Opcode of the kernel's first message on a new connection.
FUSE_INIT = 26
#: Large enough for any request the kernel queues (libfuse reads with the same size).
READ_BUFFER_SIZE = (1 << 20) + 4096
#: How long the kernel may take to queue FUSE_INIT after mount(2).
INIT_READ_TIMEOUT = 5.0
#: How long fusermount3 may take.
FUSERMOUNT_TIMEOUT = 30.0

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # struct fuse_in_header
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOATIME = 1024
_MOUNT_FLAGS = _MS_NOSUID | _MS_NODEV | _MS_RDONLY | _MS_NOATIME
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class KernelMount:
    """A mounted FUSE connection whose FUSE_INIT has been read but not answered.

    Attributes:
        fd: the /dev/fuse fd (close-on-exec), owned by whoever holds this value.
        mountpoint: the canonical mountpoint path, as /proc/self/mountinfo shows it.
        init_bytes: the kernel's FUSE_INIT request, replayed when adopting the fd.
        conn_id: the FUSE connection id, `(major << 20) | minor` of the mount's st_dev.
    """

    fd: int
    mountpoint: str
    init_bytes: bytes
    conn_id: int


def open_and_mount(mountpoint: str, *, fsname: str = "rafs", privileged: bool | None = None) -> KernelMount:
    """Mount a read-only FUSE filesystem at `mountpoint` and read its FUSE_INIT.

    Args:
        mountpoint: an existing directory.
        fsname: the mount source shown in the mount table.
        privileged: mount with mount(2) (True) or through fusermount3 (False);
            None picks mount(2) when running as root.

    Raises:
        OtherError: the mountpoint is unusable or any step failed; nothing stays
            mounted or open then.
    """
    path = os.path.realpath(mountpoint)
    if not os.path.exists(path):
        raise OtherError(f"failed to mount fuse at {mountpoint}: mountpoint does not exist")
    if not os.path.isdir(path):
        raise OtherError(f"failed to mount fuse at {mountpoint}: mountpoint is not a directory")
    if privileged is None:
        privileged = os.geteuid() == 0

    fd = -1
    mounted = False
    try:
        if privileged:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            _mount_syscall(path, fd, fsname)
        else:
            fd = _mount_fusermount(path, fsname)
        mounted = True
        init_bytes = _read_init(fd)
        conn_id = _conn_id(path)
    except (OSError, ValueError, subprocess.SubprocessError) as ex:
        if mounted:
            _unmount_quietly(path, privileged)
        if fd >= 0:
            os.close(fd)
        raise OtherError(f"failed to mount fuse at {mountpoint}: {_cause(ex)}") from ex
    logger.info("mounted fuse at %s (connection %d)", path, conn_id)
    return KernelMount(fd=fd, mountpoint=path, init_bytes=init_bytes, conn_id=conn_id)


def unmount(mountpoint: str, *, privileged: bool | None = None) -> None:
    """Lazily unmount the FUSE mount at `mountpoint`; "not mounted" is fine.

    Raises:
        OtherError: the unmount failed for another reason.
    """
    if privileged is None:
        privileged = os.geteuid() == 0
    if privileged:
        if _libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) == 0:
            logger.info("unmounted fuse at %s", mountpoint)
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            logger.debug("fuse at %s was not mounted: %s", mountpoint, os.strerror(err))
            return
        raise OtherError(f"failed to unmount fuse at {mountpoint}: {os.strerror(err)}")
    if not is_mounted(mountpoint):
        logger.debug("fuse at %s was not mounted", mountpoint)
        return
    try:
        subprocess.run(
            ["fusermount3", "-u", "-z", "--", mountpoint],
            check=True,
            capture_output=True,
            timeout=FUSERMOUNT_TIMEOUT,
        )
    except subprocess.CalledProcessError as ex:
        cause = ex.stderr.decode(errors="replace").strip() or f"exit status {ex.returncode}"
        raise OtherError(f"failed to unmount fuse at {mountpoint}: {cause}") from ex
    except (OSError, subprocess.SubprocessError) as ex:
        raise OtherError(f"failed to unmount fuse at {mountpoint}: {ex}") from ex
    logger.info("unmounted fuse at %s", mountpoint)


def is_mounted(mountpoint: str) -> bool:
    """Tell whether /proc/self/mountinfo lists a mount at `mountpoint`.

    The path is compared as given (made absolute, never resolved): resolving it
    would stat the mount, and a FUSE mount nobody serves would block that.
    """
    return _find_mount(os.path.abspath(mountpoint)) is not None


def _mount_syscall(path: str, fd: int, fsname: str) -> None:
    data = (
        f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},default_permissions,allow_other"
    )
    ret = _libc.mount(fsname.encode(), os.fsencode(path), b"fuse", _MOUNT_FLAGS, data.encode())
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount(2): {os.strerror(err)}")


def _mount_fusermount(path: str, fsname: str) -> int:
    """Mount through fusermount3 and receive the /dev/fuse fd it opened.

    fusermount3 finds the socket in `_FUSE_COMMFD` and sends the fd as
    SCM_RIGHTS over it once the mount is done.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        options = f"ro,nosuid,nodev,noatime,default_permissions,fsname={fsname}"
        try:
            subprocess.run(
                ["fusermount3", "-o", options, "--", path],
                env=env,
                pass_fds=(theirs.fileno(),),
                check=True,
                capture_output=True,
                timeout=FUSERMOUNT_TIMEOUT,
            )
        except subprocess.CalledProcessError as ex:
            cause = ex.stderr.decode(errors="replace").strip() or f"exit status {ex.returncode}"
            raise OSError(errno.EIO, f"fusermount3: {cause}") from ex
        theirs.close()
        ours.settimeout(FUSERMOUNT_TIMEOUT)
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        if _find_mount(path) is not None:
            _unmount_quietly(path, privileged=False)
        raise OSError(errno.EIO, "fusermount3 sent no file descriptor")
    # socket.recv_fds() drops its flags argument, so MSG_CMSG_CLOEXEC cannot be asked for.
    os.set_inheritable(fds[0], False)
    return fds[0]


def _read_init(fd: int) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(INIT_READ_TIMEOUT * 1000):
        raise OSError(errno.ETIMEDOUT, "the kernel sent no FUSE_INIT")
    data = os.read(fd, READ_BUFFER_SIZE)
    if len(data) < _IN_HEADER.size:
        raise ValueError(f"short FUSE request of {len(data)} bytes")
    length, opcode = _IN_HEADER.unpack_from(data)[:2]
    if opcode != FUSE_INIT or length != len(data):
        raise ValueError(f"expected FUSE_INIT, got opcode {opcode} of {length} bytes")
    return data


def _conn_id(path: str) -> int:
    # The mount table gives st_dev without a stat(2) of the mountpoint, which
    # would wait for the FUSE_INIT reply nobody has sent yet.
    found = _find_mount(path)
    if found is None:
        raise OSError(errno.ENOENT, "the new mount is not in /proc/self/mountinfo")
    major, minor = found
    return (major << 20) | minor


def _find_mount(path: str) -> tuple[int, int] | None:
    """Return (major, minor) of the topmost mount at `path`, or None."""
    found = None
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split(b" ")
            if _unescape(fields[4]) == os.fsencode(path):
                major, minor = fields[2].split(b":")
                found = (int(major), int(minor))
    return found


def _unescape(field: bytes) -> bytes:
    r"""Undo the octal escapes (`\040` for a space) of /proc/self/mountinfo."""
    return _OCTAL_ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), field)


def _unmount_quietly(path: str, privileged: bool) -> None:
    try:
        unmount(path, privileged=privileged)
    except OtherError as ex:
        logger.error("%s", ex)


def _cause(ex: Exception) -> str:
    if isinstance(ex, OSError) and ex.strerror:
        return ex.strerror
    return str(ex)
