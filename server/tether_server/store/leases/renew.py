"""Renewals: lock the named leases in one global order, decide each with the clock read
after the locks, extend the ones that may be in one statement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tether_server.domain import errors
from tether_server.domain.lease import ANONYMOUS, LeaseState, renewal_refusal
from tether_server.store.leases import rows
from tether_server.store.sql import sql
from tether_server.store.tx import Row, Tx


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
# shorten a deadline a newer renewal already reported. One statement for every lease of
# the batch, each with the stream it was renewed on (or its old one).
_EXTEND = sql(
    """
    UPDATE leases AS l SET renewed_at_us = GREATEST(l.renewed_at_us, $3),
        expires_at_us = GREATEST(l.expires_at_us, $3 + l.ttl_us),
        stream_id = COALESCE(v.stream_id, l.stream_id)
    FROM unnest($1::text[], $2::text[]) AS v(lease_id, stream_id)
    WHERE l.lease_id = v.lease_id AND l.state = 'ACTIVE' AND l.expires_at_us > $3
    RETURNING l.lease_id, l.expires_at_us, l.ttl_us
    """,
    sqlite="""
    UPDATE leases SET renewed_at_us = MAX(renewed_at_us, $3),
        expires_at_us = MAX(expires_at_us, $3 + ttl_us),
        stream_id = COALESCE($2, stream_id)
    WHERE lease_id = $1 AND state = 'ACTIVE' AND expires_at_us > $3
    RETURNING lease_id, expires_at_us, ttl_us
    """,
)
_SET_PROGRESS = sql("UPDATE leases SET progress = $2 WHERE lease_id = $1")

Outcome = Renewed | errors.TetherError


@dataclass(frozen=True)
class RenewUnit:
    """The renewals of one request (a KeepAlive message, a Renew call) as a unit of work.

    The committer merges every RenewUnit of a batch into one (``merge``): one lock statement
    and one update for all of them, however many streams and clients they came from.
    """

    namespace: str
    renewals: Sequence[Renewal]
    stream_id: str | None = None

    async def __call__(self, tx: Tx) -> list[Outcome]:
        (outcomes,) = await renew_merged(tx, [self])
        return outcomes

    @staticmethod
    def merge(units: Sequence[RenewUnit]) -> Callable[[Tx], Awaitable[list[list[Outcome]]]]:
        return lambda tx: renew_merged(tx, units)


async def renew_merged(tx: Tx, units: Sequence[RenewUnit]) -> list[list[Outcome]]:
    """The outcomes of each unit's renewals, unit by unit, in order."""
    ids = sorted({r.lease_id for unit in units for r in unit.renewals})
    if not ids:
        return [[] for _ in units]
    found = {
        lease.lease_id: lease
        for lease in (rows.row_to_lease(row) for row in await tx.fetch(rows.LOCK_MANY, ids))
    }
    now = tx.refresh_now()

    def may_renew(namespace: str, r: Renewal) -> bool:
        lease = found.get(r.lease_id)
        return (
            lease is not None
            and lease.namespace == namespace
            and lease.state is LeaseState.ACTIVE
            and lease.expires_at_us > now
            and lease.fencing_token == r.fencing_token
            and lease.principal == r.principal
        )

    # The stream each lease was last renewed on; progress, last value wins. Only a renewal
    # that itself succeeds may store either.
    streams: dict[str, str | None] = {}
    progress: dict[str, bytes] = {}
    for unit in units:
        for r in unit.renewals:
            if may_renew(unit.namespace, r):
                if r.lease_id not in streams or unit.stream_id is not None:
                    streams[r.lease_id] = unit.stream_id
                if r.progress is not None:
                    progress[r.lease_id] = r.progress
    extended: dict[str, Row] = {}
    if streams:
        chosen = sorted(streams)
        if tx.is_pg:
            found_rows = await tx.fetch(_EXTEND, chosen, [streams[i] for i in chosen], now)
        else:
            found_rows = []
            for lease_id in chosen:
                found_rows.extend(await tx.fetch(_EXTEND, lease_id, streams[lease_id], now))
        extended = {row["lease_id"]: row for row in found_rows}
        if progress:
            await tx.executemany(_SET_PROGRESS, list(progress.items()))
    results: list[list[Outcome]] = []
    for unit in units:
        outcomes: list[Outcome] = []
        for r in unit.renewals:
            row = extended.get(r.lease_id) if may_renew(unit.namespace, r) else None
            if row is not None:
                outcomes.append(
                    Renewed(r.lease_id, r.fencing_token, row["expires_at_us"], row["ttl_us"])
                )
            else:
                outcomes.append(
                    renewal_refusal(
                        found.get(r.lease_id),
                        r.lease_id,
                        unit.namespace,
                        r.fencing_token,
                        r.principal,
                        now,
                    )
                )
        results.append(outcomes)
    return results
