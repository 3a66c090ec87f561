"""Request-body decoding with nydusd's (serde_json's) error texts.

Clients see `ParseBody(Error("<serde message>", line: L, column: C))` when a
body does not decode (reference §1.6), so bodies are checked here field by
field, in document order like serde, rather than through falcon's media
handlers. Line and column are exact for syntax errors; for type errors and
missing fields they point at the end of the document (serde points at the
offending value; no client reads the position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nydus_actors.exceptions import rust_debug_str


class BodyError(Exception):
    """A handler-level 400 error whose text is the whole nydusd message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


BAD_REQUEST = "BadRequest"


def bad_request() -> BodyError:
    """Return nydusd's `BadRequest` handler error."""
    return BodyError(BAD_REQUEST)


def query_missing(name: str) -> BodyError:
    """Return nydusd's error for a required query parameter that is absent."""
    text = rust_debug_str(f"'{name}' should be specified in query string")
    return BodyError(f"QueryString({text})")


def _parse_error(message: str, line: int, column: int) -> BodyError:
    return BodyError(f"ParseBody(Error({rust_debug_str(message)}, line: {line}, column: {column}))")


_SYNTAX = {
    "Expecting value": "expected value",
    "Extra data": "trailing characters",
    "Expecting property name enclosed in double quotes": "key must be a string",
    "Expecting ':' delimiter": "expected `:`",
    "Expecting ',' delimiter": "expected `,` or `}`",
    "Unterminated string starting at": "EOF while parsing a string",
    "Invalid control character at": "control character (\\u0000-\\u001F) found while parsing a string",
    "Invalid \\escape": "invalid escape",
    "Invalid \\uXXXX escape": "invalid escape",
}


def _end_position(text: str) -> tuple[int, int]:
    lines = text.rstrip().split("\n")
    return len(lines), len(lines[-1])


def _unexpected(value: Any) -> str:
    """Describe a JSON value the way serde's `Unexpected` does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, _Pairs):  # an object; test before `list`, which it subclasses
        return "map"
    return "sequence"


def decode_json(raw: bytes) -> Any:
    """Decode a request body; object members keep document order and duplicates."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as ex:
        raise _parse_error("invalid unicode code point", 1, ex.start + 1) from None
    try:
        return json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as ex:
        message = next((serde for py, serde in _SYNTAX.items() if ex.msg.startswith(py)), ex.msg)
        if ex.pos >= len(text.rstrip()) and message in ("expected value", "key must be a string"):
            message = (
                "EOF while parsing a value" if message == "expected value" else "EOF while parsing an object"
            )
        raise _parse_error(message, ex.lineno, ex.colno) from None


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so duplicates and order survive."""


@dataclass(frozen=True, slots=True)
class Field:
    """One struct field: its JSON type and whether serde requires it."""

    name: str
    kind: str  # "string", "string_list", "object", "string_map"
    required: bool


_EXPECTED = {
    "string": "a string",
    "string_list": "a sequence",
    "object": "a map",
    "string_map": "a map",
}


def _check_kind(field: Field, value: Any, raw_text: str) -> None:
    ok = {
        "string": isinstance(value, str),
        "string_list": isinstance(value, list) or (value is None and not field.required),
        "object": isinstance(value, _Pairs) or (value is None and not field.required),
        "string_map": isinstance(value, _Pairs),
    }[field.kind]
    if not ok:
        raise _parse_error(
            f"invalid type: {_unexpected(value)}, expected {_EXPECTED[field.kind]}", *_end_position(raw_text)
        )
    if field.kind == "string_list" and value is not None:
        for item in value:
            if not isinstance(item, str):
                raise _parse_error(
                    f"invalid type: {_unexpected(item)}, expected a string", *_end_position(raw_text)
                )


def decode_struct(raw: bytes, struct: str, fields: tuple[Field, ...]) -> dict[str, Any]:
    """Decode a body as a serde struct: known fields type-checked, others ignored."""
    value = decode_json(raw)
    text = raw.decode()
    if not isinstance(value, _Pairs):
        raise _parse_error(
            f"invalid type: {_unexpected(value)}, expected struct {struct}", *_end_position(text)
        )
    by_name = {field.name: field for field in fields}
    seen: dict[str, Any] = {}
    for key, item in value:
        field = by_name.get(key)
        if field is None:
            continue
        if key in seen:
            raise _parse_error(f"duplicate field `{key}`", *_end_position(text))
        _check_kind(field, item, text)
        seen[key] = _plain(item)
    for field in fields:
        if field.required and field.name not in seen:
            raise _parse_error(f"missing field `{field.name}`", *_end_position(text))
    return seen


def decode_string_map(raw: bytes) -> dict[str, str]:
    """Decode a body as a `HashMap<String, String>`."""
    value = decode_json(raw)
    text = raw.decode()
    if not isinstance(value, _Pairs):
        raise _parse_error(f"invalid type: {_unexpected(value)}, expected a map", *_end_position(text))
    result: dict[str, str] = {}
    for key, item in value:
        if not isinstance(item, str):
            raise _parse_error(f"invalid type: {_unexpected(item)}, expected a string", *_end_position(text))
        result[key] = item
    return result


def _plain(value: Any) -> Any:
    """Turn decoded pairs back into ordinary dicts (last duplicate wins below structs)."""
    if isinstance(value, _Pairs):
        return {key: _plain(item) for key, item in value}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


MOUNT_CMD = (
    Field("source", "string", required=True),
    Field("fs_type", "string", required=False),
    Field("config", "string", required=True),
    Field("prefetch_files", "string_list", required=False),
)

DAEMON_CONF = (Field("log_level", "string", required=True),)

BLOB_CACHE_ENTRY = (
    Field("type", "string", required=True),
    Field("id", "string", required=True),
    Field("domain_id", "string", required=False),
    Field("config", "object", required=False),
    Field("config_v2", "object", required=False),
)
