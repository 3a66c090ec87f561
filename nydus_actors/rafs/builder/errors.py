"""The one error kind of the image builder: a message fit for a single line on stderr."""

from __future__ import annotations

from nydus_actors.exceptions import OtherError


class BuildError(OtherError):
    """The source cannot be read or the image cannot be written; `str()` is the whole story."""
