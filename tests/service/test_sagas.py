"""SagaService over gRPC on both backends: the state machine, fencing, claims, operators.

Time moves only when a test advances the fake clock; the deadline task is driven by hand
(``enforce_deadlines``) so a test decides when it runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from tether_client.pb import common_pb2, saga_pb2, saga_pb2_grpc

from .conftest import WAIT_S, Harness, dur, expect_error

FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
IA = grpc.StatusCode.INVALID_ARGUMENT
PLANNED = saga_pb2.SAGA_STATE_PLANNED
RUNNING = saga_pb2.SAGA_STATE_RUNNING
COMPLETED = saga_pb2.SAGA_STATE_COMPLETED
COMPENSATING = saga_pb2.SAGA_STATE_COMPENSATING
COMPENSATED = saga_pb2.SAGA_STATE_COMPENSATED
FAILED = saga_pb2.SAGA_STATE_FAILED
QUARANTINED = saga_pb2.SAGA_STATE_QUARANTINED
CANCELLED = saga_pb2.SAGA_STATE_CANCELLED
EXECUTE = saga_pb2.CLAIM_PURPOSE_EXECUTE
COMPENSATE = saga_pb2.CLAIM_PURPOSE_COMPENSATE
STARTED = saga_pb2.STEP_STATUS_STARTED
SUCCEEDED = saga_pb2.STEP_STATUS_SUCCEEDED
STEP_FAILED = saga_pb2.STEP_STATUS_FAILED
C_OK = saga_pb2.COMPENSATION_STATUS_SUCCEEDED
C_FAIL = saga_pb2.COMPENSATION_STATUS_FAILED


class Sagas:
    """A SagaService stub plus the calls tests repeat."""

    def __init__(self, tether: Harness) -> None:
        self.tether = tether
        self.stub = saga_pb2_grpc.SagaServiceStub(tether.channel)

    async def create(
        self, saga_id: str = "s1", kind: str = "build", **fields: Any
    ) -> saga_pb2.Saga:
        response = await self.stub.CreateSaga(
            saga_pb2.CreateSagaRequest(saga_id=saga_id, kind=kind, **fields), timeout=WAIT_S
        )
        return response.saga

    async def claim(
        self,
        saga_id: str = "",
        *,
        kind: str = "",
        holder: str = "w1",
        ttl_s: float = 10,
        purpose: int = EXECUTE,
        **fields: Any,
    ) -> saga_pb2.ClaimSagaResponse:
        target = {"saga_id": saga_id} if saga_id else {"kind": kind}
        lease = fields.pop("existing_lease", None)
        lease_arg: dict[str, Any] = (
            {"existing_lease": lease}
            if lease is not None
            else {"new_lease": saga_pb2.ClaimLeaseSpec(holder=holder, ttl=dur(ttl_s))}
        )
        response: saga_pb2.ClaimSagaResponse = await self.stub.ClaimSaga(
            saga_pb2.ClaimSagaRequest(purpose=purpose, **target, **lease_arg, **fields),
            timeout=WAIT_S,
        )
        return response

    async def step(
        self,
        fence: common_pb2.Fence,
        index: int,
        name: str,
        status: int = SUCCEEDED,
        saga_id: str = "s1",
        **fields: Any,
    ) -> saga_pb2.RecordStepResponse:
        response: saga_pb2.RecordStepResponse = await self.stub.RecordStep(
            saga_pb2.RecordStepRequest(
                saga_id=saga_id, fence=fence, index=index, name=name, status=status, **fields
            ),
            timeout=WAIT_S,
        )
        return response

    async def get(self, saga_id: str = "s1") -> saga_pb2.Saga:
        response = await self.stub.GetSaga(saga_pb2.GetSagaRequest(saga_id=saga_id), timeout=WAIT_S)
        return response.saga

    async def fail(
        self, fence: common_pb2.Fence, saga_id: str = "s1", **fields: Any
    ) -> saga_pb2.Saga:
        response = await self.stub.FailSaga(
            saga_pb2.FailSagaRequest(saga_id=saga_id, fence=fence, **fields), timeout=WAIT_S
        )
        return response.saga

    async def compensate(
        self,
        fence: common_pb2.Fence,
        step_index: int,
        status: int = C_OK,
        saga_id: str = "s1",
        **fields: Any,
    ) -> saga_pb2.RecordCompensationResponse:
        response: saga_pb2.RecordCompensationResponse = await self.stub.RecordCompensation(
            saga_pb2.RecordCompensationRequest(
                saga_id=saga_id, fence=fence, step_index=step_index, status=status, **fields
            ),
            timeout=WAIT_S,
        )
        return response


def comp(name: str, payload: Any = None, max_attempts: int = 0) -> saga_pb2.Compensation:
    message = saga_pb2.Compensation(name=name, max_attempts=max_attempts)
    if payload is not None:
        message.payload.CopyFrom(struct_pb2.Value(string_value=payload))
    return message


@pytest.fixture
async def sagas(tether: Harness) -> AsyncIterator[Sagas]:
    await tether.server.runner.stop_task("saga-deadlines")
    yield Sagas(tether)


async def test_a_saga_runs_to_completion(sagas: Sagas) -> None:
    created = await sagas.create(input=_struct({"repo": "r"}))
    assert created.state == PLANNED and created.input["repo"] == "r"
    claimed = await sagas.claim("s1")
    assert claimed.saga.state == RUNNING and claimed.saga.attempt == 1
    fence = claimed.fence
    assert fence.lease_id == claimed.lease.lease_id and claimed.lease.key == "sagas/s1"
    first = await sagas.step(fence, 0, "plan", STARTED, compensation=comp("unplan"))
    assert first.step.status == STARTED and first.state == RUNNING
    await sagas.step(fence, 0, "plan", SUCCEEDED, output=struct_pb2.Value(string_value="ok"))
    done = await sagas.stub.CompleteSaga(
        saga_pb2.CompleteSagaRequest(saga_id="s1", fence=fence), timeout=WAIT_S
    )
    assert done.saga.state == COMPLETED
    got = await sagas.get()
    assert [s.name for s in got.steps] == ["plan"] and got.steps[0].output.string_value == "ok"
    # Terminal: no more steps.
    await expect_error(sagas.step(fence, 1, "more"), FP, "SAGA_TERMINAL")


async def test_failure_compensates_in_reverse_order(sagas: Sagas) -> None:
    await sagas.create()
    fence = (await sagas.claim("s1")).fence
    for i, name in enumerate(["branch", "worktree", "run"]):
        await sagas.step(fence, i, name, STARTED, compensation=comp(f"undo-{name}"))
        if name != "run":
            await sagas.step(fence, i, name, SUCCEEDED)
    await sagas.step(fence, 2, "run", STEP_FAILED, error="boom")
    saga = await sagas.fail(fence, reason="boom")
    assert saga.state == COMPENSATING
    assert [c.step_index for c in saga.compensations] == [2, 1, 0]
    await expect_error(sagas.compensate(fence, 0), FP, "COMPENSATION_OUT_OF_ORDER")
    for index in (2, 1):
        await sagas.compensate(fence, index)
    last = await sagas.compensate(fence, 0)
    assert last.state == COMPENSATED
    final = await sagas.get()
    assert final.state == COMPENSATED and all(c.status == C_OK for c in final.compensations)


async def test_stale_claim_is_fenced_and_requeued(sagas: Sagas, tether: Harness) -> None:
    await sagas.create()
    old = (await sagas.claim("s1", ttl_s=5)).fence
    await sagas.step(old, 0, "plan")
    tether.clock.advance(6)
    stale = await sagas.get()
    assert stale.stale and stale.state == RUNNING
    # The old worker is fenced out at once, before any sweep.
    await expect_error(sagas.step(old, 1, "more"), FP, "LEASE_EXPIRED")
    second = await sagas.claim(kind="build", holder="w2")
    assert second.saga.saga_id == "s1" and second.saga.attempt == 2
    assert [s.name for s in second.saga.steps] == ["plan"]
    await expect_error(sagas.step(old, 1, "more"), FP, "STALE_FENCING_TOKEN")


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)
