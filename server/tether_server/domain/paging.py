"""Opaque page tokens: the last item's position plus a digest of the query it belongs to.

A token replayed against a different query (other filters) or tampered with is refused as
INVALID_PAGE_TOKEN instead of silently returning the wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

from tether_server.domain.errors import InvalidPageToken

_Position = list[str | int]


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


def int_and_id(position: _Position | None) -> tuple[int, str] | None:
    """An (integer, id) position, as the pages ordered by a time then an id use; None for
    the first page."""
    if position is None:
        return None
    match position:
        case [int(at), str(name)] if 0 <= at < 2**63 and name:
            return at, name
    raise InvalidPageToken()
