"""Opaque page tokens: the last item's position plus a digest of the query it belongs to.

A token replayed against a different query (other filters) or tampered with is refused as
INVALID_PAGE_TOKEN instead of silently returning the wrong page.

Tokens are not signed (replicas must accept each other's tokens, and the digest is
anyone's to compute), so what a token carries is client input: each part is checked like
the request field it stands for (``checked``, ``int_and_id``) before it reaches a query. A
lone surrogate, a NUL, an overlong string or an out-of-range integer is INVALID_PAGE_TOKEN,
never a database error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Sequence

from tether_server.domain.errors import InvalidField, InvalidPageToken

_Position = list[str | int]
# A validator of a request field: raises InvalidField (or ValueError) to refuse a value.
Check = Callable[[str], object]
_BIGINT_MAX = 2**63 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# For an id part without a stricter rule of its own.
_MAX_ID_BYTES = 256


def query_digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def encode(position: Sequence[str | int], digest: str) -> str:
    raw = json.dumps({"p": list(position), "q": digest}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, digest: str) -> _Position | None:
    """The position after which the next page starts; None for the first page."""
    if token == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
    # RecursionError: json refuses absurdly nested input that way.
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidPageToken() from exc
    if not isinstance(body, dict) or body.get("q") != digest:
        raise InvalidPageToken()
    position = body.get("p")
    if not isinstance(position, list) or not all(
        isinstance(part, str | int) and not isinstance(part, bool) for part in position
    ):
        raise InvalidPageToken()
    return position


def checked(value: str, check: Check) -> str:
    """A token's string part, refused unless it is valid UTF-8 (no lone surrogate: the
    drivers cannot encode one) and passes ``check``, the rule of the field it stands for."""
    try:
        value.encode("utf-8")
        check(value)
    except (InvalidField, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidPageToken() from exc
    return value


def plain_id(value: str) -> None:
    """The default rule for an id part: 1-256 bytes, no control character (NUL included)."""
    if not 0 < len(value.encode("utf-8")) <= _MAX_ID_BYTES or _CONTROL.search(value):
        raise ValueError("not an id")


def pattern(regex: re.Pattern[str]) -> Check:
    """A rule for ids of one exact shape."""

    def check(value: str) -> None:
        if not regex.fullmatch(value):
            raise ValueError("not an id")

    return check


def int_and_id(
    position: _Position | None,
    check_id: Check = plain_id,
    *,
    low: int = 0,
    high: int = _BIGINT_MAX,
) -> tuple[int, str] | None:
    """An (integer, id) position, as the pages ordered by a time (or a depth) then an id
    use; None for the first page. The integer must lie in ``low..high`` (what its column
    holds), the id must pass ``check_id``."""
    if position is None:
        return None
    match position:
        case [int(at), str(name)] if low <= at <= high:
            return at, checked(name, check_id)
    raise InvalidPageToken()
