"""Tell systemd about the daemon's state through `$NOTIFY_SOCKET` (sd_notify).

Hand-written on purpose: the systemd-python binding needs the libsystemd headers and a C compiler to
build, which a pip-installed daemon cannot count on, while the protocol is one datagram of
newline-separated `KEY=value` lines sent to the unix socket named by `$NOTIFY_SOCKET`.
"""

import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. ``"READY=1"``) to systemd as one datagram.

    A `$NOTIFY_SOCKET` starting with ``@`` names an abstract socket. Send
    failures are logged, never raised: a lost notification must not take
    the daemon down.

    Args:
        state: One or more newline-separated ``KEY=value`` assignments.

    Returns:
        True if the datagram was sent; False if `$NOTIFY_SOCKET` is unset
        or empty, unsupported, or the send failed.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        # systemd also allows vsock:CID:PORT, which only matters inside VMs.
        logger.warning("failed to notify systemd: unsupported NOTIFY_SOCKET %r", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), target)
    except OSError as ex:
        logger.warning("failed to notify systemd at %s: %s", address, ex)
        return False
    return True
