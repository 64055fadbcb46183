"""Sagas and the decisions over them. Pure: no I/O, no clock of its own.

The store loads a saga (its row locked), its step log and compensation records, and the
claim's lease, asks these functions what to do, and writes the answer. A decision returns
the saga as it must become plus the rows to write; it raises a domain error when the call
is refused, so a refused call changes nothing. docs/sagas.md is the contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from tether_server.domain import errors
from tether_server.domain.lease import Lease, LeaseState, ended_error, not_holder
from tether_server.domain.time import format_us

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_COMPENSATION_ATTEMPTS = 3


class SagaState(StrEnum):
    PLANNED = "PLANNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"
    QUARANTINED = "QUARANTINED"
    CANCELLED = "CANCELLED"

    @property
    def proto_name(self) -> str:
        """The SagaState value name clients see (in Saga.state and in error metadata)."""
        return f"SAGA_STATE_{self.value}"


TERMINAL = frozenset(
    {
        SagaState.COMPLETED,
        SagaState.COMPENSATED,
        SagaState.FAILED,
        SagaState.QUARANTINED,
        SagaState.CANCELLED,
    }
)
# States whose claim can go stale, and that a deadline can still interrupt.
CLAIMED_STATES = frozenset({SagaState.RUNNING, SagaState.COMPENSATING})
DEADLINE_STATES = frozenset({SagaState.PLANNED, SagaState.RUNNING})


class OnStale(StrEnum):
    REQUEUE = "REQUEUE"
    COMPENSATE = "COMPENSATE"
    QUARANTINE = "QUARANTINE"


class Purpose(StrEnum):
    EXECUTE = "EXECUTE"
    COMPENSATE = "COMPENSATE"

    @property
    def proto_name(self) -> str:
        return f"CLAIM_PURPOSE_{self.value}"


class StepStatus(StrEnum):
    STARTED = "STARTED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class CompStatus(StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    EXHAUSTED = "EXHAUSTED"
    MANUAL = "MANUAL"


COMP_DONE = frozenset({CompStatus.SUCCEEDED, CompStatus.MANUAL})


class RedriveMode(StrEnum):
    RETRY_COMPENSATIONS = "RETRY_COMPENSATIONS"
    RESUME = "RESUME"


class SagaEventType(StrEnum):
    CREATED = "CREATED"
    CLAIMED = "CLAIMED"
    STEP_RECORDED = "STEP_RECORDED"
    STATE_CHANGED = "STATE_CHANGED"
    ANNOTATED = "ANNOTATED"
    COMPENSATION_RECORDED = "COMPENSATION_RECORDED"
    # A claim ended without a change of state (its lease ended: the saga is requeued).
    CLAIM_ENDED = "CLAIM_ENDED"


@dataclass(frozen=True)
class CompensationSpec:
    name: str
    payload: Any = None  # JSON value
    max_attempts: int = DEFAULT_COMPENSATION_ATTEMPTS


@dataclass(frozen=True)
class Step:
    index: int
    name: str
    status: StepStatus
    attempt: int
    output: Any = None  # JSON value
    error: str = ""
    compensation: CompensationSpec | None = None
    started_at_us: int | None = None
    finished_at_us: int | None = None


@dataclass(frozen=True)
class CompensationRecord:
    step_index: int
    name: str
    status: CompStatus
    attempts: int
    max_attempts: int
    payload: Any = None
    error: str = ""
    updated_at_us: int = 0
    marked_by: str = ""

    @property
    def done(self) -> bool:
        return self.status in COMP_DONE


@dataclass(frozen=True)
class Annotation:
    seq: int
    created_at_us: int
    author: str
    text: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    lease_id: str
    fencing_token: int
    purpose: Purpose
    holder: str
    principal: str
    # The claim created its lease (rather than using one of the caller's): the lease ends
    # with the claim.
    owns_lease: bool = False
    # False once the claim ended (completion, failure handed off, cancel, deadline,
    # operator): the fence is remembered so a retried Complete/Fail is recognised.
    active: bool = True


@dataclass(frozen=True)
class Saga:
    namespace: str
    saga_id: str
    kind: str
    state: SagaState
    created_at_us: int
    updated_at_us: int
    labels: Mapping[str, str] = field(default_factory=dict)
    input: Mapping[str, Any] = field(default_factory=dict)
    owner: Mapping[str, Any] | None = None
    on_stale: OnStale = OnStale.REQUEUE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    attempt: int = 0
    # Attempts counted before an operator's redrive: max_attempts counts from here.
    attempt_base: int = 0
    claim: Claim | None = None
    progress: bytes = b""
    output: Mapping[str, Any] | None = None
    failure_reason: str = ""
    not_before_us: int = 0
    deadline_us: int | None = None
    ended_at_us: int | None = None
    create_revision: int = 0
    mod_revision: int = 0
    fingerprint: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def has_run(self) -> bool:
        return self.attempt > 0

    def claim_live(self, lease: Lease | None, now_us: int) -> bool:
        """The claim is active and its lease live with the claim's token."""
        c = self.claim
        return (
            c is not None
            and c.active
            and lease is not None
            and lease.lease_id == c.lease_id
            and lease.fencing_token == c.fencing_token
            and lease.is_live(now_us)
        )

    def is_stale(self, lease: Lease | None, now_us: int) -> bool:
        return (
            self.state in CLAIMED_STATES
            and self.claim is not None
            and self.claim.active
            and not self.claim_live(lease, now_us)
        )

    def is_overdue(self, now_us: int) -> bool:
        return (
            self.state in DEADLINE_STATES
            and self.deadline_us is not None
            and now_us >= self.deadline_us
        )


