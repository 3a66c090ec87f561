"""Configs in nydusd's three formats normalize to the same ConfigV2 shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nydus_actors.config import ConfigError, localfs_config_text, parse_config

V1 = {
    "device": {
        "id": "/snap1",
        "backend": {
            "type": "registry",
            "config": {"host": "127.0.0.1:5000", "repo": "library/x", "auth": "dTpw", "scheme": "http"},
        },
        "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache"}},
    },
    "mode": "direct",
    "digest_validate": True,
    "iostats_files": True,
    "fs_prefetch": {"enable": True, "threads_count": 4},
    "unknown_key": {"ignored": 1},
}

V2_JSON = {
    "version": 2,
    "id": "/snap1",
    "backend": {"type": "localfs", "localfs": {"dir": "/blobs"}},
    "cache": {"type": "filecache", "filecache": {"work_dir": "/var/cache"}},
    "rafs": {"mode": "cached", "validate": True, "attr_timeout": 60},
    "extra": True,
}

V2_TOML = """
version = 2
id = "/snap1"
[backend]
type = "localfs"
[backend.localfs]
dir = "/blobs"
[cache]
type = "filecache"
[cache.filecache]
work_dir = "/var/cache"
[rafs]
mode = "cached"
validate = true
attr_timeout = 60
"""

SECTIONS = ["version", "id", "backend", "external_backends", "cache", "rafs", "overlay"]


def test_v1_converts_to_v2_shape() -> None:
    config = parse_config(json.dumps(V1))
    assert list(config.data) == SECTIONS
    assert config.id == "/snap1" and config.backend_type == "registry"
    assert config.backend()["auth"] == "dTpw"
    assert config.rafs["validate"] is True and config.rafs["iostats_files"] is True
    assert config.cache["prefetch"]["enable"] is True and config.cache["prefetch"]["threads"] == 4
    assert set(config.data["backend"]) == {
        "type",
        "localdisk",
        "localfs",
        "oss",
        "s3",
        "registry",
        "http-proxy",
    }


def test_v2_json_and_toml_agree() -> None:
    from_json = parse_config(json.dumps(V2_JSON))
    from_toml = parse_config(V2_TOML)
    assert from_json.data == from_toml.data
    assert from_json.rafs["mode"] == "cached" and from_json.rafs["attr_timeout"] == 60


def test_redacted_hides_secrets_and_keeps_shape() -> None:
    shown = parse_config(json.dumps(V1)).redacted()
    assert shown["backend"]["registry"]["auth"] is None
    assert shown["backend"]["registry"]["registry_token"] is None
    assert list(shown) == SECTIONS
    assert shown["rafs"]["mode"] == "direct" and shown["cache"]["prefetch"]["batch_size"] == 1024 * 1024
    oss = {
        "version": 2,
        "backend": {
            "type": "oss",
            "oss": {"endpoint": "e", "bucket_name": "b", "access_key_id": "id", "access_key_secret": "s"},
        },
    }
    shown = parse_config(json.dumps(oss)).redacted()
    assert (
        shown["backend"]["oss"]["access_key_id"] == "" and shown["backend"]["oss"]["access_key_secret"] == ""
    )


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("", "failed to parse configuration information"),
        ("{", "failed to parse configuration information"),
        ("[1, 2]", "failed to parse configuration information"),
        ('{"device": {}, "mode": "direct"}', "invalid configuration: unsupported backend type ''"),
        ('{"device": {}}', "failed to parse configuration information"),
        (
            '{"version": 2, "backend": {"type": "nfs"}}',
            "invalid configuration: unsupported backend type 'nfs'",
        ),
        (
            '{"version": 2, "backend": {"type": "registry", "registry": {"host": "h"}}}',
            "registry needs host and repo",
        ),
        (
            json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}}}),
            "failed to parse configuration information",
        ),
        (
            json.dumps(
                {"device": {"backend": {"type": "http-proxy", "config": {"addr": "x"}}}, "mode": "direct"}
            ),
            "unsupported backend type 'http-proxy'",
        ),
    ],
)
def test_bad_configs(text: str, cause: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert cause in str(info.value)
    assert str(info.value).startswith("RAFS failed to handle request, Failed to load config: ")


def test_oversized_config() -> None:
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        parse_config(" " * (1024 * 1024 + 1))


def test_localfs_dir_config() -> None:
    config = parse_config(localfs_config_text("/blobs"))
    assert config.backend_type == "localfs" and config.backend()["dir"] == "/blobs"


@pytest.mark.parametrize("name", ["localfs-v1.json", "localfs-v2.json", "localfs-v2.toml"])
def test_sample_configs_parse(name: str) -> None:
    text = (Path(__file__).resolve().parents[1] / "config" / name).read_text()
    config = parse_config(text)
    assert config.backend_type == "localfs" and config.rafs["validate"] is True
