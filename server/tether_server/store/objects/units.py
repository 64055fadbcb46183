"""Object units of work: each locks the object row, asks domain/objects.py, writes.

Lock order: the object, then its owners (FOR SHARE: an owner cannot go while a dependent
naming it commits; the collector locks an owner FOR UPDATE before it judges it), then on
PostgreSQL the namespace's owner-graph lock when owners are added (two updates adding
owners crosswise would each pass the cycle check alone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tether_server.domain import errors
from tether_server.domain import objects as domain
from tether_server.domain.object_validation import new_uid
from tether_server.domain.objects import (
    LEASE_KIND,
    SAGA_KIND,
    AlreadyTerminating,
    Desired,
    EventType,
    MarkTerminating,
    Obj,
    OwnerRef,
    Policy,
    Refusal,
    Remove,
)
from tether_server.store.objects import rows
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

_LEASE_OWNER = sql(
    "SELECT namespace, state, expires_at_us FROM leases WHERE lease_id = $1 FOR SHARE"
)
_SAGA_OWNER = sql("SELECT 1 FROM sagas WHERE namespace = $1 AND saga_id = $2 FOR SHARE")
_OBJECT_OWNER = sql("SELECT kind, name FROM objects WHERE namespace = $1 AND uid = $2 FOR SHARE")
_GRAPH_LOCK = sql("SELECT pg_advisory_xact_lock(hashtext($1), 7)")
# Every object under $1, however deep (cycles are refused, so the recursion ends).
_BELOW = sql(
    "WITH RECURSIVE below(uid) AS ("
    " SELECT dependent_uid FROM object_owners WHERE owner_uid = $1"
    " UNION SELECT oo.dependent_uid FROM object_owners oo JOIN below b ON oo.owner_uid = b.uid)"
    " SELECT uid FROM below WHERE uid = ANY($2::text[]) LIMIT 1"
)
_TERMINATING_AMONG = sql(
    "SELECT uid FROM objects WHERE namespace = $1 AND uid = ANY($2::text[])"
    " AND deletion_ts_us IS NOT NULL"
)


@dataclass(frozen=True)
class Written:
    """An object after a write; ``obj`` is its last state when ``deleted``. The store
    adds why a terminating object is still here (``termination``) before answering."""

    obj: Obj
    deleted: bool = False
    termination: domain.Termination | None = None


async def _locked(tx: Tx, namespace: str, kind: str, name: str) -> Obj:
    obj = await rows.by_name(tx, namespace, kind, name, lock=True)
    if obj is None:
        raise domain.not_found(namespace, kind, name)
    return obj


# ---- owners -------------------------------------------------------------------------------


async def check_owners(tx: Tx, namespace: str, refs: Sequence[OwnerRef], offset: int = 0) -> None:
    """Every owner named must exist in this namespace (and be alive, for a lease)."""
    for index, ref in enumerate(refs):
        where = f"owner_references[{offset + index}]"
        if ref.kind == LEASE_KIND:
            row = await tx.fetchrow(_LEASE_OWNER, ref.uid)
            alive = (
                row is not None
                and row["namespace"] == namespace
                and row["state"] == "ACTIVE"
                and row["expires_at_us"] > tx.now_us
            )
            if not alive:
                raise _owner_not_found(ref, "no active lease with this id in this namespace")
        elif ref.kind == SAGA_KIND:
            if await tx.fetchrow(_SAGA_OWNER, namespace, ref.uid) is None:
                raise _owner_not_found(ref, "no saga with this id in this namespace")
        else:
            row = await tx.fetchrow(_OBJECT_OWNER, namespace, ref.uid)
            if row is None:
                raise _owner_not_found(ref, "no object with this uid in this namespace")
            if (row["kind"], row["name"]) != (ref.kind, ref.name):
                raise errors.InvalidField(
                    f"{where}.name",
                    f"uid {ref.uid} is {row['kind']}/{row['name']}, not {ref.kind}/{ref.name}",
                )


def _owner_not_found(ref: OwnerRef, why: str) -> errors.OwnerNotFound:
    return errors.OwnerNotFound(
        f"owner {ref.kind}/{ref.name or ref.uid}: {why}",
        {"owner_uid": ref.uid, "owner_kind": ref.kind},
    )


async def _check_no_cycle(tx: Tx, obj: Obj, added: Sequence[OwnerRef]) -> None:
    candidates = [r.uid for r in added if r.kind not in domain.BUILTIN_OWNER_KINDS]
    if not candidates:
        return
    if tx.is_pg:
        await tx.fetch(_GRAPH_LOCK, obj.namespace)
    looped = obj.uid if obj.uid in candidates else await tx.fetchval(_BELOW, obj.uid, candidates)
    if looped is not None:
        raise errors.OwnerCycle(
            f"{obj.key} cannot be owned by {looped}: it is {obj.key} or one of its dependents",
            {"uid": obj.uid, "owner_uid": str(looped)},
        )


# ---- create --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateParams:
    namespace: str
    kind: str
    name: str
    # Empty: the store gives one (a time-ordered UUID, see new_uid).
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)
    owner_refs: tuple[OwnerRef, ...] = ()
    finalizers: tuple[str, ...] = ()
    request_id: str | None = None

    def fingerprint(self) -> str:
        body = [
            self.kind,
            self.name,
            sorted(self.labels.items()),
            sorted(self.annotations.items()),
            self.spec,
            self.status,
            [
                (r.uid, r.kind, r.name, r.controller, r.block_owner_deletion)
                for r in self.owner_refs
            ],
            list(self.finalizers),
        ]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    obj: Obj
    created: bool


async def create(tx: Tx, p: CreateParams) -> Created:
    # A racing create of the same name fails the unique key and runs again (Retry).
    existing = await rows.by_name(tx, p.namespace, p.kind, p.name)
    if existing is not None:
        domain.check_create_repeat(existing, p.request_id, p.fingerprint())
        return Created(existing, created=False)
    await check_owners(tx, p.namespace, p.owner_refs)
    revision = await tx.next_revision()
    obj = Obj(
        namespace=p.namespace,
        kind=p.kind,
        name=p.name,
        uid=p.uid or new_uid(tx.now_us // 1000),
        labels=dict(p.labels),
        annotations=dict(p.annotations),
        spec=dict(p.spec),
        status=dict(p.status),
        owner_refs=p.owner_refs,
        finalizers=p.finalizers,
        created_at_us=tx.now_us,
        create_revision=revision,
        mod_revision=revision,
        request_id=p.request_id,
        fingerprint=p.fingerprint(),
    )
    await rows.insert(tx, obj)
    rows.record(tx, revision, EventType.ADDED, obj)
    return Created(obj, created=True)


# ---- update and finalizers --------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateParams:
    namespace: str
    kind: str
    name: str
    uid: str
    resource_version: int
    desired: Desired


async def update(tx: Tx, p: UpdateParams) -> Written:
    current = await _locked(tx, p.namespace, p.kind, p.name)
    domain.check_uid(current, p.uid)
    domain.check_resource_version(current, p.resource_version)
    after = domain.apply_update(current, p.desired)
    before_uids = {r.uid for r in current.owner_refs}
    added = [r for r in after.owner_refs if r.uid not in before_uids]
    if added:
        positions = [i for i, r in enumerate(after.owner_refs) if r.uid not in before_uids]
        await check_owners(tx, p.namespace, added, offset=positions[0])
        await _check_no_cycle(tx, current, added)
    return await write(tx, current, after)


async def write(tx: Tx, before: Obj, after: Obj) -> Written:
    """Store ``after`` (or remove it when it has nothing left to wait for)."""
    if domain.goes_now(after):
        await remove(tx, [after])
        return Written(after, deleted=True)
    revision = await tx.next_revision()
    after = replace(after, mod_revision=revision)
    await rows.update(tx, after)
    removed = await rows.sync_owner_index(tx, before, after)
    if removed:
        # An owner waiting in the foreground, or orphaning, may be done now.
        await enqueue_terminating(tx, after.namespace, removed)
    rows.record(tx, revision, EventType.MODIFIED, after)
    return Written(after)


async def add_finalizer(
    tx: Tx, namespace: str, kind: str, name: str, finalizer: str, uid: str
) -> Written:
    current = await _locked(tx, namespace, kind, name)
    domain.check_uid(current, uid)
    after = domain.add_finalizer(current, finalizer)
    if after is None:
        return Written(current)
    return await write(tx, current, after)


@dataclass(frozen=True)
class RemoveFinalizerParams:
    namespace: str
    kind: str
    name: str
    finalizer: str
    uid: str
    refusal: str
    principal: str


async def remove_finalizer(tx: Tx, p: RemoveFinalizerParams) -> Written | None:
    """None when the object is already gone (the handler's work is done either way)."""
    current = await rows.by_name(tx, p.namespace, p.kind, p.name, lock=True)
    if current is None:
        return None
    domain.check_uid(current, p.uid)
    if p.finalizer not in current.finalizers:
        return Written(current)
    if p.refusal:
        refusal = Refusal(p.finalizer, p.refusal, tx.now_us, p.principal)
        return await write(tx, current, domain.record_refusal(current, refusal))
    return await write(tx, current, domain.without_finalizers(current, [p.finalizer]))


@dataclass(frozen=True)
class ForceParams:
    namespace: str
    kind: str
    name: str
    finalizers: tuple[str, ...]
    reason: str
    principal: str
    uid: str


@dataclass(frozen=True)
class Forced:
    written: Written
    removed: tuple[str, ...]


async def force_remove_finalizers(tx: Tx, p: ForceParams) -> Forced:
    current = await _locked(tx, p.namespace, p.kind, p.name)
    domain.check_uid(current, p.uid)
    wanted = set(p.finalizers) if p.finalizers else set(current.finalizers)
    removed = tuple(f for f in current.finalizers if f in wanted)
    if not removed:
        return Forced(Written(current), ())
    after = domain.record_forced(current, removed, p.principal, p.reason, tx.now_us)
    return Forced(await write(tx, current, after), removed)


# ---- delete --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeleteParams:
    namespace: str
    kind: str
    name: str
    policy: Policy
    uid: str = ""
    resource_version: int = 0


async def delete(tx: Tx, p: DeleteParams) -> Written | None:
    """None: the object a uid precondition named is already gone (a retried delete that
    succeeded). Without a uid, an absent object is OBJECT_NOT_FOUND: which object was
    meant is unknown."""
    current = await rows.by_name(tx, p.namespace, p.kind, p.name, lock=True)
    if current is None:
        if p.uid:
            return None
        raise domain.not_found(p.namespace, p.kind, p.name)
    domain.check_uid(current, p.uid)
    domain.check_resource_version(current, p.resource_version)
    return await delete_locked(tx, current, p.policy)


async def delete_locked(tx: Tx, current: Obj, policy: Policy) -> Written:
    has_dependents = await rows.has_dependents(tx, current.uid)
    decision = domain.decide_delete(current, policy, has_dependents, tx.now_us)
    if isinstance(decision, AlreadyTerminating):
        return Written(current)
    if isinstance(decision, Remove):
        await remove(tx, [current])
        return Written(current, deleted=True)
    assert isinstance(decision, MarkTerminating)
    written = await write(tx, current, decision.obj)
    if decision.enqueue:
        await rows.enqueue(tx, current.namespace, [current.uid])
    return written


# ---- removal (shared with the collector) ------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """What removing one object needs: a cascade builds these straight from rows."""

    namespace: str
    uid: str
    key: str
    owner_uids: tuple[str, ...]
    snapshot: str

    @classmethod
    def of(cls, obj: Obj) -> Removal:
        owners = tuple(r.uid for r in obj.owner_refs)
        return cls(obj.namespace, obj.uid, obj.key, owners, rows.snapshot(obj))


async def remove(tx: Tx, gone: Sequence[Obj]) -> None:
    await remove_all(tx, [Removal.of(o) for o in gone])


async def remove_all(tx: Tx, gone: Sequence[Removal], owning: set[str] | None = None) -> None:
    """Remove objects now: their dependents and their waiting owners go on the queue.
    ``owning``: which of them own objects, when the caller already knows."""
    if not gone:
        return
    namespace = gone[0].namespace
    assert all(o.namespace == namespace for o in gone), "one namespace per removal"
    uids = [o.uid for o in gone]
    owners = sorted({uid for o in gone for uid in o.owner_uids})
    if owners:
        await enqueue_terminating(tx, namespace, owners)
    if owning is None:
        await rows.enqueue_owning(tx, uids)
    else:
        await rows.enqueue(tx, namespace, owning)
    await rows.delete_rows(tx, uids)
    for item in gone:
        revision = await tx.next_revision()
        tx.record_event(
            revision,
            rows.AREA,
            namespace,
            item.key,
            item.uid,
            EventType.DELETED.value,
            item.snapshot,
        )


async def enqueue_terminating(tx: Tx, namespace: str, uids: Sequence[str]) -> None:
    found = await tx.fetch(_TERMINATING_AMONG, namespace, list(uids))
    await rows.enqueue(tx, namespace, [row[0] for row in found])
