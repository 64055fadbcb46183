"""Object reads: one snapshot each. Terminating objects come with why they are still here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tether_server.domain import objects as domain
from tether_server.domain.label_selector import Op, Selector
from tether_server.domain.objects import EventType, Obj, Termination
from tether_server.store import events
from tether_server.store.objects import rows
from tether_server.store.objects.collector import FailingItem, QueueStats, failing, queue_stats
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

_MAX_EXAMPLES = 10
_BLOCKING_COUNT = sql(
    "SELECT owner_uid, count(*) AS n FROM object_owners"
    " WHERE owner_uid = ANY($1::text[]) AND block_owner_deletion = 1 GROUP BY owner_uid"
)
_BLOCKING_EXAMPLES = sql(
    "SELECT o.kind, o.name, o.uid FROM object_owners oo JOIN objects o ON o.uid = oo.dependent_uid"
    " WHERE oo.owner_uid = $1 AND oo.block_owner_deletion = 1 ORDER BY o.kind, o.name LIMIT $2"
)
_BY_UIDS = sql(f"{rows.SELECT} WHERE o.namespace = $1 AND o.uid = ANY($2::text[])")
_DEPENDENTS_OF = sql(
    f"{rows.SELECT} JOIN object_owners oo ON oo.dependent_uid = o.uid"
    " WHERE oo.owner_uid = ANY($1::text[]) AND o.namespace = $2"
)
# Every dependent under $1 with its smallest depth (diamonds reach one object twice).
_TREE = sql(
    "WITH RECURSIVE tree(uid, depth, via) AS ("
    " SELECT dependent_uid, 1, owner_uid FROM object_owners WHERE owner_uid = $1 AND namespace = $2"
    " UNION SELECT oo.dependent_uid, t.depth + 1, oo.owner_uid"
    " FROM object_owners oo JOIN tree t ON oo.owner_uid = t.uid WHERE t.depth < 1000)"
    " SELECT uid, min(depth) AS depth, min(via) AS via FROM tree GROUP BY uid"
    " HAVING (min(depth), uid) > ($3::int, $4::text) ORDER BY depth, uid LIMIT $5"
)
_DIRECT = sql(
    "SELECT dependent_uid AS uid, 1 AS depth, owner_uid AS via FROM object_owners"
    " WHERE owner_uid = $1 AND namespace = $2 AND (1, dependent_uid) > ($3::int, $4::text)"
    " ORDER BY dependent_uid LIMIT $5"
)


async def with_termination(tx: Tx, found: Sequence[Obj]) -> dict[str, Termination]:
    """Why each terminating object of ``found`` is still here."""
    terminating = [o for o in found if o.terminating]
    if not terminating:
        return {}
    waiting = [o.uid for o in terminating if domain.FOREGROUND_FINALIZER in o.finalizers]
    counts: dict[str, int] = {}
    if waiting:
        counts = {r[0]: int(r[1]) for r in await tx.fetch(_BLOCKING_COUNT, waiting)}
    result = {}
    for obj in terminating:
        examples: tuple[tuple[str, str, str], ...] = ()
        if counts.get(obj.uid):
            found_examples = await tx.fetch(_BLOCKING_EXAMPLES, obj.uid, _MAX_EXAMPLES)
            examples = tuple((r[0], r[1], r[2]) for r in found_examples)
        result[obj.uid] = Termination(
            pending_finalizers=obj.finalizers,
            blocking_dependents=counts.get(obj.uid, 0),
            blocking_examples=examples,
            refusals=obj.refusals,
        )
    return result


@dataclass(frozen=True)
class ObjectView:
    obj: Obj
    termination: Termination | None = None


async def _views(tx: Tx, found: Sequence[Obj]) -> list[ObjectView]:
    why = await with_termination(tx, found)
    return [ObjectView(o, why.get(o.uid)) for o in found]


async def get(tx: Tx, namespace: str, kind: str, name: str = "", uid: str = "") -> ObjectView:
    if name:
        obj = await rows.by_name(tx, namespace, kind, name)
    else:
        obj = await rows.by_uid(tx, namespace, uid)
        if obj is not None and kind and obj.kind != kind:
            obj = None
    if obj is None:
        raise domain.not_found(namespace, kind, name, uid)
    return (await _views(tx, [obj]))[0]


@dataclass(frozen=True)
class ListParams:
    namespace: str
    kind: str = ""
    owner_uid: str = ""
    selector: Selector = field(default_factory=Selector)
    terminating_only: bool = False
    limit: int = 100
    # (kind, name) of the last item of the previous page.
    after: tuple[str, str] | None = None


def selector_sql(selector: Selector, is_pg: bool, arg: Any) -> list[str]:
    """The selector as SQL conditions on ``o.labels`` (``arg`` binds a parameter)."""
    where = []
    for req in selector.requirements:
        if is_pg:
            value = f"(o.labels::jsonb ->> {arg(req.key)})"
        else:
            value = f"json_extract(o.labels, {arg('$.' + json.dumps(req.key))})"
        if req.op is Op.EXISTS:
            where.append(f"{value} IS NOT NULL")
        elif req.op is Op.NOT_EXISTS:
            where.append(f"{value} IS NULL")
        else:
            listed = ", ".join(arg(v) for v in req.values)
            if req.op in (Op.EQUALS, Op.IN):
                where.append(f"{value} IN ({listed})")
            else:
                where.append(f"({value} IS NULL OR {value} NOT IN ({listed}))")
    return where


async def list_objects(tx: Tx, p: ListParams) -> list[ObjectView]:
    args: list[Any] = [p.namespace]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = ["o.namespace = $1"]
    join = ""
    if p.kind:
        where.append(f"o.kind = {arg(p.kind)}")
    if p.owner_uid:
        join = " JOIN object_owners oo ON oo.dependent_uid = o.uid"
        where.append(f"oo.owner_uid = {arg(p.owner_uid)}")
    if p.terminating_only:
        where.append("o.deletion_ts_us IS NOT NULL")
    where.extend(selector_sql(p.selector, tx.is_pg, arg))
    if p.after is not None:
        where.append(f"(o.kind, o.name) > ({arg(p.after[0])}, {arg(p.after[1])})")
    query = sql(
        f"{rows.SELECT}{join} WHERE {' AND '.join(where)}"
        f" ORDER BY o.kind, o.name LIMIT {arg(p.limit)}::int"
    )
    found = [rows.row_to_obj(r) for r in await tx.fetch(query, *args)]
    return await _views(tx, found)


@dataclass(frozen=True)
class DependentView:
    view: ObjectView
    depth: int
    via: str


async def dependents(
    tx: Tx,
    namespace: str,
    owner_uid: str,
    recursive: bool,
    limit: int,
    after: tuple[int, str] | None,
) -> list[DependentView]:
    position = after or (0, "")
    query = _TREE if recursive else _DIRECT
    found = await tx.fetch(query, owner_uid, namespace, position[0], position[1], limit)
    if not found:
        return []
    loaded = {
        o.uid: o
        for o in map(rows.row_to_obj, await tx.fetch(_BY_UIDS, namespace, [r[0] for r in found]))
    }
    views = {v.obj.uid: v for v in await _views(tx, list(loaded.values()))}
    return [DependentView(views[r[0]], int(r[1]), r[2]) for r in found if r[0] in views]


# ---- the owner graph --------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphNode:
    kind: str
    name: str
    uid: str
    depth: int
    deletion_ts_us: int | None = None
    finalizers: tuple[str, ...] = ()


@dataclass(frozen=True)
class GraphEdge:
    owner_uid: str
    dependent_uid: str
    controller: bool
    block_owner_deletion: bool


@dataclass(frozen=True)
class Graph:
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    truncated: bool


def _node(obj: Obj, depth: int) -> GraphNode:
    return GraphNode(obj.kind, obj.name, obj.uid, depth, obj.deletion_ts_us, obj.finalizers)


async def graph(tx: Tx, namespace: str, root: Obj, max_objects: int) -> Graph:
    """Level by level: owners up to the roots, then dependents down to the leaves."""
    nodes: dict[str, GraphNode] = {root.uid: _node(root, 0)}
    edges: dict[tuple[str, str], GraphEdge] = {}
    truncated = False

    def add_edges(dependent: Obj) -> None:
        for ref in dependent.owner_refs:
            if ref.uid in nodes:
                edges[(ref.uid, dependent.uid)] = GraphEdge(
                    ref.uid, dependent.uid, ref.controller, ref.block_owner_deletion
                )

    # Upwards: owners named in the frontier's references.
    frontier = [root]
    depth = 0
    while frontier and not truncated:
        depth -= 1
        wanted = {r.uid: r for o in frontier for r in o.owner_refs if r.uid not in nodes}
        if not wanted:
            break
        found = {
            o.uid: o
            for o in map(rows.row_to_obj, await tx.fetch(_BY_UIDS, namespace, list(wanted)))
        }
        next_frontier = []
        for uid, ref in sorted(wanted.items()):
            if len(nodes) >= max_objects:
                truncated = True
                break
            owner = found.get(uid)
            if owner is None:
                # A lease, a saga, or an owner that is gone: a node without details.
                nodes[uid] = GraphNode(ref.kind, ref.name, uid, depth)
            else:
                nodes[uid] = _node(owner, depth)
                next_frontier.append(owner)
        for obj in frontier:
            add_edges(obj)
        frontier = next_frontier
    # Downwards: dependents of the frontier.
    frontier = [root]
    depth = 0
    while frontier and not truncated:
        depth += 1
        uids = [o.uid for o in frontier]
        next_frontier = []
        for row in await tx.fetch(_DEPENDENTS_OF, uids, namespace):
            dependent = rows.row_to_obj(row)
            if dependent.uid not in nodes:
                if len(nodes) >= max_objects:
                    truncated = True
                    break
                nodes[dependent.uid] = _node(dependent, depth)
                next_frontier.append(dependent)
            add_edges(dependent)
        frontier = next_frontier
    return Graph(list(nodes.values()), list(edges.values()), truncated)


# ---- events and the collector's state -----------------------------------------------------------


@dataclass(frozen=True)
class ObjectEventRecord:
    revision: int
    type: EventType
    obj: Obj
    occurred_at_us: int


@dataclass(frozen=True)
class ObjectEventPage:
    events: list[ObjectEventRecord]
    header_revision: int
    compact_revision: int


async def events_since(
    tx: Tx, namespace: str, kind: str, start_revision: int, limit: int
) -> ObjectEventPage:
    prefix = f"{kind}/" if kind else ""
    page = await events.since(tx, rows.AREA, namespace, prefix, start_revision, limit)
    found = [
        ObjectEventRecord(
            revision=row["revision"],
            type=EventType(row["type"]),
            obj=rows.obj_from_snapshot(row["snapshot"]),
            occurred_at_us=row["occurred_at_us"],
        )
        for row in page.rows
    ]
    return ObjectEventPage(found, page.header.current, page.header.compacted)


@dataclass(frozen=True)
class CollectorState:
    stats: QueueStats
    failing: list[FailingItem]


async def collector_state(tx: Tx) -> CollectorState:
    return CollectorState(await queue_stats(tx), await failing(tx))


_TERMINATING_SINCE = (
    "o.deletion_ts_us IS NOT NULL AND o.deletion_ts_us <= $2 AND ($1 = '' OR o.namespace = $1)"
)
_BLOCKED = sql(
    f"{rows.SELECT} WHERE {_TERMINATING_SINCE} ORDER BY o.deletion_ts_us, o.uid LIMIT $3"
)
_BLOCKED_COUNT = sql(f"SELECT count(*) FROM objects o WHERE {_TERMINATING_SINCE}")


async def terminating_since(
    tx: Tx, namespace: str, deleted_before_us: int, limit: int
) -> tuple[list[Obj], int]:
    """Objects terminating since at or before the cutoff (oldest first, up to ``limit``),
    and how many there are in all."""
    found = await tx.fetch(_BLOCKED, namespace, deleted_before_us, limit)
    total = int(await tx.fetchval(_BLOCKED_COUNT, namespace, deleted_before_us))
    return [rows.row_to_obj(r) for r in found], total
