"""Saga units of work: each locks the saga row, asks domain/saga.py, writes the answer.

Lock order: saga row, then the lease key and lease (a claim that creates its lease) or the
lease alone. Lease units never lock a saga, so the order has no cycle.

A claim writes what time alone decided (a passed deadline, a stale claim's policy) even
when it then refuses: those units return the refusal instead of raising it, so the
settled state commits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tether_server.domain import errors
from tether_server.domain import saga as domain
from tether_server.domain.lease import (
    Lease,
    LeaseState,
    Refuse,
    ended_error,
    not_holder,
    stale_token,
)
from tether_server.domain.saga import (
    Annotation,
    Change,
    Claim,
    CompensationRecord,
    Fence,
    NoChange,
    Purpose,
    Saga,
    SagaEventType,
    SagaState,
    Step,
)
from tether_server.store.leases import keys
from tether_server.store.leases import rows as lease_rows
from tether_server.store.leases.acquire import AcquireParams, AcquireResult, acquire
from tether_server.store.leases.end import end_leases
from tether_server.store.leases.renew import Renewal, RenewUnit
from tether_server.store.objects import rows as object_rows
from tether_server.store.sagas import rows
from tether_server.store.sagas.rows import FROM_SAGAS, Loaded
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

CLAIM_KEY_PREFIX = "sagas/"
_DEAD = rows.DEAD_CLAIM_LEASE.format(now="$3")
_OVERDUE = "(s.deadline_us IS NOT NULL AND s.deadline_us <= $3)"
_NEXT = " ORDER BY s.created_at_us, s.saga_id LIMIT 1 FOR UPDATE OF s SKIP LOCKED"
_QUEUE = f"{FROM_SAGAS} WHERE s.namespace = $1 AND s.kind = $2"
# The oldest candidate of each state a claim of each purpose may take (or settle first).
_CANDIDATES: dict[Purpose, list[Any]] = {
    Purpose.EXECUTE: [
        sql(f"{_QUEUE} AND s.state = 'PLANNED' AND (s.not_before_us <= $3 OR {_OVERDUE}){_NEXT}"),
        sql(
            f"{_QUEUE} AND s.state = 'RUNNING'"
            f" AND (s.claim_active = 0 OR {_DEAD} OR {_OVERDUE}){_NEXT}"
        ),
    ],
    Purpose.COMPENSATE: [
        sql(f"{_QUEUE} AND s.state = 'COMPENSATING' AND (s.claim_active = 0 OR {_DEAD}){_NEXT}"),
        sql(
            f"{_QUEUE} AND s.state = 'RUNNING' AND s.claim_active = 1"
            f" AND ({_DEAD} OR {_OVERDUE}){_NEXT}"
        ),
        sql(f"{_QUEUE} AND s.state = 'PLANNED' AND {_OVERDUE}{_NEXT}"),
    ],
}
# Candidates a claim settles before it gives up (each settled one stops matching).
_MAX_SETTLED_PER_CLAIM = 32
_SET_PROGRESS = sql(
    "UPDATE sagas SET progress = $3, updated_at_us = $4 WHERE namespace = $1 AND saga_id = $2"
)
_OVERDUE_SAGAS = sql(
    f"{FROM_SAGAS} WHERE s.state IN ('PLANNED', 'RUNNING') AND s.deadline_us <= $1"
    " ORDER BY s.deadline_us LIMIT $2 FOR UPDATE OF s SKIP LOCKED"
)
NEXT_DEADLINE = sql(
    "SELECT MIN(deadline_us) FROM sagas WHERE state IN ('PLANNED', 'RUNNING')"
    " AND deadline_us IS NOT NULL"
)


@dataclass(frozen=True)
class SagaView:
    """A saga with its logs and its claim's lease, as of ``now_us``."""

    saga: Saga
    lease: Lease | None
    now_us: int
    steps: list[Step] = field(default_factory=list)
    compensations: list[CompensationRecord] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return self.saga.is_stale(self.lease, self.now_us)

    @property
    def overdue(self) -> bool:
        return self.saga.is_overdue(self.now_us)


