"""Helpers shared by the saga model, race and bad-input tests.

``SagaApi`` wraps a SagaService stub (on any channel, so races can spread their calls over
several channels) with the calls those tests repeat; ``outcome`` turns a call into either
its response or its (status code, ErrorInfo reason, metadata); ``saga_api`` is the fixture
(``saga_api_for``: the ``tether`` harness with the deadline task stopped).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from tether_client.pb import common_pb2, saga_pb2, saga_pb2_grpc

from .conftest import WAIT_S, Harness, dur, error_info

FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
IA = grpc.StatusCode.INVALID_ARGUMENT
AE = grpc.StatusCode.ALREADY_EXISTS

PLANNED = saga_pb2.SAGA_STATE_PLANNED
RUNNING = saga_pb2.SAGA_STATE_RUNNING
COMPLETED = saga_pb2.SAGA_STATE_COMPLETED
COMPENSATING = saga_pb2.SAGA_STATE_COMPENSATING
COMPENSATED = saga_pb2.SAGA_STATE_COMPENSATED
FAILED = saga_pb2.SAGA_STATE_FAILED
QUARANTINED = saga_pb2.SAGA_STATE_QUARANTINED
CANCELLED = saga_pb2.SAGA_STATE_CANCELLED
TERMINAL = frozenset({COMPLETED, COMPENSATED, FAILED, QUARANTINED, CANCELLED})

EXECUTE = saga_pb2.CLAIM_PURPOSE_EXECUTE
COMPENSATE = saga_pb2.CLAIM_PURPOSE_COMPENSATE

STARTED = saga_pb2.STEP_STATUS_STARTED
SUCCEEDED = saga_pb2.STEP_STATUS_SUCCEEDED
STEP_FAILED = saga_pb2.STEP_STATUS_FAILED

C_PENDING = saga_pb2.COMPENSATION_STATUS_PENDING
C_OK = saga_pb2.COMPENSATION_STATUS_SUCCEEDED
C_FAIL = saga_pb2.COMPENSATION_STATUS_FAILED
C_EXHAUSTED = saga_pb2.COMPENSATION_STATUS_EXHAUSTED
C_MANUAL = saga_pb2.COMPENSATION_STATUS_MANUAL

REQUEUE = saga_pb2.ON_STALE_POLICY_REQUEUE
ON_STALE_COMPENSATE = saga_pb2.ON_STALE_POLICY_COMPENSATE
ON_STALE_QUARANTINE = saga_pb2.ON_STALE_POLICY_QUARANTINE

RETRY_COMPENSATIONS = saga_pb2.REDRIVE_MODE_RETRY_COMPENSATIONS
RESUME = saga_pb2.REDRIVE_MODE_RESUME

T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str]
    details: str

    @property
    def key(self) -> tuple[grpc.StatusCode, str]:
        return self.code, self.reason


async def outcome(call: Awaitable[T]) -> T | Refusal:
    """The response of ``call``, or the refusal it got."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        code, reason, metadata = error_info(exc)
        return Refusal(code, reason, metadata, exc.details() or "")


def comp(name: str, max_attempts: int = 0, payload: str | None = None) -> saga_pb2.Compensation:
    message = saga_pb2.Compensation(name=name, max_attempts=max_attempts)
    if payload is not None:
        message.payload.CopyFrom(struct_pb2.Value(string_value=payload))
    return message


def fence_of(message: common_pb2.Fence) -> tuple[str, int]:
    return message.lease_id, message.fencing_token


