"""Conversions between Python time values and protobuf Duration / Timestamp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

Seconds = timedelta | float | int


def seconds(value: Seconds) -> float:
    """A duration given as ``timedelta`` or as seconds."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def to_duration(value: Seconds) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMicroseconds(round(seconds(value) * 1_000_000))
    return duration


def duration_seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


def to_datetime(value: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime (microsecond precision)."""
    return value.ToDatetime(tzinfo=UTC)


def parse_duration(text: str) -> float:
    """``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"1m30s"`` or plain seconds (``"2.5"``)."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    try:
        return _non_negative(float(value), text)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, number = 0.0, ""
    i = 0
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if value.startswith("ms", i) else ch
        if unit not in units or not number:
            raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 500ms, 2m, 1h)")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise ValueError(f"not a duration: {text!r} (a number needs a unit after another)")
    return _non_negative(total, text)


def _non_negative(value: float, text: str) -> float:
    if value < 0 or value != value:  # NaN compares unequal to itself
        raise ValueError(f"a duration must be a non-negative number: {text!r}")
    return value