@dataclass(frozen=True)
class Change:
    """What a decision writes: the saga's new row, steps and compensation records to upsert,
    compensation records to drop, the events to record, and an audit entry."""

    saga: Saga
    steps: Sequence[Step] = ()
    compensations: Sequence[CompensationRecord] = ()
    drop_compensations: bool = False
    events: Sequence[SagaEventType] = ()
    note: tuple[str, str] | None = None  # (author, text) for an annotation


@dataclass(frozen=True)
class NoChange:
    """An idempotent repeat: answer as things are."""

    saga: Saga


# ---- errors --------------------------------------------------------------------------------


def not_found(namespace: str, saga_id: str) -> errors.SagaNotFound:
    return errors.SagaNotFound(
        f"no saga {saga_id!r} in namespace {namespace!r}",
        {"saga_id": saga_id, "namespace": namespace},
    )


def terminal_error(saga: Saga) -> errors.SagaTerminal:
    return errors.SagaTerminal(
        f"saga {saga.saga_id!r} is {saga.state.value}: it accepts only annotations",
        {"saga_id": saga.saga_id, "state": saga.state.proto_name},
    )


def state_error(saga: Saga, why: str) -> errors.InvalidSagaState:
    return errors.InvalidSagaState(
        f"saga {saga.saga_id!r} is {saga.state.value}: {why}",
        {"saga_id": saga.saga_id, "state": saga.state.proto_name},
    )


def _stale_fence(saga: Saga, lease_id: str, token: int) -> errors.StaleFencingToken:
    facts = {"saga_id": saga.saga_id, "lease_id": lease_id, "presented_token": str(token)}
    if saga.claim is not None:
        facts["current_token"] = str(saga.claim.fencing_token)
    return errors.StaleFencingToken(
        f"lease {lease_id} with token {token} is not the current claim of saga {saga.saga_id!r}",
        facts,
    )


# ---- creation ------------------------------------------------------------------------------


def check_create_repeat(existing: Saga, fingerprint: str) -> None:
    if existing.fingerprint != fingerprint:
        raise errors.RequestIdConflict(
            f"saga {existing.saga_id!r} exists with a different body",
            {"saga_id": existing.saga_id},
        )


# ---- fencing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    lease_id: str
    fencing_token: int


def fence_matches(saga: Saga, fence: Fence) -> bool:
    c = saga.claim
    return c is not None and c.lease_id == fence.lease_id and c.fencing_token == fence.fencing_token


def check_fence(saga: Saga, fence: Fence, lease: Lease | None, principal: str, now_us: int) -> None:
    """Refuse a call made for a claim that is not the saga's live, current one."""
    if saga.terminal:
        raise terminal_error(saga)
    if not fence_matches(saga, fence):
        raise _stale_fence(saga, fence.lease_id, fence.fencing_token)
    assert saga.claim is not None
    if not saga.claim.active:
        if (
            lease is not None
            and lease.state is not LeaseState.RELEASED
            and not lease.is_live(now_us)
        ):
            # Its lease ran out (or was revoked) and a claim or a sweep ended the claim
            # since: the worker hears why, as it would have before the claim was ended.
            raise ended_error(lease, now_us)
        reason = saga.failure_reason or "the claim ended"
        raise state_error(saga, f"the claim ended ({reason})")
    if lease is None:
        raise errors.LeaseNotFound(
            f"the claim's lease {fence.lease_id} no longer exists",
            {"lease_id": fence.lease_id, "namespace": saga.namespace},
        )
    if lease.principal != principal:
        raise not_holder(lease, principal)
    if not lease.is_live(now_us):
        raise ended_error(lease, now_us)
    if saga.is_overdue(now_us):
        raise state_error(saga, f"its deadline {format_us(saga.deadline_us or 0)} has passed")


