"""What a sweep asks of the store: each call one short transaction (a bounded batch), or
one read. The parts' order, batching and pauses live in tether_server/sweeper.py."""

from __future__ import annotations

from collections.abc import Sequence

from tether_server.domain.objects import Obj
from tether_server.domain.saga import Saga
from tether_server.domain.sweep import SweepReport, SweepTrigger
from tether_server.store import events
from tether_server.store.database import Database
from tether_server.store.leases import purge as lease_purge
from tether_server.store.objects import read as object_read
from tether_server.store.sagas import units as saga_units
from tether_server.store.sql import sql
from tether_server.store.sweeps import reports

__all__ = ["SweepStore"]

_DUE_LEASES = sql(
    "SELECT count(*) FROM leases WHERE state = 'ACTIVE' AND expires_at_us <= $1"
    " AND ($2 = '' OR namespace = $2)"
)
# Direct dependents of the owners queued for collection: what a dry run reports.
_QUEUED_DEPENDENTS = sql(
    "SELECT count(DISTINCT oo.dependent_uid) FROM gc_queue q"
    " JOIN object_owners oo ON oo.owner_uid = q.uid AND oo.namespace = q.namespace"
    " WHERE ($1 = '' OR q.namespace = $1)"
)


class SweepStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- reconciliation ----------------------------------------------------------------

    async def settle_sagas(
        self, namespace: str, limit: int, *, dry_run: bool
    ) -> list[tuple[Saga, Saga]]:
        if dry_run:
            return await self.db.read(
                lambda tx: saga_units.settle_due(tx, namespace, limit, dry_run=True)
            )
        return await self.db.write(
            lambda tx: saga_units.settle_due(tx, namespace, limit, dry_run=False)
        )

    async def count_due_sagas(self, namespace: str) -> int:
        return await self.db.read(lambda tx: saga_units.count_due(tx, namespace), snapshot=False)

    async def count_due_leases(self, namespace: str) -> int:
        return int(
            await self.db.read(
                lambda tx: tx.fetchval(_DUE_LEASES, tx.now_us, namespace), snapshot=False
            )
        )

    async def count_queued_dependents(self, namespace: str) -> int:
        return int(
            await self.db.read(
                lambda tx: tx.fetchval(_QUEUED_DEPENDENTS, namespace), snapshot=False
            )
        )

    async def terminating_since(
        self, namespace: str, deleted_before_us: int, limit: int
    ) -> tuple[list[Obj], int]:
        return await self.db.read(
            lambda tx: object_read.terminating_since(tx, namespace, deleted_before_us, limit)
        )

    # ---- purges: rows purged (or to purge) per table, the kind's own table first ----------
    # Events and reports are global: their namespace argument is always empty.

    async def purge_leases(self, namespace: str, before_us: int, limit: int) -> dict[str, int]:
        done = await self.db.write(
            lambda tx: lease_purge.purge_ended(tx, namespace, before_us, limit)
        )
        return done.by_table()

    async def count_leases(self, namespace: str, before_us: int) -> dict[str, int]:
        counted = await self.db.read(lambda tx: lease_purge.count_ended(tx, namespace, before_us))
        return counted.by_table()

    async def purge_sagas(self, namespace: str, before_us: int, limit: int) -> dict[str, int]:
        purged = await self.db.write(
            lambda tx: saga_units.purge_ended(tx, namespace, before_us, limit), emits=False
        )
        return {"sagas": purged}

    async def count_sagas(self, namespace: str, before_us: int) -> dict[str, int]:
        counted = await self.db.read(lambda tx: saga_units.count_ended(tx, namespace, before_us))
        return {"sagas": counted}

    async def purge_events(self, namespace: str, before_us: int, limit: int) -> dict[str, int]:
        return {"events": await self.db.write(lambda tx: events.purge_older(tx, before_us, limit))}

    async def count_events(self, namespace: str, before_us: int) -> dict[str, int]:
        return {"events": await self.db.read(lambda tx: events.count_older(tx, before_us))}

    async def purge_reports(self, namespace: str, before_us: int, limit: int) -> dict[str, int]:
        purged = await self.db.write(
            lambda tx: reports.purge_older(tx, before_us, limit), emits=False
        )
        return {"sweep_reports": purged}

    async def count_reports(self, namespace: str, before_us: int) -> dict[str, int]:
        return {"sweep_reports": await self.db.read(lambda tx: reports.count_older(tx, before_us))}

    # ---- reports -------------------------------------------------------------------------

    async def save_report(self, report: SweepReport) -> None:
        await self.db.write(lambda tx: reports.insert(tx, report), emits=False)

    async def get_report(self, sweep_id: str) -> SweepReport | None:
        return await self.db.read(lambda tx: reports.get(tx, sweep_id), snapshot=False)

    async def list_reports(
        self, triggers: Sequence[SweepTrigger], after: tuple[int, str], limit: int
    ) -> list[SweepReport]:
        return await self.db.read(
            lambda tx: reports.page(tx, triggers, after, limit), snapshot=False
        )

    async def last_started(self, trigger: SweepTrigger) -> int | None:
        return await self.db.read(lambda tx: reports.last_started(tx, trigger), snapshot=False)
