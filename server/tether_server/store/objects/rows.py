"""Object rows: loading, writing, the owner index, the collector's queue and events.

Every write of an object takes a new revision (its resource version) and records one
event whose snapshot is the object as written (for DELETED: as it was last).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tether_server.domain.objects import (
    EventType,
    HistoryEntry,
    Obj,
    OwnerRef,
    Refusal,
)
from tether_server.store.sql import sql
from tether_server.store.tx import Row, Tx

AREA = "object"
COLUMNS = (
    "uid, namespace, kind, name, labels, annotations, spec, status, owner_refs, finalizers,"
    " refusals, history, deletion_ts_us, created_at_us, create_revision, mod_revision,"
    " request_id, fingerprint"
)
COLUMN_NAMES = tuple(c.strip() for c in COLUMNS.split(","))
_O_COLUMNS = ", ".join(f"o.{name}" for name in COLUMN_NAMES)
SELECT = f"SELECT {_O_COLUMNS} FROM objects o"

_BY_NAME = sql(f"{SELECT} WHERE o.namespace = $1 AND o.kind = $2 AND o.name = $3")
_BY_NAME_LOCK = sql(f"{_BY_NAME.pg} FOR UPDATE")
_BY_UID = sql(f"{SELECT} WHERE o.namespace = $1 AND o.uid = $2")
_BY_UID_LOCK = sql(f"{_BY_UID.pg} FOR UPDATE")
_INSERT = sql(
    f"INSERT INTO objects ({COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 19))})"
)
_UPDATE = sql(
    "UPDATE objects SET labels = $2, annotations = $3, spec = $4, status = $5,"
    " owner_refs = $6, finalizers = $7, refusals = $8, history = $9, deletion_ts_us = $10,"
    " mod_revision = $11 WHERE uid = $1"
)
_DELETE = sql("DELETE FROM objects WHERE uid = ANY($1::text[])")
_DROP_OWNERS_OF = sql("DELETE FROM object_owners WHERE dependent_uid = ANY($1::text[])")
_DROP_OWNER_REFS = sql(
    "DELETE FROM object_owners WHERE dependent_uid = $1 AND owner_uid = ANY($2::text[])"
)
_ADD_OWNER = sql(
    "INSERT INTO object_owners (dependent_uid, owner_uid, namespace, owner_kind,"
    " block_owner_deletion) VALUES ($1, $2, $3, $4, $5)"
    " ON CONFLICT (dependent_uid, owner_uid) DO UPDATE SET"
    " block_owner_deletion = EXCLUDED.block_owner_deletion, owner_kind = EXCLUDED.owner_kind"
)
# Which of these uids own something (one index probe each).
_OWNING = sql("SELECT DISTINCT owner_uid FROM object_owners WHERE owner_uid = ANY($1::text[])")
_HAS_DEPENDENTS = sql("SELECT 1 FROM object_owners WHERE owner_uid = $1 LIMIT 1")
_ENQUEUE = sql(
    "INSERT INTO gc_queue (namespace, uid, enqueued_at_us, next_attempt_us, attempts,"
    " last_error) VALUES ($1, $2, $3, $3, 0, '')"
    " ON CONFLICT (namespace, uid) DO UPDATE SET next_attempt_us = EXCLUDED.next_attempt_us"
)
# Whatever of these uids owns objects goes on the queue (a lease that ended, a saga purged).
ENQUEUE_OWNING = sql(
    "INSERT INTO gc_queue (namespace, uid, enqueued_at_us, next_attempt_us, attempts,"
    " last_error) SELECT DISTINCT namespace, owner_uid, $2::bigint, $2::bigint, 0, ''"
    " FROM object_owners WHERE owner_uid = ANY($1::text[])"
    " ON CONFLICT (namespace, uid) DO UPDATE SET next_attempt_us = EXCLUDED.next_attempt_us"
)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def refs_to_json(refs: Iterable[OwnerRef]) -> str:
    return _json(
        [
            {
                "uid": r.uid,
                "kind": r.kind,
                "name": r.name,
                "controller": r.controller,
                "block": r.block_owner_deletion,
            }
            for r in refs
        ]
    )


def refs_from_json(text: str) -> tuple[OwnerRef, ...]:
    return _refs(json.loads(text))


def _refs(items: list[dict[str, Any]]) -> tuple[OwnerRef, ...]:
    return tuple(
        OwnerRef(d["uid"], d["kind"], d["name"], d["controller"], d["block"]) for d in items
    )


def _refusals_to_json(refusals: Iterable[Refusal]) -> str:
    return _json(
        [
            {
                "finalizer": r.finalizer,
                "reason": r.reason,
                "at": r.recorded_at_us,
                "by": r.recorded_by,
            }
            for r in refusals
        ]
    )


def _refusals(items: list[dict[str, Any]]) -> tuple[Refusal, ...]:
    return tuple(Refusal(d["finalizer"], d["reason"], d["at"], d["by"]) for d in items)


def _history_to_json(history: Iterable[HistoryEntry]) -> str:
    return _json(
        [
            {"at": h.created_at_us, "author": h.author, "text": h.text, "attributes": h.attributes}
            for h in history
        ]
    )


def _history(items: list[dict[str, Any]]) -> tuple[HistoryEntry, ...]:
    return tuple(HistoryEntry(d["at"], d["author"], d["text"], d["attributes"]) for d in items)


def finalizers_of(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def row_to_obj(row: Row) -> Obj:
    return _obj(row, json.loads)


def obj_from_snapshot(text: str) -> Obj:
    """An event's object: the snapshot holds the JSON columns already decoded."""
    return _obj(json.loads(text), _as_is)


