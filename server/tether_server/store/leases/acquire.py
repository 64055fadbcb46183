"""Acquire: lock the key, decide with the pure core, grant in one statement."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from tether_server.domain import errors
from tether_server.domain.lease import (
    AcquireIntent,
    Grant,
    Lease,
    LeaseKey,
    LeaseState,
    Refuse,
    ReturnExisting,
    decide_acquire,
)
from tether_server.store.leases import keys, rows
from tether_server.store.leases.end import end_leases
from tether_server.store.sql import sql
from tether_server.store.tx import Tx


@dataclass(frozen=True)
class AcquireParams:
    namespace: str
    key: str
    holder: str
    principal: str
    ttl_us: int
    lock_delay_us: int = 0
    labels: Mapping[str, str] | None = None
    request_id: str | None = None
    # Live leases the principal may hold (0: no cap); counted in this transaction, under
    # the revision lock every grant takes, so replicas cannot exceed it together.
    max_live_leases: int = 0


@dataclass(frozen=True)
class AcquireResult:
    lease: Lease
    created: bool


@dataclass(frozen=True)
class Held(Refuse):
    """A LEASE_HELD refusal naming the holding lease's principal: the service shows the
    lease's id and token to that principal only."""

    principal: str = ""


# The principal's live leases, counted up to the cap (the scan stops there).
_COUNT_LIVE = sql(
    "SELECT count(*) FROM (SELECT 1 FROM leases WHERE principal = $1 AND state = 'ACTIVE'"
    " AND expires_at_us > $2 LIMIT $3) AS live"
)
# The key row, locked, when the key exists (a refusal at the cap writes nothing).
_LOCK_EXISTING_KEY = sql(
    "SELECT last_fencing_token, available_at_us, current_lease_id FROM lease_keys"
    " WHERE namespace = $1 AND key = $2 FOR UPDATE"
)


_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, 20))
_INSERT_LEASE = sql(f"INSERT INTO leases ({rows.COLUMNS}) VALUES ({_PLACEHOLDERS})")
_POINT_KEY = sql(
    "UPDATE lease_keys SET last_fencing_token = $3, current_lease_id = $4"
    " WHERE namespace = $1 AND key = $2"
)
_REMEMBER = sql(
    "INSERT INTO lease_requests (namespace, request_id, lease_id, fingerprint, created_at_us)"
    " VALUES ($1, $2, $3, $4, $5)"
)
# PostgreSQL: the lease, the key's token and the request record in one round trip.
_GRANT_PG = sql(
    f"""
    WITH l AS (INSERT INTO leases ({rows.COLUMNS}) VALUES ({_PLACEHOLDERS})),
    k AS (
        UPDATE lease_keys SET last_fencing_token = $7, current_lease_id = $1
        WHERE namespace = $2 AND key = $3
    ),
    r AS (
        INSERT INTO lease_requests (namespace, request_id, lease_id, fingerprint,
                                    created_at_us)
        SELECT $2, $17, $1, $20::text, $9 WHERE $17 IS NOT NULL
    )
    SELECT 1
    """,
    sqlite="SELECT 1",
)
# PostgreSQL, one round trip: a key never leased before gets its row and the grant (token
# 1); an existing key is locked instead (the no-op update takes the row lock and waits for
# a holder; RETURNING reads the row after the wait), and then its current lease (lock
# order: key, then lease). ``xmax = 0`` tells an inserted row from an updated one.
_CASTS = [
    "text",
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "text",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "text",
    "bytea",
    "text",
    "text",
    "bigint",
    "bigint",
]
_TYPED = ", ".join(f"${i}::{t}" for i, t in enumerate(_CASTS, start=1))
_CLAIM_KEY_TEMPLATE = """
    WITH {live}k AS (
        INSERT INTO lease_keys (namespace, key, last_fencing_token, available_at_us,
                                current_lease_id)
        {source}
        ON CONFLICT (namespace, key) DO UPDATE SET namespace = EXCLUDED.namespace
        RETURNING (xmax = 0) AS inserted, last_fencing_token AS k_last_fencing_token,
            available_at_us AS k_available_at_us, current_lease_id AS k_current_lease_id
    ),
    l AS (INSERT INTO leases ({columns}) SELECT {typed} FROM k WHERE k.inserted),
    r AS (
        INSERT INTO lease_requests (namespace, request_id, lease_id, fingerprint,
                                    created_at_us)
        SELECT $2::text, $17::text, $1::text, $20::text, $9::bigint FROM k
        WHERE k.inserted AND $17::text IS NOT NULL
    ),
    c AS (
        SELECT {columns} FROM leases
        WHERE lease_id = (SELECT k_current_lease_id FROM k WHERE NOT k.inserted)
        FOR UPDATE
    )
    SELECT k.*, c.* FROM k LEFT JOIN c ON true
    """
