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
    UPDATE leases AS l SET renewed_at_us = GREATEST(l.renewed_at_us, $2),
        expires_at_us = GREATEST(l.expires_at_us, $2 + l.ttl_us),
        stream_id = COALESCE(v.stream_id, l.stream_id)
    FROM unnest($1::text[], $3::text[]) AS v(lease_id, stream_id)
    WHERE l.lease_id = v.lease_id AND l.state = 'ACTIVE' AND l.expires_at_us > $2
    RETURNING l.lease_id, l.expires_at_us, l.ttl_us
    """
)
# SQLite: the same update per lease through one prepared statement (executemany), then one
# read of the results; the batch holds the whole database, so nothing moves in between.
_EXTEND_ONE = sql(
    """
    UPDATE leases SET renewed_at_us = MAX(renewed_at_us, $2),
        expires_at_us = MAX(expires_at_us, $2 + ttl_us), stream_id = COALESCE($3, stream_id)
    WHERE lease_id = $1 AND state = 'ACTIVE' AND expires_at_us > $2
    """
)
_EXTENDED = sql(
    "SELECT lease_id, expires_at_us, ttl_us FROM leases WHERE lease_id = ANY($1::text[])"
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


# What a renewal decides on: the locked rows, without the parts only a refusal reports.
_LOCK_FOR_RENEWAL = sql(
    "SELECT lease_id, namespace, state, expires_at_us, fencing_token, principal FROM leases"
    " WHERE lease_id = ANY($1::text[]) ORDER BY lease_id FOR UPDATE"
)


async def renew_merged(tx: Tx, units: Sequence[RenewUnit]) -> list[list[Outcome]]:
    """The outcomes of each unit's renewals, unit by unit, in order."""
    ids = sorted({r.lease_id for unit in units for r in unit.renewals})
    if not ids:
        return [[] for _ in units]
    locked = {row["lease_id"]: row for row in await tx.fetch(_LOCK_FOR_RENEWAL, ids)}
    now = tx.refresh_now()
    active = LeaseState.ACTIVE.value

    def may_renew(namespace: str, r: Renewal) -> bool:
        row = locked.get(r.lease_id)
        return (
            row is not None
            and row["namespace"] == namespace
            and row["state"] == active
            and row["expires_at_us"] > now
            and row["fencing_token"] == r.fencing_token
            and row["principal"] == r.principal
        )

    # The stream each lease was last renewed on; progress, last value wins. Only a renewal
    # that itself succeeds may store either.
    streams: dict[str, str | None] = {}
    progress: dict[str, bytes] = {}
    refused: list[tuple[int, int, RenewUnit, Renewal]] = []
    for u, unit in enumerate(units):
        for i, r in enumerate(unit.renewals):
            if may_renew(unit.namespace, r):
                if r.lease_id not in streams or unit.stream_id is not None:
                    streams[r.lease_id] = unit.stream_id
                if r.progress is not None:
                    progress[r.lease_id] = r.progress
            else:
                refused.append((u, i, unit, r))
    extended: dict[str, Row] = {}
    if streams:
        chosen = sorted(streams)
        if tx.is_pg:
            found = await tx.fetch(_EXTEND, chosen, now, [streams[i] for i in chosen])
        else:
            await tx.executemany(_EXTEND_ONE, [(i, now, streams[i]) for i in chosen])
            found = await tx.fetch(_EXTENDED, chosen)
        extended = {row["lease_id"]: row for row in found}
        if progress:
            await tx.executemany(_SET_PROGRESS, list(progress.items()))
    # Refusals say why, from the whole lease (rare: read only for them).
    reasons: dict[tuple[int, int], Outcome] = {}
    if refused:
        whole = {
            lease.lease_id: lease
            for lease in (
                rows.row_to_lease(row)
                for row in await tx.fetch(
                    rows.SELECT_MANY, sorted({r.lease_id for _, _, _, r in refused})
                )
            )
        }
        for u, i, unit, r in refused:
            reasons[u, i] = renewal_refusal(
                whole.get(r.lease_id), r.lease_id, unit.namespace, r.fencing_token, r.principal, now
            )
    results: list[list[Outcome]] = []
    for u, unit in enumerate(units):
        outcomes: list[Outcome] = []
        for i, r in enumerate(unit.renewals):
            reason = reasons.get((u, i))
            if reason is not None:
                outcomes.append(reason)
                continue
            row = extended[r.lease_id]
            outcomes.append(
                Renewed(r.lease_id, r.fencing_token, row["expires_at_us"], row["ttl_us"])
            )
        results.append(outcomes)
    return results
