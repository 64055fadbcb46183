"""Sweep reports: one row each, the report as JSON, listed newest first."""

from __future__ import annotations

from collections.abc import Sequence

from tether_server.domain.sweep import SweepReport, SweepTrigger
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

_INSERT = sql(
    "INSERT INTO sweep_reports (sweep_id, started_at_us, trigger, dry_run, replica, body)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
_GET = sql("SELECT body FROM sweep_reports WHERE sweep_id = $1")
_LIST = (
    "SELECT body FROM sweep_reports WHERE trigger = ANY($1::text[])"
    " AND (started_at_us < $2 OR (started_at_us = $2 AND sweep_id < $3))"
    " ORDER BY started_at_us DESC, sweep_id DESC LIMIT $4"
)
_LIST_STMT = sql(_LIST)
_PURGE = sql(
    "DELETE FROM sweep_reports WHERE sweep_id IN (SELECT sweep_id FROM sweep_reports"
    " WHERE started_at_us <= $1 ORDER BY started_at_us LIMIT $2)"
)
_COUNT_OLDER = sql("SELECT count(*) FROM sweep_reports WHERE started_at_us <= $1")


async def insert(tx: Tx, report: SweepReport) -> None:
    await tx.execute(
        _INSERT,
        report.sweep_id,
        report.started_at_us,
        report.trigger.value,
        int(report.dry_run),
        report.replica,
        report.to_json(),
    )


async def get(tx: Tx, sweep_id: str) -> SweepReport | None:
    body = await tx.fetchval(_GET, sweep_id)
    return None if body is None else SweepReport.from_json(body)


async def page(
    tx: Tx, triggers: Sequence[SweepTrigger], after: tuple[int, str], limit: int
) -> list[SweepReport]:
    """Reports older than ``after`` (started_at_us, sweep_id), newest first."""
    chosen = [t.value for t in (triggers or SweepTrigger)]
    found = await tx.fetch(_LIST_STMT, chosen, after[0], after[1], limit)
    return [SweepReport.from_json(r["body"]) for r in found]


async def purge_older(tx: Tx, started_before_us: int, limit: int) -> int:
    return await tx.execute(_PURGE, started_before_us, limit)


async def count_older(tx: Tx, started_before_us: int) -> int:
    return int(await tx.fetchval(_COUNT_OLDER, started_before_us))


_LAST_STARTED = sql(
    "SELECT max(started_at_us) FROM sweep_reports WHERE trigger = $1 AND dry_run = 0"
)


async def last_started(tx: Tx, trigger: SweepTrigger) -> int | None:
    """When the latest sweep of this trigger (not a dry run) started, on any replica."""
    value = await tx.fetchval(_LAST_STARTED, trigger.value)
    return None if value is None else int(value)
