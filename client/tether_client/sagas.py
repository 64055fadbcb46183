"""``client.sagas``: SagaService as keyword methods returning sagas.

::

    await client.sagas.create("task-168", "open-pr", input={"repo": "tether"})
    claim = await client.sagas.claim(kind="open-pr", ttl=30, wait=20)
    await client.sagas.record_step("task-168", claim.fence, 0, "branch", "succeeded")
    await client.sagas.complete("task-168", claim.fence, output={"pr": 12})
    async for saga in client.sagas.list(states=["running", "compensating"]):
        ...

To run a saga step by step with its compensations, use ``client.run_saga()``; these calls
are its building blocks and the operator's tools. A call is retried on ``Unavailable``
only when sending it twice has the effect of sending it once: reads, ``create`` (its id is
the client's), ``record_step``, ``heartbeat``, ``complete`` and ``fail`` (idempotent under
the claim's fence) and ``record_compensation`` when it names its ``attempt``. ``claim``,
``cancel``, ``quarantine``, ``redrive``, ``mark_step_compensated`` and ``annotate`` are
tried once: a repeat after a lost answer could act twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import TypeAlias

from google.protobuf import struct_pb2, timestamp_pb2

from tether_client.connection import Endpoint
from tether_client.convert import Seconds, seconds, to_datetime, to_duration
from tether_client.pb import common_pb2, saga_pb2
from tether_client.results import (
    Claim,
    CompensationRecorded,
    SagaCreated,
    SagaHeartbeat,
    StepRecorded,
)
from tether_client.transport import EnumNames, Metadata, Transport
from tether_client.values import to_struct, to_value

SagaState: TypeAlias = saga_pb2.SagaState.ValueType
OnStalePolicy: TypeAlias = saga_pb2.OnStalePolicy.ValueType
RedriveMode: TypeAlias = saga_pb2.RedriveMode.ValueType
ClaimPurpose: TypeAlias = saga_pb2.ClaimPurpose.ValueType
StepStatus: TypeAlias = saga_pb2.StepStatus.ValueType
CompensationStatus: TypeAlias = saga_pb2.CompensationStatus.ValueType

saga_states: EnumNames[SagaState] = EnumNames(
    "SAGA_STATE_", dict(saga_pb2.SagaState.items()), "a saga state"
)
on_stale_policies: EnumNames[OnStalePolicy] = EnumNames(
    "ON_STALE_POLICY_", dict(saga_pb2.OnStalePolicy.items()), "an on-stale policy"
)
redrive_modes: EnumNames[RedriveMode] = EnumNames(
    "REDRIVE_MODE_", dict(saga_pb2.RedriveMode.items()), "a redrive mode"
)
claim_purposes: EnumNames[ClaimPurpose] = EnumNames(
    "CLAIM_PURPOSE_", dict(saga_pb2.ClaimPurpose.items()), "a claim purpose"
)
step_statuses: EnumNames[StepStatus] = EnumNames(
    "STEP_STATUS_", dict(saga_pb2.StepStatus.items()), "a step status"
)
compensation_statuses: EnumNames[CompensationStatus] = EnumNames(
    "COMPENSATION_STATUS_", dict(saga_pb2.CompensationStatus.items()), "a compensation status"
)


def _timestamp(when: datetime, what: str) -> timestamp_pb2.Timestamp:
    """A Timestamp from an aware datetime: a naive one would be read as UTC silently."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, not {when!r}")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


