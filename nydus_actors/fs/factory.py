"""Build the filesystem a mount request names."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nydus_actors.exceptions import InvalidArgument, OtherError
from nydus_actors.fs.passthrough import PassthroughFs
from nydus_actors.models import FsType

if TYPE_CHECKING:
    from nydus_actors.fs.base import Filesystem
    from nydus_actors.models import MountCmd

logger = logging.getLogger(__name__)


def open_filesystem(cmd: MountCmd) -> Filesystem:
    """Open the filesystem `cmd` asks for, ready to attach to the VFS.

    Raises:
        OtherError: the passthrough source is not an existing directory.
        InvalidArgument: the filesystem type cannot be served (RAFS, for now).
    """
    if cmd.fs_type is FsType.PASSTHROUGH:
        try:
            fs = PassthroughFs(cmd.source)
        except OSError as ex:
            cause = ex.strerror or str(ex)
            raise OtherError(f"failed to open shared directory {cmd.source}: {cause}") from ex
        logger.info("opened shared directory %s", fs.source)
        return fs
    raise InvalidArgument(f"only 'passthrough_fs' is supported, but {cmd.fs_type.name.lower()} was specified")
