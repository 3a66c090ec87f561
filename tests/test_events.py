"""The events ring is bounded by count and by bytes, like nydusd's ErrorHolder."""

from __future__ import annotations

from nydus_actors.events import ErrorHolder

DATE_LEN = len("Sun, 06 Nov 1994 08:49:37 GMT - ")


def test_line_format() -> None:
    ring = ErrorHolder()
    ring.push("Backend(Timeout)", now=784111777)
    assert ring.export()["errors"] == ["Sun, 06 Nov 1994 08:49:37 GMT - Backend(Timeout)"]


def test_bounded_by_count() -> None:
    ring = ErrorHolder(max_errors=3, max_size=10_000)
    for i in range(5):
        ring.push(f"e{i}", now=0)
    out = ring.export()
    assert [line[DATE_LEN:] for line in out["errors"]] == ["e2", "e3", "e4"]
    assert out["total_errors"] == 3 and out["max_errors"] == 3
    assert out["total_size"] == sum(len(line) for line in out["errors"])


def test_bounded_by_size() -> None:
    ring = ErrorHolder(max_errors=500, max_size=3 * (DATE_LEN + 10))
    for i in range(10):
        assert ring.push(f"{i:010d}", now=0)
    out = ring.export()
    assert len(out["errors"]) == 3 and out["total_size"] <= out["max_size"]
    assert out["errors"][-1].endswith("0000000009")


def test_oversized_entry_is_refused() -> None:
    ring = ErrorHolder(max_size=100)
    ring.push("small", now=0)
    assert not ring.push("x" * 200, now=0)
    assert ring.export()["total_errors"] == 1


def test_default_bounds() -> None:
    out = ErrorHolder().export()
    assert (out["max_errors"], out["max_size"], out["total_errors"], out["total_size"], out["errors"]) == (
        500,
        51_200,
        0,
        0,
        [],
    )
