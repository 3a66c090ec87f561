"""Filesystem configs in nydusd's three formats, normalized to ConfigV2 (reference §7).

A mount's `config` arrives as text: v2 JSON, v2 TOML or v1 JSON (what
nydus-snapshotter writes). Like nydusd, each format is tried in turn and must
then validate; unknown keys are ignored everywhere. The result is a plain
nested dict in ConfigV2's shape with every section present (absent ones as
null), which is also what `GET /api/v1/daemon` shows, secrets removed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from nydus_actors.exceptions import OtherError

MAX_CONFIG_SIZE = 1024 * 1024
BACKEND_TYPES = ("localdisk", "localfs", "oss", "s3", "registry", "http-proxy")
CACHE_TYPES = ("", "dummycache", "blobcache", "filecache", "fscache")
DEFAULT_BATCH = 1024 * 1024
#: How long the kernel may cache names and attributes of an image: images never change.
DEFAULT_IMAGE_TIMEOUT = 3600.0


class _Unparsable(ValueError):
    """The document lacks a field serde requires: a parse failure, not a validation one."""


class ConfigError(OtherError):
    """A config nydusd would not load; the text follows nydusd's RAFS error."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"RAFS failed to handle request, Failed to load config: {cause}`")


def _prefetch(raw: dict | None, *, v1: bool = False) -> dict[str, Any]:
    raw = raw or {}
    if v1:
        return {
            "enable": bool(raw.get("enable", False)),
            "threads": int(raw.get("threads_count", 8)),
            "batch_size": int(raw.get("merging_size", DEFAULT_BATCH)),
            "bandwidth_limit": int(raw.get("bandwidth_rate", 0)),
            "prefetch_all": bool(raw.get("prefetch_all", True)),
        }
    return {
        "enable": bool(raw.get("enable", False)),
        "threads": int(raw.get("threads", raw.get("threads_count", 8))),
        "batch_size": int(raw.get("batch_size", DEFAULT_BATCH)),
        "bandwidth_limit": int(raw.get("bandwidth_limit", 0)),
        "prefetch_all": bool(raw.get("prefetch_all", False)),
    }


def _backend_section(kind: str, raw: dict) -> dict[str, Any]:
    """Normalize one backend's settings; keep the fields nydusd knows, with defaults."""
    common = {
        "skip_verify": bool(raw.get("skip_verify", False)),
        "ca_cert_files": [str(path) for path in raw.get("ca_cert_files", [])],
        "timeout": int(raw.get("timeout", 5)),
        "connect_timeout": int(raw.get("connect_timeout", 5)),
        "retry_limit": int(raw.get("retry_limit", 0)),
    }
    if kind == "localfs":
        return {
            "blob_file": str(raw.get("blob_file", "")),
            "dir": str(raw.get("dir", "")),
            "alt_dirs": [str(d) for d in raw.get("alt_dirs", [])],
        }
    if kind == "localdisk":
        return {
            "device_path": str(raw.get("device_path", "")),
            "disable_gpt": bool(raw.get("disable_gpt", False)),
        }
    if kind == "registry":
        return {
            "scheme": str(raw.get("scheme", "https")),
            "host": str(raw.get("host", "")),
            "repo": str(raw.get("repo", "")),
            "auth": raw.get("auth"),
            "registry_token": raw.get("registry_token"),
            "blob_url_scheme": str(raw.get("blob_url_scheme", "")),
            "blob_redirected_host": str(raw.get("blob_redirected_host", "")),
            "proxy": raw.get("proxy") or {},
            **common,
        }
    if kind in ("oss", "s3"):
        section = {
            "scheme": str(raw.get("scheme", "https")),
            "endpoint": str(raw.get("endpoint", "")),
            "bucket_name": str(raw.get("bucket_name", "")),
            "object_prefix": str(raw.get("object_prefix", "")),
            "access_key_id": str(raw.get("access_key_id", "")),
            "access_key_secret": str(raw.get("access_key_secret", "")),
            "proxy": raw.get("proxy") or {},
            **common,
        }
        if kind == "s3":
            section["region"] = str(raw.get("region", ""))
        return section
    return {  # http-proxy
        "addr": str(raw.get("addr", "")),
        "path": str(raw.get("path", "")),
        "proxy": raw.get("proxy") or {},
        **common,
    }


def _validate_backend(kind: str, section: dict) -> None:
    if kind == "localfs" and not (section["blob_file"] or section["dir"]):
        raise ValueError("localfs needs blob_file or dir")
    if kind == "localdisk" and not section["device_path"]:
        raise ValueError("localdisk needs device_path")
    if kind == "registry" and not (section["host"] and section["repo"]):
        raise ValueError("registry needs host and repo")
    if kind == "oss" and not (section["endpoint"] and section["bucket_name"]):
        raise ValueError("oss needs endpoint and bucket_name")
    if kind == "s3" and not (section["region"] and section["bucket_name"]):
        raise ValueError("s3 needs region and bucket_name")
    if kind == "http-proxy" and not section["addr"]:
        raise ValueError("http-proxy needs addr")