async def full_view(tx: Tx, saga: Saga, lease: Lease | None) -> SagaView:
    return SagaView(
        saga,
        lease,
        tx.now_us,
        await rows.load_steps(tx, saga),
        await rows.load_compensations(tx, saga),
        await rows.load_annotations(tx, saga),
    )


async def _locked(tx: Tx, namespace: str, saga_id: str) -> Loaded:
    loaded = await rows.load(tx, namespace, saga_id, lock=True)
    if loaded is None:
        raise domain.not_found(namespace, saga_id)
    return loaded


# ---- create --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateParams:
    namespace: str
    saga_id: str
    kind: str
    principal: str
    labels: Mapping[str, str] = field(default_factory=dict)
    input: Mapping[str, Any] = field(default_factory=dict)
    owner: Mapping[str, Any] | None = None
    on_stale: domain.OnStale = domain.OnStale.REQUEUE
    max_attempts: int = domain.DEFAULT_MAX_ATTEMPTS
    deadline_us: int | None = None

    def fingerprint(self) -> str:
        body = [
            self.kind,
            sorted(self.labels.items()),
            self.input,
            self.owner,
            self.on_stale.value,
            self.max_attempts,
            self.deadline_us,
        ]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    view: SagaView
    created: bool


async def create(tx: Tx, p: CreateParams) -> Created:
    # A racing create of the same id fails the insert's unique key and runs again (Retry),
    # then finds this one.
    existing = await rows.load(tx, p.namespace, p.saga_id)
    if existing is not None:
        domain.check_create_repeat(existing.saga, p.fingerprint())
        return Created(await full_view(tx, existing.saga, existing.lease), created=False)
    revision = await tx.next_revision()
    saga = Saga(
        namespace=p.namespace,
        saga_id=p.saga_id,
        kind=p.kind,
        state=SagaState.PLANNED,
        created_at_us=tx.now_us,
        updated_at_us=tx.now_us,
        labels=dict(p.labels),
        input=dict(p.input),
        owner=p.owner,
        on_stale=p.on_stale,
        max_attempts=p.max_attempts,
        not_before_us=tx.now_us,
        deadline_us=p.deadline_us,
        create_revision=revision,
        mod_revision=revision,
        fingerprint=p.fingerprint(),
    )
    await rows.insert(tx, saga)
    rows.record(tx, revision, SagaEventType.CREATED, saga)
    return Created(SagaView(saga, None, tx.now_us), created=True)


# ---- claim ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewLease:
    holder: str
    ttl_us: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClaimParams:
    namespace: str
    purpose: Purpose
    principal: str
    saga_id: str = ""
    kind: str = ""
    existing: Fence | None = None
    new_lease: NewLease | None = None


@dataclass(frozen=True)
class Claimed:
    view: SagaView
    lease: Lease


@dataclass(frozen=True)
class Refused:
    error: errors.TetherError
    # When waiting for the saga could pay off at the earliest (not_before), if known.
    retry_at_us: int | None = None


async def claim(tx: Tx, p: ClaimParams) -> Claimed | Refused:
    if p.saga_id:
        loaded = await _settled(tx, await _locked(tx, p.namespace, p.saga_id))
        refusal = domain.claimable_error(loaded.saga, p.purpose, loaded.lease, tx.now_us)
        if refusal is not None:
            retry_at = loaded.saga.not_before_us if loaded.saga.state is SagaState.PLANNED else None
            return Refused(refusal, retry_at)
        return await _take(tx, p, loaded)
    for _ in range(_MAX_SETTLED_PER_CLAIM):
        candidate = await _oldest_candidate(tx, p)
        if candidate is None:
            break
        settled = await _settled(tx, candidate)
        if domain.claimable_error(settled.saga, p.purpose, settled.lease, tx.now_us) is None:
            return await _take(tx, p, settled)
    return Refused(
        errors.NothingClaimable(
            f"no saga of kind {p.kind!r} is claimable for {p.purpose.value.lower()} now",
            {"kind": p.kind, "purpose": p.purpose.proto_name},
        )
    )


