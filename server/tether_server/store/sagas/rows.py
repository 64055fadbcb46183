"""Saga rows: loading a saga with its claim's lease, its logs, and writing a decision."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tether_server.domain.lease import Lease, LeaseState
from tether_server.domain.saga import (
    Annotation,
    Change,
    Claim,
    CompensationRecord,
    CompensationSpec,
    CompStatus,
    OnStale,
    Purpose,
    Saga,
    SagaEventType,
    SagaState,
    Step,
    StepStatus,
)
from tether_server.store.sql import sql
from tether_server.store.tx import Row, Tx

AREA = "saga"
COLUMNS = (
    "namespace, saga_id, kind, state, labels, input, owner, on_stale, max_attempts, attempt, "
    "attempt_base, claim_lease_id, claim_token, claim_purpose, claim_holder, claim_principal, "
    "claim_active, claim_owns_lease, progress, output, failure_reason, not_before_us, deadline_us, "
    "created_at_us, updated_at_us, ended_at_us, create_revision, mod_revision, fingerprint"
)
_S_COLUMNS = ", ".join(f"s.{c.strip()}" for c in COLUMNS.split(","))
# The claim's lease rides along with every saga read: staleness is judged from it.
LEASE_COLUMNS = (
    "l.lease_id AS l_lease_id, l.state AS l_state, l.expires_at_us AS l_expires_at_us,"
    " l.fencing_token AS l_fencing_token, l.principal AS l_principal, l.holder AS l_holder,"
    " l.key AS l_key, l.ttl_us AS l_ttl_us, l.acquired_at_us AS l_acquired_at_us"
)
FROM_SAGAS = (
    f"SELECT {_S_COLUMNS}, {LEASE_COLUMNS}"
    " FROM sagas s LEFT JOIN leases l ON l.lease_id = s.claim_lease_id"
)
# What time alone decides, as conditions over ``sagas s`` joined with its claim's lease
# ``l`` (``{now}``: the placeholder of the judging time). Reads list by them; the sweep
# settles by them.
DEAD_CLAIM_LEASE = (
    "(l.lease_id IS NULL OR l.state <> 'ACTIVE' OR l.expires_at_us <= {now}"
    " OR l.fencing_token <> s.claim_token)"
)
STALE_WHERE = (
    f"(s.state IN ('RUNNING', 'COMPENSATING') AND s.claim_active = 1 AND {DEAD_CLAIM_LEASE})"
)
OVERDUE_WHERE = "(s.state IN ('PLANNED', 'RUNNING') AND s.deadline_us <= {now})"

_LOAD = sql(f"{FROM_SAGAS} WHERE s.namespace = $1 AND s.saga_id = $2")
_LOCK = sql(f"{FROM_SAGAS} WHERE s.namespace = $1 AND s.saga_id = $2 FOR UPDATE OF s")
_INSERT = sql(f"INSERT INTO sagas ({COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 30))})")
_UPDATE = sql(
    "UPDATE sagas SET state = $3, attempt = $4, attempt_base = $5, claim_lease_id = $6,"
    " claim_token = $7, claim_purpose = $8, claim_holder = $9, claim_principal = $10,"
    " claim_active = $11, claim_owns_lease = $12, progress = $13, output = $14,"
    " failure_reason = $15, not_before_us = $16, updated_at_us = $17, ended_at_us = $18,"
    " mod_revision = $19"
    " WHERE namespace = $1 AND saga_id = $2"
)
_STEP_COLUMNS = (
    "step_index, name, status, attempt, output, error, compensation, started_at_us, finished_at_us"
)
_STEPS = sql(
    f"SELECT {_STEP_COLUMNS} FROM saga_steps WHERE namespace = $1 AND saga_id = $2"
    " ORDER BY step_index"
)
_UPSERT_STEP = sql(
    f"INSERT INTO saga_steps (namespace, saga_id, {_STEP_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (namespace, saga_id, step_index) DO UPDATE SET status = EXCLUDED.status,"
    " attempt = EXCLUDED.attempt, output = EXCLUDED.output, error = EXCLUDED.error,"
    " compensation = EXCLUDED.compensation, started_at_us = EXCLUDED.started_at_us,"
    " finished_at_us = EXCLUDED.finished_at_us"
)
_COMP_COLUMNS = (
    "step_index, name, status, attempts, max_attempts, payload, error, updated_at_us, marked_by"
)
_COMPS = sql(
    f"SELECT {_COMP_COLUMNS} FROM saga_compensations WHERE namespace = $1 AND saga_id = $2"
    " ORDER BY step_index DESC"
)
_UPSERT_COMP = sql(
    f"INSERT INTO saga_compensations (namespace, saga_id, {_COMP_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (namespace, saga_id, step_index) DO UPDATE SET status = EXCLUDED.status,"
    " attempts = EXCLUDED.attempts, max_attempts = EXCLUDED.max_attempts,"
    " payload = EXCLUDED.payload, error = EXCLUDED.error,"
    " updated_at_us = EXCLUDED.updated_at_us, marked_by = EXCLUDED.marked_by"
)
_DROP_COMPS = sql("DELETE FROM saga_compensations WHERE namespace = $1 AND saga_id = $2")
_ANNOTATIONS = sql(
    "SELECT seq, created_at_us, author, text, attributes FROM saga_annotations"
    " WHERE namespace = $1 AND saga_id = $2 ORDER BY seq"
)
_ADD_ANNOTATION = sql(
    "INSERT INTO saga_annotations (namespace, saga_id, seq, created_at_us, author, text,"
    " attributes) SELECT $1::text, $2::text, COALESCE(MAX(seq), 0) + 1, $3::bigint, $4::text,"
    " $5::text, $6::text"
    " FROM saga_annotations WHERE namespace = $1 AND saga_id = $2 RETURNING seq"
)


@dataclass(frozen=True)
class Loaded:
    """A saga and the claim's lease as one query found them."""

    saga: Saga
    lease: Lease | None


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def row_to_saga(row: Row) -> Saga:
    claim = None
    if row["claim_lease_id"] is not None:
        claim = Claim(
            lease_id=row["claim_lease_id"],
            fencing_token=row["claim_token"],
            purpose=Purpose(row["claim_purpose"]),
            holder=row["claim_holder"],
            principal=row["claim_principal"],
            owns_lease=bool(row["claim_owns_lease"]),
            active=bool(row["claim_active"]),
        )
    return Saga(
        namespace=row["namespace"],
        saga_id=row["saga_id"],
        kind=row["kind"],
        state=SagaState(row["state"]),
        created_at_us=row["created_at_us"],
        updated_at_us=row["updated_at_us"],
        labels=json.loads(row["labels"]),
        input=json.loads(row["input"]),
        owner=_unjson(row["owner"]),
        on_stale=OnStale(row["on_stale"]),
        max_attempts=row["max_attempts"],
        attempt=row["attempt"],
        attempt_base=row["attempt_base"],
        claim=claim,
        progress=bytes(row["progress"]),
        output=_unjson(row["output"]),
        failure_reason=row["failure_reason"],
        not_before_us=row["not_before_us"],
        deadline_us=row["deadline_us"],
        ended_at_us=row["ended_at_us"],
        create_revision=row["create_revision"],
        mod_revision=row["mod_revision"],
        fingerprint=row["fingerprint"],
    )


