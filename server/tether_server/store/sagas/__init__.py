"""Saga units of work and ``SagaStore``, which runs each as its own unit through the group
committer (a claim composes the lease store's acquire inside its own unit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tether_server.domain import saga as domain
from tether_server.store.database import Database
from tether_server.store.sagas import read, units
from tether_server.store.sagas.read import ListSagasParams, SagaEventPage, SagaEventRecord
from tether_server.store.sagas.units import (
    Annotated,
    Claimed,
    ClaimParams,
    CompensationRecorded,
    Created,
    CreateParams,
    DeadlinePass,
    Fenced,
    Heartbeat,
    NewLease,
    OperatorCall,
    Refused,
    SagaView,
    StepRecorded,
)

__all__ = [
    "Annotated",
    "ClaimParams",
    "Claimed",
    "CompensationRecorded",
    "CreateParams",
    "Created",
    "DeadlinePass",
    "Fenced",
    "Heartbeat",
    "ListSagasParams",
    "NewLease",
    "OperatorCall",
    "Refused",
    "SagaEventPage",
    "SagaEventRecord",
    "SagaStore",
    "SagaView",
    "StepRecorded",
]


class SagaStore:
    def __init__(self, db: Database, max_steps: int = 1000) -> None:
        self.db = db
        self._max_steps = max_steps

    async def create(self, p: CreateParams) -> Created:
        return await self.db.write(lambda tx: units.create(tx, p))

    async def claim(self, p: ClaimParams) -> Claimed | Refused:
        return await self.db.write(lambda tx: units.claim(tx, p))

    async def record_step(self, f: Fenced, report: domain.StepReport) -> StepRecorded:
        return await self.db.write(lambda tx: units.record_step(tx, f, report, self._max_steps))

    async def heartbeat(self, f: Fenced, progress: bytes | None) -> Heartbeat:
        return await self.db.write(lambda tx: units.heartbeat(tx, f, progress), emits=False)

    async def complete(self, f: Fenced, output: Mapping[str, Any] | None) -> SagaView:
        return await self.db.write(lambda tx: units.complete(tx, f, output))

    async def fail(self, f: Fenced, failure: domain.Failure) -> SagaView:
        return await self.db.write(lambda tx: units.fail(tx, f, failure))

    async def record_compensation(
        self, f: Fenced, step_index: int, succeeded: bool, error: str, attempt: int
    ) -> CompensationRecorded:
        return await self.db.write(
            lambda tx: units.record_compensation(tx, f, step_index, succeeded, error, attempt)
        )

    async def cancel(self, c: OperatorCall) -> SagaView:
        return await self.db.write(lambda tx: units.cancel(tx, c))

    async def quarantine(self, c: OperatorCall) -> SagaView:
        return await self.db.write(lambda tx: units.quarantine(tx, c))

    async def redrive(self, c: OperatorCall, mode: domain.RedriveMode) -> SagaView:
        return await self.db.write(lambda tx: units.redrive(tx, c, mode))

    async def mark_compensated(self, c: OperatorCall, step_index: int) -> SagaView:
        return await self.db.write(lambda tx: units.mark_compensated(tx, c, step_index))

    async def annotate(
        self, c: OperatorCall, text: str, attributes: Mapping[str, str]
    ) -> Annotated:
        return await self.db.write(lambda tx: units.annotate(tx, c, text, attributes))

    async def enforce_deadlines(self, limit: int = 200) -> DeadlinePass:
        return await self.db.write(lambda tx: units.enforce_deadlines(tx, limit))

    async def purge(self, namespace: str, saga_id: str) -> bool:
        return await self.db.write(lambda tx: units.purge(tx, namespace, saga_id))

    async def counts(self) -> read.SagaCounts:
        return await self.db.read(read.counts)

    # ---- reads ----------------------------------------------------------------------

    async def get(self, namespace: str, saga_id: str) -> SagaView:
        return await self.db.read(lambda tx: read.get(tx, namespace, saga_id))

    async def list(self, p: ListSagasParams) -> list[SagaView]:
        return await self.db.read(lambda tx: read.list_sagas(tx, p), snapshot=False)

    async def events_since(
        self, namespace: str, kind: str, start_revision: int, limit: int = 500
    ) -> SagaEventPage:
        return await self.db.read(
            lambda tx: read.events_since(tx, namespace, kind, start_revision, limit)
        )