async def _oldest_candidate(tx: Tx, p: ClaimParams) -> Loaded | None:
    found: list[Loaded] = []
    for stmt in _CANDIDATES[p.purpose]:
        row = await tx.fetchrow(stmt, p.namespace, p.kind, tx.now_us)
        if row is not None:
            found.append(rows.row_to_loaded(row))
    if not found:
        return None
    return min(found, key=lambda f: (f.saga.created_at_us, f.saga.saga_id))


async def _settled(tx: Tx, loaded: Loaded) -> Loaded:
    """Write what time decided (deadline, stale claim) before deciding the call."""
    saga = loaded.saga
    steps = await rows.load_steps(tx, saga) if saga.deadline_us or saga.claim else []
    change = domain.settle(saga, steps, loaded.lease, tx.now_us)
    if change is None:
        return loaded
    return Loaded(await _write(tx, saga, change), loaded.lease)


async def _take(tx: Tx, p: ClaimParams, loaded: Loaded) -> Claimed | Refused:
    saga = loaded.saga
    lease = await _claim_lease(tx, p, saga)
    if isinstance(lease, Refused):
        return lease
    new_claim = Claim(
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        purpose=p.purpose,
        holder=lease.holder,
        principal=p.principal,
        owns_lease=p.new_lease is not None,
    )
    saga = await _write(tx, saga, domain.claim(saga, new_claim, tx.now_us))
    return Claimed(await full_view(tx, saga, lease), lease)


async def _claim_lease(tx: Tx, p: ClaimParams, saga: Saga) -> Lease | Refused:
    if p.existing is not None:
        lease = await lease_rows.get(tx, p.existing.lease_id)
        if lease is None or lease.namespace != p.namespace:
            return Refused(
                errors.LeaseNotFound(
                    f"no lease {p.existing.lease_id!r} in namespace {p.namespace!r}",
                    {"lease_id": p.existing.lease_id, "namespace": p.namespace},
                )
            )
        if lease.principal != p.principal:
            return Refused(not_holder(lease, p.principal))
        if lease.fencing_token != p.existing.fencing_token:
            return Refused(stale_token(lease, p.existing.fencing_token))
        if not lease.is_live(tx.now_us):
            return Refused(ended_error(lease, tx.now_us))
        return lease
    assert p.new_lease is not None
    await _release_ended_claim_lease(tx, saga)
    outcome = await acquire(
        tx,
        AcquireParams(
            namespace=p.namespace,
            key=CLAIM_KEY_PREFIX + saga.saga_id,
            holder=p.new_lease.holder,
            principal=p.principal,
            ttl_us=p.new_lease.ttl_us,
            labels=p.new_lease.labels,
        ),
    )
    if isinstance(outcome, Refuse):
        return Refused(outcome.error, outcome.retry_at_us)
    assert isinstance(outcome, AcquireResult)
    return outcome.lease


async def _write(tx: Tx, before: Saga, change: Change) -> Saga:
    """Write a decision; a claim it ends releases the lease the claim created."""
    saga = await rows.write(tx, change)
    old, new = before.claim, saga.claim
    if old is not None and old.active and old.owns_lease and (new is None or not new.active):
        await _end_claim_lease(tx, saga.namespace, old.lease_id)
    return saga


async def _end_claim_lease(tx: Tx, namespace: str, lease_id: str) -> None:
    lease = await lease_rows.get(tx, lease_id)
    if lease is None or not lease.is_live(tx.now_us):
        return
    # Key before lease: the order Acquire locks them in.
    await keys.lock(tx, namespace, lease.key)
    lease = await lease_rows.get(tx, lease_id, lock=True)
    if lease is not None and lease.is_live(tx.now_us):
        await end_leases(tx, [lease], LeaseState.RELEASED)


