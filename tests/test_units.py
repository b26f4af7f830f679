from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_smart_proxy.schemas.units import format_bytes, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MiB", 512 * 2**20), ("24GB", 24 * 10**9), ("1.5GiB", 3 * 2**29), ("100", 100), (7, 7), ("2 KiB", 2048)],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "12XB", "-1MiB", -5, 1.5, True, "MiB"])
def test_bad_sizes_are_errors(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("250ms", 0.25), ("30s", 30.0), ("15m", 900.0), ("1h30m", 5400.0), (2, 2.0), (0.5, 0.5)],
)
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "5", "10x", "m5", "5 m s", -1, False])
def test_bad_durations_are_errors(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=2**50))
def test_every_byte_count_formats(n: int) -> None:
    assert format_bytes(n)