# ---- transitions shared by several calls ---------------------------------------------------


def _touch(saga: Saga, now_us: int, **changes: Any) -> Saga:
    return replace(saga, updated_at_us=now_us, **changes)


def _end_claim(saga: Saga) -> Claim | None:
    return replace(saga.claim, active=False) if saga.claim is not None else None


def _terminal(saga: Saga, state: SagaState, now_us: int, reason: str | None = None) -> Saga:
    return _touch(
        saga,
        now_us,
        state=state,
        claim=_end_claim(saga),
        ended_at_us=now_us,
        failure_reason=saga.failure_reason if reason is None else reason,
    )


def compensation_records(steps: Sequence[Step], now_us: int) -> list[CompensationRecord]:
    """One pending record per step that registered a compensation, last step first."""
    return [
        CompensationRecord(
            step_index=s.index,
            name=s.compensation.name,
            status=CompStatus.PENDING,
            attempts=0,
            max_attempts=s.compensation.max_attempts,
            payload=s.compensation.payload,
            updated_at_us=now_us,
        )
        for s in sorted(steps, key=lambda s: -s.index)
        if s.compensation is not None
    ]


def begin_compensation(
    saga: Saga,
    steps: Sequence[Step],
    reason: str,
    now_us: int,
    *,
    keep_claim: bool = False,
    cancelled: bool = False,
) -> Change:
    """To COMPENSATING with a record per registered compensation; with none, straight to
    FAILED (CANCELLED for a cancel)."""
    records = compensation_records(steps, now_us)
    if not records:
        state = SagaState.CANCELLED if cancelled else SagaState.FAILED
        return Change(_terminal(saga, state, now_us, reason), events=(SagaEventType.STATE_CHANGED,))
    claim = saga.claim if keep_claim else _end_claim(saga)
    new = _touch(saga, now_us, state=SagaState.COMPENSATING, claim=claim, failure_reason=reason)
    return Change(
        new,
        compensations=records,
        drop_compensations=True,
        events=(SagaEventType.STATE_CHANGED,),
    )


def _quarantine(saga: Saga, reason: str, now_us: int) -> Change:
    return Change(
        _terminal(saga, SagaState.QUARANTINED, now_us, reason),
        events=(SagaEventType.STATE_CHANGED,),
    )


def attempts_left(saga: Saga) -> bool:
    return saga.attempt - saga.attempt_base < saga.max_attempts


# ---- stale claims and deadlines ------------------------------------------------------------


def apply_stale_policy(saga: Saga, steps: Sequence[Step], now_us: int) -> Change:
    """The saga's claim went stale: what its on-stale policy makes of it."""
    assert saga.claim is not None
    who = f"the claim of {saga.claim.holder!r} (lease {saga.claim.lease_id}) went stale"
    if saga.on_stale is OnStale.QUARANTINE:
        return _quarantine(saga, f"{who}; policy QUARANTINE", now_us)
    if saga.state is SagaState.COMPENSATING or (
        saga.on_stale is OnStale.REQUEUE and attempts_left(saga)
    ):
        ended = _touch(saga, now_us, claim=_end_claim(saga))
        return Change(ended, events=(SagaEventType.CLAIM_ENDED,))
    if saga.on_stale is OnStale.REQUEUE:
        why = f"{who} after {saga.attempt - saga.attempt_base} of {saga.max_attempts} attempts"
    else:
        why = f"{who}; policy COMPENSATE"
    return begin_compensation(saga, steps, why, now_us)


def apply_deadline(saga: Saga, steps: Sequence[Step], now_us: int) -> Change:
    assert saga.deadline_us is not None
    reason = f"deadline {format_us(saga.deadline_us)} passed"
    return begin_compensation(saga, steps, reason, now_us)


