"""Retention for leases: ended lease rows, their request-id records, and the keys no lease
uses any more.

A purged key's row took its fencing-token counter with it, so the highest token it ever
had is raised into the global floor first (``revisions.token_floor``, under the revision
lock every grant also takes first): a key leased again starts above every token it had.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether_server.store.sql import sql
from tether_server.store.tx import Tx

_ENDED_WHERE = (
    "ended_at_us IS NOT NULL AND ended_at_us <= $2 AND state <> 'ACTIVE'"
    " AND ($1 = '' OR namespace = $1)"
)
_PICK = sql(
    f"SELECT lease_id, namespace, key, request_id FROM leases WHERE {_ENDED_WHERE}"
    " LIMIT $3 FOR UPDATE SKIP LOCKED"
)
_COUNT = sql(
    f"SELECT count(*) AS leases, count(request_id) AS requests FROM leases WHERE {_ENDED_WHERE}"
)
_DELETE_LEASES = sql("DELETE FROM leases WHERE lease_id = ANY($1::text[])")
_DELETE_REQUESTS = sql(
    "DELETE FROM lease_requests WHERE namespace = $1 AND request_id = ANY($2::text[])"
    " AND lease_id = ANY($3::text[])"
)
# Keys of the purged leases that no lease row names any more and whose lock-delay passed.
_DELETE_KEYS = sql(
    "DELETE FROM lease_keys WHERE namespace = $1 AND key = ANY($2::text[])"
    " AND available_at_us <= $3 AND NOT EXISTS (SELECT 1 FROM leases l"
    " WHERE l.namespace = lease_keys.namespace AND l.key = lease_keys.key)"
    " RETURNING last_fencing_token"
)
_RAISE_FLOOR = sql("UPDATE revisions SET token_floor = GREATEST(token_floor, $1) WHERE id = 1")
# Keys whose every lease would go: what a dry run reports for "lease_keys".
_COUNT_KEYS = sql(
    "SELECT count(*) FROM lease_keys k WHERE ($1 = '' OR k.namespace = $1)"
    " AND k.available_at_us <= $3 AND NOT EXISTS (SELECT 1 FROM leases l"
    " WHERE l.namespace = k.namespace AND l.key = k.key"
    " AND NOT (l.ended_at_us IS NOT NULL AND l.ended_at_us <= $2 AND l.state <> 'ACTIVE'))"
)


@dataclass(frozen=True)
class LeasePurge:
    leases: int = 0
    requests: int = 0
    keys: int = 0

    def by_table(self) -> dict[str, int]:
        """The lease rows first: they drive the purge's batches."""
        return {"leases": self.leases, "lease_requests": self.requests, "lease_keys": self.keys}


async def purge_ended(tx: Tx, namespace: str, ended_before_us: int, limit: int) -> LeasePurge:
    """Remove up to ``limit`` leases that ended at or before the cutoff, their request-id
    records, and then the keys they leave unused."""
    # Revision lock first, as every grant takes it first: no deadlock with an acquire of
    # one of these keys, and none can read the old floor after this commits.
    await tx.lock_revisions()
    found = await tx.fetch(_PICK, namespace, ended_before_us, limit)
    if not found:
        return LeasePurge()
    lease_ids = [r["lease_id"] for r in found]
    await tx.execute(_DELETE_LEASES, lease_ids)
    requests = keys = 0
    by_namespace: dict[str, tuple[set[str], list[str]]] = {}
    for r in found:
        ns_keys, ns_requests = by_namespace.setdefault(r["namespace"], (set(), []))
        ns_keys.add(r["key"])
        if r["request_id"] is not None:
            ns_requests.append(r["request_id"])
    floor = 0
    for ns, (ns_keys, ns_requests) in by_namespace.items():
        if ns_requests:
            requests += await tx.execute(_DELETE_REQUESTS, ns, ns_requests, lease_ids)
        gone = await tx.fetch(_DELETE_KEYS, ns, sorted(ns_keys), tx.now_us)
        keys += len(gone)
        floor = max([floor, *(int(g["last_fencing_token"]) for g in gone)])
    if floor:
        await tx.execute(_RAISE_FLOOR, floor)
    return LeasePurge(len(found), requests, keys)


async def count_ended(tx: Tx, namespace: str, ended_before_us: int) -> LeasePurge:
    row = await tx.fetchrow(_COUNT, namespace, ended_before_us)
    assert row is not None
    keys = await tx.fetchval(_COUNT_KEYS, namespace, ended_before_us, tx.now_us)
    return LeasePurge(int(row["leases"]), int(row["requests"]), int(keys))
