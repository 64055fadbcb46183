"""Bad input gets the precise status, reason and field, and changes nothing.

Every case runs against a server that already holds leases; afterwards the listing and the
revision counter are exactly what they were.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether_client.pb import lease_pb2

from .conftest import WAIT_S, Harness, dur, error_info, expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK_KEY = "jobs/new"  # a free key: were validation skipped, a lease would appear


def acquire(**fields: Any) -> lease_pb2.AcquireRequest:
    values: dict[str, Any] = {"key": OK_KEY, "holder": "w1", "ttl": dur(10)}
    values.update(fields)
    return lease_pb2.AcquireRequest(**values)


def many_labels(count: int) -> dict[str, str]:
    return {f"label-{index}": "v" for index in range(count)}


# (request, field named in the ErrorInfo metadata)
ACQUIRE_CASES = [
    pytest.param(acquire(key=""), "key", id="empty-key"),
    pytest.param(acquire(key="k" * 513), "key", id="key-513-bytes"),
    pytest.param(acquire(key="é" * 257), "key", id="key-514-utf8-bytes"),
    pytest.param(acquire(key="jobs/\x07a"), "key", id="key-control-char"),
    pytest.param(acquire(key="jobs/a\x00"), "key", id="key-nul"),
    pytest.param(acquire(key=" jobs/a"), "key", id="key-leading-space"),
    pytest.param(acquire(holder=""), "holder", id="empty-holder"),
    pytest.param(acquire(holder="h" * 257), "holder", id="holder-257-bytes"),
    pytest.param(acquire(ttl=dur(0)), "ttl", id="ttl-unset"),
    pytest.param(acquire(ttl=dur(0.5)), "ttl", id="ttl-half-second"),
    pytest.param(acquire(ttl=dur(7200)), "ttl", id="ttl-2h"),
    pytest.param(acquire(ttl=dur(3600, nanos=1000)), "ttl", id="ttl-just-over-1h"),
    pytest.param(acquire(ttl=dur(-5)), "ttl", id="ttl-negative"),
    pytest.param(acquire(ttl=dur(1, nanos=-1)), "ttl", id="ttl-invalid-duration"),
    pytest.param(acquire(ttl=dur(10, nanos=1)), "ttl", id="ttl-sub-microsecond"),
    pytest.param(
        acquire(ttl=duration_pb2.Duration(seconds=2**62)), "ttl", id="ttl-out-of-duration-range"
    ),
    pytest.param(acquire(wait=dur(301)), "wait", id="wait-too-long"),
    pytest.param(acquire(wait=dur(-1)), "wait", id="wait-negative"),
    pytest.param(acquire(lock_delay=dur(61)), "lock_delay", id="lock-delay-too-long"),
    pytest.param(acquire(labels=many_labels(65)), "labels", id="65-labels"),
    pytest.param(acquire(labels={"-bad": "v"}), "labels['-bad']", id="bad-label-key"),
    pytest.param(acquire(labels={"ok": "v\n"}), "labels['ok']", id="label-value-control"),
    pytest.param(acquire(labels={"ok": "v" * 257}), "labels['ok']", id="label-value-257"),
    pytest.param(acquire(namespace="Bad_NS"), "namespace", id="namespace-Bad_NS"),
    pytest.param(acquire(namespace="a" * 64), "namespace", id="namespace-64-chars"),
    pytest.param(acquire(request_id="r" * 129), "request_id", id="request-id-129-bytes"),
]


@pytest.fixture
async def seeded(tether: Harness) -> Harness:
    """A server holding a few leases, so "nothing changed" means something."""
    await tether.acquire("jobs/a", "w1", labels={"team": "a"})
    await tether.acquire("jobs/b", "w2")
    await tether.acquire("other/c", "w1", namespace="team-a")
    return tether


async def assert_refused(
    tether: Harness,
    call: Callable[[], Any],
    code: grpc.StatusCode,
    reason: str,
    field: str | None = None,
) -> dict[str, str]:
    before = await tether.snapshot(("", "team-a"))
    metadata = await expect_error(call(), code, reason)
    if field is not None:
        assert metadata.get("field") == field, metadata
    assert await tether.snapshot(("", "team-a")) == before, "a refused call changed state"
    return metadata


@pytest.mark.parametrize(("request_", "field"), ACQUIRE_CASES)
async def test_acquire_refuses_invalid_fields(
    seeded: Harness, request_: lease_pb2.AcquireRequest, field: str
) -> None:
    await assert_refused(
        seeded, lambda: seeded.stub.Acquire(request_), INVALID, "INVALID_FIELD", field
    )


async def test_acquire_at_the_bounds_is_accepted(seeded: Harness) -> None:
    """The limits are inclusive: the refusals above are about the bounds, not the values."""
    low = await seeded.acquire("bounds/low", "w", ttl_s=1, labels=many_labels(64))
    high = await seeded.acquire(
        "bounds/" + "k" * 505, "h" * 256, ttl_s=3600, wait=dur(300), lock_delay=dur(60)
    )
    assert low.ttl == dur(1)
    assert high.ttl == dur(3600)
    assert len(high.key.encode()) == 512


def _page_token(position: list[object], digest: str) -> str:
    raw = json.dumps({"p": position, "q": digest}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def _token_for(tether: Harness, **filters: Any) -> str:
    response = await tether.stub.ListLeases(lease_pb2.ListLeasesRequest(page_size=1, **filters))
    assert response.next_page_token
    return str(response.next_page_token)


@pytest.mark.parametrize(
    ("make", "reason", "field"),
    [
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(page_token="%%% not base64 %%%"),
            "INVALID_PAGE_TOKEN",
            "page_token",
            id="malformed-page-token",
        ),
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(page_token=_page_token(["x", 1], "0" * 16)),
            "INVALID_PAGE_TOKEN",
            "page_token",
            id="forged-page-token",
        ),
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(page_size=-1),
            "INVALID_FIELD",
            "page_size",
            id="negative-page-size",
        ),
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(states=[99]),
            "INVALID_FIELD",
            "states",
            id="state-99",
        ),
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(states=[lease_pb2.LEASE_STATE_UNSPECIFIED]),
            "INVALID_FIELD",
            "states",
            id="state-unspecified",
        ),
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(namespace="Bad_NS"),
            "INVALID_FIELD",
            "namespace",
            id="bad-namespace",
        ),
        pytest.param(
            lambda _t: lease_pb2.ListLeasesRequest(key_prefix="jobs/\x01"),
            "INVALID_FIELD",
            "key_prefix",
            id="prefix-control-char",
        ),
    ],
)
async def test_list_refuses_bad_queries(
    seeded: Harness, make: Callable[[Harness], Any], reason: str, field: str
) -> None:
    await assert_refused(
        seeded, lambda: seeded.stub.ListLeases(make(seeded)), INVALID, reason, field
    )


@pytest.mark.parametrize(
    "other_query",
    [
        pytest.param({"key_prefix": "other/"}, id="other-prefix"),
        pytest.param({"holder": "w1"}, id="other-holder"),
        pytest.param({"states": [lease_pb2.LEASE_STATE_ACTIVE]}, id="other-states"),
        pytest.param({"namespace": "team-a"}, id="other-namespace"),
    ],
)
async def test_page_token_from_another_query_is_refused(
    seeded: Harness, other_query: dict[str, Any]
) -> None:
    token = await _token_for(seeded, key_prefix="jobs/")
    # The token works for its own query...
    page = await seeded.stub.ListLeases(
        lease_pb2.ListLeasesRequest(key_prefix="jobs/", page_size=1, page_token=token)
    )
    assert [lease.key for lease in page.leases] == ["jobs/b"]
    # ...and for no other.
    await assert_refused(
        seeded,
        lambda: seeded.stub.ListLeases(
            lease_pb2.ListLeasesRequest(page_token=token, page_size=1, **other_query)
        ),
        INVALID,
        "INVALID_PAGE_TOKEN",
        "page_token",
    )


async def test_get_lease_without_a_selector(seeded: Harness) -> None:
    await assert_refused(
        seeded,
        lambda: seeded.stub.GetLease(lease_pb2.GetLeaseRequest()),
        INVALID,
        "INVALID_FIELD",
        "selector",
    )


async def test_get_lease_by_invalid_key(seeded: Harness) -> None:
    await assert_refused(
        seeded,
        lambda: seeded.stub.GetLease(lease_pb2.GetLeaseRequest(key="")),
        INVALID,
        "INVALID_FIELD",
        "key",
    )


async def test_renew_with_token_zero(seeded: Harness) -> None:
    lease = (await seeded.list_all())[0]
    await assert_refused(
        seeded,
        lambda: seeded.stub.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id)),
        INVALID,
        "INVALID_FIELD",
        "fencing_token",
    )


async def test_renew_with_empty_lease_id(seeded: Harness) -> None:
    await assert_refused(
        seeded,
        lambda: seeded.stub.Renew(lease_pb2.RenewRequest(fencing_token=1)),
        INVALID,
        "INVALID_FIELD",
        "lease_id",
    )


async def test_renew_with_a_malformed_lease_id(seeded: Harness) -> None:
    await assert_refused(
        seeded,
        lambda: seeded.stub.Renew(lease_pb2.RenewRequest(lease_id="x'; --", fencing_token=1)),
        INVALID,
        "INVALID_FIELD",
        "lease_id",
    )


async def test_renew_with_oversized_progress(seeded: Harness) -> None:
    lease = (await seeded.list_all())[0]
    await assert_refused(
        seeded,
        lambda: seeded.stub.Renew(
            lease_pb2.RenewRequest(
                lease_id=lease.lease_id,
                fencing_token=lease.fencing_token,
                progress=b"x" * (64 * 1024 + 1),
            )
        ),
        INVALID,
        "INVALID_FIELD",
        "progress",
    )


async def test_release_with_empty_holder(seeded: Harness) -> None:
    lease = (await seeded.list_all())[0]
    await assert_refused(
        seeded,
        lambda: seeded.stub.Release(
            lease_pb2.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        ),
        INVALID,
        "INVALID_FIELD",
        "holder",
    )


async def test_revoke_unknown_id(seeded: Harness) -> None:
    metadata = await assert_refused(
        seeded,
        lambda: seeded.stub.Revoke(lease_pb2.RevokeRequest(lease_id="a" * 32)),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )
    assert metadata["lease_id"] == "a" * 32


async def test_revoke_with_an_oversized_reason(seeded: Harness) -> None:
    lease = (await seeded.list_all())[0]
    await assert_refused(
        seeded,
        lambda: seeded.stub.Revoke(
            lease_pb2.RevokeRequest(lease_id=lease.lease_id, reason="r" * 1025)
        ),
        INVALID,
        "INVALID_FIELD",
        "reason",
    )


async def test_watch_with_a_negative_revision(seeded: Harness) -> None:
    async def first_message() -> Any:
        call = seeded.stub.Watch(lease_pb2.WatchRequest(start_revision=-1), timeout=WAIT_S)
        return await call.read()

    await assert_refused(seeded, first_message, INVALID, "INVALID_FIELD", "start_revision")


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x12\xff", id="truncated-varint"),
        pytest.param(b"\x12\x05ab", id="truncated-string"),
        pytest.param(b"\x12\x02\xff\xfe", id="invalid-utf8-key"),
        pytest.param(b"\x22\x03\x08", id="truncated-duration"),
        pytest.param(b"\x0f", id="invalid-wire-type"),
    ],
)
async def test_garbage_bytes_to_a_unary_rpc_are_malformed(seeded: Harness, garbage: bytes) -> None:
    metadata = await assert_refused(
        seeded,
        lambda: seeded.raw_unary("Acquire")(garbage, timeout=WAIT_S),
        INVALID,
        "MALFORMED_REQUEST",
    )
    assert metadata["method"] == "tether.v1.LeaseService.Acquire"


# ---- Property: no input is a server fault ------------------------------------------

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}

_chars = st.characters(exclude_categories=("Cs",))  # protobuf strings are valid UTF-8
_text = st.one_of(
    st.text(_chars, max_size=20),
    st.text(_chars, min_size=250, max_size=600),
    st.sampled_from(["", "default", "team-a", "jobs/a", " x", "a/b", "-", "é" * 300]),
)
_durations = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(
        st.integers(-10, 4000),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 1, 60, 300, 3600, 315_576_000_000, 315_576_000_001]),
    ),
    nanos=st.one_of(
        st.just(0),
        st.integers(-999_999_999, 999_999_999),
        st.integers(-(2**31), 2**31 - 1),
    ),
)
_labels = st.one_of(
    st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9./-]{0,20}\Z"), st.text(_chars, max_size=30)),
    st.dictionaries(_text, _text, max_size=5),
    st.dictionaries(st.from_regex(r"\A[a-z0-9]{1,10}\Z"), st.just("v"), min_size=60, max_size=70),
)
# Each field is usually plausible and sometimes arbitrary, so that whole requests are often
# valid (reaching the store) and the invalid ones are invalid in one field at a time.
_plausible_text = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
    min_size=1,
    max_size=40,
)
_plausible_duration = st.builds(
    duration_pb2.Duration, seconds=st.integers(0, 3600), nanos=st.sampled_from([0, 500_000_000])
)


def _mostly(plausible: st.SearchStrategy[Any], arbitrary: st.SearchStrategy[Any]) -> Any:
    """``plausible`` nine times in ten, ``arbitrary`` otherwise."""
    return st.sampled_from(range(10)).flatmap(lambda n: arbitrary if n == 9 else plausible)


_requests = st.builds(
    lease_pb2.AcquireRequest,
    namespace=_mostly(
        st.sampled_from(["", "default", "team-a"]),
        st.one_of(_text, st.from_regex(r"\A[a-z0-9-]{1,64}\Z")),
    ),
    key=_mostly(_plausible_text, _text),
    holder=_mostly(_plausible_text, _text),
    ttl=_mostly(_plausible_duration, _durations),
    wait=_mostly(st.just(duration_pb2.Duration()), _durations),
    lock_delay=_mostly(st.just(duration_pb2.Duration()), _durations),
    labels=_mostly(st.just({}), _labels),
    request_id=_mostly(st.sampled_from(["", "r1", "r2"]), _text),
)


async def _acquire_then_clean_up(tether: Harness, call: Any, parse: Callable[[Any], Any]) -> None:
    """Make the call; whatever it granted is revoked and the clock moved past every
    lock-delay, so the next example starts with every key free (a waiting Acquire would
    otherwise block, since the fake clock does not move by itself)."""
    failure: grpc.aio.AioRpcError | None = None
    try:
        response = parse(await call)
    except grpc.aio.AioRpcError as exc:
        failure = exc
    finally:
        tether.clock.advance(61)
    if failure is not None:
        code, reason, metadata = error_info(failure)
        assert code in ALLOWED, (code, reason, failure.details())
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert reason in {"INVALID_FIELD", "MALFORMED_REQUEST"}, reason
            if reason == "INVALID_FIELD":
                assert metadata.get("field"), metadata
        return
    lease = response.lease
    await tether.stub.Revoke(
        lease_pb2.RevokeRequest(namespace=lease.namespace, lease_id=lease.lease_id),
        timeout=WAIT_S,
    )
    tether.clock.advance(61)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request_=_requests)
async def test_random_acquire_requests_never_fault_the_server(
    tether: Harness, request_: lease_pb2.AcquireRequest
) -> None:
    await _acquire_then_clean_up(
        tether, tether.stub.Acquire(request_, timeout=WAIT_S), lambda response: response
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.one_of(
        st.binary(max_size=64),
        # Valid requests with a few bytes flipped or cut: mostly decodable, often odd.
        st.tuples(_requests, st.binary(min_size=1, max_size=4), st.integers(0, 200)).map(
            lambda t: _mangle(t[0].SerializeToString(), t[1], t[2])
        ),
    )
)
async def test_random_bytes_to_acquire_never_fault_the_server(tether: Harness, data: bytes) -> None:
    await _acquire_then_clean_up(
        tether,
        tether.raw_unary("Acquire")(data, timeout=WAIT_S),
        lease_pb2.AcquireResponse.FromString,
    )


def _mangle(valid: bytes, noise: bytes, at: int) -> bytes:
    at = min(at, len(valid))
    return valid[:at] + noise + valid[at + len(noise) :]


async def test_keepalive_with_a_bad_namespace_ends_the_stream(seeded: Harness) -> None:
    lease = (await seeded.list_all())[0]

    async def exchange() -> Any:
        call = seeded.stub.KeepAlive(timeout=WAIT_S)
        await call.write(
            lease_pb2.KeepAliveRequest(
                namespace="Bad_NS",
                renewals=[
                    lease_pb2.KeepAliveRenewal(
                        lease_id=lease.lease_id, fencing_token=lease.fencing_token
                    )
                ],
            )
        )
        return await call.read()

    await assert_refused(seeded, exchange, INVALID, "INVALID_FIELD", "namespace")