def row_to_claim_lease(row: Row, namespace: str) -> Lease | None:
    """The part of the claim's lease that staleness and fencing look at."""
    if row["l_lease_id"] is None:
        return None
    return Lease(
        lease_id=row["l_lease_id"],
        namespace=namespace,
        key=row["l_key"],
        holder=row["l_holder"],
        principal=row["l_principal"],
        ttl_us=row["l_ttl_us"],
        fencing_token=row["l_fencing_token"],
        state=LeaseState(row["l_state"]),
        acquired_at_us=row["l_acquired_at_us"],
        renewed_at_us=row["l_acquired_at_us"],
        expires_at_us=row["l_expires_at_us"],
    )


def row_to_loaded(row: Row) -> Loaded:
    return Loaded(row_to_saga(row), row_to_claim_lease(row, row["namespace"]))


async def load(tx: Tx, namespace: str, saga_id: str, *, lock: bool = False) -> Loaded | None:
    row = await tx.fetchrow(_LOCK if lock else _LOAD, namespace, saga_id)
    return None if row is None else row_to_loaded(row)


async def load_steps(tx: Tx, saga: Saga) -> list[Step]:
    return [_row_to_step(r) for r in await tx.fetch(_STEPS, saga.namespace, saga.saga_id)]


async def load_compensations(tx: Tx, saga: Saga) -> list[CompensationRecord]:
    return [_row_to_comp(r) for r in await tx.fetch(_COMPS, saga.namespace, saga.saga_id)]


async def load_annotations(tx: Tx, saga: Saga) -> list[Annotation]:
    return [
        Annotation(
            seq=r["seq"],
            created_at_us=r["created_at_us"],
            author=r["author"],
            text=r["text"],
            attributes=json.loads(r["attributes"]),
        )
        for r in await tx.fetch(_ANNOTATIONS, saga.namespace, saga.saga_id)
    ]


