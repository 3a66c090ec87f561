"""The blob objects of API v2 (`/api/v2/blobs`): bootstrap blobs and their data blobs, by domain.

Keys are `<domain_id>/<blob_id>` (just the blob id when the domain is empty),
as in nydusd's blob cache manager. A bootstrap entry brings the data blobs its
image names into the same domain; a data blob shared by two bootstraps of one
domain is one entry, kept while any of them is registered. Each domain has its
own cache directory under the configured `work_dir`, so domains never share
cache files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from nydus_actors.exceptions import OtherError
from nydus_actors.rafs import RafsImage

_SAFE = re.compile(r"^[A-Za-z0-9._:-]+$")


class EinvalError(OtherError):
    """nydusd's `einval!()`: the message is dropped, only the OS error remains (reference §1.6)."""

    def __init__(self) -> None:
        super().__init__("Invalid argument (os error 22)")


class EnoentError(OtherError):
    """nydusd's `enoent!()` for a blob object that is not registered."""

    def __init__(self) -> None:
        super().__init__("No such file or directory (os error 2)")


@dataclass
class BlobObject:
    """One registered blob object."""

    blob_type: str  # "bootstrap" or "datablob"
    blob_id: str
    domain_id: str
    config: dict[str, Any]
    #: bootstraps: the data blob ids of the image; data blobs: the bootstraps that use them
    related: set[str] = field(default_factory=set)

    def export(self) -> dict[str, Any]:
        config = dict(self.config)
        backend = dict(config.get("backend") or {})
        for kind in ("oss", "s3"):
            if backend.get(kind):
                backend[kind] = dict(backend[kind], access_key_id="", access_key_secret="")
        if backend.get("registry"):
            backend["registry"] = dict(backend["registry"], auth=None, registry_token=None)
        config["backend"] = backend
        return {"type": self.blob_type, "id": self.blob_id, "domain_id": self.domain_id, "config_v2": config}


def scoped_key(domain_id: str, blob_id: str) -> str:
    """nydusd's key of a blob object."""
    return f"{domain_id}/{blob_id}" if domain_id else blob_id


class BlobObjects:
    """The registry of API v2 blob objects, owned by the blob cache manager actor."""

    def __init__(self) -> None:
        self._objects: dict[str, BlobObject] = {}

    def add_bootstrap(self, blob_id: str, domain_id: str, config: dict[str, Any]) -> list[str]:
        """Register a bootstrap and its data blobs; return the keys added.

        Raises:
            EinvalError: ids that nydusd refuses, or a metadata path that is not a file.
            OtherError: the bootstrap is already registered, or cannot be read.
        """
        for value in (blob_id, domain_id):
            if "/" in value or (value and not _SAFE.match(value)):
                raise EinvalError
        if not blob_id:
            raise EinvalError
        path = config.get("metadata_path", "")
        if not path or not os.path.isfile(path):
            raise EinvalError
        key = scoped_key(domain_id, blob_id)
        if key in self._objects:
            raise OtherError("blob_cache: bootstrap blob already exists")
        with RafsImage.open(path) as image:
            data_ids = [blob.blob_id for blob in image.blobs if blob.blob_id]
        cache = config.get("cache") or {}
        for section in ("filecache", "fscache"):
            if cache.get(section) and domain_id:
                # domains never share cache files
                cache[section] = dict(
                    cache[section], work_dir=os.path.join(cache[section]["work_dir"], domain_id)
                )
        bootstrap = BlobObject("bootstrap", blob_id, domain_id, config, set(data_ids))
        self._objects[key] = bootstrap
        added = [key]
        for data_id in data_ids:
            data_key = scoped_key(domain_id, data_id)
            existing = self._objects.get(data_key)
            if existing is None:
                existing = self._objects[data_key] = BlobObject("datablob", data_id, domain_id, config)
                added.append(data_key)
            existing.related.add(blob_id)
        return added

    def list(self, domain_id: str, blob_id: str | None) -> list[dict[str, Any]]:
        """The objects of a domain, or one of them."""
        found = [
            obj.export()
            for obj in self._objects.values()
            if obj.domain_id == domain_id and (blob_id is None or obj.blob_id == blob_id)
        ]
        return sorted(found, key=lambda item: (item["type"] != "bootstrap", item["id"]))

    def remove(self, domain_id: str, blob_id: str | None) -> list[str]:
        """Remove one object (a bootstrap takes its unshared data blobs along) or a whole domain.

        Raises:
            EnoentError: nothing matches.
        """
        if blob_id is None:
            keys = [key for key, obj in self._objects.items() if obj.domain_id == domain_id]
            if not keys:
                raise EnoentError
            for key in keys:
                del self._objects[key]
            return keys
        key = scoped_key(domain_id, blob_id)
        obj = self._objects.pop(key, None)
        if obj is None:
            raise EnoentError
        removed = [key]
        if obj.blob_type == "bootstrap":
            for data_id in obj.related:
                data_key = scoped_key(domain_id, data_id)
                data = self._objects.get(data_key)
                if data is not None:
                    data.related.discard(blob_id)
                    if not data.related:
                        del self._objects[data_key]
                        removed.append(data_key)
        return removed