async def _release_ended_claim_lease(tx: Tx, saga: Saga) -> None:
    """A claim that ended without its lease ending (handed off, failed for a retry,
    cancelled) leaves that lease on the saga's key: the next claim's lease takes the key
    over, so the previous one is released here."""
    c = saga.claim
    if c is None or c.active:
        return
    old = await lease_rows.get(tx, c.lease_id)
    if old is not None and old.key == CLAIM_KEY_PREFIX + saga.saga_id:
        await _end_claim_lease(tx, saga.namespace, c.lease_id)


# ---- fenced calls --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fenced:
    namespace: str
    saga_id: str
    fence: Fence
    principal: str


async def _fenced(tx: Tx, f: Fenced) -> Loaded:
    loaded = await _locked(tx, f.namespace, f.saga_id)
    domain.check_fence(loaded.saga, f.fence, loaded.lease, f.principal, tx.now_us)
    return loaded


@dataclass(frozen=True)
class StepRecorded:
    step: Step
    state: SagaState
    revision: int


async def record_step(tx: Tx, f: Fenced, report: domain.StepReport, max_steps: int) -> StepRecorded:
    loaded = await _fenced(tx, f)
    steps = {s.index: s for s in await rows.load_steps(tx, loaded.saga)}
    decision = domain.record_step(loaded.saga, steps, report, tx.now_us, max_steps)
    if isinstance(decision, NoChange):
        saga = decision.saga
        return StepRecorded(steps[report.index], saga.state, saga.mod_revision)
    saga = await _write(tx, loaded.saga, decision)
    return StepRecorded(decision.steps[0], saga.state, saga.mod_revision)


@dataclass(frozen=True)
class Heartbeat:
    expires_at_us: int
    ttl_us: int
    state: SagaState


async def heartbeat(tx: Tx, f: Fenced, progress: bytes | None) -> Heartbeat:
    loaded = await _fenced(tx, f)
    (outcome,) = await RenewUnit(
        f.namespace, [Renewal(f.fence.lease_id, f.fence.fencing_token, None, f.principal)]
    )(tx)
    if isinstance(outcome, errors.TetherError):
        raise outcome
    if progress is not None:
        await tx.execute(_SET_PROGRESS, f.namespace, f.saga_id, progress, tx.now_us)
    return Heartbeat(outcome.expires_at_us, outcome.ttl_us, loaded.saga.state)


async def complete(tx: Tx, f: Fenced, output: Mapping[str, Any] | None) -> SagaView:
    loaded = await _locked(tx, f.namespace, f.saga_id)
    if not domain.is_repeat_of_end(loaded.saga, f.fence, completing=True):
        domain.check_fence(loaded.saga, f.fence, loaded.lease, f.principal, tx.now_us)
        saga = await _write(tx, loaded.saga, domain.complete(loaded.saga, output, tx.now_us))
        loaded = Loaded(saga, loaded.lease)
    return await full_view(tx, loaded.saga, loaded.lease)


async def fail(tx: Tx, f: Fenced, failure: domain.Failure) -> SagaView:
    loaded = await _locked(tx, f.namespace, f.saga_id)
    if not domain.is_repeat_of_end(loaded.saga, f.fence, completing=False, reason=failure.reason):
        domain.check_fence(loaded.saga, f.fence, loaded.lease, f.principal, tx.now_us)
        steps = await rows.load_steps(tx, loaded.saga)
        saga = await _write(tx, loaded.saga, domain.fail(loaded.saga, steps, failure, tx.now_us))
        loaded = Loaded(saga, loaded.lease)
    return await full_view(tx, loaded.saga, loaded.lease)


@dataclass(frozen=True)
class CompensationRecorded:
    record: CompensationRecord
    state: SagaState
    revision: int


async def record_compensation(
    tx: Tx, f: Fenced, step_index: int, succeeded: bool, error: str, attempt: int
) -> CompensationRecorded:
    loaded = await _fenced(tx, f)
    records = {r.step_index: r for r in await rows.load_compensations(tx, loaded.saga)}
    decision = domain.record_compensation(
        loaded.saga, records, step_index, succeeded, error, attempt, tx.now_us
    )
    if isinstance(decision, NoChange):
        saga = decision.saga
        return CompensationRecorded(records[step_index], saga.state, saga.mod_revision)
    saga = await _write(tx, loaded.saga, decision)
    return CompensationRecorded(decision.compensations[0], saga.state, saga.mod_revision)