def _backend(kind: str, raw: dict) -> dict[str, Any]:
    if kind not in BACKEND_TYPES:
        raise ValueError(f"unsupported backend type '{kind}'")
    if not isinstance(raw, dict):
        raise ValueError(f"backend {kind} has no settings")
    section = _backend_section(kind, raw)
    _validate_backend(kind, section)
    backend: dict[str, Any] = {"type": kind}
    backend.update({name: None for name in BACKEND_TYPES})
    backend[kind] = section
    return backend


def _cache(kind: str, *, compressed: bool, validate: bool, prefetch: dict, work_dir: str | None) -> dict:
    if kind not in CACHE_TYPES:
        raise ValueError(f"unsupported cache type '{kind}'")
    cache: dict[str, Any] = {
        "type": kind,
        "compressed": compressed,
        "validate": validate,
        "prefetch": prefetch,
        "filecache": None,
        "fscache": None,
    }
    if kind in ("blobcache", "filecache"):
        cache["filecache"] = {"work_dir": work_dir if work_dir is not None else "."}
        if not cache["filecache"]["work_dir"]:
            raise ValueError("filecache work_dir must not be empty")
    elif kind == "fscache":
        cache["fscache"] = {"work_dir": work_dir if work_dir is not None else "."}
    return cache


def _rafs(raw: dict, prefetch: dict) -> dict[str, Any]:
    mode = str(raw.get("mode", "direct"))
    if mode not in ("direct", "cached"):
        raise ValueError(f"invalid rafs mode '{mode}'")
    return {
        "mode": mode,
        "batch_size": int(raw.get("batch_size", DEFAULT_BATCH)),
        "validate": bool(raw.get("validate", False)),
        "enable_xattr": bool(raw.get("enable_xattr", False)),
        "iostats_files": bool(raw.get("iostats_files", False)),
        "access_pattern": bool(raw.get("access_pattern", False)),
        "latest_read_files": bool(raw.get("latest_read_files", False)),
        "prefetch": prefetch,
        "attr_timeout": float(raw.get("attr_timeout", DEFAULT_IMAGE_TIMEOUT)),
        "entry_timeout": float(raw.get("entry_timeout", DEFAULT_IMAGE_TIMEOUT)),
    }


def _from_v2(doc: dict) -> dict[str, Any]:
    if doc.get("version") != 2:
        raise ValueError("version must be 2")
    raw_backend = doc.get("backend")
    backend = None
    if raw_backend is not None:
        kind = str(raw_backend.get("type", ""))
        backend = _backend(kind, raw_backend.get(kind))
    raw_cache = doc.get("cache")
    cache = None
    if raw_cache is not None:
        kind = str(raw_cache.get("type", ""))
        section = raw_cache.get("filecache") or raw_cache.get("fscache") or {}
        cache = _cache(
            kind,
            compressed=bool(raw_cache.get("compressed", False)),
            validate=bool(raw_cache.get("validate", False)),
            prefetch=_prefetch(raw_cache.get("prefetch")),
            work_dir=section.get("work_dir"),
        )
    raw_rafs = doc.get("rafs")
    rafs = None if raw_rafs is None else _rafs(raw_rafs, _prefetch(raw_rafs.get("prefetch")))
    return {
        "version": 2,
        "id": str(doc.get("id", "")),
        "backend": backend,
        "external_backends": list(doc.get("external_backends", [])),
        "cache": cache,
        "rafs": rafs,
        "overlay": doc.get("overlay"),
    }


def _from_v1(doc: dict) -> dict[str, Any]:
    device = doc.get("device")
    if not isinstance(device, dict):
        raise _Unparsable("missing field device")
    if "mode" not in doc:
        raise _Unparsable("missing field mode")
    raw_backend = device.get("backend") or {}
    kind = str(raw_backend.get("type", ""))
    if kind == "http-proxy":
        raise ValueError("unsupported backend type 'http-proxy'")
    backend = _backend(kind, raw_backend.get("config"))
    fs_prefetch = _prefetch(doc.get("fs_prefetch"), v1=True)
    raw_cache = device.get("cache") or {}
    cache_prefetch = _prefetch(None)
    if fs_prefetch["enable"]:
        cache_prefetch = dict(fs_prefetch)
    cache_config = raw_cache.get("config") or {}
    cache = _cache(
        str(raw_cache.get("type", "")),
        compressed=bool(raw_cache.get("compressed", False)),
        validate=bool(raw_cache.get("validate", False)),
        prefetch=cache_prefetch,
        work_dir=cache_config.get("work_dir"),
    )
    rafs = _rafs(
        {
            "mode": doc["mode"],
            "batch_size": doc.get("amplify_io", DEFAULT_BATCH),
            "validate": doc.get("digest_validate", False),
            "enable_xattr": doc.get("enable_xattr", False),
            "iostats_files": doc.get("iostats_files", False),
            "access_pattern": doc.get("access_pattern", False),
            "latest_read_files": doc.get("latest_read_files", False),
            "attr_timeout": doc.get("attr_timeout", DEFAULT_IMAGE_TIMEOUT),
            "entry_timeout": doc.get("entry_timeout", DEFAULT_IMAGE_TIMEOUT),
        },
        fs_prefetch,
    )
    return {
        "version": 2,
        "id": str(device.get("id", "")),
        "backend": backend,
        "external_backends": list(device.get("external_backends", [])),
        "cache": cache,
        "rafs": rafs,
        "overlay": None,
    }


