"""Lease reads: one snapshot each, lazily expired for every reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether_server.domain import errors
from tether_server.domain.lease import Lease, LeaseState, not_found
from tether_server.store.leases import rows
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

_BY_KEY = sql(
    f"SELECT {rows.COLUMNS} FROM leases WHERE namespace = $1 AND key = $2"
    " ORDER BY fencing_token DESC LIMIT 1"
)


@dataclass(frozen=True)
class ListLeasesParams:
    namespace: str
    key_prefix: str = ""
    holder: str = ""
    states: frozenset[LeaseState] = frozenset()
    limit: int = 100
    # (key, fencing_token) of the last item of the previous page.
    after: tuple[str, int] | None = None


async def get(tx: Tx, namespace: str, lease_id: str) -> Lease:
    lease = await rows.get(tx, lease_id)
    if lease is None or lease.namespace != namespace:
        raise not_found(lease_id, namespace)
    return rows.effective(lease, tx.now_us)


async def get_by_key(tx: Tx, namespace: str, key: str) -> Lease:
    row = await tx.fetchrow(_BY_KEY, namespace, key)
    if row is None:
        raise errors.LeaseNotFound(
            f"no lease for key {key!r} in namespace {namespace!r}",
            {"key": key, "namespace": namespace},
        )
    return rows.effective(rows.row_to_lease(row), tx.now_us)


async def list_leases(tx: Tx, p: ListLeasesParams) -> list[Lease]:
    args: list[Any] = [p.namespace]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = ["namespace = $1"]
    if p.key_prefix:
        # substr, not LIKE: SQLite's LIKE ignores ASCII case and both need escaping.
        where.append(f"substr(key, 1, {arg(len(p.key_prefix))}::int) = {arg(p.key_prefix)}")
    if p.holder:
        where.append(f"holder = {arg(p.holder)}")
    if p.states:
        # Only states judged by the deadline take the clock (an unused parameter has no type).
        now = arg(tx.now_us) if p.states & {LeaseState.ACTIVE, LeaseState.EXPIRED} else ""
        where.append("(" + " OR ".join(_in_state(s, now) for s in sorted(p.states)) + ")")
    if p.after is not None:
        where.append(f"(key, fencing_token) > ({arg(p.after[0])}, {arg(p.after[1])})")
    query = sql(
        f"SELECT {rows.COLUMNS} FROM leases WHERE {' AND '.join(where)}"
        f" ORDER BY key, fencing_token LIMIT {arg(p.limit)}::int"
    )
    return [rows.effective(rows.row_to_lease(r), tx.now_us) for r in await tx.fetch(query, *args)]


def _in_state(state: LeaseState, now: str) -> str:
    """The SQL form of Lease.effective_state(now) == state."""
    if state is LeaseState.ACTIVE:
        return f"(state = 'ACTIVE' AND expires_at_us > {now})"
    if state is LeaseState.EXPIRED:
        return f"(state = 'EXPIRED' OR (state = 'ACTIVE' AND expires_at_us <= {now}))"
    return f"state = '{state.value}'"