# ---- operator calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorCall:
    namespace: str
    saga_id: str
    author: str
    reason: str = ""


async def _apply(tx: Tx, loaded: Loaded, decision: Change | NoChange) -> SagaView:
    if isinstance(decision, NoChange):
        return await full_view(tx, decision.saga, loaded.lease)
    saga = await _write(tx, loaded.saga, decision)
    return await full_view(tx, saga, loaded.lease)


async def cancel(tx: Tx, c: OperatorCall) -> SagaView:
    loaded = await _locked(tx, c.namespace, c.saga_id)
    steps = await rows.load_steps(tx, loaded.saga)
    return await _apply(
        tx, loaded, domain.cancel(loaded.saga, steps, c.reason, c.author, tx.now_us)
    )


async def quarantine(tx: Tx, c: OperatorCall) -> SagaView:
    loaded = await _locked(tx, c.namespace, c.saga_id)
    return await _apply(tx, loaded, domain.quarantine(loaded.saga, c.reason, c.author, tx.now_us))


async def redrive(tx: Tx, c: OperatorCall, mode: domain.RedriveMode) -> SagaView:
    loaded = await _locked(tx, c.namespace, c.saga_id)
    steps = await rows.load_steps(tx, loaded.saga)
    records = await rows.load_compensations(tx, loaded.saga)
    decision = domain.redrive(loaded.saga, steps, records, mode, c.reason, c.author, tx.now_us)
    return await _apply(tx, loaded, decision)


async def mark_compensated(tx: Tx, c: OperatorCall, step_index: int) -> SagaView:
    loaded = await _locked(tx, c.namespace, c.saga_id)
    steps = await rows.load_steps(tx, loaded.saga)
    records = {r.step_index: r for r in await rows.load_compensations(tx, loaded.saga)}
    decision = domain.mark_compensated(
        loaded.saga, steps, records, step_index, c.reason, c.author, tx.now_us
    )
    return await _apply(tx, loaded, decision)


@dataclass(frozen=True)
class Annotated:
    annotation: Annotation
    revision: int


async def annotate(tx: Tx, c: OperatorCall, text: str, attributes: Mapping[str, str]) -> Annotated:
    loaded = await _locked(tx, c.namespace, c.saga_id)
    annotation = await rows.add_annotation(tx, loaded.saga, c.author, text, attributes)
    saga = replace(loaded.saga, updated_at_us=tx.now_us)
    saga = await rows.write(tx, Change(saga, events=(SagaEventType.ANNOTATED,)))
    return Annotated(annotation, saga.mod_revision)


# ---- deadlines -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadlinePass:
    moved: int
    # More overdue sagas than the pass took: run again at once.
    backlog: bool
    # The earliest deadline still ahead, read in the same transaction.
    next_deadline_us: int | None = None


async def enforce_deadlines(tx: Tx, limit: int) -> DeadlinePass:
    """Move up to ``limit`` overdue sagas to compensation (or FAILED)."""
    found = await tx.fetch(_OVERDUE_SAGAS, tx.now_us, limit)
    for row in found:
        loaded = rows.row_to_loaded(row)
        steps = await rows.load_steps(tx, loaded.saga)
        await _write(tx, loaded.saga, domain.apply_deadline(loaded.saga, steps, tx.now_us))
    upcoming = await tx.fetchval(NEXT_DEADLINE)
    return DeadlinePass(
        len(found),
        backlog=len(found) >= limit,
        next_deadline_us=int(upcoming) if upcoming is not None else None,
    )


# ---- the sweep: settle what time decided, purge what retention lets go -----------------------

