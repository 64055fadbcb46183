"""Ending leases: release, revoke, expiry. Set-based: one statement ends any number."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tether_server.domain.lease import (
    ANONYMOUS,
    AlreadyEnded,
    EndNow,
    ExpireFirst,
    Lease,
    LeaseKey,
    LeaseState,
    decide_release,
    decide_revoke,
    lock_delay_after_end,
)
from tether_server.store.leases import rows
from tether_server.store.objects import rows as object_rows
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

_END_MANY = sql(
    """
    UPDATE leases AS l SET state = $3::text,
        ended_at_us = CASE WHEN $3::text = 'EXPIRED' THEN l.expires_at_us ELSE $4 END,
        stream_id = NULL, mod_revision = v.rev
    FROM unnest($1::text[], $2::bigint[]) AS v(id, rev)
    WHERE l.lease_id = v.id AND l.state = 'ACTIVE'
    """,
    sqlite="""
    UPDATE leases SET state = $3,
        ended_at_us = CASE WHEN $3 = 'EXPIRED' THEN expires_at_us ELSE $4 END,
        stream_id = NULL, mod_revision = $2
    WHERE lease_id = $1 AND state = 'ACTIVE'
    """,
)
_DUE = sql(
    f"SELECT {rows.COLUMNS} FROM leases WHERE state = 'ACTIVE' AND expires_at_us <= $1"
    " ORDER BY expires_at_us LIMIT $2 FOR UPDATE SKIP LOCKED"
)
NEXT_DEADLINE = sql("SELECT min(expires_at_us) FROM leases WHERE state = 'ACTIVE'")
# FOR UPDATE locks the rows of both tables in the order they are named: the key first.
_LOCK_KEY_AND_LEASE = sql(
    "SELECT k.last_fencing_token AS k_last_fencing_token,"
    " k.available_at_us AS k_available_at_us, k.current_lease_id AS k_current_lease_id, "
    + ", ".join("l." + column.strip() for column in rows.COLUMNS.split(","))
    + " FROM lease_keys k JOIN leases l ON l.namespace = k.namespace AND l.key = k.key"
    " WHERE l.lease_id = $1 FOR UPDATE"
)
_SET_AVAILABLE_AT = sql(
    "UPDATE lease_keys SET available_at_us = $3 WHERE namespace = $1 AND key = $2"
    " AND available_at_us < $3"
)


@dataclass(frozen=True)
class ReleaseParams:
    namespace: str
    lease_id: str
    fencing_token: int
    holder: str
    principal: str = ANONYMOUS


@dataclass(frozen=True)
class RevokeParams:
    namespace: str
    lease_id: str


@dataclass(frozen=True)
class ExpiryResult:
    expired: list[Lease]
    # Earliest deadline of a lease still active after this pass, if any, and the store's
    # `now` for this pass: sleep for the difference.
    next_deadline_us: int | None
    now_us: int


async def end_leases(tx: Tx, candidates: Sequence[Lease], state: LeaseState) -> list[Lease]:
    """End locked, active leases with ``state`` and record one event each.

    The candidates' rows are locked (or, on SQLite, the database is), so the decision of
    which still end is made here on their latest versions: an expiry only of leases at or
    past their deadline (a renewal that committed meanwhile wins).
    """
    now = tx.now_us
    ending = sorted(
        (
            lease
            for lease in {x.lease_id: x for x in candidates}.values()
            if lease.state is LeaseState.ACTIVE
            and (state is not LeaseState.EXPIRED or lease.expires_at_us <= now)
        ),
        key=lambda x: (x.expires_at_us, x.lease_id),
    )
    if not ending:
        return []
    ended: list[Lease] = []
    for lease in ending:
        revision = await tx.next_revision()
        ended.append(
            replace(
                lease,
                state=state,
                ended_at_us=lease.expires_at_us if state is LeaseState.EXPIRED else now,
                stream_attached=False,
                mod_revision=revision,
            )
        )
    if tx.is_pg:
        await tx.execute(
            _END_MANY,
            [x.lease_id for x in ended],
            [x.mod_revision for x in ended],
            state.value,
            now,
        )
    else:
        await tx.executemany(
            _END_MANY, [(x.lease_id, x.mod_revision, state.value, now) for x in ended]
        )
    for lease in ended:
        await rows.record(tx, lease.mod_revision, state.value, lease)
    # Objects owned by these leases are the collector's now (like keys of an etcd lease).
    await object_rows.enqueue_owning(tx, [x.lease_id for x in ended])
    return ended


async def release(tx: Tx, p: ReleaseParams) -> Lease:
    lease, key = await _lock_lease_and_key(tx, p.namespace, p.lease_id)
    decision = decide_release(
        lease, p.lease_id, p.namespace, p.fencing_token, p.holder, p.principal, tx.now_us
    )
    assert lease is not None
    assert key is not None
    return await _apply_end(tx, lease, key, decision)


async def revoke(tx: Tx, p: RevokeParams) -> Lease:
    lease, key = await _lock_lease_and_key(tx, p.namespace, p.lease_id)
    decision = decide_revoke(lease, p.lease_id, p.namespace, tx.now_us)
    assert lease is not None
    assert key is not None
    return await _apply_end(tx, lease, key, decision)


async def expire_due(tx: Tx, limit: int) -> ExpiryResult:
    """Record the expiry of up to ``limit`` leases whose deadline has passed. Replicas
    expiring at once split the work (SKIP LOCKED) instead of queueing on rows."""
    due = [rows.row_to_lease(r) for r in await tx.fetch(_DUE, tx.now_us, limit)]
    expired = await end_leases(tx, due, LeaseState.EXPIRED)
    next_deadline = await tx.fetchval(NEXT_DEADLINE)
    return ExpiryResult(
        expired, int(next_deadline) if next_deadline is not None else None, tx.now_us
    )


async def _lock_lease_and_key(
    tx: Tx, namespace: str, lease_id: str
) -> tuple[Lease | None, LeaseKey | None]:
    """Lock the lease's key row, then the lease (lock order), in one statement."""
    row = await tx.fetchrow(_LOCK_KEY_AND_LEASE, lease_id)
    if row is None or row["namespace"] != namespace:
        return (rows.row_to_lease(row) if row is not None else None), None
    tx.refresh_now()
    key = LeaseKey(
        namespace=row["namespace"],
        key=row["key"],
        last_fencing_token=row["k_last_fencing_token"],
        available_at_us=row["k_available_at_us"],
        current_lease_id=row["k_current_lease_id"],
    )
    return rows.row_to_lease(row), key


async def _apply_end(
    tx: Tx, lease: Lease, key: LeaseKey, decision: EndNow | ExpireFirst | AlreadyEnded
) -> Lease:
    if isinstance(decision, AlreadyEnded):
        return rows.effective(lease, tx.now_us)
    state = decision.state if isinstance(decision, EndNow) else LeaseState.EXPIRED
    (ended,) = await end_leases(tx, [lease], state)
    # Expiry's lock-delay is derived from the lease itself (see decide_acquire).
    available_at = lock_delay_after_end(lease, state, tx.now_us)
    if state is LeaseState.REVOKED and available_at > key.available_at_us:
        await tx.execute(_SET_AVAILABLE_AT, key.namespace, key.key, available_at)
    return ended