def settle(saga: Saga, steps: Sequence[Step], lease: Lease | None, now_us: int) -> Change | None:
    """What time alone has decided for the saga (a passed deadline, a stale claim), to be
    written before anything else is decided; None when nothing."""
    if saga.is_overdue(now_us):
        return apply_deadline(saga, steps, now_us)
    if saga.is_stale(lease, now_us):
        return apply_stale_policy(saga, steps, now_us)
    return None


# ---- claims --------------------------------------------------------------------------------


def claimable_error(
    saga: Saga, purpose: Purpose, lease: Lease | None, now_us: int
) -> errors.TetherError | None:
    """Why the (settled) saga cannot be claimed for ``purpose``; None when it can."""
    if saga.terminal:
        return terminal_error(saga)
    if saga.claim is not None and saga.claim.active:
        facts = {"saga_id": saga.saga_id, "holder": saga.claim.holder}
        if lease is not None:
            facts["expires_at"] = format_us(lease.expires_at_us)
        return errors.SagaClaimed(
            f"saga {saga.saga_id!r} is claimed by {saga.claim.holder!r}", facts
        )
    if purpose is Purpose.EXECUTE:
        if saga.state is SagaState.PLANNED:
            if now_us < saga.not_before_us:
                return errors.NothingClaimable(
                    f"saga {saga.saga_id!r} is not claimable before "
                    f"{format_us(saga.not_before_us)}",
                    {"saga_id": saga.saga_id, "not_before": format_us(saga.not_before_us)},
                )
            return None
        if saga.state is SagaState.RUNNING:
            return None
        return state_error(saga, "only PLANNED or requeued RUNNING sagas run")
    if saga.state is SagaState.COMPENSATING:
        return None
    return state_error(saga, "only COMPENSATING sagas are claimed for compensation")


def claim(saga: Saga, new_claim: Claim, now_us: int) -> Change:
    attempt = saga.attempt + 1 if new_claim.purpose is Purpose.EXECUTE else saga.attempt
    state = SagaState.RUNNING if new_claim.purpose is Purpose.EXECUTE else saga.state
    new = _touch(saga, now_us, state=state, claim=new_claim, attempt=attempt)
    return Change(new, events=(SagaEventType.CLAIMED,))


# ---- steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepReport:
    index: int
    name: str
    status: StepStatus
    output: Any = None
    error: str = ""
    compensation: CompensationSpec | None = None


def record_step(
    saga: Saga, steps: Mapping[int, Step], report: StepReport, now_us: int, max_steps: int
) -> Change | NoChange:
    if saga.state is not SagaState.RUNNING:
        raise state_error(saga, "steps are recorded only while RUNNING")
    existing = steps.get(report.index)
    if existing is None:
        if report.index != len(steps):
            raise errors.InvalidField(
                "index", f"the next step of saga {saga.saga_id!r} is {len(steps)}"
            )
        if report.index >= max_steps:
            raise errors.InvalidField("index", f"a saga has at most {max_steps} steps")
        step = Step(
            index=report.index,
            name=report.name,
            status=report.status,
            attempt=saga.attempt,
            output=report.output,
            error=report.error,
            compensation=report.compensation,
            started_at_us=now_us,
            finished_at_us=None if report.status is StepStatus.STARTED else now_us,
        )
        return _step_change(saga, step, now_us)
    if existing.name != report.name:
        raise _step_conflict(
            saga, existing, f"step {existing.index} is {existing.name!r}, not {report.name!r}"
        )
    if existing.status is report.status and (
        existing.attempt == saga.attempt or existing.status is StepStatus.SUCCEEDED
    ):
        return NoChange(saga)
    if existing.status is StepStatus.SUCCEEDED:
        raise _step_conflict(
            saga,
            existing,
            f"step {existing.index} ({existing.name!r}) succeeded in attempt "
            f"{existing.attempt}; it is not run again",
        )
    started = report.status is StepStatus.STARTED
    step = replace(
        existing,
        status=report.status,
        attempt=saga.attempt,
        output=report.output,
        error=report.error,
        compensation=report.compensation or existing.compensation,
        started_at_us=now_us if started else existing.started_at_us,
        finished_at_us=None if started else now_us,
    )
    return _step_change(saga, step, now_us)


def _step_change(saga: Saga, step: Step, now_us: int) -> Change:
    return Change(_touch(saga, now_us), steps=(step,), events=(SagaEventType.STEP_RECORDED,))


def _step_conflict(saga: Saga, step: Step, message: str) -> errors.StepConflict:
    return errors.StepConflict(
        message, {"saga_id": saga.saga_id, "step_index": str(step.index), "step": step.name}
    )


