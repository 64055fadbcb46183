"""Conversions between stored microseconds and readable times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

MICROS = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_us(us: int) -> str:
    """RFC 3339 in UTC with microseconds, as ErrorInfo metadata carries deadlines."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat().replace("+00:00", "Z")
