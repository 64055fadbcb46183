"""The one event log. Every area (leases now; sagas and objects next) appends to the same
table under one global revision sequence, so a revision names one moment of the whole
store, and each ``Watch*`` RPC reads its own area's rows (``area``, ``namespace``, key
prefix) resuming from any revision. Compaction is global: below the compacted revision no
area can resume, which is the etcd contract (``OUT_OF_RANGE``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether_server.domain import errors
from tether_server.store.sql import sql
from tether_server.store.tx import Row, Tx

_HEADER = sql("SELECT current, compacted FROM revisions WHERE id = 1")
_SINCE = sql(
    "SELECT revision, type, occurred_at_us, snapshot FROM events"
    " WHERE area = $1 AND namespace = $2 AND revision >= $3"
    " ORDER BY revision LIMIT $4"
)
_SINCE_PREFIX = sql(
    "SELECT revision, type, occurred_at_us, snapshot FROM events"
    " WHERE area = $1 AND namespace = $2 AND revision >= $3"
    " AND substr(key, 1, $5::int) = $6 ORDER BY revision LIMIT $4"
)
_PURGE = sql("DELETE FROM events WHERE revision <= $1")
_SET_COMPACTED = sql("UPDATE revisions SET compacted = $1 WHERE id = 1 AND compacted < $1")


@dataclass(frozen=True)
class Header:
    current: int
    compacted: int


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    header: Header


async def header(tx: Tx) -> Header:
    row = await tx.fetchrow(_HEADER)
    assert row is not None
    return Header(int(row["current"]), int(row["compacted"]))


async def since(
    tx: Tx, area: str, namespace: str, key_prefix: str, start_revision: int, limit: int
) -> Page:
    """Events with revision >= start_revision, oldest first; OUT_OF_RANGE if purged."""
    head = await header(tx)
    if 0 < start_revision <= head.compacted:
        raise errors.RevisionCompacted(
            f"revision {start_revision} was purged; the oldest available is {head.compacted + 1}",
            {
                "compact_revision": str(head.compacted),
                "requested_revision": str(start_revision),
            },
        )
    if limit <= 0:
        return Page([], head)
    args: list[Any] = [area, namespace, start_revision, limit]
    if key_prefix:
        found = await tx.fetch(_SINCE_PREFIX, *args, len(key_prefix), key_prefix)
    else:
        found = await tx.fetch(_SINCE, *args)
    return Page(found, head)


async def compact(tx: Tx, up_to_revision: int) -> int:
    """Purge events at or below a revision (never past the head). Run with emits=True: the
    batch holds the counter, so no event below the target can still commit."""
    await tx.lock_revisions()
    current = tx.last_revision or 0
    target = min(up_to_revision, current)
    purged = await tx.execute(_PURGE, target)
    await tx.execute(_SET_COMPACTED, target)
    return purged


_OLDEST = sql(
    "SELECT revision, occurred_at_us FROM events WHERE revision > $1 ORDER BY revision LIMIT $2"
)
_COUNT_OLDER = sql("SELECT count(*) FROM events WHERE revision > $1 AND occurred_at_us <= $2")


async def purge_older(tx: Tx, occurred_before_us: int, limit: int) -> int:
    """Compact up to ``limit`` of the oldest events, those that occurred at or before the
    cutoff. Compaction is a prefix (every revision at or below the compacted one is gone),
    so it stops at the first younger event even if older ones follow (replicas' clocks)."""
    await tx.lock_revisions()
    head = await header(tx)
    upto = None
    for row in await tx.fetch(_OLDEST, head.compacted, limit):
        if int(row["occurred_at_us"]) > occurred_before_us:
            break
        upto = int(row["revision"])
    if upto is None:
        return 0
    return await compact(tx, upto)


async def count_older(tx: Tx, occurred_before_us: int) -> int:
    head = await header(tx)
    return int(await tx.fetchval(_COUNT_OLDER, head.compacted, occurred_before_us))