class SagaApi:
    """A SagaService stub on one channel plus the calls tests repeat. Every call takes the
    saga id first and passes extra request fields through."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = saga_pb2_grpc.SagaServiceStub(channel)

    async def create(self, saga_id: str, kind: str = "build", **fields: Any) -> Any:
        return await self.stub.CreateSaga(
            saga_pb2.CreateSagaRequest(saga_id=saga_id, kind=kind, **fields), timeout=WAIT_S
        )

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
        if "existing_lease" not in fields:
            fields["new_lease"] = saga_pb2.ClaimLeaseSpec(holder=holder, ttl=dur(ttl_s))
        response: saga_pb2.ClaimSagaResponse = await self.stub.ClaimSaga(
            saga_pb2.ClaimSagaRequest(purpose=purpose, **target, **fields), timeout=WAIT_S
        )
        return response

    async def step(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        index: int,
        name: str,
        status: int = SUCCEEDED,
        **fields: Any,
    ) -> saga_pb2.RecordStepResponse:
        response: saga_pb2.RecordStepResponse = await self.stub.RecordStep(
            saga_pb2.RecordStepRequest(
                saga_id=saga_id, fence=fence, index=index, name=name, status=status, **fields
            ),
            timeout=WAIT_S,
        )
        return response

    async def heartbeat(
        self, saga_id: str, fence: common_pb2.Fence, progress: bytes = b""
    ) -> saga_pb2.HeartbeatSagaResponse:
        response: saga_pb2.HeartbeatSagaResponse = await self.stub.HeartbeatSaga(
            saga_pb2.HeartbeatSagaRequest(saga_id=saga_id, fence=fence, progress=progress),
            timeout=WAIT_S,
        )
        return response

    async def complete(self, saga_id: str, fence: common_pb2.Fence, **fields: Any) -> Any:
        return await self.stub.CompleteSaga(
            saga_pb2.CompleteSagaRequest(saga_id=saga_id, fence=fence, **fields), timeout=WAIT_S
        )

    async def fail(self, saga_id: str, fence: common_pb2.Fence, **fields: Any) -> Any:
        return await self.stub.FailSaga(
            saga_pb2.FailSagaRequest(saga_id=saga_id, fence=fence, **fields), timeout=WAIT_S
        )

    async def compensate(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        step_index: int,
        status: int = C_OK,
        **fields: Any,
    ) -> saga_pb2.RecordCompensationResponse:
        response: saga_pb2.RecordCompensationResponse = await self.stub.RecordCompensation(
            saga_pb2.RecordCompensationRequest(
                saga_id=saga_id, fence=fence, step_index=step_index, status=status, **fields
            ),
            timeout=WAIT_S,
        )
        return response

    async def cancel(self, saga_id: str, reason: str = "") -> Any:
        return await self.stub.CancelSaga(
            saga_pb2.CancelSagaRequest(saga_id=saga_id, reason=reason), timeout=WAIT_S
        )

    async def quarantine(self, saga_id: str, reason: str = "") -> Any:
        return await self.stub.QuarantineSaga(
            saga_pb2.QuarantineSagaRequest(saga_id=saga_id, reason=reason), timeout=WAIT_S
        )

    async def redrive(self, saga_id: str, mode: int, reason: str = "") -> Any:
        return await self.stub.RedriveSaga(
            saga_pb2.RedriveSagaRequest(saga_id=saga_id, mode=mode, reason=reason),
            timeout=WAIT_S,
        )

    async def mark(self, saga_id: str, step_index: int, reason: str = "by hand") -> Any:
        return await self.stub.MarkStepCompensated(
            saga_pb2.MarkStepCompensatedRequest(
                saga_id=saga_id, step_index=step_index, reason=reason
            ),
            timeout=WAIT_S,
        )

    async def annotate(self, saga_id: str, text: str = "note", **fields: Any) -> Any:
        return await self.stub.AnnotateSaga(
            saga_pb2.AnnotateSagaRequest(saga_id=saga_id, text=text, **fields), timeout=WAIT_S
        )

    async def get(self, saga_id: str, namespace: str = "") -> saga_pb2.Saga:
        response = await self.stub.GetSaga(
            saga_pb2.GetSagaRequest(saga_id=saga_id, namespace=namespace), timeout=WAIT_S
        )
        saga: saga_pb2.Saga = response.saga
        return saga

    async def list_all(self, **filters: Any) -> list[saga_pb2.Saga]:
        sagas: list[saga_pb2.Saga] = []
        token = ""
        for _ in range(10_000):
            response = await self.stub.ListSagas(
                saga_pb2.ListSagasRequest(page_token=token, page_size=500, **filters),
                timeout=WAIT_S,
            )
            sagas.extend(response.sagas)
            token = response.next_page_token
            if not token:
                return sagas
        raise AssertionError("ListSagas never returned a last page")

    async def snapshot(self, *saga_ids: str) -> list[bytes]:
        """Every saga named (with its logs), serialized: equal snapshots mean nothing
        observable changed."""
        return [
            (await self.get(saga_id)).SerializeToString(deterministic=True) for saga_id in saga_ids
        ]


async def saga_api_for(tether: Harness) -> SagaApi:
    """The harness's channel as a SagaApi, with the deadline task stopped (a test decides
    when deadlines are enforced). Each test module wraps this in its own fixture."""
    await tether.server.runner.stop_task("saga-deadlines")
    return SagaApi(tether.channel)