def _row_to_step(r: Row) -> Step:
    comp = _unjson(r["compensation"])
    return Step(
        index=r["step_index"],
        name=r["name"],
        status=StepStatus(r["status"]),
        attempt=r["attempt"],
        output=_unjson(r["output"]),
        error=r["error"],
        compensation=None if comp is None else CompensationSpec(**comp),
        started_at_us=r["started_at_us"],
        finished_at_us=r["finished_at_us"],
    )


def _row_to_comp(r: Row) -> CompensationRecord:
    return CompensationRecord(
        step_index=r["step_index"],
        name=r["name"],
        status=CompStatus(r["status"]),
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        payload=_unjson(r["payload"]),
        error=r["error"],
        updated_at_us=r["updated_at_us"],
        marked_by=r["marked_by"],
    )


def step_to_dict(s: Step) -> dict[str, Any]:
    return {
        "index": s.index,
        "name": s.name,
        "status": s.status.value,
        "attempt": s.attempt,
        "output": s.output,
        "error": s.error,
        "compensation": None if s.compensation is None else _spec_dict(s.compensation),
        "started_at_us": s.started_at_us,
        "finished_at_us": s.finished_at_us,
    }


def step_from_dict(d: Mapping[str, Any]) -> Step:
    comp = d["compensation"]
    return Step(
        index=d["index"],
        name=d["name"],
        status=StepStatus(d["status"]),
        attempt=d["attempt"],
        output=d["output"],
        error=d["error"],
        compensation=None if comp is None else CompensationSpec(**comp),
        started_at_us=d["started_at_us"],
        finished_at_us=d["finished_at_us"],
    )


def comp_to_dict(c: CompensationRecord) -> dict[str, Any]:
    return {
        "step_index": c.step_index,
        "name": c.name,
        "status": c.status.value,
        "attempts": c.attempts,
        "max_attempts": c.max_attempts,
        "payload": c.payload,
        "error": c.error,
        "updated_at_us": c.updated_at_us,
        "marked_by": c.marked_by,
    }


def comp_from_dict(d: Mapping[str, Any]) -> CompensationRecord:
    return CompensationRecord(**{**d, "status": CompStatus(d["status"])})


def _spec_dict(spec: CompensationSpec) -> dict[str, Any]:
    return {"name": spec.name, "payload": spec.payload, "max_attempts": spec.max_attempts}


def saga_to_dict(s: Saga) -> dict[str, Any]:
    c = s.claim
    return {
        "namespace": s.namespace,
        "saga_id": s.saga_id,
        "kind": s.kind,
        "state": s.state.value,
        "created_at_us": s.created_at_us,
        "updated_at_us": s.updated_at_us,
        "labels": dict(s.labels),
        "input": dict(s.input),
        "owner": s.owner,
        "on_stale": s.on_stale.value,
        "max_attempts": s.max_attempts,
        "attempt": s.attempt,
        "attempt_base": s.attempt_base,
        "claim": None
        if c is None
        else [
            c.lease_id,
            c.fencing_token,
            c.purpose.value,
            c.holder,
            c.principal,
            c.owns_lease,
            c.active,
        ],
        "output": s.output,
        "failure_reason": s.failure_reason,
        "not_before_us": s.not_before_us,
        "deadline_us": s.deadline_us,
        "ended_at_us": s.ended_at_us,
        "create_revision": s.create_revision,
        "mod_revision": s.mod_revision,
    }


def saga_from_dict(d: Mapping[str, Any]) -> Saga:
    c = d["claim"]
    claim = None
    if c is not None:
        claim = Claim(c[0], c[1], Purpose(c[2]), c[3], c[4], c[5], c[6])
    return Saga(
        **{
            **{k: v for k, v in d.items() if k != "claim"},
            "state": SagaState(d["state"]),
            "on_stale": OnStale(d["on_stale"]),
            "claim": claim,
        }
    )


def _claim_values(c: Claim | None) -> tuple[Any, ...]:
    """claim_lease_id .. claim_owns_lease, in column order."""
    if c is None:
        return (None, None, None, None, None, 0, 0)
    return (
        c.lease_id,
        c.fencing_token,
        c.purpose.value,
        c.holder,
        c.principal,
        int(c.active),
        int(c.owns_lease),
    )


