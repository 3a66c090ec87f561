"""Build the filesystem a mount request names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nydus_actors.config import FsConfig, parse_config
from nydus_actors.exceptions import OtherError, Unsupported
from nydus_actors.fs.passthrough import PassthroughFs
from nydus_actors.fs.rafs import RafsFs
from nydus_actors.metrics import FsIoStats
from nydus_actors.models import FsType
from nydus_actors.rafs import ChunkSource, RafsImage

if TYPE_CHECKING:
    from nydus_actors.fs.base import Filesystem
    from nydus_actors.models import MountCmd

logger = logging.getLogger(__name__)


#: Opens the chunk source of a RAFS mount: (mount id, image, config) -> ChunkSource.
OpenSource = Callable[[str, RafsImage, FsConfig], ChunkSource]


def open_filesystem(cmd: MountCmd, open_source: OpenSource | None = None) -> Filesystem:
    """Open the filesystem `cmd` asks for, ready to attach to the VFS.

    Raises:
        OtherError: the passthrough source is not an existing directory, or the
            RAFS config or bootstrap cannot be used.
        Unsupported: the config names a backend this daemon cannot read yet.
    """
    if cmd.fs_type is FsType.PASSTHROUGH:
        try:
            fs = PassthroughFs(cmd.source)
        except OSError as ex:
            cause = ex.strerror or str(ex)
            raise OtherError(f"failed to open shared directory {cmd.source}: {cause}") from ex
        logger.info("opened shared directory %s", fs.source)
        return fs
    config = parse_config(cmd.config)
    rafs = config.rafs
    stats = FsIoStats(
        cmd.mountpoint,
        files=rafs["iostats_files"],
        access_pattern=rafs["access_pattern"],
        latest_files=rafs["latest_read_files"],
    )
    image = RafsImage.open(cmd.source)
    try:
        source = None
        if image.is_rafs:
            if open_source is None:
                raise Unsupported
            source = open_source(cmd.mountpoint, image, config)
        fs = RafsFs(image, config, stats, source)
    except BaseException:
        image.close()
        raise
    logger.info("opened RAFS bootstrap %s (%d blobs)", cmd.source, len(image.blobs))
    return fs
