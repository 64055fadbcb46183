"""SagaService: bad input gets the precise status, ErrorInfo reason and field, changes
nothing, and is never a server fault (INTERNAL / UNKNOWN).

Every case runs against a server that already holds sagas in several states; afterwards
each of them (with its logs) and the global revision counter are exactly what they were.
A claim with a lease of another principal is not testable here: the in-process server has
one, anonymous, principal.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether_client.pb import common_pb2, saga_pb2

from .conftest import WAIT_S, Harness, dur, error_info, expect_error
from .saga_support import (
    AE,
    C_FAIL,
    C_OK,
    C_PENDING,
    COMPENSATE,
    COMPENSATING,
    COMPLETED,
    EXECUTE,
    FP,
    IA,
    NF,
    ON_STALE_QUARANTINE,
    PLANNED,
    REQUEUE,
    RESUME,
    RETRY_COMPENSATIONS,
    STARTED,
    STEP_FAILED,
    Refusal,
    SagaApi,
    comp,
    outcome,
    saga_api_for,
)

BOGUS_FENCE = common_pb2.Fence(lease_id="a" * 32, fencing_token=1)
KIB = 1024


@dataclass
class Seeded:
    """The server with sagas in several states and the fences of their claims."""

    tether: Harness
    api: SagaApi
    running: common_pb2.Fence  # "run": RUNNING, step 0 STARTED with a compensation
    compensating: common_pb2.Fence  # "comp": COMPENSATING (claim kept), steps 0-2, 2 without
    # a compensation
    completed: common_pb2.Fence  # "done": COMPLETED

    IDS = ("plan", "run", "comp", "done")

    async def snapshot(self) -> tuple[Any, ...]:
        return (await self.api.snapshot(*self.IDS), await self.tether.server.db.current_revision())


@pytest.fixture
async def seeded(tether: Harness) -> Seeded:
    api = await saga_api_for(tether)
    for saga_id in Seeded.IDS:
        await api.create(saga_id, input=_struct({"n": saga_id}))
    running = (await api.claim("run")).fence
    await api.step("run", running, 0, "plan", STARTED, compensation=comp("unplan"))
    compensating = (await api.claim("comp")).fence
    await api.step("comp", compensating, 0, "a", compensation=comp("undo-a"))
    await api.step("comp", compensating, 1, "b", compensation=comp("undo-b"))
    await api.step("comp", compensating, 2, "c")
    failed = await api.fail("comp", compensating, reason="boom")
    assert failed.saga.state == COMPENSATING
    completed = (await api.claim("done")).fence
    await api.step("done", completed, 0, "only")
    assert (await api.complete("done", completed)).saga.state == COMPLETED
    return Seeded(tether, api, running, compensating, completed)


async def assert_refused(
    seeded: Seeded,
    call: Callable[[], Any],
    code: grpc.StatusCode,
    reason: str,
    field: str | None = None,
) -> dict[str, str]:
    before = await seeded.snapshot()
    metadata = await expect_error(call(), code, reason)
    if field is not None:
        assert metadata.get("field") == field, metadata
    assert await seeded.snapshot() == before, "a refused call changed state"
    return metadata


# ---- the cases ---------------------------------------------------------------------------
#
# Each group runs on one freshly seeded server, case after case; every case must be refused
# with its status, reason and field and leave everything as it was. A group reports all of
# its failing cases at once.


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Seeded], Awaitable[Any]]
    code: grpc.StatusCode
    reason: str
    field: str | None = None
    # ErrorInfo metadata the refusal must carry (a subset).
    metadata: dict[str, str] | None = None


def _invalid(id_: str, call: Callable[[Seeded], Awaitable[Any]], field: str) -> Case:
    return Case(id_, call, IA, "INVALID_FIELD", field)


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def _nan_value() -> struct_pb2.Value:
    return struct_pb2.Value(number_value=math.nan)


_UNKNOWN = "no-such-saga"
_NOT_FOUND = {"saga_id": _UNKNOWN}

UNKNOWN_SAGA = [
    Case("get", lambda s: s.api.get(_UNKNOWN), NF, "SAGA_NOT_FOUND", metadata=_NOT_FOUND),
    Case("claim", lambda s: s.api.claim(_UNKNOWN), NF, "SAGA_NOT_FOUND", metadata=_NOT_FOUND),
    Case(
        "claim-compensate",
        lambda s: s.api.claim(_UNKNOWN, purpose=COMPENSATE),
        NF,
        "SAGA_NOT_FOUND",
    ),
    Case("step", lambda s: s.api.step(_UNKNOWN, BOGUS_FENCE, 0, "a"), NF, "SAGA_NOT_FOUND"),
    Case("heartbeat", lambda s: s.api.heartbeat(_UNKNOWN, BOGUS_FENCE), NF, "SAGA_NOT_FOUND"),
    Case("complete", lambda s: s.api.complete(_UNKNOWN, BOGUS_FENCE), NF, "SAGA_NOT_FOUND"),
    Case("fail", lambda s: s.api.fail(_UNKNOWN, BOGUS_FENCE, reason="x"), NF, "SAGA_NOT_FOUND"),
    Case(
        "compensation", lambda s: s.api.compensate(_UNKNOWN, BOGUS_FENCE, 0), NF, "SAGA_NOT_FOUND"
    ),
    Case("cancel", lambda s: s.api.cancel(_UNKNOWN), NF, "SAGA_NOT_FOUND"),
    Case("quarantine", lambda s: s.api.quarantine(_UNKNOWN), NF, "SAGA_NOT_FOUND"),
    Case("redrive", lambda s: s.api.redrive(_UNKNOWN, RESUME), NF, "SAGA_NOT_FOUND"),
    Case("mark", lambda s: s.api.mark(_UNKNOWN, 0), NF, "SAGA_NOT_FOUND"),
    Case("annotate", lambda s: s.api.annotate(_UNKNOWN), NF, "SAGA_NOT_FOUND"),
    Case(
        "other-namespace",
        lambda s: s.api.get("run", namespace="team-a"),
        NF,
        "SAGA_NOT_FOUND",
        metadata={"saga_id": "run", "namespace": "team-a"},
    ),
]

STEPS_AND_COMPENSATIONS = [
    # "run" has step 0: the next one is 1.
    _invalid("index-beyond-the-next", lambda s: s.api.step("run", s.running, 2, "x"), "index"),
    _invalid("index-far-beyond", lambda s: s.api.step("run", s.running, 57, "x"), "index"),
    _invalid("index-negative", lambda s: s.api.step("run", s.running, -1, "x"), "index"),
    _invalid("index-past-max-steps", lambda s: s.api.step("run", s.running, 1000, "x"), "index"),
    _invalid("index-int32-max", lambda s: s.api.step("run", s.running, 2**31 - 1, "x"), "index"),
    Case(
        "step-with-another-name",
        lambda s: s.api.step("run", s.running, 0, "not-plan"),
        FP,
        "STEP_CONFLICT",
        metadata={"step_index": "0"},
    ),
    Case(
        "step-on-a-compensating-saga",
        lambda s: s.api.step("comp", s.compensating, 3, "d"),
        FP,
        "INVALID_SAGA_STATE",
        metadata={"state": "SAGA_STATE_COMPENSATING"},
    ),
    Case(
        "compensation-for-a-step-never-recorded",
        lambda s: s.api.compensate("comp", s.compensating, 5),
        NF,
        "STEP_NOT_FOUND",
        metadata={"step_index": "5"},
    ),
    Case(
        "compensation-of-a-step-without-one",
        lambda s: s.api.compensate("comp", s.compensating, 2),
        NF,
        "STEP_NOT_FOUND",
        metadata={"step_index": "2"},
    ),
    Case(
        "compensation-out-of-order",
        lambda s: s.api.compensate("comp", s.compensating, 0),
        FP,
        "COMPENSATION_OUT_OF_ORDER",
        metadata={"next_step_index": "1"},
    ),
    _invalid(
        "compensation-skipping-an-attempt",
        lambda s: s.api.compensate("comp", s.compensating, 1, C_FAIL, attempt=2),
        "attempt",
    ),
    _invalid(
        "compensation-negative-attempt",
        lambda s: s.api.compensate("comp", s.compensating, 1, attempt=-1),
        "attempt",
    ),
    _invalid(
        "compensation-negative-step",
        lambda s: s.api.compensate("comp", s.compensating, -1),
        "step_index",
    ),
    _invalid(
        "compensation-status-0", lambda s: s.api.compensate("comp", s.compensating, 1, 0), "status"
    ),
    _invalid(
        "compensation-status-99",
        lambda s: s.api.compensate("comp", s.compensating, 1, 99),
        "status",
    ),
    _invalid(
        "compensation-status-pending",
        lambda s: s.api.compensate("comp", s.compensating, 1, C_PENDING),
        "status",
    ),
    Case(
        "compensation-on-a-running-saga",
        lambda s: s.api.compensate("run", s.running, 0),
        FP,
        "INVALID_SAGA_STATE",
        metadata={"state": "SAGA_STATE_RUNNING"},
    ),
    Case(
        "fabricated-fence",
        lambda s: s.api.step("run", BOGUS_FENCE, 1, "n"),
        FP,
        "STALE_FENCING_TOKEN",
        metadata={"presented_token": "1"},
    ),
    Case(
        "another-sagas-fence",
        lambda s: s.api.step("run", s.compensating, 1, "n"),
        FP,
        "STALE_FENCING_TOKEN",
    ),
    Case("claim-of-a-claimed-saga", lambda s: s.api.claim("run"), FP, "SAGA_CLAIMED"),
    Case(
        "compensation-claim-of-a-claimed-saga",
        lambda s: s.api.claim("comp", purpose=COMPENSATE),
        FP,
        "SAGA_CLAIMED",
    ),
    Case(
        "compensation-claim-of-a-planned-saga",
        lambda s: s.api.claim("plan", purpose=COMPENSATE),
        FP,
        "INVALID_SAGA_STATE",
    ),
    Case("empty-queue", lambda s: s.api.claim(kind="nothing"), FP, "NOTHING_CLAIMABLE"),
    Case(
        "empty-compensation-queue",
        lambda s: s.api.claim(kind="build", purpose=COMPENSATE),
        FP,
        "NOTHING_CLAIMABLE",
    ),
    Case(
        "unknown-existing-lease",
        lambda s: s.api.claim("plan", existing_lease=BOGUS_FENCE),
        NF,
        "LEASE_NOT_FOUND",
    ),
    Case(
        "redrive-of-a-running-saga",
        lambda s: s.api.redrive("run", RESUME),
        FP,
        "INVALID_SAGA_STATE",
    ),
    _invalid("mark-without-a-reason", lambda s: s.api.mark("comp", 0, reason=""), "reason"),
    Case("mark-an-unknown-step", lambda s: s.api.mark("comp", 7), NF, "STEP_NOT_FOUND"),
    _invalid("mark-a-negative-step", lambda s: s.api.mark("comp", -1), "step_index"),
    Case(
        "mark-a-running-saga",
        lambda s: s.api.mark("run", 0),
        FP,
        "INVALID_SAGA_STATE",
        metadata={"state": "SAGA_STATE_RUNNING"},
    ),
]

_DONE = {"state": "SAGA_STATE_COMPLETED"}

AFTER_COMPLETION = [
    Case(
        "step",
        lambda s: s.api.step("done", s.completed, 1, "more"),
        FP,
        "SAGA_TERMINAL",
        metadata=_DONE,
    ),
    Case(
        "same-step-again",
        lambda s: s.api.step("done", s.completed, 0, "only"),
        FP,
        "SAGA_TERMINAL",
    ),
    Case("heartbeat", lambda s: s.api.heartbeat("done", s.completed), FP, "SAGA_TERMINAL"),
    Case("complete-other-fence", lambda s: s.api.complete("done", s.running), FP, "SAGA_TERMINAL"),
    Case(
        "fail-other-fence",
        lambda s: s.api.fail("done", s.running, reason="x"),
        FP,
        "SAGA_TERMINAL",
    ),
    Case(
        "fail-with-a-reason",
        lambda s: s.api.fail("done", s.completed, reason="late"),
        FP,
        "SAGA_TERMINAL",
    ),
    Case("compensation", lambda s: s.api.compensate("done", s.completed, 0), FP, "SAGA_TERMINAL"),
    Case("cancel", lambda s: s.api.cancel("done"), FP, "SAGA_TERMINAL", metadata=_DONE),
    Case("quarantine", lambda s: s.api.quarantine("done"), FP, "SAGA_TERMINAL"),
    Case("mark", lambda s: s.api.mark("done", 0), FP, "SAGA_TERMINAL"),
    Case("claim", lambda s: s.api.claim("done"), FP, "SAGA_TERMINAL"),
    Case(
        "claim-compensate",
        lambda s: s.api.claim("done", purpose=COMPENSATE),
        FP,
        "SAGA_TERMINAL",
    ),
]

SIZES_AND_JSON = [
    _invalid(
        "input-over-256-KiB",
        lambda s: s.api.create("big", input=_struct({"blob": "x" * (256 * KIB)})),
        "input",
    ),
    _invalid(
        "input-nan-in-a-list",
        lambda s: s.api.create("nan", input=_struct({"a": {"b": [1, math.nan]}})),
        "input",
    ),
    _invalid(
        "input-infinity", lambda s: s.api.create("nan", input=_struct({"a": math.inf})), "input"
    ),
    _invalid(
        "input-minus-infinity",
        lambda s: s.api.create("nan", input=_struct({"a": -math.inf})),
        "input",
    ),
    _invalid(
        "step-nan-output",
        lambda s: s.api.step("run", s.running, 1, "n", STARTED, output=_nan_value()),
        "output",
    ),
    _invalid(
        "step-output-over-64-KiB",
        lambda s: s.api.step(
            "run", s.running, 1, "n", output=struct_pb2.Value(string_value="x" * (64 * KIB))
        ),
        "output",
    ),
    _invalid(
        "compensation-nan-payload",
        lambda s: s.api.step(
            "run",
            s.running,
            1,
            "n",
            STARTED,
            compensation=saga_pb2.Compensation(name="u", payload=_nan_value()),
        ),
        "compensation.payload",
    ),
    _invalid(
        "compensation-without-a-name",
        lambda s: s.api.step(
            "run", s.running, 1, "n", STARTED, compensation=saga_pb2.Compensation()
        ),
        "compensation.name",
    ),
    _invalid(
        "compensation-negative-attempts",
        lambda s: s.api.step("run", s.running, 1, "n", STARTED, compensation=comp("u", -1)),
        "compensation.max_attempts",
    ),
    _invalid(
        "compensation-101-attempts",
        lambda s: s.api.step("run", s.running, 1, "n", STARTED, compensation=comp("u", 101)),
        "compensation.max_attempts",
    ),
    _invalid(
        "step-error-over-8-KiB",
        lambda s: s.api.step("run", s.running, 1, "n", STEP_FAILED, error="e" * (8 * KIB + 1)),
        "error",
    ),
    _invalid("step-empty-name", lambda s: s.api.step("run", s.running, 1, "", STARTED), "name"),
    _invalid(
        "step-name-control-char",
        lambda s: s.api.step("run", s.running, 1, "a\nb", STARTED),
        "name",
    ),
    _invalid("step-name-257-bytes", lambda s: s.api.step("run", s.running, 1, "n" * 257), "name"),
    _invalid("step-status-0", lambda s: s.api.step("run", s.running, 1, "n", 0), "status"),
    _invalid("step-status-99", lambda s: s.api.step("run", s.running, 1, "n", 99), "status"),
    _invalid(
        "complete-nan-output",
        lambda s: s.api.complete("run", s.running, output=_struct({"x": math.nan})),
        "output",
    ),
    _invalid(
        "complete-output-over-64-KiB",
        lambda s: s.api.complete("run", s.running, output=_struct({"x": "y" * (64 * KIB)})),
        "output",
    ),
    _invalid(
        "fail-reason-over-8-KiB",
        lambda s: s.api.fail("run", s.running, reason="r" * (8 * KIB + 1)),
        "reason",
    ),
    _invalid(
        "fail-negative-retry-after",
        lambda s: s.api.fail("run", s.running, retry_after=dur(-1)),
        "retry_after",
    ),
    _invalid(
        "fail-retry-after-over-an-hour",
        lambda s: s.api.fail("run", s.running, retry_after=dur(3601)),
        "retry_after",
    ),
    _invalid(
        "heartbeat-progress-over-64-KiB",
        lambda s: s.api.heartbeat("run", s.running, b"p" * (64 * KIB + 1)),
        "progress",
    ),
    _invalid("annotate-without-text", lambda s: s.api.annotate("run", ""), "text"),
    _invalid(
        "annotate-33-attributes",
        lambda s: s.api.annotate("run", "t", attributes={f"k{i}": "v" for i in range(33)}),
        "attributes",
    ),
    _invalid(
        "annotate-text-over-8-KiB", lambda s: s.api.annotate("run", "t" * (8 * KIB + 1)), "text"
    ),
    _invalid("cancel-reason-too-long", lambda s: s.api.cancel("run", "r" * 1025), "reason"),
]


def _create(**fields: Any) -> Callable[[Seeded], Awaitable[Any]]:
    values: dict[str, Any] = {"saga_id": "new-saga", "kind": "build", **fields}
    return lambda s: s.api.stub.CreateSaga(saga_pb2.CreateSagaRequest(**values), timeout=WAIT_S)


def _claim(**fields: Any) -> Callable[[Seeded], Awaitable[Any]]:
    values: dict[str, Any] = {
        "saga_id": "plan",
        "purpose": EXECUTE,
        "new_lease": saga_pb2.ClaimLeaseSpec(holder="w9", ttl=dur(10)),
    }
    values.update(fields)
    for name in [k for k, v in values.items() if v is None]:
        del values[name]
    return lambda s: s.api.stub.ClaimSaga(saga_pb2.ClaimSagaRequest(**values), timeout=WAIT_S)


_LEASE = saga_pb2.ClaimLeaseSpec(holder="w", ttl=dur(10))

ENUMS_IDS_AND_LEASES = [
    _invalid("create-empty-id", _create(saga_id=""), "saga_id"),
    _invalid("create-id-leading-dash", _create(saga_id="-lead"), "saga_id"),
    _invalid("create-id-with-a-space", _create(saga_id="a b"), "saga_id"),
    _invalid("create-id-non-ascii", _create(saga_id="é"), "saga_id"),
    _invalid("create-id-257", _create(saga_id="a" * 257), "saga_id"),
    _invalid("create-empty-kind", _create(kind=""), "kind"),
    _invalid("create-kind-with-a-slash", _create(kind="a/b"), "kind"),
    _invalid("create-kind-129", _create(kind="k" * 129), "kind"),
    _invalid("create-on-stale-99", _create(on_stale=99), "on_stale"),
    _invalid("create-on-stale-negative", _create(on_stale=-1), "on_stale"),
    _invalid("create-negative-attempts", _create(max_attempts=-1), "max_attempts"),
    _invalid("create-101-attempts", _create(max_attempts=101), "max_attempts"),
    _invalid("create-bad-namespace", _create(namespace="Bad_NS"), "namespace"),
    _invalid("create-bad-label", _create(labels={"-bad": "v"}), "labels['-bad']"),
    _invalid(
        "create-deadline-out-of-range",
        _create(deadline=timestamp_pb2.Timestamp(seconds=2**62)),
        "deadline",
    ),
    _invalid(
        "create-owner-without-kind",
        _create(owner=common_pb2.OwnerReference(kind="", name="x")),
        "owner.kind",
    ),
    _invalid(
        "create-owner-without-name-or-uid",
        _create(owner=common_pb2.OwnerReference(kind="tether.v1/Lease")),
        "owner",
    ),
    _invalid("claim-purpose-0", _claim(purpose=0), "purpose"),
    _invalid("claim-purpose-99", _claim(purpose=99), "purpose"),
    _invalid("claim-without-a-lease", _claim(new_lease=None), "lease"),
    _invalid("claim-without-a-target", _claim(saga_id=None), "target"),
    _invalid("claim-empty-id", _claim(saga_id=""), "saga_id"),
    _invalid("claim-bad-id", _claim(saga_id="a b"), "saga_id"),
    _invalid("claim-empty-kind", _claim(saga_id=None, kind=""), "kind"),
    _invalid("claim-bad-kind", _claim(saga_id=None, kind="a/b"), "kind"),
    _invalid(
        "claim-lease-without-holder",
        _claim(new_lease=saga_pb2.ClaimLeaseSpec(ttl=dur(10))),
        "new_lease.holder",
    ),
    _invalid(
        "claim-lease-without-ttl",
        _claim(new_lease=saga_pb2.ClaimLeaseSpec(holder="w")),
        "new_lease.ttl",
    ),
    _invalid(
        "claim-lease-ttl-2h",
        _claim(new_lease=saga_pb2.ClaimLeaseSpec(holder="w", ttl=dur(7200))),
        "new_lease.ttl",
    ),
    _invalid(
        "claim-existing-lease-without-id",
        _claim(new_lease=None, existing_lease=common_pb2.Fence(fencing_token=1)),
        "existing_lease.lease_id",
    ),
    _invalid(
        "claim-existing-lease-token-0",
        _claim(new_lease=None, existing_lease=common_pb2.Fence(lease_id="a" * 32)),
        "existing_lease.fencing_token",
    ),
    _invalid("claim-negative-wait", _claim(wait=dur(-1)), "wait"),
    _invalid("claim-bad-namespace", _claim(namespace="Bad_NS"), "namespace"),
    _invalid("redrive-mode-0", lambda s: s.api.redrive("run", 0), "mode"),
    _invalid("redrive-mode-99", lambda s: s.api.redrive("run", 99), "mode"),
    _invalid(
        "list-state-99",
        lambda s: s.api.stub.ListSagas(saga_pb2.ListSagasRequest(states=[99]), timeout=WAIT_S),
        "states",
    ),
    _invalid(
        "list-state-0",
        lambda s: s.api.stub.ListSagas(saga_pb2.ListSagasRequest(states=[0]), timeout=WAIT_S),
        "states",
    ),
    _invalid(
        "list-bad-kind",
        lambda s: s.api.stub.ListSagas(saga_pb2.ListSagasRequest(kind="a/b"), timeout=WAIT_S),
        "kind",
    ),
    _invalid(
        "list-negative-page-size",
        lambda s: s.api.stub.ListSagas(saga_pb2.ListSagasRequest(page_size=-1), timeout=WAIT_S),
        "page_size",
    ),
    Case(
        "list-bad-page-token",
        lambda s: s.api.stub.ListSagas(saga_pb2.ListSagasRequest(page_token="%%%"), timeout=WAIT_S),
        IA,
        "INVALID_PAGE_TOKEN",
        "page_token",
    ),
    _invalid("get-empty-id", lambda s: s.api.get(""), "saga_id"),
    _invalid("annotate-bad-id", lambda s: s.api.annotate("a b"), "saga_id"),
]

_FENCED_REQUESTS: dict[str, Callable[[], Any]] = {
    "RecordStep": lambda: saga_pb2.RecordStepRequest(
        saga_id="run", index=1, name="n", status=STARTED
    ),
    "HeartbeatSaga": lambda: saga_pb2.HeartbeatSagaRequest(saga_id="run"),
    "CompleteSaga": lambda: saga_pb2.CompleteSagaRequest(saga_id="run"),
    "FailSaga": lambda: saga_pb2.FailSagaRequest(saga_id="run", reason="r"),
    "RecordCompensation": lambda: saga_pb2.RecordCompensationRequest(
        saga_id="comp", step_index=1, status=C_OK
    ),
}
_BAD_FENCES: list[tuple[str, common_pb2.Fence | None, str]] = [
    ("missing", None, "fence"),
    ("empty", common_pb2.Fence(), "fence.lease_id"),
    ("no-lease-id", common_pb2.Fence(fencing_token=1), "fence.lease_id"),
    ("token-0", common_pb2.Fence(lease_id="a" * 32), "fence.fencing_token"),
    ("garbage-id", common_pb2.Fence(lease_id="x'; --", fencing_token=1), "fence.lease_id"),
    ("id-65-chars", common_pb2.Fence(lease_id="a" * 65, fencing_token=1), "fence.lease_id"),
]


def _fenced(method: str, fence: common_pb2.Fence | None) -> Callable[[Seeded], Awaitable[Any]]:
    def call(s: Seeded) -> Awaitable[Any]:
        request_ = _FENCED_REQUESTS[method]()
        if fence is not None:
            request_.fence.CopyFrom(fence)
        result: Awaitable[Any] = getattr(s.api.stub, method)(request_, timeout=WAIT_S)
        return result

    return call


FENCES = [
    _invalid(f"{method}-{name}", _fenced(method, fence), field)
    for method in _FENCED_REQUESTS
    for name, fence, field in _BAD_FENCES
]

GROUPS = {
    "unknown-saga": UNKNOWN_SAGA,
    "steps-and-compensations": STEPS_AND_COMPENSATIONS,
    "after-completion": AFTER_COMPLETION,
    "sizes-and-json": SIZES_AND_JSON,
    "enums-ids-and-leases": ENUMS_IDS_AND_LEASES,
    "fences": FENCES,
}


@pytest.mark.parametrize("group", list(GROUPS))
async def test_bad_input_is_refused_precisely_and_changes_nothing(
    seeded: Seeded, group: str
) -> None:
    failures: list[str] = []
    for case in GROUPS[group]:
        before = await seeded.snapshot()
        result = await outcome(case.call(seeded))
        problems: list[str] = []
        if not isinstance(result, Refusal):
            problems.append("accepted")
        else:
            if result.key != (case.code, case.reason):
                problems.append(f"got {result.code.name}/{result.reason}: {result.details}")
            if case.field is not None and result.metadata.get("field") != case.field:
                problems.append(f"field {result.metadata.get('field')!r} != {case.field!r}")
            for key, value in (case.metadata or {}).items():
                if result.metadata.get(key) != value:
                    problems.append(f"metadata {key}={result.metadata.get(key)!r} != {value!r}")
        if await seeded.snapshot() != before:
            problems.append("changed state")
        if problems:
            failures.append(f"{case.id}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)


# ---- bugs ----------------------------------------------------------------------------------


async def test_fail_after_completion_with_the_same_fence_is_terminal(seeded: Seeded) -> None:
    await assert_refused(
        seeded, lambda: seeded.api.fail("done", seeded.completed), FP, "SAGA_TERMINAL"
    )


async def test_fail_with_the_fence_of_a_claim_ended_by_a_redrive_is_refused(
    seeded: Seeded,
) -> None:
    api = seeded.api
    await api.create("resumed")
    fence = (await api.claim("resumed")).fence
    await api.quarantine("resumed", "look")
    assert (await api.redrive("resumed", RESUME, "go on")).saga.state == PLANNED
    before = await api.get("resumed")
    # The redrive forgot the old claim's fence: it is not the current claim.
    await expect_error(api.fail("resumed", fence), FP, "STALE_FENCING_TOKEN")
    assert (await api.get("resumed")).revision == before.revision


async def test_redrive_of_a_completed_saga_is_terminal(seeded: Seeded) -> None:
    for mode in (RESUME, RETRY_COMPENSATIONS):
        await assert_refused(
            seeded, lambda m=mode: seeded.api.redrive("done", m), FP, "SAGA_TERMINAL"
        )


# ---- accepted at the bounds, annotations, creating twice -----------------------------------


def _sized(make: Callable[[int], Any], size: int) -> Any:
    """``make(n)`` with the largest n whose message encodes to at most ``size`` bytes (then
    its JSON is smaller still: a bound on either measure is met)."""
    n = size
    while make(n).ByteSize() > size:
        n -= 1
    return make(n)


async def test_bounds_and_annotations_are_accepted(seeded: Seeded) -> None:
    """Values at the size bounds are accepted, and annotations are taken even on a
    terminal saga."""
    api = seeded.api
    big_input = _sized(lambda n: _struct({"blob": "x" * n}), 256 * KIB)
    assert big_input.ByteSize() >= 256 * KIB - 1
    created = await api.create("big", input=big_input)
    assert created.created
    big_output = _sized(lambda n: struct_pb2.Value(string_value="x" * n), 64 * KIB)
    step = await api.step(
        "run",
        seeded.running,
        1,
        "n" * 256,
        STARTED,
        output=big_output,
        compensation=comp("u", 100),
    )
    assert step.step.index == 1
    assert step.step.output == big_output
    assert step.step.compensation.max_attempts == 100
    before = await api.get("done")
    annotated = await api.annotate("done", "after the fact", attributes={"k": "v"})
    after = await api.get("done")
    assert annotated.revision == after.revision > before.revision
    assert [a.text for a in after.annotations] == ["after the fact"]
    assert after.state == COMPLETED


async def test_create_with_the_same_id_and_body_returns_the_first(seeded: Seeded) -> None:
    first = await seeded.api.get("plan")
    before = await seeded.snapshot()
    again = await seeded.api.create("plan", input=_struct({"n": "plan"}))
    assert again.created is False
    assert again.saga.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    # max_attempts 0 means 3 and on_stale UNSPECIFIED means REQUEUE: the same body.
    again = await seeded.api.create(
        "plan", input=_struct({"n": "plan"}), max_attempts=3, on_stale=REQUEUE
    )
    assert again.created is False
    assert again.saga.state == PLANNED
    # Once the saga has run, the answer is the saga as it is now.
    again = await seeded.api.create("done", input=_struct({"n": "done"}))
    assert again.created is False
    assert again.saga.state == COMPLETED
    assert await seeded.snapshot() == before


async def test_create_with_the_same_id_and_another_body_conflicts(seeded: Seeded) -> None:
    same = _struct({"n": "plan"})
    for kind, fields in [
        ("build", {"input": _struct({"n": "other"})}),
        ("deploy", {"input": same}),
        ("build", {"input": same, "labels": {"team": "a"}}),
        ("build", {"input": same, "max_attempts": 5}),
        ("build", {"input": same, "on_stale": ON_STALE_QUARANTINE}),
        ("build", {"input": same, "deadline": timestamp_pb2.Timestamp(seconds=2_000_000_000)}),
        ("build", {}),
    ]:
        metadata = await assert_refused(
            seeded,
            lambda k=kind, f=fields: seeded.api.create("plan", k, **f),
            AE,
            "REQUEST_ID_CONFLICT",
        )
        assert metadata["saga_id"] == "plan"


# ---- property: no input is a server fault -------------------------------------------------

SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

# Protobuf strings are valid UTF-8 (no surrogates). NUL is left out: on PostgreSQL it is a
# known server fault in free text (test_a_nul_character_in_free_text_is_stored_or_refused).
_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
_text = st.one_of(
    st.text(_chars, max_size=20),
    st.text(_chars, min_size=250, max_size=300),
    st.sampled_from(["", "build", "a/b", "-x", "s1", "run", "é" * 200, "a" * 256, "a" * 257]),
)
_ids = st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:/-]{0,20}\Z"), _text)
_kinds = st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"), _text)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**60), 2**60),
    st.text(_chars, max_size=10),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(_chars, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_enum = st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1))
_int32 = st.one_of(st.integers(-2, 5), st.integers(-(2**31), 2**31 - 1))


def _value(data: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(data, float) and not math.isfinite(data):
        message.number_value = data  # json_format refuses to parse these
    else:
        json_format.ParseDict(data, message)
    return message


def _struct_of(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    for key, item in data.items():
        message.fields[key].CopyFrom(_value(item))
    return message


_creates = st.builds(
    saga_pb2.CreateSagaRequest,
    namespace=st.sampled_from(["", "default", "team-a", "Bad_NS"]),
    saga_id=_ids,
    kind=_kinds,
    labels=st.one_of(
        st.just({}), st.dictionaries(st.from_regex(r"\A[a-z]{1,8}\Z"), st.text(_chars, max_size=8))
    ),
    input=st.dictionaries(st.text(_chars, max_size=8), _json, max_size=4).map(_struct_of),
    on_stale=_enum,
    max_attempts=_int32,
)


@st.composite
def _steps(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "index": draw(_int32),
        "name": draw(st.one_of(st.sampled_from(["plan", "next", "x"]), _text)),
        "status": draw(_enum),
        "error": draw(st.one_of(st.just(""), _text)),
    }
    if draw(st.booleans()):
        fields["output"] = _value(draw(_json))
    if draw(st.booleans()):
        compensation = saga_pb2.Compensation(
            name=draw(st.one_of(st.just("undo"), _text)), max_attempts=draw(_int32)
        )
        if draw(st.booleans()):
            compensation.payload.CopyFrom(_value(draw(_json)))
        fields["compensation"] = compensation
    return fields


@pytest.fixture
async def scratch(tether: Harness) -> SagaApi:
    return await saga_api_for(tether)


def _assert_not_a_fault(result: Any) -> None:
    if isinstance(result, grpc.aio.AioRpcError):
        code, reason, _ = error_info(result)
        assert code not in SERVER_FAULTS, (code, reason, result.details())
        assert reason, f"no ErrorInfo reason: {code} {result.details()}"


async def _call(call: Any) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return exc


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request_=_creates)
async def test_random_create_requests_never_fault_the_server(
    scratch: SagaApi, request_: saga_pb2.CreateSagaRequest
) -> None:
    _assert_not_a_fault(await _call(scratch.stub.CreateSaga(request_, timeout=WAIT_S)))


_step_counter = iter(range(10**9))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=_steps(), fence_kind=st.sampled_from(["live", "bogus", "none"]))
async def test_random_record_step_requests_never_fault_the_server(
    scratch: SagaApi, fields: dict[str, Any], fence_kind: str
) -> None:
    # A fresh claimed saga per example, with one step, so a valid request is recorded.
    saga_id = f"fuzz-{next(_step_counter)}"
    await scratch.create(saga_id)
    fence = (await scratch.claim(saga_id)).fence
    await scratch.step(saga_id, fence, 0, "plan", STARTED)
    request_ = saga_pb2.RecordStepRequest(saga_id=saga_id, **fields)
    if fence_kind == "live":
        request_.fence.CopyFrom(fence)
    elif fence_kind == "bogus":
        request_.fence.CopyFrom(BOGUS_FENCE)
    result = await _call(scratch.stub.RecordStep(request_, timeout=WAIT_S))
    _assert_not_a_fault(result)
    if not isinstance(result, grpc.aio.AioRpcError):
        assert fence_kind == "live"
        assert result.step.index == request_.index
        assert result.step.name == request_.name


_durations = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(st.integers(-5, 4000), st.integers(-(2**63), 2**63 - 1)),
    nanos=st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),
)
_fence_kinds = st.sampled_from(["live", "live", "bogus", "none"])
# Every other call, with each field usually plausible and sometimes arbitrary.
_OTHER_CALLS: dict[str, tuple[Any, st.SearchStrategy[dict[str, Any]]]] = {
    "ClaimSaga": (
        saga_pb2.ClaimSagaRequest,
        st.fixed_dictionaries(
            {"purpose": _enum},
            optional={
                "kind": _kinds,
                "new_lease": st.builds(
                    saga_pb2.ClaimLeaseSpec,
                    holder=st.one_of(st.just("w"), _text),
                    ttl=_durations,
                ),
                "wait": st.just(duration_pb2.Duration()),
            },
        ),
    ),
    "HeartbeatSaga": (
        saga_pb2.HeartbeatSagaRequest,
        st.fixed_dictionaries({"progress": st.binary(max_size=70_000)}),
    ),
    "CompleteSaga": (
        saga_pb2.CompleteSagaRequest,
        st.fixed_dictionaries(
            {},
            optional={
                "output": st.dictionaries(st.text(_chars, max_size=8), _json, max_size=4).map(
                    _struct_of
                )
            },
        ),
    ),
    "FailSaga": (
        saga_pb2.FailSagaRequest,
        st.fixed_dictionaries(
            {
                "reason": _text,
                "retryable": st.booleans(),
                "hand_off": st.booleans(),
                "retry_after": _durations,
            }
        ),
    ),
    "RecordCompensation": (
        saga_pb2.RecordCompensationRequest,
        st.fixed_dictionaries(
            {"step_index": _int32, "status": _enum, "error": _text, "attempt": _int32}
        ),
    ),
    "CancelSaga": (saga_pb2.CancelSagaRequest, st.fixed_dictionaries({"reason": _text})),
    "QuarantineSaga": (saga_pb2.QuarantineSagaRequest, st.fixed_dictionaries({"reason": _text})),
    "RedriveSaga": (
        saga_pb2.RedriveSagaRequest,
        st.fixed_dictionaries({"mode": _enum, "reason": _text}),
    ),
    "MarkStepCompensated": (
        saga_pb2.MarkStepCompensatedRequest,
        st.fixed_dictionaries({"step_index": _int32, "reason": _text}),
    ),
    "AnnotateSaga": (
        saga_pb2.AnnotateSagaRequest,
        st.fixed_dictionaries(
            {
                "text": _text,
                "attributes": st.dictionaries(_text, _text, max_size=3),
            }
        ),
    ),
    "GetSaga": (saga_pb2.GetSagaRequest, st.fixed_dictionaries({})),
    "ListSagas": (
        saga_pb2.ListSagasRequest,
        st.fixed_dictionaries(
            {
                "states": st.lists(_enum, max_size=3),
                "kind": st.one_of(st.just(""), _kinds),
                "stale_only": st.booleans(),
                "overdue_only": st.booleans(),
                "page_size": _int32,
                "page_token": st.one_of(st.just(""), _text),
            }
        ),
    ),
}
_FENCED = {"HeartbeatSaga", "CompleteSaga", "FailSaga", "RecordCompensation"}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(sorted(_OTHER_CALLS)),
    data=st.data(),
    fence_kind=_fence_kinds,
    own_saga=st.sampled_from([True, True, True, False]),
)
async def test_random_requests_to_every_other_call_never_fault_the_server(
    scratch: SagaApi, method: str, data: st.DataObject, fence_kind: str, own_saga: bool
) -> None:
    """A saga in some state (planned, running with a step, or compensating), then one
    call with random fields at it (or at a random id): never a server fault."""
    saga_id = f"any-{next(_step_counter)}"
    await scratch.create(saga_id)
    stage = data.draw(st.sampled_from(["planned", "running", "compensating"]), label="stage")
    fence = BOGUS_FENCE
    if stage != "planned":
        fence = (await scratch.claim(saga_id)).fence
        await scratch.step(saga_id, fence, 0, "plan", STARTED, compensation=comp("u"))
        if stage == "compensating":
            await scratch.fail(saga_id, fence, reason="boom")
    request_class, fields = _OTHER_CALLS[method]
    request_ = request_class(**data.draw(fields, label="fields"))
    if method not in ("ListSagas",):
        if method == "ClaimSaga" and request_.kind:
            pass
        else:
            request_.saga_id = saga_id if own_saga else data.draw(_ids, label="saga_id")
    if method in _FENCED and fence_kind != "none":
        request_.fence.CopyFrom(fence if fence_kind == "live" else BOGUS_FENCE)
    if method == "ClaimSaga" and fence_kind == "live" and not request_.HasField("new_lease"):
        request_.existing_lease.CopyFrom(fence)
    _assert_not_a_fault(await _call(getattr(scratch.stub, method)(request_, timeout=WAIT_S)))


def _raw(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(
        f"/tether.v1.SagaService/{method}",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )


GARBAGE = [
    b"\x12\xff",  # truncated varint
    b"\x12\x05ab",  # truncated string
    b"\x12\x02\xff\xfe",  # invalid UTF-8 in saga_id
    b"\x0f",  # invalid wire type
]


async def test_garbage_bytes_are_malformed(seeded: Seeded) -> None:
    for garbage in GARBAGE:
        for method in ("CreateSaga", "RecordStep", "ClaimSaga", "GetSaga"):
            call = _raw(seeded.tether.channel, method)
            metadata = await assert_refused(
                seeded,
                lambda c=call, g=garbage: c(g, timeout=WAIT_S),
                IA,
                "MALFORMED_REQUEST",
            )
            assert metadata["method"] == f"tether.v1.SagaService.{method}"


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["CreateSaga", "RecordStep"]),
    data=st.one_of(
        st.binary(max_size=64),
        st.tuples(_creates, st.binary(min_size=1, max_size=4), st.integers(0, 200)).map(
            lambda t: _mangle(t[0].SerializeToString(), t[1], t[2])
        ),
    ),
)
async def test_random_bytes_never_fault_the_server(
    tether: Harness, method: str, data: bytes
) -> None:
    _assert_not_a_fault(await _call(_raw(tether.channel, method)(data, timeout=WAIT_S)))


def _mangle(valid: bytes, noise: bytes, at: int) -> bytes:
    at = min(at, len(valid))
    return valid[:at] + noise + valid[at + len(noise) :]


@pytest.mark.parametrize(
    "field",
    ["RecordStep.error", "FailSaga.reason", "RecordCompensation.error", "AnnotateSaga.text"],
)
async def test_a_nul_character_in_free_text_is_stored_or_refused(
    seeded: Seeded, field: str
) -> None:
    """Free-text fields (errors, reasons, annotations) with a NUL character: stored and read
    back as sent, or refused INVALID_FIELD naming the field; never a server fault.
    PostgreSQL text cannot hold U+0000, so there the value must be refused (or escaped)."""
    api, text = seeded.api, "before\x00after"
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "RecordStep.error": lambda: api.step(
            "run", seeded.running, 1, "n", STEP_FAILED, error=text
        ),
        "FailSaga.reason": lambda: api.fail("run", seeded.running, reason=text),
        "RecordCompensation.error": lambda: api.compensate(
            "comp", seeded.compensating, 1, C_FAIL, error=text
        ),
        "AnnotateSaga.text": lambda: api.annotate("run", text),
    }
    before = await seeded.snapshot()
    result = await outcome(calls[field]())
    if isinstance(result, Refusal):
        assert result.key == (IA, "INVALID_FIELD"), result
        assert result.metadata["field"] == field.split(".")[1]
        assert await seeded.snapshot() == before
        return
    saga_id = "comp" if field.startswith("RecordCompensation") else "run"
    saga = await api.get(saga_id)
    stored = {
        "RecordStep.error": lambda: saga.steps[1].error,
        "FailSaga.reason": lambda: saga.failure_reason,
        "RecordCompensation.error": lambda: saga.compensations[0].error,
        "AnnotateSaga.text": lambda: saga.annotations[-1].text,
    }[field]()
    assert stored == text


def _deeply_nested_create(depth: int) -> bytes:
    """A CreateSagaRequest whose input nests ``depth`` Structs, encoded by hand (the
    protobuf runtime refuses to build messages nested past its depth limit)."""
    value = struct_pb2.Value(string_value="leaf").SerializeToString()
    for _ in range(depth):
        entry = b"\x0a\x01a" + b"\x12" + _varint(len(value)) + value  # map entry "a" -> value
        struct = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields
        value = b"\x2a" + _varint(len(struct)) + struct  # Value.struct_value
    entry = b"\x0a\x01x" + b"\x12" + _varint(len(value)) + value
    struct = b"\x0a" + _varint(len(entry)) + entry
    head = saga_pb2.CreateSagaRequest(saga_id="deep", kind="build").SerializeToString()
    return head + b"\x2a" + _varint(len(struct)) + struct  # CreateSagaRequest.input


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_input_nested_past_the_protobuf_depth_limit_is_malformed(seeded: Seeded) -> None:
    call = _raw(seeded.tether.channel, "CreateSaga")
    for depth in (40, 200):
        await assert_refused(
            seeded,
            lambda d=depth: call(_deeply_nested_create(d), timeout=WAIT_S),
            IA,
            "MALFORMED_REQUEST",
        )
    # Within the limit, the same encoding is a valid request.
    created = saga_pb2.CreateSagaResponse.FromString(
        await call(_deeply_nested_create(30), timeout=WAIT_S)
    )
    assert created.created
    value = created.saga.input["x"]
    for _ in range(30):
        value = value["a"]
    assert value == "leaf"
