"""Conversions between Python time values and protobuf Duration / Timestamp."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

Seconds = timedelta | float | int

# The longest duration accepted anywhere (100 years of 365.25 days): as microseconds, even
# added to a timestamp, it stays far inside int64 (about 292 000 years).
MAX_DURATION_S = 100 * 365.25 * 86400
MAX_DURATION_TEXT = "100 years (876600h)"


def seconds(value: Seconds) -> float:
    """A duration given as ``timedelta`` or as seconds."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def to_duration(value: Seconds) -> duration_pb2.Duration:
    """A protobuf Duration; ``ValueError`` for NaN, infinities and anything longer than
    ``MAX_DURATION_S`` (no tether duration is anywhere near it: a typo, not a wish)."""
    secs = seconds(value)
    if not math.isfinite(secs) or abs(secs) > MAX_DURATION_S:
        raise ValueError(f"a duration must be finite and at most {MAX_DURATION_TEXT}: {value!r}")
    duration = duration_pb2.Duration()
    duration.FromMicroseconds(round(secs * 1_000_000))
    return duration


def duration_seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


def to_datetime(value: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime (microsecond precision)."""
    return value.ToDatetime(tzinfo=UTC)


def parse_duration(text: str) -> float:
    """``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"1m30s"`` or plain seconds (``"2.5"``).

    ``ValueError`` (a usage error in the CLIs) for anything else, and for NaN, infinities
    and durations longer than ``MAX_DURATION_S``: every duration ends up as integer
    microseconds (int64) added to timestamps, where they would overflow.
    """
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    try:
        number = float(value)
    except ValueError:
        number = _with_units(value, text)
    return _in_range(number, text)


_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _with_units(value: str, text: str) -> float:
    total, at = 0.0, 0
    while at < len(value):
        part = _PART.match(value, at)
        if part is None:
            raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 500ms, 2m, 1h, 1m30s)")
        total += float(part.group(1)) * _UNITS[part.group(2)]
        at = part.end()
    return total


def _in_range(value: float, text: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a duration must be a finite, non-negative number: {text!r}")
    if value > MAX_DURATION_S:
        raise ValueError(f"a duration must be at most {MAX_DURATION_TEXT}: {text!r}")
    return value


INT64_MAX = 2**63 - 1


def parse_int(text: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """A whole number from the command line, within ``[minimum, maximum]`` (by default what
    an int64 field or column holds): ``ValueError`` otherwise, never an overflow later."""
    value = text.strip()
    if not value.isascii() or not value.lstrip("+-").isdigit() or len(value) > 20:
        raise ValueError(f"not an integer: {text!r}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise ValueError(f"must be between {minimum} and {maximum}: {text!r}")
    return number
