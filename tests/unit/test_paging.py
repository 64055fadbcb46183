"""Opaque page tokens: round trips, and every bad token refused as INVALID_PAGE_TOKEN."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether_server.domain import paging
from tether_server.domain.errors import InvalidPageToken

DIGEST = paging.query_digest("default", "jobs/", "", ["ACTIVE"])
positions = st.lists(st.one_of(st.text(), st.integers()), max_size=5)


def raw_token(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def refused(token: str, digest: str = DIGEST) -> InvalidPageToken:
    with pytest.raises(InvalidPageToken) as exc:
        paging.decode(token, digest)
    assert exc.value.reason == "INVALID_PAGE_TOKEN"
    assert exc.value.metadata == {"field": "page_token"}
    return exc.value


def test_empty_token_is_the_first_page() -> None:
    assert paging.decode("", DIGEST) is None


def test_round_trip() -> None:
    token = paging.encode(["jobs/a", 3], DIGEST)
    assert paging.decode(token, DIGEST) == ["jobs/a", 3]
    # URL-safe and unpadded: fits in a query string or a header as is.
    assert "=" not in token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@given(position=positions, parts=st.lists(st.text(), max_size=3))
def test_round_trip_property(position: list[str | int], parts: list[str]) -> None:
    digest = paging.query_digest(*parts)
    token = paging.encode(position, digest)
    assert paging.decode(token, digest) == position


@given(position=positions, a=st.text(), b=st.text())
def test_token_of_another_query_is_refused(position: list[str | int], a: str, b: str) -> None:
    digest_a, digest_b = paging.query_digest(a), paging.query_digest(b)
    token = paging.encode(position, digest_a)
    if digest_a != digest_b:
        refused(token, digest_b)


def test_digest_depends_on_every_part_and_its_order() -> None:
    assert paging.query_digest("a", "b") == paging.query_digest("a", "b")
    assert paging.query_digest("a", "b") != paging.query_digest("b", "a")
    assert paging.query_digest("a", "") != paging.query_digest("a")
    assert paging.query_digest("ab", "") != paging.query_digest("a", "b")
    assert paging.query_digest(1) != paging.query_digest("1")


@pytest.mark.parametrize(
    "token",
    [
        "!!!!",
        "a",
        "not a token",
        "é",
        "////",
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
        raw_token("just a string"),
        raw_token([1, 2]),
        raw_token(None),
        raw_token({"p": ["a", 1]}),
        raw_token({"q": DIGEST}),
        raw_token({"p": "a", "q": DIGEST}),
        raw_token({"p": None, "q": DIGEST}),
        raw_token({"p": [1.5], "q": DIGEST}),
        raw_token({"p": [True], "q": DIGEST}),
        raw_token({"p": [None], "q": DIGEST}),
        raw_token({"p": [["nested"]], "q": DIGEST}),
        raw_token({"p": [{"k": 1}], "q": DIGEST}),
        raw_token({"p": ["a"], "q": DIGEST.upper()}),
    ],
)
def test_garbage_tokens_are_refused(token: str) -> None:
    refused(token)


def test_tampered_token_is_refused() -> None:
    token = paging.encode(["jobs/a", 3], DIGEST)
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body["q"] = paging.query_digest("default", "", "", [])
    refused(raw_token(body))
    # Flipping characters either breaks the encoding or the body.
    for i in range(len(token)):
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
        try:
            decoded = paging.decode(flipped, DIGEST)
        except InvalidPageToken:
            continue
        # A flip that still decodes may only have changed the position, never the query.
        assert isinstance(decoded, list)


@given(st.text(max_size=200))
def test_arbitrary_text_never_escapes_as_another_error(token: str) -> None:
    with contextlib.suppress(InvalidPageToken):
        paging.decode(token, DIGEST)


def test_deeply_nested_token_is_refused() -> None:
    # Regression: json raised RecursionError, which escaped as an internal error.
    refused(base64.urlsafe_b64encode(b"[" * 100_000).decode())
