"""Saga reads: one snapshot each; staleness and overdue are judged at the read's time."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tether_server.domain import saga as domain
from tether_server.domain.saga import CompensationRecord, SagaEventType, SagaState, Step
from tether_server.store import events
from tether_server.store.sagas import rows
from tether_server.store.sagas.rows import FROM_SAGAS
from tether_server.store.sagas.units import SagaView, full_view
from tether_server.store.sql import sql
from tether_server.store.tx import Tx


async def get(tx: Tx, namespace: str, saga_id: str) -> SagaView:
    loaded = await rows.load(tx, namespace, saga_id)
    if loaded is None:
        raise domain.not_found(namespace, saga_id)
    return await full_view(tx, loaded.saga, loaded.lease)


@dataclass(frozen=True)
class ListSagasParams:
    namespace: str
    states: frozenset[SagaState] = frozenset()
    kind: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    stale_only: bool = False
    overdue_only: bool = False
    limit: int = 100
    # (created_at_us, saga_id) of the last item of the previous page.
    after: tuple[int, str] | None = None


async def list_sagas(tx: Tx, p: ListSagasParams) -> list[SagaView]:
    args: list[Any] = [p.namespace]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = ["s.namespace = $1"]
    if p.states:
        where.append("s.state IN (" + ", ".join(arg(s.value) for s in sorted(p.states)) + ")")
    if p.kind:
        where.append(f"s.kind = {arg(p.kind)}")
    if p.stale_only:
        where.append(rows.STALE_WHERE.format(now=arg(tx.now_us)))
    if p.overdue_only:
        where.append(rows.OVERDUE_WHERE.format(now=arg(tx.now_us)))
    for key, value in sorted(p.labels.items()):
        if tx.is_pg:
            where.append(f"(s.labels::jsonb ->> {arg(key)}) = {arg(value)}")
        else:
            where.append(f"json_extract(s.labels, {arg('$.' + json.dumps(key))}) = {arg(value)}")
    if p.after is not None:
        where.append(f"(s.created_at_us, s.saga_id) > ({arg(p.after[0])}, {arg(p.after[1])})")
    query = sql(
        f"{FROM_SAGAS} WHERE {' AND '.join(where)}"
        f" ORDER BY s.created_at_us, s.saga_id LIMIT {arg(p.limit)}::int"
    )
    return [
        SagaView(loaded.saga, loaded.lease, tx.now_us)
        for loaded in map(rows.row_to_loaded, await tx.fetch(query, *args))
    ]


@dataclass(frozen=True)
class SagaEventRecord:
    revision: int
    type: SagaEventType
    saga: domain.Saga
    occurred_at_us: int
    step: Step | None = None
    compensation: CompensationRecord | None = None


@dataclass(frozen=True)
class SagaEventPage:
    events: list[SagaEventRecord]
    header_revision: int
    compact_revision: int


async def events_since(
    tx: Tx, namespace: str, kind: str, start_revision: int, limit: int
) -> SagaEventPage:
    prefix = f"{kind}/" if kind else ""
    page = await events.since(tx, rows.AREA, namespace, prefix, start_revision, limit)
    found = []
    for row in page.rows:
        body = json.loads(row["snapshot"])
        found.append(
            SagaEventRecord(
                revision=row["revision"],
                type=rows.EVENT_TYPES[row["type"]],
                saga=rows.saga_from_dict(body["saga"]),
                occurred_at_us=row["occurred_at_us"],
                step=rows.step_from_dict(body["step"]) if "step" in body else None,
                compensation=(
                    rows.comp_from_dict(body["compensation"]) if "compensation" in body else None
                ),
            )
        )
    return SagaEventPage(found, page.header.current, page.header.compacted)


@dataclass(frozen=True)
class SagaCounts:
    by_state: dict[str, int]
    stale: int
    overdue: int


_BY_STATE = sql("SELECT state, count(*) AS n FROM sagas GROUP BY state")
_STALE_COUNT = sql(
    "SELECT count(*) FROM sagas s LEFT JOIN leases l ON l.lease_id = s.claim_lease_id"
    f" WHERE {rows.STALE_WHERE.format(now='$1')}"
)
_OVERDUE_COUNT = sql(f"SELECT count(*) FROM sagas s WHERE {rows.OVERDUE_WHERE.format(now='$1')}")


async def counts(tx: Tx) -> SagaCounts:
    by_state = {row["state"]: int(row["n"]) for row in await tx.fetch(_BY_STATE)}
    return SagaCounts(
        by_state={state.value: by_state.get(state.value, 0) for state in SagaState},
        stale=int(await tx.fetchval(_STALE_COUNT, tx.now_us)),
        overdue=int(await tx.fetchval(_OVERDUE_COUNT, tx.now_us)),
    )