def saga_values(s: Saga) -> tuple[Any, ...]:
    return (
        s.namespace,
        s.saga_id,
        s.kind,
        s.state.value,
        json.dumps(dict(s.labels), sort_keys=True),
        json.dumps(dict(s.input), sort_keys=True),
        _json(s.owner),
        s.on_stale.value,
        s.max_attempts,
        s.attempt,
        s.attempt_base,
        *_claim_values(s.claim),
        s.progress,
        _json(s.output),
        s.failure_reason,
        s.not_before_us,
        s.deadline_us,
        s.created_at_us,
        s.updated_at_us,
        s.ended_at_us,
        s.create_revision,
        s.mod_revision,
        s.fingerprint,
    )


async def insert(tx: Tx, saga: Saga) -> None:
    await tx.execute(_INSERT, *saga_values(saga))


async def update(tx: Tx, s: Saga) -> None:
    await tx.execute(
        _UPDATE,
        s.namespace,
        s.saga_id,
        s.state.value,
        s.attempt,
        s.attempt_base,
        *_claim_values(s.claim),
        s.progress,
        _json(s.output),
        s.failure_reason,
        s.not_before_us,
        s.updated_at_us,
        s.ended_at_us,
        s.mod_revision,
    )


async def write(tx: Tx, change: Change) -> Saga:
    """Apply a decision: the saga row, its steps and compensation records, an annotation,
    and its events, each under the next revision (the saga's revision is the last).
    Returns the saga as written."""
    revisions = [await tx.next_revision() for _ in change.events]
    saga = change.saga
    if revisions:
        saga = replace(saga, mod_revision=revisions[-1])
    await update(tx, saga)
    ns, sid = saga.namespace, saga.saga_id
    if change.steps:
        await tx.executemany(_UPSERT_STEP, [(ns, sid, *_step_values(s)) for s in change.steps])
    if change.drop_compensations:
        await tx.execute(_DROP_COMPS, ns, sid)
    if change.compensations:
        await tx.executemany(
            _UPSERT_COMP, [(ns, sid, *_comp_values(c)) for c in change.compensations]
        )
    if change.note is not None:
        await add_annotation(tx, saga, change.note[0], change.note[1], {})
    for revision, event in zip(revisions, change.events, strict=True):
        record(tx, revision, event, saga, change.steps, change.compensations)
    return saga


def _step_values(s: Step) -> tuple[Any, ...]:
    return (
        s.index,
        s.name,
        s.status.value,
        s.attempt,
        _json(s.output),
        s.error,
        None if s.compensation is None else _json(_spec_dict(s.compensation)),
        s.started_at_us,
        s.finished_at_us,
    )


def _comp_values(c: CompensationRecord) -> tuple[Any, ...]:
    return (
        c.step_index,
        c.name,
        c.status.value,
        c.attempts,
        c.max_attempts,
        _json(c.payload),
        c.error,
        c.updated_at_us,
        c.marked_by,
    )


async def add_annotation(
    tx: Tx, saga: Saga, author: str, text: str, attributes: Mapping[str, str]
) -> Annotation:
    seq = await tx.fetchval(
        _ADD_ANNOTATION,
        saga.namespace,
        saga.saga_id,
        tx.now_us,
        author,
        text,
        json.dumps(dict(attributes), sort_keys=True),
    )
    return Annotation(int(seq), tx.now_us, author, text, dict(attributes))


def event_key(saga: Saga) -> str:
    """Events are keyed by kind, then id: WatchSagas(kind) reads the prefix ``kind/``."""
    return f"{saga.kind}/{saga.saga_id}"


# Event type strings fit the events table's 16 characters.
EVENT_CODES = {
    SagaEventType.CREATED: "CREATED",
    SagaEventType.CLAIMED: "CLAIMED",
    SagaEventType.STEP_RECORDED: "STEP",
    SagaEventType.STATE_CHANGED: "STATE",
    SagaEventType.ANNOTATED: "ANNOTATED",
    SagaEventType.COMPENSATION_RECORDED: "COMPENSATION",
    SagaEventType.CLAIM_ENDED: "CLAIM_ENDED",
}
EVENT_TYPES = {code: t for t, code in EVENT_CODES.items()}


def record(
    tx: Tx,
    revision: int,
    event: SagaEventType,
    saga: Saga,
    steps: Sequence[Step] = (),
    comps: Sequence[CompensationRecord] = (),
) -> None:
    body: dict[str, Any] = {"saga": saga_to_dict(saga)}
    if event is SagaEventType.STEP_RECORDED and steps:
        body["step"] = step_to_dict(steps[0])
    if event is SagaEventType.COMPENSATION_RECORDED and comps:
        body["compensation"] = comp_to_dict(comps[0])
    tx.record_event(
        revision,
        AREA,
        saga.namespace,
        event_key(saga),
        saga.saga_id,
        EVENT_CODES[event],
        json.dumps(body, separators=(",", ":")),
    )