_CLAIM_KEY_PG = sql(
    _CLAIM_KEY_TEMPLATE.format(
        live="",
        source="VALUES ($2::text, $3::text, $7::bigint, 0, $1::text)",
        columns=rows.COLUMNS,
        typed=_TYPED,
    ),
    sqlite="SELECT 1",
)
# The same with the principal's cap ($21): at the cap, neither the key nor a lease is
# written and no row comes back (the caller then looks at the key on its own). ``live``
# counts in the statement's snapshot, taken under the revision lock.
_CLAIM_KEY_CAPPED_PG = sql(
    _CLAIM_KEY_TEMPLATE.format(
        live="""live AS (
            SELECT count(*) AS n FROM (
                SELECT 1 FROM leases WHERE principal = $5::text AND state = 'ACTIVE'
                AND expires_at_us > $9::bigint LIMIT $21::bigint
            ) AS s
        ),
        """,
        source="SELECT $2::text, $3::text, $7::bigint, 0, $1::text FROM live"
        " WHERE live.n < $21::bigint",
        columns=rows.COLUMNS,
        typed=_TYPED,
    ),
    sqlite="SELECT 1",
)
_NEW_KEY = sql(
    "INSERT INTO lease_keys (namespace, key, last_fencing_token, available_at_us,"
    " current_lease_id) VALUES ($1, $2, $3, 0, $4) ON CONFLICT (namespace, key) DO NOTHING"
)
_FIRST_RESULT = sql(
    "SELECT lease_id, fingerprint FROM lease_requests WHERE namespace = $1 AND request_id = $2"
)


class _AtCap:
    """_claim_key's answer when the principal holds its most live leases."""


_AT_CAP = _AtCap()


def new_lease_id() -> str:
    return secrets.token_hex(16)


async def acquire(tx: Tx, p: AcquireParams) -> AcquireResult | Refuse:
    if p.request_id is not None:
        first = await _first_result(tx, p)
        if first is not None:
            return AcquireResult(rows.effective(first, tx.now_us), created=False)
    intent = AcquireIntent(p.holder, p.principal)
    # The answer for a key never leased before, granted by the same statement that finds
    # out whether the key is new.
    # Under the revision lock, so a purge of the key's row cannot slip in before it.
    await tx.lock_revisions()
    fresh = decide_acquire(
        LeaseKey(p.namespace, p.key, last_fencing_token=tx.token_floor), None, intent, tx.now_us
    )
    assert isinstance(fresh, Grant)
    revision = await tx.next_revision()
    lease = _new_lease(tx, p, fresh, revision)
    claim = await _claim_key(tx, p, lease)
    if claim is None:
        await rows.record(tx, revision, "ACQUIRED", lease)
        tx.note_deadline(lease.expires_at_us)
        return AcquireResult(lease, created=True)
    tx.unreserve_revision(revision)
    if isinstance(claim, _AtCap):
        return await _acquire_at_cap(tx, p, intent)
    key, current = claim
    return await _decide(tx, p, intent, key, current, at_cap=False)


async def _decide(
    tx: Tx,
    p: AcquireParams,
    intent: AcquireIntent,
    key: LeaseKey,
    current: Lease | None,
    *,
    at_cap: bool,
) -> AcquireResult | Refuse:
    """Decide over the locked key and its current lease, and apply the decision."""
    tx.refresh_now()
    decision = decide_acquire(key, current, intent, tx.now_us)
    if isinstance(decision, ReturnExisting):
        await _remember(tx, p, decision.lease.lease_id)
        return AcquireResult(decision.lease, created=False)
    if at_cap and isinstance(decision, Grant):
        raise _lease_limit(p)
    if decision.expire_current is not None:
        await end_leases(tx, [decision.expire_current], LeaseState.EXPIRED)
    if isinstance(decision, Refuse):
        # Nothing was granted: a retry with the same request id may still succeed.
        if current is not None and isinstance(decision.error, errors.LeaseHeld):
            return Held(
                decision.error, decision.expire_current, decision.retry_at_us, current.principal
            )
        return decision
    return AcquireResult(await _grant(tx, key, p, decision), created=True)


async def _acquire_at_cap(
    tx: Tx, p: AcquireParams, intent: AcquireIntent
) -> AcquireResult | Refuse:
    """The principal holds as many live leases as it may: only a lease it already holds on
    the key comes back (an idempotent re-acquire), or the key's own refusal; a new lease is
    refused."""
    row = await tx.fetchrow(_LOCK_EXISTING_KEY, p.namespace, p.key)
    if row is None:
        raise _lease_limit(p)
    key = LeaseKey(
        namespace=p.namespace,
        key=p.key,
        last_fencing_token=row["last_fencing_token"],
        available_at_us=row["available_at_us"],
        current_lease_id=row["current_lease_id"],
    )
    current = await rows.get(tx, key.current_lease_id, lock=True) if key.current_lease_id else None
    return await _decide(tx, p, intent, key, current, at_cap=True)


