"""tether.v1.SagaService: protobuf in, saga store calls, protobuf out. No decisions here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tether_client.pb import common_pb2, saga_pb2
from tether_server.auth import Principal, current_principal
from tether_server.clock import MICROS, Clock
from tether_server.domain import errors, paging, validation
from tether_server.domain import saga as domain
from tether_server.domain import saga_validation as sv
from tether_server.domain.saga_validation import SagaLimits
from tether_server.domain.validation import Limits
from tether_server.notify import ChangeHub
from tether_server.services import saga_convert as conv
from tether_server.services.convert import duration_us, lease_to_pb, to_duration, to_timestamp
from tether_server.services.limits import ServerLimits
from tether_server.services.streaming import (
    Drains,
    Follow,
    WatchSlots,
    count_fitting,
    first_of,
    follow_events,
)
from tether_server.store.sagas import (
    Claimed,
    ClaimParams,
    CreateParams,
    Fenced,
    ListSagasParams,
    NewLease,
    OperatorCall,
    Refused,
    SagaEventRecord,
    SagaStore,
)
from tether_server.store.sagas.rows import AREA

Context = Any  # grpc.aio.ServicerContext


@dataclass(frozen=True)
class SagaServiceConfig:
    limits: Limits = field(default_factory=Limits)
    saga_limits: SagaLimits = field(default_factory=SagaLimits)
    # How often a waiting claim or a watch looks at the store when nothing in this process
    # woke it (changes through other replicas, leases that expired).
    poll_interval_s: float = 1.0
    watch_batch_size: int = 500
    max_response_bytes: int = 1 << 20


class SagaService(Drains):
    def __init__(
        self,
        store: SagaStore,
        clock: Clock,
        changes: ChangeHub,
        config: SagaServiceConfig | None = None,
        watches: WatchSlots | None = None,
        instance_id: str = "",
    ) -> None:
        self._store = store
        self._clock = clock
        self._changes = changes
        self._config = config or SagaServiceConfig()
        # Shared with the other services of the server: the watch cap counts them together.
        self._watches = watches or WatchSlots(ServerLimits().max_watches_per_principal)
        super().__init__(instance_id)

    @property
    def _limits(self) -> SagaLimits:
        return self._config.saga_limits

    # ---- create and claim -----------------------------------------------------------

    async def CreateSaga(
        self, request: saga_pb2.CreateSagaRequest, context: Context
    ) -> saga_pb2.CreateSagaResponse:
        limits = self._limits
        params = CreateParams(
            namespace=validation.namespace(request.namespace),
            saga_id=sv.saga_id(request.saga_id),
            kind=sv.kind(request.kind),
            principal=current_principal().name,
            labels=validation.labels(request.labels, self._config.limits),
            input=conv.struct_to_dict(request.input, "input", limits.max_input_bytes),
            owner=_owner(request),
            on_stale=domain.OnStale.REQUEUE
            if request.on_stale == saga_pb2.ON_STALE_POLICY_UNSPECIFIED
            else conv.enum_value(
                conv.ON_STALE_FROM_PB, request.on_stale, "on_stale", "on-stale policy"
            ),
            max_attempts=sv.attempts(
                request.max_attempts,
                domain.DEFAULT_MAX_ATTEMPTS,
                limits.max_attempts,
                "max_attempts",
            ),
            deadline_us=_timestamp_us(request, "deadline"),
        )
        created = await self._store.create(params)
        return saga_pb2.CreateSagaResponse(
            saga=conv.view_to_pb(created.view), created=created.created
        )

    async def ClaimSaga(
        self, request: saga_pb2.ClaimSagaRequest, context: Context
    ) -> saga_pb2.ClaimSagaResponse:
        params = self._claim_params(request, current_principal())
        limits = self._config.limits
        wait_us = validation.wait(duration_us(request.wait, "wait"), limits)
        wait_until = self._clock.now_us() + wait_us
        prefix = f"{params.kind}/" if params.kind else ""
        with self._changes.watch_prefix(AREA, params.namespace, prefix) as changed:
            while True:
                changed.clear()
                outcome = await self._store.claim(params)
                if isinstance(outcome, Claimed):
                    return _claimed_to_pb(outcome)
                if not _worth_waiting(outcome):
                    raise outcome.error
                now = self._clock.now_us()
                if now >= wait_until:
                    raise outcome.error
                # Wake on a saga change (here or through NOTIFY), at the saga's not-before,
                # or at the poll interval: leases that end free stale sagas silently.
                until = min(wait_until, outcome.retry_at_us or wait_until)
                timeout = max(0.001, min((until - now) / MICROS, self._config.poll_interval_s))
                await first_of(changed.wait(), self._draining.wait(), self._clock.sleep(timeout))
                self._check_draining()

    def _claim_params(self, request: saga_pb2.ClaimSagaRequest, who: Principal) -> ClaimParams:
        namespace = validation.namespace(request.namespace)
        target = request.WhichOneof("target")
        if target is None:
            raise errors.InvalidField("target", "name a saga_id or a kind")
        purpose = conv.enum_value(
            conv.PURPOSE_FROM_PB, request.purpose, "purpose", "claim purpose (EXECUTE/COMPENSATE)"
        )
        which = request.WhichOneof("lease")
        existing = new_lease = None
        if which == "existing_lease":
            existing = _fence(request.existing_lease, "existing_lease")
        elif which == "new_lease":
            spec = request.new_lease
            limits = self._config.limits
            new_lease = NewLease(
                holder=validation.holder(spec.holder, limits, "new_lease.holder"),
                ttl_us=validation.ttl(
                    duration_us(spec.ttl, "new_lease.ttl"), limits, "new_lease.ttl"
                ),
                labels=validation.labels(spec.labels, limits),
            )
        else:
            raise errors.InvalidField("lease", "give existing_lease or new_lease")
        return ClaimParams(
            namespace=namespace,
            purpose=purpose,
            principal=who.name,
            saga_id=sv.saga_id(request.saga_id) if target == "saga_id" else "",
            kind=sv.kind(request.kind) if target == "kind" else "",
            existing=existing,
            new_lease=new_lease,
        )

    # ---- fenced calls ---------------------------------------------------------------

    def _fenced(self, request: Any, context: Context) -> Fenced:
        if not request.HasField("fence"):
            raise errors.InvalidField("fence", "is required: the fence of the claim")
        return Fenced(
            namespace=validation.namespace(request.namespace),
            saga_id=sv.saga_id(request.saga_id),
            fence=_fence(request.fence, "fence"),
            principal=current_principal().name,
        )

    async def RecordStep(
        self, request: saga_pb2.RecordStepRequest, context: Context
    ) -> saga_pb2.RecordStepResponse:
        limits = self._limits
        fenced = self._fenced(request, context)
        compensation = None
        if request.HasField("compensation"):
            compensation = _compensation(request.compensation, limits)
        report = domain.StepReport(
            index=sv.index(request.index, limits),
            name=sv.step_name(request.name, limits),
            status=conv.enum_value(
                conv.STEP_STATUS_FROM_PB, request.status, "status", "step status"
            ),
            output=conv.value_to_python(request.output, "output", limits.max_output_bytes),
            error=sv.text(request.error, limits.max_error_bytes, "error"),
            compensation=compensation,
        )
        recorded = await self._store.record_step(fenced, report)
        return saga_pb2.RecordStepResponse(
            step=conv.step_to_pb(recorded.step),
            state=conv.STATE_TO_PB[recorded.state],
            revision=recorded.revision,
        )

    async def HeartbeatSaga(
        self, request: saga_pb2.HeartbeatSagaRequest, context: Context
    ) -> saga_pb2.HeartbeatSagaResponse:
        fenced = self._fenced(request, context)
        progress = validation.progress(request.progress, self._config.limits)
        beat = await self._store.heartbeat(fenced, progress if request.progress else None)
        return saga_pb2.HeartbeatSagaResponse(
            expires_at=to_timestamp(beat.expires_at_us),
            ttl=to_duration(beat.ttl_us),
            state=conv.STATE_TO_PB[beat.state],
        )

    async def CompleteSaga(
        self, request: saga_pb2.CompleteSagaRequest, context: Context
    ) -> saga_pb2.CompleteSagaResponse:
        fenced = self._fenced(request, context)
        output = None
        if request.HasField("output"):
            output = conv.struct_to_dict(request.output, "output", self._limits.max_output_bytes)
        view = await self._store.complete(fenced, output)
        return saga_pb2.CompleteSagaResponse(saga=conv.view_to_pb(view))

    async def FailSaga(
        self, request: saga_pb2.FailSagaRequest, context: Context
    ) -> saga_pb2.FailSagaResponse:
        fenced = self._fenced(request, context)
        retry_after = duration_us(request.retry_after, "retry_after")
        if not 0 <= retry_after <= self._config.limits.max_ttl_us:
            raise errors.InvalidField(
                "retry_after",
                f"must be between 0s and {self._config.limits.max_ttl_us // 1_000_000}s"
                " (the server's --max-ttl)",
            )
        failure = domain.Failure(
            reason=sv.text(request.reason, self._limits.max_error_bytes, "reason"),
            retryable=request.retryable,
            retry_after_us=retry_after,
            hand_off=request.hand_off,
        )
        view = await self._store.fail(fenced, failure)
        return saga_pb2.FailSagaResponse(saga=conv.view_to_pb(view))

    async def RecordCompensation(
        self, request: saga_pb2.RecordCompensationRequest, context: Context
    ) -> saga_pb2.RecordCompensationResponse:
        fenced = self._fenced(request, context)
        if request.status == saga_pb2.COMPENSATION_STATUS_SUCCEEDED:
            succeeded = True
        elif request.status == saga_pb2.COMPENSATION_STATUS_FAILED:
            succeeded = False
        else:
            raise errors.InvalidField("status", "must be SUCCEEDED or FAILED")
        if request.attempt < 0:
            raise errors.InvalidField("attempt", "must not be negative")
        recorded = await self._store.record_compensation(
            fenced,
            sv.index(request.step_index, self._limits, "step_index"),
            succeeded,
            sv.text(request.error, self._limits.max_error_bytes, "error"),
            request.attempt,
        )
        return saga_pb2.RecordCompensationResponse(
            compensation=conv.comp_to_pb(recorded.record),
            state=conv.STATE_TO_PB[recorded.state],
            revision=recorded.revision,
        )

    # ---- cancel and operator calls --------------------------------------------------

    def _operator_call(self, request: Any, context: Context) -> OperatorCall:
        # The RPC boundary has checked the caller's role for this call (domain/access.py).
        who = current_principal()
        return OperatorCall(
            namespace=validation.namespace(request.namespace),
            saga_id=sv.saga_id(request.saga_id),
            author=who.name,
            reason=validation.reason(getattr(request, "reason", ""), self._config.limits),
        )

    async def CancelSaga(
        self, request: saga_pb2.CancelSagaRequest, context: Context
    ) -> saga_pb2.CancelSagaResponse:
        view = await self._store.cancel(self._operator_call(request, context))
        return saga_pb2.CancelSagaResponse(saga=conv.view_to_pb(view))

    async def QuarantineSaga(
        self, request: saga_pb2.QuarantineSagaRequest, context: Context
    ) -> saga_pb2.QuarantineSagaResponse:
        view = await self._store.quarantine(self._operator_call(request, context))
        return saga_pb2.QuarantineSagaResponse(saga=conv.view_to_pb(view))

    async def RedriveSaga(
        self, request: saga_pb2.RedriveSagaRequest, context: Context
    ) -> saga_pb2.RedriveSagaResponse:
        call = self._operator_call(request, context)
        mode = conv.enum_value(
            conv.REDRIVE_FROM_PB, request.mode, "mode", "redrive mode (RETRY_COMPENSATIONS/RESUME)"
        )
        view = await self._store.redrive(call, mode)
        return saga_pb2.RedriveSagaResponse(saga=conv.view_to_pb(view))

    async def MarkStepCompensated(
        self, request: saga_pb2.MarkStepCompensatedRequest, context: Context
    ) -> saga_pb2.MarkStepCompensatedResponse:
        call = self._operator_call(request, context)
        if not call.reason:
            raise errors.InvalidField("reason", "must say why the step counts as compensated")
        step_index = sv.index(request.step_index, self._limits, "step_index")
        view = await self._store.mark_compensated(call, step_index)
        return saga_pb2.MarkStepCompensatedResponse(saga=conv.view_to_pb(view))

    async def AnnotateSaga(
        self, request: saga_pb2.AnnotateSagaRequest, context: Context
    ) -> saga_pb2.AnnotateSagaResponse:
        call = self._operator_call(request, context)
        if not request.text:
            raise errors.InvalidField("text", "must not be empty")
        text = sv.text(request.text, self._limits.max_annotation_bytes, "text")
        attributes = sv.attributes(request.attributes, self._limits)
        annotated = await self._store.annotate(call, text, attributes)
        return saga_pb2.AnnotateSagaResponse(
            annotation=conv.annotation_to_pb(annotated.annotation), revision=annotated.revision
        )

    # ---- reads ----------------------------------------------------------------------

    async def GetSaga(
        self, request: saga_pb2.GetSagaRequest, context: Context
    ) -> saga_pb2.GetSagaResponse:
        view = await self._store.get(
            validation.namespace(request.namespace), sv.saga_id(request.saga_id)
        )
        return saga_pb2.GetSagaResponse(saga=conv.view_to_pb(view))

    async def ListSagas(
        self, request: saga_pb2.ListSagasRequest, context: Context
    ) -> saga_pb2.ListSagasResponse:
        limits = self._config.limits
        namespace = validation.namespace(request.namespace)
        states = frozenset(
            conv.enum_value(conv.STATE_FROM_PB, s, "states", "saga state") for s in request.states
        )
        kind = sv.kind(request.kind, required=False)
        labels = validation.labels(request.labels, limits)
        size = validation.page_size(request.page_size, limits)
        digest = paging.query_digest(
            "sagas",
            namespace,
            sorted(s.value for s in states),
            kind,
            sorted(labels.items()),
            request.stale_only,
            request.overdue_only,
        )
        after = paging.int_and_id(paging.decode(request.page_token, digest), sv.saga_id)
        page = await self._store.list(
            ListSagasParams(
                namespace=namespace,
                states=states,
                kind=kind,
                labels=labels,
                stale_only=request.stale_only,
                overdue_only=request.overdue_only,
                limit=size + 1,
                after=after,
            )
        )
        messages = [conv.view_to_pb(v, logs=False) for v in page[:size]]
        fits = count_fitting(messages, self._config.max_response_bytes)
        response = saga_pb2.ListSagasResponse(sagas=messages[:fits])
        if fits < len(page):
            last = page[fits - 1].saga
            response.next_page_token = paging.encode([last.created_at_us, last.saga_id], digest)
        return response

    async def WatchSagas(
        self, request: saga_pb2.WatchSagasRequest, context: Context
    ) -> AsyncIterator[saga_pb2.WatchSagasResponse]:
        namespace = validation.namespace(request.namespace)
        kind = sv.kind(request.kind, required=False)
        start = validation.revision(request.start_revision)
        self._watches.take(current_principal().name, context)
        if start == 0:
            current, _ = await self._store.db.current_revision()
            start = current + 1
        page = await self._store.events_since(namespace, kind, start, limit=0)
        yield saga_pb2.WatchSagasResponse(
            header_revision=page.header_revision, compact_revision=page.compact_revision
        )
        prefix = f"{kind}/" if kind else ""
        with self._changes.watch_prefix(AREA, namespace, prefix) as changed:
            follow = Follow(
                read=lambda rev, limit: self._store.events_since(namespace, kind, rev, limit),
                convert=_event_to_pb,
                respond=lambda head, compact, events: saga_pb2.WatchSagasResponse(
                    header_revision=head, compact_revision=compact, events=events
                ),
                changed=changed,
                draining=self._draining,
                check_draining=self._check_draining,
                batch_size=self._config.watch_batch_size,
                poll_interval_s=self._config.poll_interval_s,
                max_response_bytes=self._config.max_response_bytes,
            )
            async for response in follow_events(follow, start):
                yield response


# ---- helpers ---------------------------------------------------------------------------


def _fence(message: common_pb2.Fence, field_name: str) -> domain.Fence:
    return domain.Fence(
        lease_id=validation.lease_id(message.lease_id, f"{field_name}.lease_id"),
        fencing_token=validation.fencing_token(
            message.fencing_token, f"{field_name}.fencing_token"
        ),
    )


def _compensation(message: saga_pb2.Compensation, limits: SagaLimits) -> domain.CompensationSpec:
    return domain.CompensationSpec(
        name=sv.step_name(message.name, limits, "compensation.name"),
        payload=conv.value_to_python(
            message.payload, "compensation.payload", limits.max_output_bytes
        ),
        max_attempts=sv.attempts(
            message.max_attempts,
            domain.DEFAULT_COMPENSATION_ATTEMPTS,
            limits.max_compensation_attempts,
            "compensation.max_attempts",
        ),
    )


def _owner(request: saga_pb2.CreateSagaRequest) -> dict[str, Any] | None:
    if not request.HasField("owner"):
        return None
    o = request.owner
    sv.owner(o.kind, o.name, o.uid)
    return {
        "kind": o.kind,
        "name": o.name,
        "uid": o.uid,
        "controller": o.controller,
        "block_owner_deletion": o.block_owner_deletion,
    }


# Timestamps the store can hold: year 1 to 9999, as protobuf allows.
_MIN_TS, _MAX_TS = -62_135_596_800, 253_402_300_799


def _timestamp_us(request: Any, field_name: str) -> int | None:
    if not request.HasField(field_name):
        return None
    ts = getattr(request, field_name)
    if not (_MIN_TS <= ts.seconds <= _MAX_TS and 0 <= ts.nanos < 1_000_000_000):
        raise errors.InvalidField(field_name, "is not a valid Timestamp")
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def _worth_waiting(refused: Refused) -> bool:
    """Refusals a long-poll waits out: nothing claimable yet, or claimed by a lease that
    may end. Everything else (bad lease, terminal saga) answers at once."""
    return isinstance(refused.error, errors.NothingClaimable | errors.SagaClaimed)


def _claimed_to_pb(claimed: Claimed) -> saga_pb2.ClaimSagaResponse:
    lease = claimed.lease
    return saga_pb2.ClaimSagaResponse(
        saga=conv.view_to_pb(claimed.view),
        lease=lease_to_pb(lease),
        fence=common_pb2.Fence(lease_id=lease.lease_id, fencing_token=lease.fencing_token),
    )


def _event_to_pb(event: SagaEventRecord) -> saga_pb2.SagaEvent:
    message = saga_pb2.SagaEvent(
        revision=event.revision,
        type=conv.EVENT_TO_PB[event.type],
        saga=conv.saga_to_pb(event.saga),
        occurred_at=to_timestamp(event.occurred_at_us),
    )
    if event.step is not None:
        message.step.CopyFrom(conv.step_to_pb(event.step))
    if event.compensation is not None:
        message.compensation.CopyFrom(conv.comp_to_pb(event.compensation))
    return message
