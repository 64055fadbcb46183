"""Input validation: every bound, and every failure naming its field."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether_server.domain import validation as v
from tether_server.domain.errors import InvalidField

LIMITS = v.Limits()


def invalid(field: str, fn: Callable[..., Any], *args: Any) -> InvalidField:
    with pytest.raises(InvalidField) as exc:
        fn(*args)
    assert exc.value.field_name == field
    assert exc.value.metadata == {"field": field}
    assert exc.value.reason == "INVALID_FIELD"
    assert str(exc.value).startswith(f"{field}: ")
    return exc.value


# ---- namespace ----------------------------------------------------------------------


def test_empty_namespace_means_default() -> None:
    assert v.namespace("") == "default"


@pytest.mark.parametrize("value", ["default", "a", "team-1", "0", "a" * 63, "a-b-c", "9x"])
def test_valid_namespaces(value: str) -> None:
    assert v.namespace(value) == value


@pytest.mark.parametrize(
    "value",
    ["Default", "a_b", "-a", "a-", "a" * 64, "a.b", " a", "a b", "ä", "a/b", "\x00"],
)
def test_invalid_namespaces(value: str) -> None:
    invalid("namespace", v.namespace, value)


def test_namespace_with_trailing_newline_is_invalid() -> None:
    # Regression: `^...$` with re.match let `$` match before a trailing newline.
    invalid("namespace", v.namespace, "team\n")


@given(st.text(max_size=70))
def test_namespace_property(value: str) -> None:
    if value == "":
        assert v.namespace(value) == "default"
    elif re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", value):
        assert v.namespace(value) == value
    else:
        invalid("namespace", v.namespace, value)


# ---- bounded text: key, key_prefix, holder, request_id, reason ----------------------

TEXT_FIELDS = [
    # (field, function, max bytes, required)
    ("key", lambda s: v.key(s, LIMITS), LIMITS.max_key_bytes, True),
    ("key_prefix", lambda s: v.key_prefix(s, LIMITS), LIMITS.max_key_bytes, False),
    ("holder", lambda s: v.holder(s, LIMITS), LIMITS.max_holder_bytes, True),
    ("holder", lambda s: v.optional_holder(s, LIMITS), LIMITS.max_holder_bytes, False),
    ("request_id", lambda s: v.request_id(s, LIMITS), LIMITS.max_request_id_bytes, False),
    ("reason", lambda s: v.reason(s, LIMITS), LIMITS.max_reason_bytes, False),
]
TEXT_IDS = ["key", "key_prefix", "holder", "optional_holder", "request_id", "reason"]


@pytest.mark.parametrize(("field", "fn", "max_bytes", "required"), TEXT_FIELDS, ids=TEXT_IDS)
def test_text_empty(field: str, fn: Callable[[str], Any], max_bytes: int, required: bool) -> None:
    if required:
        assert "must not be empty" in str(invalid(field, fn, ""))
    else:
        assert fn("") in ("", None)


@pytest.mark.parametrize(("field", "fn", "max_bytes", "required"), TEXT_FIELDS, ids=TEXT_IDS)
def test_text_size_is_counted_in_bytes(
    field: str, fn: Callable[[str], Any], max_bytes: int, required: bool
) -> None:
    assert fn("a" * max_bytes) == "a" * max_bytes
    invalid(field, fn, "a" * (max_bytes + 1))
    # 'é' is two bytes in UTF-8.
    half = max_bytes // 2
    assert fn("é" * half) == "é" * half
    invalid(field, fn, "é" * half + "a" * (max_bytes % 2 + 1))


@pytest.mark.parametrize(("field", "fn", "max_bytes", "required"), TEXT_FIELDS, ids=TEXT_IDS)
@pytest.mark.parametrize(
    "value", ["a\x00b", "a\nb", "a\tb", "a\rb", "a\x1bb", "a\x7fb", "ab\n", "\x01"]
)
def test_text_control_characters(
    field: str, fn: Callable[[str], Any], max_bytes: int, required: bool, value: str
) -> None:
    invalid(field, fn, value)


@pytest.mark.parametrize(("field", "fn", "max_bytes", "required"), TEXT_FIELDS, ids=TEXT_IDS)
@pytest.mark.parametrize("value", [" a", "a ", " ", "\u00a0a", "a\u3000"])
def test_text_surrounding_whitespace(
    field: str, fn: Callable[[str], Any], max_bytes: int, required: bool, value: str
) -> None:
    invalid(field, fn, value)


@pytest.mark.parametrize(("field", "fn", "max_bytes", "required"), TEXT_FIELDS, ids=TEXT_IDS)
@pytest.mark.parametrize("value", ["jobs/a b", "ü/ключ", "a%_b", "x"])
def test_text_accepted(
    field: str, fn: Callable[[str], Any], max_bytes: int, required: bool, value: str
) -> None:
    assert fn(value) == value


def test_key_and_holder_take_a_field_name() -> None:
    invalid("target_key", v.key, "", LIMITS, "target_key")
    invalid("owner", v.holder, "", LIMITS, "owner")


def test_empty_request_id_means_none() -> None:
    assert v.request_id("", LIMITS) is None
    assert v.request_id("req-1", LIMITS) == "req-1"


@given(st.text(max_size=600))
def test_key_property(value: str) -> None:
    acceptable = (
        0 < len(value.encode()) <= LIMITS.max_key_bytes
        and not re.search(r"[\x00-\x1f\x7f-\x9f]", value)
        and value == value.strip()
    )
    if acceptable:
        assert v.key(value, LIMITS) == value
    else:
        invalid("key", v.key, value, LIMITS)


def test_custom_limits_apply() -> None:
    small = v.Limits(max_key_bytes=4, max_holder_bytes=2)
    assert v.key("abcd", small) == "abcd"
    invalid("key", v.key, "abcde", small)
    invalid("holder", v.holder, "abc", small)


# ---- ids and numbers ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["0123abcdef" * 3 + "ab", "a", "a-b", "A1" * 32])
def test_valid_lease_ids(value: str) -> None:
    assert v.lease_id(value) == value


@pytest.mark.parametrize("value", ["a" * 65, "a b", "a/b", "é", "---", "a_b", "a\n"])
def test_invalid_lease_ids(value: str) -> None:
    invalid("lease_id", v.lease_id, value)


def test_lease_id_empty_and_field_name() -> None:
    assert "must not be empty" in str(invalid("lease_id", v.lease_id, ""))
    invalid("leases[3].lease_id", v.lease_id, "", "leases[3].lease_id")


def test_fencing_token_must_be_positive() -> None:
    assert v.fencing_token(1) == 1
    assert v.fencing_token(2**62) == 2**62
    invalid("fencing_token", v.fencing_token, 0)
    invalid("fencing_token", v.fencing_token, -1)
    invalid("renewals[0].fencing_token", v.fencing_token, 0, "renewals[0].fencing_token")


def test_ttl_bounds_are_inclusive() -> None:
    assert v.ttl(LIMITS.min_ttl_us, LIMITS) == LIMITS.min_ttl_us
    assert v.ttl(LIMITS.max_ttl_us, LIMITS) == LIMITS.max_ttl_us
    message = str(invalid("ttl", v.ttl, LIMITS.min_ttl_us - 1, LIMITS))
    assert "between 1s and 3600s" in message
    invalid("ttl", v.ttl, LIMITS.max_ttl_us + 1, LIMITS)
    invalid("ttl", v.ttl, 0, LIMITS)
    invalid("ttl", v.ttl, -5, LIMITS)
    invalid("lease_ttl", v.ttl, 0, LIMITS, "lease_ttl")


def test_wait_bounds() -> None:
    assert v.wait(0, LIMITS) == 0
    assert v.wait(LIMITS.max_wait_us, LIMITS) == LIMITS.max_wait_us
    invalid("wait", v.wait, -1, LIMITS)
    invalid("wait", v.wait, LIMITS.max_wait_us + 1, LIMITS)


def test_lock_delay_bounds() -> None:
    assert v.lock_delay(0, LIMITS) == 0
    assert v.lock_delay(LIMITS.max_lock_delay_us, LIMITS) == LIMITS.max_lock_delay_us
    invalid("lock_delay", v.lock_delay, -1, LIMITS)
    invalid("lock_delay", v.lock_delay, LIMITS.max_lock_delay_us + 1, LIMITS)


def test_revision_must_not_be_negative() -> None:
    assert v.revision(0) == 0
    assert v.revision(42) == 42
    invalid("start_revision", v.revision, -1)
    invalid("after_revision", v.revision, -1, "after_revision")


def test_progress_size() -> None:
    limit = LIMITS.max_progress_bytes
    assert v.progress(b"", LIMITS) == b""
    assert v.progress(b"\x00" * limit, LIMITS) == b"\x00" * limit
    invalid("progress", v.progress, b"x" * (limit + 1), LIMITS)
    invalid("details", v.progress, b"x" * (limit + 1), LIMITS, "details")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, 100), (1, 1), (100, 100), (999, 999), (1000, 1000), (1001, 1000), (10**9, 1000)],
)
def test_page_size(requested: int, expected: int) -> None:
    assert v.page_size(requested, LIMITS) == expected


def test_negative_page_size_is_invalid() -> None:
    invalid("page_size", v.page_size, -1, LIMITS)


# ---- labels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label_key",
    [
        "app",
        "a",
        "app.kubernetes.io/name",
        "example.com/Role_x",
        "x/y",
        "A-b_c.d",
        "a" * 63,
        "a" * 253 + "/" + "b" * 63,
    ],
)
def test_valid_label_keys(label_key: str) -> None:
    assert v.labels({label_key: "v"}, LIMITS) == {label_key: "v"}


@pytest.mark.parametrize(
    "label_key",
    [
        "",
        "-app",
        "app-",
        "_app",
        "a b",
        "a" * 64,
        "a" * 254 + "/b",
        "Example.com/x",
        "/x",
        "x/",
        "a/b/c",
        "é",
        "app\x00",
    ],
)
def test_invalid_label_keys(label_key: str) -> None:
    exc = invalid(f"labels[{label_key!r}]", v.labels, {label_key: "v"}, LIMITS)
    assert "label key" in str(exc)


def test_label_key_with_trailing_newline_is_invalid() -> None:
    # Regression: `^...$` with re.match let `$` match before a trailing newline.
    invalid("labels['app\\n']", v.labels, {"app\n": "v"}, LIMITS)


def test_label_values() -> None:
    limit = LIMITS.max_label_value_bytes
    assert v.labels({"a": ""}, LIMITS) == {"a": ""}
    assert v.labels({"a": "x" * limit}, LIMITS) == {"a": "x" * limit}
    assert v.labels({"a": "é" * (limit // 2)}, LIMITS) == {"a": "é" * (limit // 2)}
    invalid("labels['a']", v.labels, {"a": "x" * (limit + 1)}, LIMITS)
    invalid("labels['a']", v.labels, {"a": "é" * (limit // 2) + "x"}, LIMITS)
    invalid("labels['a']", v.labels, {"a": "x\ny"}, LIMITS)
    invalid("labels['a']", v.labels, {"a": "\x7f"}, LIMITS)


def test_label_count() -> None:
    most = {f"k{i}": "v" for i in range(LIMITS.max_labels)}
    assert v.labels(most, LIMITS) == most
    too_many = {**most, "one-more": "v"}
    assert "65 entries" in str(invalid("labels", v.labels, too_many, LIMITS))


def test_labels_returns_a_copy() -> None:
    source = {"a": "1"}
    result = v.labels(source, LIMITS)
    result["b"] = "2"
    assert source == {"a": "1"}
    assert v.labels({}, LIMITS) == {}