def _lease_limit(p: AcquireParams) -> errors.LeaseLimit:
    return errors.LeaseLimit(
        f"principal {p.principal!r} holds {p.max_live_leases} live leases, the most allowed;"
        " release some first",
        {"principal": p.principal, "limit": str(p.max_live_leases)},
    )


async def _claim_key(
    tx: Tx, p: AcquireParams, fresh: Lease
) -> tuple[LeaseKey, Lease | None] | _AtCap | None:
    """Grant ``fresh`` if the key was never leased (None), or lock the key and its current
    lease: renewals take only the lease's lock, and the decision must see a renewal that
    committed after the key lock was granted. ``_AT_CAP`` (nothing done) when the principal
    holds its most live leases."""
    values = rows.lease_values(fresh)
    if tx.is_pg:
        fingerprint = _fingerprint(p) if p.request_id is not None else None
        if p.max_live_leases:
            row = await tx.fetchrow(_CLAIM_KEY_CAPPED_PG, *values, fingerprint, p.max_live_leases)
            if row is None:
                return _AT_CAP
        else:
            row = await tx.fetchrow(_CLAIM_KEY_PG, *values, fingerprint)
        assert row is not None
        if row["inserted"]:
            return None
        key = LeaseKey(
            namespace=p.namespace,
            key=p.key,
            last_fencing_token=row["k_last_fencing_token"],
            available_at_us=row["k_available_at_us"],
            current_lease_id=row["k_current_lease_id"],
        )
        return key, rows.row_to_lease(row) if row["lease_id"] is not None else None
    if p.max_live_leases:
        live = await tx.fetchval(_COUNT_LIVE, p.principal, tx.now_us, p.max_live_leases)
        if live >= p.max_live_leases:
            return _AT_CAP
    if await tx.execute(_NEW_KEY, p.namespace, p.key, fresh.fencing_token, fresh.lease_id):
        await tx.execute(_INSERT_LEASE, *values)
        await _remember(tx, p, fresh.lease_id)
        return None
    key = await keys.lock(tx, p.namespace, p.key)
    current = await rows.get(tx, key.current_lease_id, lock=True) if key.current_lease_id else None
    return key, current


def _new_lease(tx: Tx, p: AcquireParams, grant: Grant, revision: int) -> Lease:
    now = tx.now_us
    return Lease(
        lease_id=new_lease_id(),
        namespace=p.namespace,
        key=p.key,
        holder=p.holder,
        principal=p.principal,
        ttl_us=p.ttl_us,
        fencing_token=grant.fencing_token,
        state=LeaseState.ACTIVE,
        acquired_at_us=now,
        renewed_at_us=now,
        expires_at_us=now + p.ttl_us,
        lock_delay_us=p.lock_delay_us,
        labels=dict(p.labels or {}),
        request_id=p.request_id,
        create_revision=revision,
        mod_revision=revision,
    )


async def _grant(tx: Tx, key: LeaseKey, p: AcquireParams, grant: Grant) -> Lease:
    revision = await tx.next_revision()
    lease = _new_lease(tx, p, grant, revision)
    values = rows.lease_values(lease)
    if tx.is_pg:
        fingerprint = _fingerprint(p) if p.request_id is not None else None
        await tx.execute(_GRANT_PG, *values, fingerprint)
    else:
        await tx.execute(_INSERT_LEASE, *values)
        await tx.execute(_POINT_KEY, key.namespace, key.key, grant.fencing_token, lease.lease_id)
        await _remember(tx, p, lease.lease_id)
    await rows.record(tx, revision, "ACQUIRED", lease)
    tx.note_deadline(lease.expires_at_us)
    return lease


async def _remember(tx: Tx, p: AcquireParams, lease_id: str) -> None:
    """Record a request id's first answer; two first attempts racing insert the same key,
    and the loser runs again (a unique violation is a Retry) and then finds this one."""
    if p.request_id is not None:
        await tx.execute(_REMEMBER, p.namespace, p.request_id, lease_id, _fingerprint(p), tx.now_us)


async def _first_result(tx: Tx, p: AcquireParams) -> Lease | None:
    """The lease a request id was first answered with, or None for a new request id."""
    assert p.request_id is not None
    row = await tx.fetchrow(_FIRST_RESULT, p.namespace, p.request_id)
    if row is None:
        return None
    first = await rows.get(tx, row["lease_id"])
    if row["fingerprint"] != _fingerprint(p):
        facts = {"request_id": p.request_id}
        # Request ids are per namespace: another principal's lease id stays hidden.
        if first is not None and first.principal == p.principal:
            facts["lease_id"] = first.lease_id
        raise errors.RequestIdConflict(
            f"request_id {p.request_id!r} was first used for a different acquire", facts
        )
    return first


def _fingerprint(p: AcquireParams) -> str:
    """What makes two acquires with one request id the same request."""
    content = [
        p.key,
        p.holder,
        p.principal,
        p.ttl_us,
        p.lock_delay_us,
        sorted((p.labels or {}).items()),
    ]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()