class SagasClient:
    """SagaService: create, claim and drive sagas; operate on stuck ones; read and watch."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def create(
        self,
        saga_id: str,
        kind: str,
        *,
        input: Mapping[str, object] | None = None,
        labels: Mapping[str, str] | None = None,
        owner: common_pb2.OwnerReference | None = None,
        on_stale: str | OnStalePolicy | None = None,
        max_attempts: int = 0,
        deadline: datetime | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> SagaCreated:
        """Create a saga in PLANNED (``input``: JSON). Creating it again with the same
        content answers the first one (``created`` False), so this is retried;
        different content raises ``AlreadyExists``."""
        request = saga_pb2.CreateSagaRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            kind=kind,
            labels=dict(labels or {}),
            max_attempts=max_attempts,
        )
        if input is not None:
            request.input.CopyFrom(to_struct(input))
        if owner is not None:
            request.owner.CopyFrom(owner)
        if on_stale is not None:
            request.on_stale = on_stale_policies(on_stale)
        if deadline is not None:
            request.deadline.CopyFrom(_timestamp(deadline, "deadline"))
        response = await self._transport.unary(
            lambda e: e.saga.CreateSaga, request, safe=bool(saga_id), timeout=timeout
        )
        return SagaCreated(response.saga, response.created)

    async def claim(
        self,
        saga_id: str | None = None,
        *,
        kind: str = "",
        purpose: str | ClaimPurpose = "execute",
        fence: common_pb2.Fence | None = None,
        ttl: Seconds | None = None,
        holder: str | None = None,
        labels: Mapping[str, str] | None = None,
        wait: Seconds = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> Claim:
        """Claim ``saga_id``, or the oldest claimable saga of ``kind``, waiting up to
        ``wait`` for one (the default timeout covers the wait).

        The claim holds either a live lease of the caller's (``fence``: it stays the
        caller's when the claim ends) or one created for it (``ttl``, ``holder``,
        ``labels``: released when the claim ends). Not retried: a repeat after a lost
        answer would claim again, and the first claim's lease would hold the saga."""
        if (saga_id is None) == (not kind):
            raise ValueError("give exactly one of saga_id and kind")
        t = self._transport
        request = saga_pb2.ClaimSagaRequest(
            namespace=t.ns(namespace), purpose=claim_purposes(purpose), wait=to_duration(wait)
        )
        if saga_id is not None:
            request.saga_id = saga_id
        else:
            request.kind = kind
        if fence is not None:
            if ttl is not None or holder is not None or labels is not None:
                raise ValueError(
                    "a claim under an existing lease (fence) takes no ttl, holder or labels"
                )
            request.existing_lease.CopyFrom(fence)
        elif ttl is None:
            raise ValueError("give fence (a lease of yours) or ttl (a lease for the claim)")
        else:
            request.new_lease.CopyFrom(
                saga_pb2.ClaimLeaseSpec(
                    holder=holder or t.holder, ttl=to_duration(ttl), labels=dict(labels or {})
                )
            )
        response, _ = await t.waiting(
            lambda e: e.saga.ClaimSaga, request, wait=seconds(wait), safe=False, timeout=timeout
        )
        return Claim(response.saga, response.lease, response.fence)

    async def record_step(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        index: int,
        name: str,
        status: str | StepStatus,
        *,
        output: object = None,
        error: str = "",
        compensation: saga_pb2.Compensation | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> StepRecorded:
        """Record step ``index`` started, succeeded or failed, with its ``output`` (JSON, or
        a ``google.protobuf.Value`` already made; sent only when not None) and the
        ``compensation`` that undoes it. Idempotent per step, status and attempt, so
        retried."""
        request = saga_pb2.RecordStepRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            fence=fence,
            index=index,
            name=name,
            status=step_statuses(status),
            error=error,
        )
        if isinstance(output, struct_pb2.Value):
            request.output.CopyFrom(output)
        elif output is not None:
            request.output.CopyFrom(to_value(output))
        if compensation is not None:
            request.compensation.CopyFrom(compensation)
        response = await self._transport.unary(
            lambda e: e.saga.RecordStep, request, safe=True, timeout=timeout
        )
        return StepRecorded(response.step, response.state, response.revision)

    async def heartbeat(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        *,
        progress: bytes = b"",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> SagaHeartbeat:
        """Renew the claim's lease and store ``progress`` for whoever resumes the saga.
        Retried, like a renewal: a repeat stores the same progress."""
        request = saga_pb2.HeartbeatSagaRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            fence=fence,
            progress=progress,
        )
        response = await self._transport.unary(
            lambda e: e.saga.HeartbeatSaga, request, safe=True, timeout=timeout
        )
        return SagaHeartbeat(
            to_datetime(response.expires_at), response.ttl.ToTimedelta(), response.state
        )

    async def complete(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        *,
        output: Mapping[str, object] | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> saga_pb2.Saga:
        """RUNNING → COMPLETED with ``output`` (JSON). A repeat under the same fence answers
        the saga as it is, so retried."""
        request = saga_pb2.CompleteSagaRequest(
            namespace=self._transport.ns(namespace), saga_id=saga_id, fence=fence
        )
        if output is not None:
            request.output.CopyFrom(to_struct(output))
        response = await self._transport.unary(
            lambda e: e.saga.CompleteSaga, request, safe=True, timeout=timeout
        )
        return response.saga

    async def fail(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        *,
        reason: str = "",
        retryable: bool = False,
        retry_after: Seconds = 0,
        hand_off: bool = False,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> saga_pb2.Saga:
        """Fail the claimed saga: to COMPENSATING (FAILED when nothing needs undoing), or
        claimable again after ``retry_after`` when ``retryable`` and attempts are left.
        ``hand_off`` ends the claim so a compensation worker runs the compensations. A
        repeat under the same fence answers the saga as it is, so retried."""
        request = saga_pb2.FailSagaRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            fence=fence,
            reason=reason,
            retryable=retryable,
            retry_after=to_duration(retry_after),
            hand_off=hand_off,
        )
        response = await self._transport.unary(
            lambda e: e.saga.FailSaga, request, safe=True, timeout=timeout
        )
        return response.saga

    async def record_compensation(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        step_index: int,
        status: str | CompensationStatus,
        *,
        error: str = "",
        attempt: int = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> CompensationRecorded:
        """Report one compensation attempt of step ``step_index`` (``"succeeded"`` or
        ``"failed"``). Retried only when it names its ``attempt``: with 0 ("the next one")
        a repeat would count another attempt."""
        request = saga_pb2.RecordCompensationRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            fence=fence,
            step_index=step_index,
            status=compensation_statuses(status),
            error=error,
            attempt=attempt,
        )
        response = await self._transport.unary(
            lambda e: e.saga.RecordCompensation, request, safe=attempt > 0, timeout=timeout
        )
        return CompensationRecorded(response.compensation, response.state, response.revision)

    async def cancel(
        self,
        saga_id: str,
        *,
        reason: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> saga_pb2.Saga:
        """PLANNED → CANCELLED; a saga that has run compensates instead. Not retried."""
        request = saga_pb2.CancelSagaRequest(
            namespace=self._transport.ns(namespace), saga_id=saga_id, reason=reason
        )
        response = await self._transport.unary(
            lambda e: e.saga.CancelSaga, request, safe=False, timeout=timeout
        )
        return response.saga

    async def quarantine(
        self,
        saga_id: str,
        *,
        reason: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> saga_pb2.Saga:
        """Operator: stop a saga for a human to look at (any state but a terminal one).
        Not retried."""
        request = saga_pb2.QuarantineSagaRequest(
            namespace=self._transport.ns(namespace), saga_id=saga_id, reason=reason
        )
        response = await self._transport.unary(
            lambda e: e.saga.QuarantineSaga, request, safe=False, timeout=timeout
        )
        return response.saga

    async def redrive(
        self,
        saga_id: str,
        *,
        mode: str | RedriveMode,
        reason: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> saga_pb2.Saga:
        """Operator: a QUARANTINED saga retries its compensations
        (``"retry-compensations"``) or resumes forward (``"resume"``) with fresh attempts.
        Not retried: a repeat would grant the attempts again."""
        request = saga_pb2.RedriveSagaRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            mode=redrive_modes(mode),
            reason=reason,
        )
        response = await self._transport.unary(
            lambda e: e.saga.RedriveSaga, request, safe=False, timeout=timeout
        )
        return response.saga

    async def mark_step_compensated(
        self,
        saga_id: str,
        step_index: int,
        *,
        reason: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> saga_pb2.Saga:
        """Operator: step ``step_index`` was compensated by hand. Not retried."""
        request = saga_pb2.MarkStepCompensatedRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            step_index=step_index,
            reason=reason,
        )
        response = await self._transport.unary(
            lambda e: e.saga.MarkStepCompensated, request, safe=False, timeout=timeout
        )
        return response.saga

    async def annotate(
        self,
        saga_id: str,
        text: str,
        *,
        attributes: Mapping[str, str] | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> common_pb2.Annotation:
        """Append an audit entry (terminal sagas too). Not retried: a repeat would append
        it twice."""
        request = saga_pb2.AnnotateSagaRequest(
            namespace=self._transport.ns(namespace),
            saga_id=saga_id,
            text=text,
            attributes=dict(attributes or {}),
        )
        response = await self._transport.unary(
            lambda e: e.saga.AnnotateSaga, request, safe=False, timeout=timeout
        )
        return response.annotation

    async def get(
        self, saga_id: str, *, namespace: str | None = None, timeout: Seconds | None = None
    ) -> saga_pb2.Saga:
        """A saga with its step log, compensations and annotations."""
        request = saga_pb2.GetSagaRequest(namespace=self._transport.ns(namespace), saga_id=saga_id)
        response = await self._transport.unary(
            lambda e: e.saga.GetSaga, request, safe=True, timeout=timeout
        )
        return response.saga

    def list(
        self,
        *,
        kind: str = "",
        states: str | SagaState | Iterable[str | SagaState] = (),
        labels: Mapping[str, str] | None = None,
        stale_only: bool = False,
        overdue_only: bool = False,
        page_size: int = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> AsyncIterator[saga_pb2.Saga]:
        """Every matching saga (without its logs), page after page (``states``: e.g.
        ``["running"]``; ``labels``: all must match; ``timeout`` bounds each page)."""
        request = saga_pb2.ListSagasRequest(
            namespace=self._transport.ns(namespace),
            states=saga_states.many(states),
            kind=kind,
            labels=dict(labels or {}),
            stale_only=stale_only,
            overdue_only=overdue_only,
            page_size=page_size,
        )
        return self._transport.pages(
            lambda e: e.saga.ListSagas, request, lambda page: page.sagas, timeout=timeout
        )

    def watch(
        self,
        *,
        kind: str = "",
        start_revision: int = 0,
        namespace: str | None = None,
    ) -> AsyncIterator[saga_pb2.SagaEvent]:
        """Saga events (of ``kind``, or all) in revision order from ``start_revision`` on
        (0: from now), resumed after a broken stream without loss or repeats;
        ``RevisionCompacted`` once that revision is purged.

        The stream opens at the first iteration: to miss nothing, read a revision first
        and pass the one after it."""
        ns = self._transport.ns(namespace)

        def open_stream(
            endpoint: Endpoint, revision: int, metadata: Metadata
        ) -> AsyncIterable[saga_pb2.WatchSagasResponse]:
            request = saga_pb2.WatchSagasRequest(namespace=ns, kind=kind, start_revision=revision)
            return endpoint.saga.WatchSagas(request, metadata=metadata)

        return self._transport.watch(open_stream, start_revision=start_revision)


__all__ = [
    "SagasClient",
    "claim_purposes",
    "compensation_statuses",
    "on_stale_policies",
    "redrive_modes",
    "saga_states",
    "step_statuses",
]