# ---- completion and failure ----------------------------------------------------------------


def complete(saga: Saga, output: Mapping[str, Any] | None, now_us: int) -> Change:
    if saga.state is not SagaState.RUNNING:
        raise state_error(saga, "only a RUNNING saga completes")
    new = _terminal(saga, SagaState.COMPLETED, now_us, reason="")
    return Change(replace(new, output=output), events=(SagaEventType.STATE_CHANGED,))


@dataclass(frozen=True)
class Failure:
    reason: str
    retryable: bool = False
    retry_after_us: int = 0
    hand_off: bool = False


def fail(saga: Saga, steps: Sequence[Step], failure: Failure, now_us: int) -> Change:
    if saga.state is not SagaState.RUNNING:
        raise state_error(saga, "only a RUNNING saga fails")
    if failure.retryable and attempts_left(saga):
        new = _touch(
            saga,
            now_us,
            state=SagaState.PLANNED,
            claim=_end_claim(saga),
            failure_reason=failure.reason,
            not_before_us=now_us + failure.retry_after_us,
        )
        return Change(new, events=(SagaEventType.STATE_CHANGED,))
    return begin_compensation(saga, steps, failure.reason, now_us, keep_claim=not failure.hand_off)


def is_repeat_of_end(saga: Saga, fence: Fence, *, completing: bool, reason: str = "") -> bool:
    """A retried CompleteSaga / FailSaga whose first attempt took effect (same fence)."""
    if not fence_matches(saga, fence):
        return False
    if completing:
        return saga.state is SagaState.COMPLETED
    return (
        saga.state not in (SagaState.RUNNING, SagaState.COMPLETED) and saga.failure_reason == reason
    )


# ---- compensations -------------------------------------------------------------------------


def next_compensation(records: Sequence[CompensationRecord]) -> CompensationRecord | None:
    pending = [r for r in records if not r.done]
    return max(pending, key=lambda r: r.step_index) if pending else None


def record_compensation(
    saga: Saga,
    records: Mapping[int, CompensationRecord],
    step_index: int,
    succeeded: bool,
    error: str,
    attempt: int,
    now_us: int,
) -> Change | NoChange:
    if saga.state is not SagaState.COMPENSATING:
        raise state_error(saga, "compensations are recorded only while COMPENSATING")
    record = records.get(step_index)
    if record is None:
        raise errors.StepNotFound(
            f"saga {saga.saga_id!r} has no compensation for step {step_index}",
            {"saga_id": saga.saga_id, "step_index": str(step_index)},
        )
    attempt = attempt or record.attempts + 1
    if attempt <= record.attempts or record.done:
        return NoChange(saga)
    if attempt > record.attempts + 1:
        raise errors.InvalidField(
            "attempt", f"the next attempt of this compensation is {record.attempts + 1}"
        )
    following = next_compensation(list(records.values()))
    if following is not None and following.step_index != step_index:
        raise errors.CompensationOutOfOrder(
            f"compensations run in reverse step order: step {following.step_index} is next",
            {"saga_id": saga.saga_id, "next_step_index": str(following.step_index)},
        )
    if succeeded:
        updated = replace(
            record, status=CompStatus.SUCCEEDED, attempts=attempt, error="", updated_at_us=now_us
        )
    else:
        status = CompStatus.EXHAUSTED if attempt >= record.max_attempts else CompStatus.FAILED
        updated = replace(
            record, status=status, attempts=attempt, error=error, updated_at_us=now_us
        )
    return _after_compensation(saga, {**records, step_index: updated}, updated, now_us)


def _after_compensation(
    saga: Saga,
    records: Mapping[int, CompensationRecord],
    updated: CompensationRecord,
    now_us: int,
) -> Change:
    events = (SagaEventType.COMPENSATION_RECORDED,)
    if all(r.done for r in records.values()):
        new = _terminal(saga, SagaState.COMPENSATED, now_us)
        return Change(new, compensations=(updated,), events=(*events, SagaEventType.STATE_CHANGED))
    if updated.status is CompStatus.EXHAUSTED:
        reason = (
            f"compensation {updated.name!r} of step {updated.step_index} failed "
            f"{updated.attempts} times: {updated.error}"
        )
        new = _terminal(saga, SagaState.QUARANTINED, now_us, reason)
        return Change(new, compensations=(updated,), events=(*events, SagaEventType.STATE_CHANGED))
    return Change(_touch(saga, now_us), compensations=(updated,), events=events)