def _as_is(value: Any) -> Any:
    return value


def _obj(fields: Any, decode: Callable[[Any], Any]) -> Obj:
    return Obj(
        namespace=fields["namespace"],
        kind=fields["kind"],
        name=fields["name"],
        uid=fields["uid"],
        labels=decode(fields["labels"]),
        annotations=decode(fields["annotations"]),
        spec=decode(fields["spec"]),
        status=decode(fields["status"]),
        owner_refs=_refs(decode(fields["owner_refs"])),
        finalizers=tuple(decode(fields["finalizers"])),
        deletion_ts_us=fields["deletion_ts_us"],
        created_at_us=fields["created_at_us"],
        create_revision=fields["create_revision"],
        mod_revision=fields["mod_revision"],
        refusals=_refusals(decode(fields["refusals"])),
        history=_history(decode(fields["history"])),
        request_id=fields["request_id"],
        fingerprint=fields["fingerprint"],
    )


def _columns(o: Obj) -> list[Any]:
    return [
        o.uid,
        o.namespace,
        o.kind,
        o.name,
        _json(o.labels),
        _json(o.annotations),
        _json(o.spec),
        _json(o.status),
        refs_to_json(o.owner_refs),
        _json(list(o.finalizers)),
        _refusals_to_json(o.refusals),
        _history_to_json(o.history),
        o.deletion_ts_us,
        o.created_at_us,
        o.create_revision,
        o.mod_revision,
        o.request_id,
        o.fingerprint,
    ]


def snapshot(o: Obj) -> str:
    """The event snapshot: the object's columns as one JSON object (JSON columns nested)."""
    return snapshot_from_row(dict(zip(COLUMN_NAMES, _columns(o), strict=True)))


