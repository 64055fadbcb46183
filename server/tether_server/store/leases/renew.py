"""Renewals: lock the named leases in one global order, decide each with the clock read
after the locks, extend the ones that may be in one statement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tether_server.domain import errors
from tether_server.domain.lease import ANONYMOUS, LeaseState, renewal_refusal
from tether_server.store.leases import rows
from tether_server.store.sql import sql
from tether_server.store.tx import Tx


@dataclass(frozen=True)
class Renewal:
    lease_id: str
    fencing_token: int
    progress: bytes | None = None
    # Only the principal that acquired the lease may renew it.
    principal: str = ANONYMOUS


@dataclass(frozen=True)
class Renewed:
    lease_id: str
    fencing_token: int
    expires_at_us: int
    # Remaining ttl at the moment of renewal: the full ttl.
    ttl_us: int


# Never backwards: a renewal decided at an earlier time but committed later must not
# shorten a deadline a newer renewal already reported.
_EXTEND = sql(
    """
    UPDATE leases SET renewed_at_us = GREATEST(renewed_at_us, $2),
        expires_at_us = GREATEST(expires_at_us, $2 + ttl_us),
        stream_id = COALESCE($3, stream_id)
    WHERE lease_id = ANY($1::text[]) AND state = 'ACTIVE' AND expires_at_us > $2
    RETURNING lease_id, expires_at_us, ttl_us
    """
)
_SET_PROGRESS = sql("UPDATE leases SET progress = $2 WHERE lease_id = $1")


async def renew_many(
    tx: Tx, namespace: str, renewals: Sequence[Renewal], stream_id: str | None
) -> list[Renewed | errors.TetherError]:
    """One outcome per renewal, in order. A batch may name one lease twice with different
    tokens: only the current token's renewal succeeds."""
    if not renewals:
        return []
    ids = sorted({r.lease_id for r in renewals})
    found = {
        lease.lease_id: lease
        for lease in (rows.row_to_lease(row) for row in await tx.fetch(rows.LOCK_MANY, ids))
    }
    now = tx.refresh_now()

    def may_renew(r: Renewal) -> bool:
        lease = found.get(r.lease_id)
        return (
            lease is not None
            and lease.namespace == namespace
            and lease.state is LeaseState.ACTIVE
            and lease.expires_at_us > now
            and lease.fencing_token == r.fencing_token
            and lease.principal == r.principal
        )

    allowed = [r for r in renewals if may_renew(r)]
    extended = {}
    if allowed:
        extended = {
            row["lease_id"]: row
            for row in await tx.fetch(
                _EXTEND, sorted({r.lease_id for r in allowed}), now, stream_id
            )
        }
        # Only a renewal that itself succeeded may store progress.
        progress = {r.lease_id: r.progress for r in allowed if r.progress is not None}
        if progress:
            await tx.executemany(_SET_PROGRESS, list(progress.items()))
    outcomes: list[Renewed | errors.TetherError] = []
    for r in renewals:
        row = extended.get(r.lease_id) if may_renew(r) else None
        if row is not None:
            outcomes.append(
                Renewed(r.lease_id, r.fencing_token, row["expires_at_us"], row["ttl_us"])
            )
        else:
            outcomes.append(
                renewal_refusal(
                    found.get(r.lease_id), r.lease_id, namespace, r.fencing_token, r.principal, now
                )
            )
    return outcomes