# ---- cancel and operator actions -----------------------------------------------------------


def cancel(
    saga: Saga, steps: Sequence[Step], reason: str, author: str, now_us: int
) -> Change | NoChange:
    if saga.state is SagaState.CANCELLED:
        return NoChange(saga)
    if saga.terminal:
        raise terminal_error(saga)
    if saga.state is SagaState.COMPENSATING:
        return NoChange(saga)  # its compensations already run to the end
    why = f"cancelled by {author}" + (f": {reason}" if reason else "")
    note = (author, f"cancel: {reason}" if reason else "cancel")
    if not saga.has_run:
        change = Change(
            _terminal(saga, SagaState.CANCELLED, now_us, why),
            events=(SagaEventType.STATE_CHANGED,),
        )
    else:
        change = begin_compensation(saga, steps, why, now_us, cancelled=True)
    return replace(change, note=note)


def quarantine(saga: Saga, reason: str, author: str, now_us: int) -> Change | NoChange:
    if saga.state is SagaState.QUARANTINED:
        return NoChange(saga)
    if saga.terminal:
        raise terminal_error(saga)
    why = f"quarantined by {author}" + (f": {reason}" if reason else "")
    return replace(_quarantine(saga, why, now_us), note=(author, f"quarantine: {reason}"))


def redrive(
    saga: Saga,
    steps: Sequence[Step],
    records: Sequence[CompensationRecord],
    mode: RedriveMode,
    reason: str,
    author: str,
    now_us: int,
) -> Change:
    if saga.state is not SagaState.QUARANTINED:
        if saga.terminal:
            raise terminal_error(saga)
        raise state_error(saga, "only a QUARANTINED saga is redriven")
    note = (author, f"redrive {mode.value}: {reason}")
    # The fence of the claim before the quarantine is forgotten: no retry of that worker's
    # CompleteSaga or FailSaga can be mistaken for a repeat now.
    reopened = replace(saga, ended_at_us=None, claim=None)
    if mode is RedriveMode.RESUME:
        if any(r.done or r.attempts > 0 for r in records):
            raise state_error(saga, "compensations have run; it cannot resume forward")
        new = _touch(
            reopened,
            now_us,
            state=SagaState.PLANNED,
            attempt_base=saga.attempt,
            not_before_us=now_us,
            failure_reason="",
        )
        return Change(
            new, drop_compensations=True, events=(SagaEventType.STATE_CHANGED,), note=note
        )
    if not records:
        change = begin_compensation(reopened, steps, saga.failure_reason, now_us)
        return replace(change, note=note)
    fresh = [
        r if r.done else replace(r, status=CompStatus.PENDING, attempts=0, updated_at_us=now_us)
        for r in records
    ]
    new = _touch(reopened, now_us, state=SagaState.COMPENSATING)
    return Change(new, compensations=fresh, events=(SagaEventType.STATE_CHANGED,), note=note)


def mark_compensated(
    saga: Saga,
    steps: Sequence[Step],
    records: Mapping[int, CompensationRecord],
    step_index: int,
    reason: str,
    author: str,
    now_us: int,
) -> Change | NoChange:
    if saga.state not in (SagaState.COMPENSATING, SagaState.QUARANTINED):
        if saga.terminal:
            raise terminal_error(saga)
        raise state_error(saga, "only COMPENSATING or QUARANTINED sagas have compensations")
    base_records = dict(records) or {r.step_index: r for r in compensation_records(steps, now_us)}
    record = base_records.get(step_index)
    if record is None:
        raise errors.StepNotFound(
            f"saga {saga.saga_id!r} has no compensation for step {step_index}",
            {"saga_id": saga.saga_id, "step_index": str(step_index)},
        )
    if record.done:
        return NoChange(saga)
    updated = replace(record, status=CompStatus.MANUAL, marked_by=author, updated_at_us=now_us)
    merged = {**base_records, step_index: updated}
    note = (author, f"step {step_index} ({record.name}) compensated by hand: {reason}")
    if all(r.done for r in merged.values()):
        change = Change(
            _terminal(saga, SagaState.COMPENSATED, now_us),
            compensations=list(merged.values()),
            events=(SagaEventType.COMPENSATION_RECORDED, SagaEventType.STATE_CHANGED),
        )
    else:
        change = Change(
            _touch(saga, now_us),
            compensations=list(merged.values()),
            events=(SagaEventType.COMPENSATION_RECORDED,),
        )
    return replace(change, note=note)