def snapshot_from_row(row: Row) -> str:
    """Like ``snapshot`` but straight from a row: its JSON columns are spliced in as text,
    so a cascade over many rows parses none of them. Namespaces, kinds, names, uids and
    fingerprints are validated to need no JSON escaping; the request id may."""
    deletion = row["deletion_ts_us"]
    request_id = "null" if row["request_id"] is None else json.dumps(row["request_id"])
    return (
        f'{{"annotations":{row["annotations"]},"create_revision":{row["create_revision"]},'
        f'"created_at_us":{row["created_at_us"]},'
        f'"deletion_ts_us":{"null" if deletion is None else deletion},'
        f'"finalizers":{row["finalizers"]},"fingerprint":"{row["fingerprint"]}",'
        f'"history":{row["history"]},"kind":"{row["kind"]}","labels":{row["labels"]},'
        f'"mod_revision":{row["mod_revision"]},"name":"{row["name"]}",'
        f'"namespace":"{row["namespace"]}","owner_refs":{row["owner_refs"]},'
        f'"refusals":{row["refusals"]},"request_id":{request_id},'
        f'"spec":{row["spec"]},"status":{row["status"]},"uid":"{row["uid"]}"}}'
    )


# ---- reads --------------------------------------------------------------------------------


async def by_name(
    tx: Tx, namespace: str, kind: str, name: str, *, lock: bool = False
) -> Obj | None:
    row = await tx.fetchrow(_BY_NAME_LOCK if lock else _BY_NAME, namespace, kind, name)
    return None if row is None else row_to_obj(row)


async def by_uid(tx: Tx, namespace: str, uid: str, *, lock: bool = False) -> Obj | None:
    row = await tx.fetchrow(_BY_UID_LOCK if lock else _BY_UID, namespace, uid)
    return None if row is None else row_to_obj(row)


async def has_dependents(tx: Tx, uid: str) -> bool:
    return await tx.fetchrow(_HAS_DEPENDENTS, uid) is not None


async def owning(tx: Tx, uids: Sequence[str]) -> set[str]:
    if not uids:
        return set()
    return {row[0] for row in await tx.fetch(_OWNING, list(uids))}


# ---- writes -------------------------------------------------------------------------------


def record(tx: Tx, revision: int, type_: EventType, o: Obj) -> None:
    tx.record_event(revision, AREA, o.namespace, o.key, o.uid, type_.value, snapshot(o))


async def insert(tx: Tx, o: Obj) -> None:
    await tx.execute(_INSERT, *_columns(o))
    await add_owner_index(tx, o, o.owner_refs)


async def update(tx: Tx, o: Obj) -> None:
    c = _columns(o)
    await tx.execute(_UPDATE, o.uid, *c[4:13], o.mod_revision)


async def add_owner_index(tx: Tx, o: Obj, refs: Sequence[OwnerRef]) -> None:
    if refs:
        await tx.executemany(
            _ADD_OWNER,
            [(o.uid, r.uid, o.namespace, r.kind, int(r.block_owner_deletion)) for r in refs],
        )


async def drop_owner_index(tx: Tx, o: Obj, owner_uids: Sequence[str]) -> None:
    if owner_uids:
        await tx.execute(_DROP_OWNER_REFS, o.uid, list(owner_uids))


async def sync_owner_index(tx: Tx, before: Obj, after: Obj) -> list[str]:
    """Make the owner index match ``after``; returns the owner uids it no longer names."""
    old = {r.uid: r for r in before.owner_refs}
    new = {r.uid: r for r in after.owner_refs}
    removed = [uid for uid in old if uid not in new]
    await drop_owner_index(tx, after, removed)
    changed = [r for uid, r in new.items() if old.get(uid) != r]
    await add_owner_index(tx, after, changed)
    return removed


async def delete_rows(tx: Tx, uids: Sequence[str]) -> None:
    """Remove objects and their own owner references (references to them stay: they are
    the collector's to follow)."""
    if uids:
        await tx.execute(_DELETE, list(uids))
        await tx.execute(_DROP_OWNERS_OF, list(uids))


async def enqueue(tx: Tx, namespace: str, uids: Iterable[str]) -> None:
    batch = [(namespace, uid, tx.now_us) for uid in sorted(set(uids))]
    if batch:
        await tx.executemany(_ENQUEUE, batch)


async def enqueue_owning(tx: Tx, uids: Sequence[str]) -> None:
    """Queue those of ``uids`` that own objects (cheap when none do: one index probe each)."""
    if uids:
        await tx.execute(ENQUEUE_OWNING, list(uids), tx.now_us)
