"""Sizes and durations as people write them in TOML, as integers and floats inside.

Rules kept here:
- a size is an integer number of bytes inside; in a file it is an integer (bytes) or a string
  with a unit: "512MiB", "24GB", "1.5GiB". Binary units are powers of 1024, decimal ones of 1000.
- a duration is a float number of seconds inside; in a file it is a number (seconds) or a string
  with a unit: "250ms", "30s", "15m", "2h", or a sum of them: "1m30s".
- nothing is clamped or rounded silently: a negative or malformed value is an error that says
  what was expected.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?(ms|s|m|h|d))+\s*$"

MIB = 1024**2
GIB = 1024**3


def parse_size(value: Any) -> int:
    """'512MiB' -> 536870912. Integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 24GB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    if isinstance(value, float):
        raise ValueError(f"expected bytes as an integer or a size string such as 512MiB, got {value}")
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512MiB or 24GB, got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 512MiB, 24GB or 1.5GiB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: Any) -> float:
    """'1m30s' -> 90.0. Plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 15m, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a duration such as 30s or 15m, got {value}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 30s or 15m, got {type(value).__name__}")
    text = value.strip()
    parts = _DURATION_PART_RE.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"expected a duration such as 250ms, 30s, 15m or 1h30m, got {value!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_bytes(n: int) -> str:
    """Bytes for a person: 5.2 GiB, 312 MiB, 4.0 KiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GIB:
        return f"{sign}{n / GIB:.1f} GiB"
    if n >= MIB:
        return f"{sign}{n / MIB:.0f} MiB"
    if n >= 1024:
        return f"{sign}{n / 1024:.1f} KiB"
    return f"{sign}{n} B"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "examples": ["512MiB", "24GB"],
        }
    ),
]
"""Bytes; written as an integer or as "512MiB", "24GB"."""

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "examples": ["30s", "15m"],
        }
    ),
]
"""Seconds; written as a number or as "250ms", "30s", "15m", "1h30m"."""