_DUE_WHERE = (
    f"($1 = '' OR s.namespace = $1) AND ({rows.STALE_WHERE.format(now='$2')}"
    f" OR {rows.OVERDUE_WHERE.format(now='$2')})"
)
_DUE_LOCK = sql(f"{FROM_SAGAS} WHERE {_DUE_WHERE} LIMIT $3 FOR UPDATE OF s SKIP LOCKED")
_DUE_READ = sql(f"{FROM_SAGAS} WHERE {_DUE_WHERE} LIMIT $3")
_DUE_COUNT = sql(
    "SELECT count(*) FROM sagas s LEFT JOIN leases l ON l.lease_id = s.claim_lease_id"
    f" WHERE {_DUE_WHERE}"
)


async def settle_due(
    tx: Tx, namespace: str, limit: int, *, dry_run: bool
) -> list[tuple[Saga, Saga]]:
    """Apply to up to ``limit`` stale or overdue sagas what time decided (on-stale policy,
    deadline); (before, after) for each. Each is judged again under its row lock, so a
    saga a worker completed (or renewed) since the selection is left alone. A dry run
    decides the same way and writes nothing."""
    found = await tx.fetch(_DUE_READ if dry_run else _DUE_LOCK, namespace, tx.now_us, limit)
    settled: list[tuple[Saga, Saga]] = []
    for row in found:
        loaded = rows.row_to_loaded(row)
        steps = await rows.load_steps(tx, loaded.saga)
        change = domain.settle(loaded.saga, steps, loaded.lease, tx.now_us)
        if change is None:
            continue
        after = change.saga if dry_run else await _write(tx, loaded.saga, change)
        settled.append((loaded.saga, after))
    return settled


async def count_due(tx: Tx, namespace: str) -> int:
    """Stale or overdue sagas waiting to be settled."""
    return int(await tx.fetchval(_DUE_COUNT, namespace, tx.now_us))


_PURGE = [
    sql(f"DELETE FROM {table} WHERE namespace = $1 AND saga_id = ANY($2::text[])")
    for table in ("saga_annotations", "saga_compensations", "saga_steps", "sagas")
]
_TERMINAL = ", ".join(f"'{state.value}'" for state in sorted(domain.TERMINAL))
_ENDED_WHERE = (
    f"ended_at_us IS NOT NULL AND ended_at_us <= $2 AND state IN ({_TERMINAL})"
    " AND ($1 = '' OR namespace = $1)"
)
_PICK_ENDED = sql(
    f"SELECT namespace, saga_id FROM sagas WHERE {_ENDED_WHERE} LIMIT $3 FOR UPDATE SKIP LOCKED"
)
_COUNT_ENDED = sql(f"SELECT count(*) FROM sagas WHERE {_ENDED_WHERE}")


async def _delete(tx: Tx, namespace: str, saga_ids: list[str]) -> None:
    """Remove (locked, terminal) sagas with their logs; what they owned goes to the
    garbage collector in the same transaction."""
    for statement in _PURGE:
        await tx.execute(statement, namespace, saga_ids)
    await object_rows.enqueue_owning(tx, saga_ids)


async def purge(tx: Tx, namespace: str, saga_id: str) -> bool:
    """Remove one terminal saga and its logs. False when there is no such terminal saga."""
    loaded = await rows.load(tx, namespace, saga_id, lock=True)
    if loaded is None or not loaded.saga.terminal:
        return False
    await _delete(tx, namespace, [saga_id])
    return True


async def purge_ended(tx: Tx, namespace: str, ended_before_us: int, limit: int) -> int:
    """Remove up to ``limit`` terminal sagas that ended at or before the cutoff. Rows another
    transaction holds are skipped (a redrive, an annotation): the next batch or sweep gets
    them."""
    found = await tx.fetch(_PICK_ENDED, namespace, ended_before_us, limit)
    by_namespace: dict[str, list[str]] = {}
    for row in found:
        by_namespace.setdefault(row["namespace"], []).append(row["saga_id"])
    for ns, ids in by_namespace.items():
        await _delete(tx, ns, ids)
    return len(found)


async def count_ended(tx: Tx, namespace: str, ended_before_us: int) -> int:
    return int(await tx.fetchval(_COUNT_ENDED, namespace, ended_before_us))
