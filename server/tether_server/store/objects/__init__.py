"""Object units of work and ``ObjectStore``, which runs each through the group committer,
and the collector's passes (see collector.py)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from functools import partial

from tether_server.domain.errors import StoreUnavailable
from tether_server.store.database import Database
from tether_server.store.objects import collector, read, units
from tether_server.store.objects.read import (
    CollectorState,
    DependentView,
    Graph,
    ListParams,
    ObjectEventPage,
    ObjectEventRecord,
    ObjectView,
)
from tether_server.store.objects.units import (
    Created,
    CreateParams,
    DeleteParams,
    Forced,
    ForceParams,
    RemoveFinalizerParams,
    UpdateParams,
    Written,
)
from tether_server.store.tx import Tx

log = logging.getLogger(__name__)

__all__ = [
    "CollectPass",
    "CollectorState",
    "CreateParams",
    "Created",
    "DeleteParams",
    "DependentView",
    "ForceParams",
    "Forced",
    "Graph",
    "ListParams",
    "ObjectEventPage",
    "ObjectEventRecord",
    "ObjectStore",
    "ObjectView",
    "RemoveFinalizerParams",
    "UpdateParams",
    "Written",
]


@dataclass(frozen=True)
class CollectPass:
    items: int = 0
    deleted: int = 0
    orphaned: int = 0
    failures: int = 0
    # More work is due now: run the next pass straight away.
    backlog: bool = False


class ObjectStore:
    def __init__(self, db: Database, batch_size: int = 1000, items_per_pass: int = 64) -> None:
        self.db = db
        self.batch_size = batch_size
        self.items_per_pass = items_per_pass

    async def create(self, p: CreateParams) -> Created:
        return await self.db.write(lambda tx: units.create(tx, p))

    async def update(self, p: UpdateParams) -> Written:
        return await self.db.write(lambda tx: _explained(tx, units.update(tx, p)))

    async def add_finalizer(
        self, namespace: str, kind: str, name: str, finalizer: str, uid: str
    ) -> Written:
        return await self.db.write(
            lambda tx: _explained(
                tx, units.add_finalizer(tx, namespace, kind, name, finalizer, uid)
            )
        )

    async def remove_finalizer(self, p: RemoveFinalizerParams) -> Written | None:
        async def unit(tx: Tx) -> Written | None:
            written = await units.remove_finalizer(tx, p)
            return None if written is None else await _explain(tx, written)

        return await self.db.write(unit)

    async def force_remove_finalizers(self, p: ForceParams) -> Forced:
        async def unit(tx: Tx) -> Forced:
            forced = await units.force_remove_finalizers(tx, p)
            return replace(forced, written=await _explain(tx, forced.written))

        return await self.db.write(unit)

    async def delete(self, p: DeleteParams) -> Written | None:
        async def unit(tx: Tx) -> Written | None:
            written = await units.delete(tx, p)
            return None if written is None else await _explain(tx, written)

        return await self.db.write(unit)

    # ---- the collector ----------------------------------------------------------------

    async def collect(self) -> CollectPass:
        """Work on the due queue items in one transaction of about ``batch_size``
        dependents (many small owners share it: a deep tree is thousands of them). If that
        transaction fails, each item runs alone, so only the failing one is recorded
        (error, attempts, next attempt) and the others go on."""
        due = await self.db.read(lambda tx: collector.due(tx, self.items_per_pass), snapshot=False)
        if not due:
            return CollectPass()
        results: list[collector.ItemResult | None]
        try:
            results = list(
                await self.db.write(
                    partial(collector.collect_items, items=due, budget=self.batch_size)
                )
            )
        except StoreUnavailable:
            raise
        except Exception:
            results = await self._collect_one_by_one(due)
        failures = sum(r is None for r in results)
        done = [r for r in results if r is not None]
        unsettled = any(not r.settled for r in done) or len(results) < len(due)
        return CollectPass(
            items=len(due),
            deleted=sum(r.deleted for r in done),
            orphaned=sum(r.orphaned for r in done),
            failures=failures,
            backlog=unsettled or len(due) == self.items_per_pass,
        )

    async def _collect_one_by_one(
        self, due: list[tuple[str, str]]
    ) -> list[collector.ItemResult | None]:
        results: list[collector.ItemResult | None] = []
        for namespace, uid in due:
            try:
                results.append(
                    await self.db.write(
                        partial(
                            collector.collect_item,
                            namespace=namespace,
                            uid=uid,
                            batch=self.batch_size,
                        )
                    )
                )
            except StoreUnavailable:
                raise
            except Exception as exc:
                results.append(None)
                log.warning(
                    "garbage collection of an owner failed; retrying with backoff",
                    extra={"namespace": namespace, "uid": uid, "error": repr(exc)},
                )
                await self.db.write(
                    partial(
                        collector.record_failure, namespace=namespace, uid=uid, error=repr(exc)
                    ),
                    emits=False,
                )
        return results

    async def collector_state(self) -> CollectorState:
        return await self.db.read(read.collector_state, snapshot=False)

    # ---- reads ----------------------------------------------------------------------

    async def get(self, namespace: str, kind: str, name: str = "", uid: str = "") -> ObjectView:
        return await self.db.read(lambda tx: read.get(tx, namespace, kind, name, uid))

    async def list_objects(self, p: ListParams) -> list[ObjectView]:
        return await self.db.read(lambda tx: read.list_objects(tx, p))

    async def dependents(
        self,
        namespace: str,
        owner_uid: str,
        recursive: bool,
        limit: int,
        after: tuple[int, str] | None,
    ) -> list[DependentView]:
        return await self.db.read(
            lambda tx: read.dependents(tx, namespace, owner_uid, recursive, limit, after)
        )

    async def graph(
        self, namespace: str, kind: str, name: str, uid: str, max_objects: int
    ) -> tuple[ObjectView, Graph]:
        async def unit(tx: Tx) -> tuple[ObjectView, Graph]:
            root = await read.get(tx, namespace, kind, name, uid)
            return root, await read.graph(tx, namespace, root.obj, max_objects)

        return await self.db.read(unit)

    async def events_since(
        self, namespace: str, kind: str, start_revision: int, limit: int = 500
    ) -> ObjectEventPage:
        return await self.db.read(
            lambda tx: read.events_since(tx, namespace, kind, start_revision, limit)
        )


async def _explain(tx: Tx, written: Written) -> Written:
    """Add why a terminating object is still here, as a read would say it."""
    if written.deleted or not written.obj.terminating:
        return written
    why = await read.with_termination(tx, [written.obj])
    return replace(written, termination=why.get(written.obj.uid))


async def _explained(tx: Tx, writing: Awaitable[Written]) -> Written:
    return await _explain(tx, await writing)