@dataclass(frozen=True, slots=True)
class FsConfig:
    """A parsed, validated filesystem config, kept as ConfigV2-shaped data."""

    data: dict[str, Any]

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def backend_type(self) -> str | None:
        backend = self.data["backend"]
        return None if backend is None else backend["type"]

    def backend(self) -> dict[str, Any]:
        """Return the settings of the configured backend."""
        backend = self.data["backend"]
        if backend is None:
            raise ConfigError("invalid configuration: no backend")
        return backend[backend["type"]]

    @property
    def rafs(self) -> dict[str, Any]:
        rafs = self.data["rafs"]
        return rafs if rafs is not None else _rafs({}, _prefetch(None))

    @property
    def cache(self) -> dict[str, Any] | None:
        return self.data["cache"]

    def redacted(self) -> dict[str, Any]:
        """Return the ConfigV2 JSON nydusd shows in `backend_collection`, without secrets."""
        data = copy.deepcopy(self.data)
        backend = data["backend"] or {}
        for kind in ("oss", "s3"):
            if backend.get(kind):
                backend[kind]["access_key_id"] = ""
                backend[kind]["access_key_secret"] = ""
        if backend.get("registry"):
            backend["registry"]["auth"] = None
            backend["registry"]["registry_token"] = None
        if data["rafs"] is not None:
            data["rafs"] = {
                k: v for k, v in data["rafs"].items() if k not in ("attr_timeout", "entry_timeout")
            }
        return data


def parse_config(text: str) -> FsConfig:
    """Parse a config in any of nydusd's formats: v2 JSON, v2 TOML, then v1 JSON.

    Raises:
        ConfigError: no format parses (`failed to parse configuration information`)
            or the parsed config does not validate (`invalid configuration: ...`).
    """
    if len(text.encode()) > MAX_CONFIG_SIZE:
        raise ConfigError("config larger than 1 MiB")
    invalid: str | None = None
    candidates: list[tuple[str, Any]] = []
    if not text.strip():
        raise ConfigError("failed to parse configuration information")
    try:
        candidates.append(("json", json.loads(text)))
    except ValueError:
        with contextlib.suppress(tomllib.TOMLDecodeError, ValueError):
            candidates.append(("toml", tomllib.loads(text)))
    for _, doc in candidates:
        if not isinstance(doc, dict):
            continue
        for convert in (_from_v2, _from_v1) if "version" in doc else (_from_v1,):
            try:
                return FsConfig(convert(doc))
            except _Unparsable:
                continue
            except (ValueError, TypeError, AttributeError) as ex:
                invalid = invalid or str(ex)
    if invalid is not None:
        raise ConfigError(f"invalid configuration: {invalid}")
    raise ConfigError("failed to parse configuration information")


def localfs_config_text(blob_dir: str) -> str:
    """The v1 config nydusd generates for `--localfs-dir`: a localfs backend over that directory."""
    return json.dumps(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": blob_dir}},
                "cache": {"type": "blobcache", "config": {"work_dir": os.path.join(blob_dir, "cache")}},
            },
            "mode": "direct",
        }
    )


def blob_entry_config(entry: dict[str, Any]) -> dict[str, Any]:
    """The ConfigV2 of a BlobCacheEntry (`PUT /api/v2/blobs`), as `prepare_configuration_info()` builds it.

    A legacy `config` is converted; `config_v2` is taken as it is. Backend and
    cache must validate.

    Raises:
        ValueError: no usable configuration (the API answers 400 `BadRequest`).
    """
    raw_v2 = entry.get("config_v2")
    if raw_v2 is not None:
        backend_raw = raw_v2.get("backend") or {}
        kind = str(backend_raw.get("type", ""))
        cache_raw = raw_v2.get("cache") or {}
        cache_kind = str(cache_raw.get("type", ""))
        section = cache_raw.get("filecache") or cache_raw.get("fscache") or {}
        config_id = str(raw_v2.get("id", ""))
        metadata_path = str(raw_v2.get("metadata_path", ""))
        backend = _backend(kind, backend_raw.get(kind))
    else:
        legacy = entry.get("config") or {}
        kind = str(legacy.get("backend_type", ""))
        cache_kind = str(legacy.get("cache_type", ""))
        section = legacy.get("cache_config") or {}
        config_id = str(legacy.get("id", ""))
        metadata_path = str(legacy.get("metadata_path", ""))
        backend = _backend(kind, legacy.get("backend_config"))
    cache = _cache(
        cache_kind,
        compressed=False,
        validate=False,
        prefetch=_prefetch(None),
        work_dir=section.get("work_dir"),
    )
    return {
        "version": 2,
        "id": config_id,
        "backend": backend,
        "cache": cache,
        "metadata_path": metadata_path,
    }
