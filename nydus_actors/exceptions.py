"""The error kinds of the daemon, each knowing its nydusd Debug rendering.

nydusd clients read the error `message` of an API reply, which is the Rust Debug
text of the error (reference §1.6). Each class here renders the innermost part of
that text; `api/errors.py` wraps it in the route's outer variants and picks the
HTTP status, and `fs/operations.py` maps the same classes to errno values.
"""

from __future__ import annotations

import errno


def rust_debug_str(text: str) -> str:
    """Quote a string the way Rust's `{:?}` does (`"a \\"b\\""`)."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class NydusError(Exception):
    """Root of every error the daemon reports to a client."""

    #: errno used when the error reaches a FUSE request.
    errno: int = errno.EIO

    def debug(self) -> str:
        """Return the Rust Debug rendering of this error kind."""
        return type(self).__name__


class NotReady(NydusError):
    """The daemon cannot serve this request yet (HTTP 503)."""

    errno = errno.EAGAIN


class Unsupported(NydusError):
    """The capability is absent from this daemon (HTTP 501)."""

    errno = errno.ENOSYS


class UnexpectedEvent(NydusError):
    """A state-machine input that the current state does not accept (HTTP 400)."""

    def __init__(self, event: str) -> None:
        super().__init__(f"unexpected event {event}")
        self.event = event

    def debug(self) -> str:
        return f"UnexpectedEvent({rust_debug_str(self.event)})"


class UpgradeManagerError(NydusError):
    """Saving or restoring state through the supervisor failed (HTTP 500)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def debug(self) -> str:
        return f"UpgradeManager({rust_debug_str(self.detail)})"


class OtherError(NydusError):
    """Any other failure, rendered as `Other("<text>")` (HTTP 500)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def debug(self) -> str:
        return f"Other({rust_debug_str(self.text)})"


class AlreadyExists(OtherError):
    """An object or filesystem is already present at that place."""

    errno = errno.EEXIST

    def __init__(self) -> None:
        super().__init__("object or filesystem already exists")


class NotFound(OtherError):
    """No object or filesystem is present at that place."""

    errno = errno.ENOENT

    def __init__(self) -> None:
        super().__init__("object or filesystem doesn't exist")


class InvalidArgument(OtherError):
    """A request named something the daemon cannot use (nydusd `einval!`)."""

    errno = errno.EINVAL

    def __init__(self, what: str) -> None:
        super().__init__(f"invalid argument `{what}`")


class NoCounter(NydusError):
    """No metrics instance matches the request (HTTP 404)."""

    def debug(self) -> str:
        return "Stats(NoCounter)"


class ResponsePayloadType(NydusError):
    """A request value of the right JSON type that the daemon cannot apply (HTTP 500)."""
