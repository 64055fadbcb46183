"""Durations from users: what the CLIs accept, and that nothing non-finite or absurd passes
(it would overflow the server's int64 microseconds), plus the server's Duration checks."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf import duration_pb2

from tether_client.convert import (
    INT64_MAX,
    MAX_DURATION_S,
    parse_duration,
    parse_int,
    to_duration,
)
from tether_server.domain.errors import InvalidField
from tether_server.services.convert import duration_us


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h0m0.5s", 3600.5),
        (".5s", 0.5),
        ("2.5", 2.5),
        (" 10s ", 10.0),
        ("0", 0.0),
        ("1e3", 1000.0),
        ("876600h", MAX_DURATION_S),
    ],
)
def test_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "inf",
        "+inf",
        "-inf",
        "Infinity",
        "nan",
        "NaN",
        "-nan",
        "-1",
        "-1s",
        "1e400",
        "1e400s",
        "9" * 400,
        "9" * 400 + "s",
        "99999999999999h",
        "876601h",
        "3155760001",
        "1.2.3s",
        "s",
        "1s2",
        "1x",
        "1 s",
        "\u0661s",  # a non-ASCII digit
    ],
)
def test_refused_with_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_the_maximum_fits_int64_microseconds_added_to_a_timestamp() -> None:
    year_9999_us = 253_402_300_799 * 1_000_000
    assert round(MAX_DURATION_S * 1e6) + year_9999_us < INT64_MAX


@pytest.mark.parametrize(
    "value", [float("inf"), float("-inf"), float("nan"), 1e300, MAX_DURATION_S + 1]
)
def test_to_duration_refuses_what_would_overflow(value: float) -> None:
    with pytest.raises(ValueError, match="finite and at most 100 years"):
        to_duration(value)


def test_to_duration_converts_within_range() -> None:
    assert to_duration(timedelta(seconds=1.5)) == duration_pb2.Duration(
        seconds=1, nanos=500_000_000
    )
    assert to_duration(MAX_DURATION_S).seconds == int(MAX_DURATION_S)


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("42", 42), (" 7 ", 7), (str(INT64_MAX), INT64_MAX)]
)
def test_parse_int_accepted(text: str, value: int) -> None:
    assert parse_int(text) == value


@pytest.mark.parametrize(
    "text", ["", "-1", str(INT64_MAX + 1), "9" * 5000, "1e3", "1.0", "inf", "\u0663", "0x10"]
)
def test_parse_int_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"integer|between"):
        parse_int(text)


def test_parse_int_bounds() -> None:
    assert parse_int("5", minimum=1, maximum=10) == 5
    for text in ("0", "11"):
        with pytest.raises(ValueError, match="between 1 and 10"):
            parse_int(text, minimum=1, maximum=10)


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (2**63 - 1, 0),
        (-(2**63), 0),
        (315_576_000_001, 0),
        (1, 1_000_000_000),
        (1, -1),
        (-1, 1),
        (0, 2**31 - 1),
        (0, 1),  # not whole microseconds
    ],
)
def test_server_refuses_malformed_or_huge_durations(seconds: int, nanos: int) -> None:
    """Protobuf lets these through; the server's conversion must refuse each."""
    with pytest.raises(InvalidField):
        duration_us(duration_pb2.Duration(seconds=seconds, nanos=nanos), "ttl")


def test_server_duration_range_fits_int64_microseconds() -> None:
    largest = duration_us(duration_pb2.Duration(seconds=315_576_000_000), "ttl")
    assert largest == 315_576_000_000 * 1_000_000 < INT64_MAX
