"""The garbage collector's units: one queued owner at a time, in bounded, set-based batches.

A queue item names an owner whose dependents need a look:
- GONE (no such object, an ended lease, a purged saga): each dependent with another solid
  owner loses its references to owners that are not solid; the others are deleted
  (background, or foreground when a waiting owner asked and they have dependents);
- WAITING (terminating with ``foregroundDeletion``): the same for its dependents, then,
  once no dependent with block_owner_deletion remains, the finalizer goes;
- orphaning (terminating with ``orphan``): every dependent loses its reference to it, then
  the finalizer goes.

Each batch reads its dependents with one query, judges all their owners with one query per
owner kind, and writes with a few statements, so a cascade costs batches, not round trips
per object. A failed item stays queued with its error and a later next attempt (backoff).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tether_server.domain import objects as domain
from tether_server.domain.objects import (
    LEASE_KIND,
    ORPHAN_FINALIZER,
    SAGA_KIND,
    Collect,
    EventType,
    Keep,
    Obj,
    OwnerRef,
    OwnerState,
    Policy,
)
from tether_server.store.objects import rows, units
from tether_server.store.sql import sql
from tether_server.store.tx import Row, Tx

# How long an owner waiting for terminating dependents stays parked before a recheck
# (removals and dropped references wake it sooner).
PARK_US = 60_000_000
_BACKOFF_INITIAL_US = 1_000_000
_BACKOFF_MAX_US = 300_000_000

_DUE = sql(
    "SELECT namespace, uid FROM gc_queue WHERE next_attempt_us <= $1"
    " ORDER BY next_attempt_us, namespace, uid LIMIT $2"
)
_LOCK_ITEM = sql(
    "SELECT attempts FROM gc_queue WHERE namespace = $1 AND uid = $2 FOR UPDATE SKIP LOCKED"
)
_DONE = sql("DELETE FROM gc_queue WHERE namespace = $1 AND uid = $2")
_PARK = sql(
    "UPDATE gc_queue SET next_attempt_us = $3, attempts = 0, last_error = ''"
    " WHERE namespace = $1 AND uid = $2"
)
_ATTEMPTS = sql("SELECT attempts FROM gc_queue WHERE namespace = $1 AND uid = $2 FOR UPDATE")
_FAILED = sql(
    "UPDATE gc_queue SET last_error = $3, attempts = $4, next_attempt_us = $5"
    " WHERE namespace = $1 AND uid = $2"
)
_FROM_DEPENDENTS = (
    f"{rows.SELECT} JOIN object_owners oo ON oo.dependent_uid = o.uid"
    " WHERE oo.owner_uid = $1 AND o.namespace = $2"
)
_IN_ORDER = " ORDER BY oo.dependent_uid LIMIT $3 FOR UPDATE OF o"
# Dependents not already terminating (their own finalizers hold them), and all of them.
_DEPENDENTS = sql(f"{_FROM_DEPENDENTS} AND o.deletion_ts_us IS NULL{_IN_ORDER}")
_ALL_DEPENDENTS = sql(f"{_FROM_DEPENDENTS}{_IN_ORDER}")
_OBJECT_OWNERS = sql(
    "SELECT uid, deletion_ts_us, finalizers FROM objects"
    " WHERE namespace = $1 AND uid = ANY($2::text[])"
)
_LIVE_LEASES = sql(
    "SELECT lease_id FROM leases WHERE lease_id = ANY($1::text[]) AND state = 'ACTIVE'"
)
_LIVE_SAGAS = sql("SELECT saga_id FROM sagas WHERE namespace = $1 AND saga_id = ANY($2::text[])")
_BLOCKING = sql(
    "SELECT count(*) FROM object_owners WHERE owner_uid = $1 AND block_owner_deletion = 1"
)
QUEUE_STATS = sql(
    "SELECT count(*) AS depth, min(enqueued_at_us) AS oldest,"
    " sum(CASE WHEN attempts > 0 THEN 1 ELSE 0 END) AS failing FROM gc_queue"
)
_FAILING = sql(
    "SELECT namespace, uid, attempts, last_error, next_attempt_us FROM gc_queue"
    " WHERE attempts > 0 ORDER BY namespace, uid LIMIT $1"
)


@dataclass(frozen=True)
class ItemResult:
    # Dependents deleted (removed now or marked terminating), and references dropped.
    deleted: int = 0
    orphaned: int = 0
    # The item is finished (removed from the queue) or parked; False means more batches.
    settled: bool = True


async def due(tx: Tx, limit: int) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in await tx.fetch(_DUE, tx.now_us, limit)]


async def collect_items(tx: Tx, items: Sequence[tuple[str, str]], budget: int) -> list[ItemResult]:
    """Several queued owners in one transaction, until about ``budget`` dependents were
    handled; the items not reached stay due (their results are missing)."""
    results: list[ItemResult] = []
    for namespace, uid in items:
        if budget <= 0:
            break
        result = await collect_item(tx, namespace, uid, budget)
        results.append(result)
        budget -= max(1, result.deleted + result.orphaned)
    return results


async def collect_item(tx: Tx, namespace: str, uid: str, batch: int) -> ItemResult:
    """One bounded batch of work on one queued owner."""
    if await tx.fetchrow(_LOCK_ITEM, namespace, uid) is None:
        return ItemResult()  # done meanwhile, or another replica holds it
    owner = await rows.by_uid(tx, namespace, uid, lock=True)
    tx.refresh_now()
    if owner is not None and owner.terminating and ORPHAN_FINALIZER in owner.finalizers:
        return await _orphan(tx, owner, batch)
    if owner is not None:
        state = owner.owner_state()
    elif await _builtin_alive(tx, namespace, uid):
        state = OwnerState.SOLID
    else:
        state = OwnerState.GONE
    if state is OwnerState.SOLID:
        await tx.execute(_DONE, namespace, uid)
        return ItemResult()
    found = [_Dependent.of(r) for r in await tx.fetch(_DEPENDENTS, uid, namespace, batch)]
    deleted, orphaned = await _settle_dependents(tx, namespace, uid, state, found)
    if len(found) == batch:
        return ItemResult(deleted, orphaned, settled=False)
    if state is OwnerState.GONE:
        await tx.execute(_DONE, namespace, uid)
        return ItemResult(deleted, orphaned)
    assert owner is not None
    if int(await tx.fetchval(_BLOCKING, uid)) > 0:
        # Blocking dependents are terminating (their finalizers, or their own foreground
        # wait): their removal wakes this item again.
        await tx.execute(_PARK, namespace, uid, tx.now_us + PARK_US)
        return ItemResult(deleted, orphaned)
    # Settle the item first: removing the owner may queue its uid again, and that must stay.
    await tx.execute(_DONE, namespace, uid)
    after = domain.without_finalizers(owner, [domain.FOREGROUND_FINALIZER])
    await units.write(tx, owner, after)
    return ItemResult(deleted, orphaned)


async def _builtin_alive(tx: Tx, namespace: str, uid: str) -> bool:
    """Whether ``uid`` is an active lease or a saga not purged (a solid owner)."""
    if await tx.fetchrow(_LIVE_LEASES, [uid]) is not None:
        return True
    return await tx.fetchrow(_LIVE_SAGAS, namespace, [uid]) is not None


async def _orphan(tx: Tx, owner: Obj, batch: int) -> ItemResult:
    found = [
        _Dependent.of(r) for r in await tx.fetch(_ALL_DEPENDENTS, owner.uid, owner.namespace, batch)
    ]
    await _strip(tx, owner.namespace, [(d, frozenset({owner.uid})) for d in found])
    if len(found) == batch:
        return ItemResult(orphaned=len(found), settled=False)
    await tx.execute(_DONE, owner.namespace, owner.uid)
    await units.write(tx, owner, domain.without_finalizers(owner, [ORPHAN_FINALIZER]))
    return ItemResult(orphaned=len(found))


@dataclass(frozen=True)
class _Dependent:
    """A dependent as its row came, with only what the decision needs parsed (a cascade
    removes most dependents without ever building the whole object)."""

    row: Row
    uid: str
    owner_refs: tuple[OwnerRef, ...]
    finalizers: tuple[str, ...]

    @classmethod
    def of(cls, row: Row) -> _Dependent:
        return cls(
            row,
            row["uid"],
            rows.refs_from_json(row["owner_refs"]),
            rows.finalizers_of(row["finalizers"]),
        )

    def obj(self) -> Obj:
        return rows.row_to_obj(self.row)

    def removal(self) -> units.Removal:
        row = self.row
        return units.Removal(
            row["namespace"],
            self.uid,
            f"{row['kind']}/{row['name']}",
            tuple(r.uid for r in self.owner_refs),
            rows.snapshot_from_row(row),
        )


async def _settle_dependents(
    tx: Tx, namespace: str, owner_uid: str, owner_state: OwnerState, found: Sequence[_Dependent]
) -> tuple[int, int]:
    if not found:
        return 0, 0
    states = await _owner_states(tx, namespace, found, {owner_uid: owner_state})
    owning = await rows.owning(tx, [d.uid for d in found])
    # A dependent's solid owner may be another dependent that this batch deletes: judge
    # again with the batch's own decisions until none changes, so the result does not
    # depend on the order of the batch. Owners are acyclic, so this settles within as many
    # rounds as the batch is deep; the bound only guards against a bug looping forever.
    actions: dict[str, domain.DependentAction] = {}
    owners_in_batch = {r.uid for d in found for r in d.owner_refs}
    for _ in range(len(found) + 1):
        for dependent in found:
            actions[dependent.uid] = domain.decide_dependent(
                dependent.owner_refs, states, dependent.uid in owning
            )
        moved = False
        for dependent in found:
            if dependent.uid not in owners_in_batch:
                continue
            action = actions[dependent.uid]
            if not isinstance(action, Collect):
                continue
            if action.policy is Policy.FOREGROUND:
                after = OwnerState.WAITING
            else:
                after = OwnerState.SOLID if dependent.finalizers else OwnerState.GONE
            if states.get(dependent.uid, OwnerState.SOLID) is not after:
                states[dependent.uid] = after
                moved = moved or after is not OwnerState.SOLID
        if not moved:
            break
    keep: list[tuple[_Dependent, frozenset[str]]] = []
    remove: list[units.Removal] = []
    mark: list[tuple[Obj, Policy]] = []
    foreground = Policy.FOREGROUND
    for dependent in found:
        action = actions[dependent.uid]
        if isinstance(action, Keep):
            if action.strip:
                keep.append((dependent, action.strip))
            continue
        if action.policy is foreground or dependent.finalizers:
            mark.append((dependent.obj(), action.policy))
        else:
            remove.append(dependent.removal())
    await _strip(tx, namespace, keep)
    await units.remove_all(tx, remove, owning & {r.uid for r in remove})
    for marked, policy in mark:
        await units.delete_locked(tx, marked, policy)
    return len(remove) + len(mark), len(keep)


async def _owner_states(
    tx: Tx, namespace: str, found: Sequence[_Dependent], known: dict[str, OwnerState]
) -> dict[str, OwnerState]:
    by_kind: dict[str, set[str]] = defaultdict(set)
    for dependent in found:
        for ref in dependent.owner_refs:
            if ref.uid not in known:
                by_kind[ref.kind].add(ref.uid)
    states = dict(known)
    leases = sorted(by_kind.pop(LEASE_KIND, set()))
    sagas = sorted(by_kind.pop(SAGA_KIND, set()))
    others = sorted(set().union(*by_kind.values())) if by_kind else []
    for uid in (*leases, *sagas, *others):
        states[uid] = OwnerState.GONE
    if leases:
        for row in await tx.fetch(_LIVE_LEASES, leases):
            states[row[0]] = OwnerState.SOLID
    if sagas:
        for row in await tx.fetch(_LIVE_SAGAS, namespace, sagas):
            states[row[0]] = OwnerState.SOLID
    if others:
        for row in await tx.fetch(_OBJECT_OWNERS, namespace, others):
            waiting = row[1] is not None and domain.FOREGROUND_FINALIZER in rows.finalizers_of(
                row[2]
            )
            states[row[0]] = OwnerState.WAITING if waiting else OwnerState.SOLID
    return states


async def _strip(
    tx: Tx, namespace: str, items: Sequence[tuple[_Dependent, frozenset[str]]]
) -> None:
    """Dependents that stay lose references, set-based: one UPDATE and one DELETE per
    batch, one MODIFIED event each (snapshots spliced from the rows)."""
    if not items:
        return
    updates = []
    dropped: list[tuple[str, str]] = []
    for dependent, uids in items:
        revision = await tx.next_revision()
        kept = [r for r in dependent.owner_refs if r.uid not in uids]
        row = dict(dependent.row)
        row["owner_refs"] = rows.refs_to_json(kept)
        row["mod_revision"] = revision
        updates.append((dependent.uid, row["owner_refs"], revision))
        dropped.extend((dependent.uid, uid) for uid in sorted(uids))
        key = f"{row['kind']}/{row['name']}"
        snapshot = rows.snapshot_from_row(row)
        tx.record_event(revision, rows.AREA, namespace, key, dependent.uid, _MODIFIED, snapshot)
    await tx.executemany(_SET_OWNER_REFS, updates)
    await tx.executemany(_DROP_REF, dropped)
    # An owner waiting in the foreground, or orphaning, may be done now.
    await units.enqueue_terminating(tx, namespace, sorted({uid for _, u in items for uid in u}))


_MODIFIED = EventType.MODIFIED.value
_SET_OWNER_REFS = sql("UPDATE objects SET owner_refs = $2, mod_revision = $3 WHERE uid = $1")
_DROP_REF = sql("DELETE FROM object_owners WHERE dependent_uid = $1 AND owner_uid = $2")


async def record_failure(tx: Tx, namespace: str, uid: str, error: str) -> int:
    """Back off a failed item; returns its attempts so far (0: it is no longer queued)."""
    before = await tx.fetchval(_ATTEMPTS, namespace, uid)
    if before is None:
        return 0
    attempts = int(before) + 1
    delay = min(_BACKOFF_MAX_US, _BACKOFF_INITIAL_US * 2 ** min(attempts - 1, 20))
    await tx.execute(_FAILED, namespace, uid, error[:2000], attempts, tx.now_us + delay)
    return attempts


@dataclass(frozen=True)
class QueueStats:
    depth: int
    oldest_enqueued_us: int | None
    failing: int


async def queue_stats(tx: Tx) -> QueueStats:
    row = await tx.fetchrow(QUEUE_STATS)
    assert row is not None
    return QueueStats(int(row["depth"]), row["oldest"], int(row["failing"] or 0))


@dataclass(frozen=True)
class FailingItem:
    namespace: str
    uid: str
    attempts: int
    last_error: str
    next_attempt_us: int


async def failing(tx: Tx, limit: int = 100) -> list[FailingItem]:
    return [
        FailingItem(r[0], r[1], int(r[2]), r[3], int(r[4])) for r in await tx.fetch(_FAILING, limit)
    ]
