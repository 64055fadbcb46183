"""Lease units of work (acquire, renew, end, read) and ``LeaseStore``, which runs each as
its own unit through the group committer. Other areas compose the unit functions with
their own inside one ``Tx`` instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tether_server.domain import errors
from tether_server.domain.lease import Lease, LeaseEventType, Refuse
from tether_server.store import events
from tether_server.store.database import Database
from tether_server.store.leases import rows
from tether_server.store.leases.acquire import AcquireParams, AcquireResult, acquire
from tether_server.store.leases.end import (
    NEXT_DEADLINE,
    ExpiryResult,
    ReleaseParams,
    RevokeParams,
    expire_due,
    release,
    revoke,
)
from tether_server.store.leases.read import ListLeasesParams, get, get_by_key, list_leases
from tether_server.store.leases.renew import Renewal, Renewed, RenewUnit
from tether_server.store.leases.shift import ShiftResult, shift_deadlines
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

__all__ = [
    "AcquireParams",
    "AcquireResult",
    "EventPage",
    "ExpiryResult",
    "LeaseEventRecord",
    "LeaseStore",
    "ListLeasesParams",
    "ReleaseParams",
    "Renewal",
    "Renewed",
    "RevokeParams",
    "ShiftResult",
]

_DETACH = sql("UPDATE leases SET stream_id = NULL WHERE stream_id = $1")
_DETACH_ALL = sql("UPDATE leases SET stream_id = NULL WHERE stream_id IS NOT NULL")
_COUNT_ACTIVE = sql("SELECT count(*) FROM leases WHERE state = 'ACTIVE' AND expires_at_us > $1")


@dataclass(frozen=True)
class LeaseEventRecord:
    revision: int
    type: LeaseEventType
    lease: Lease
    occurred_at_us: int


@dataclass(frozen=True)
class EventPage:
    events: list[LeaseEventRecord]
    header_revision: int
    compact_revision: int


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- writes ---------------------------------------------------------------------

    async def lease_acquire(self, p: AcquireParams) -> AcquireResult | Refuse:
        return await self.db.write(lambda tx: acquire(tx, p))

    async def lease_renew_many(
        self, namespace: str, renewals: Sequence[Renewal], stream_id: str | None = None
    ) -> list[Renewed | errors.TetherError]:
        """Renew many leases in one unit; one outcome per renewal, in order."""
        if not renewals:
            return []
        return await self.db.write(RenewUnit(namespace, renewals, stream_id), emits=False)

    async def lease_renew(self, namespace: str, renewal: Renewal) -> Renewed:
        (outcome,) = await self.lease_renew_many(namespace, [renewal])
        if isinstance(outcome, errors.TetherError):
            raise outcome
        return outcome

    async def lease_release(self, p: ReleaseParams) -> Lease:
        return await self.db.write(lambda tx: release(tx, p))

    async def lease_revoke(self, p: RevokeParams) -> Lease:
        return await self.db.write(lambda tx: revoke(tx, p))

    async def lease_expire_due(self, limit: int = 500) -> ExpiryResult:
        """Record the expiry of up to ``limit`` leases whose deadline has passed."""
        return await self.db.write(lambda tx: expire_due(tx, limit))

    async def lease_shift_deadlines(self, step_us: int) -> ShiftResult:
        """Move live deadlines by a forward clock step (store/leases/shift.py)."""
        return await self.db.write(lambda tx: shift_deadlines(tx, step_us), emits=False)

    async def lease_detach_stream(self, stream_id: str) -> int:
        """A KeepAlive stream closed: its leases no longer have a live stream attached."""
        return await self.db.write(lambda tx: tx.execute(_DETACH, stream_id), emits=False)

    async def lease_detach_all_streams(self) -> int:
        """At start of a single-process store: no stream of a previous process is open."""
        return await self.db.write(lambda tx: tx.execute(_DETACH_ALL), emits=False)

    async def lease_events_compact(self, up_to_revision: int) -> int:
        """Purge events at or below a revision; watchers asking for them get OUT_OF_RANGE."""
        return await self.db.write(lambda tx: events.compact(tx, up_to_revision))

    # ---- reads ----------------------------------------------------------------------

    async def lease_get(self, namespace: str, lease_id: str) -> Lease:
        return await self.db.read(lambda tx: get(tx, namespace, lease_id), snapshot=False)

    async def lease_get_by_key(self, namespace: str, key: str) -> Lease:
        return await self.db.read(lambda tx: get_by_key(tx, namespace, key), snapshot=False)

    async def lease_list(self, p: ListLeasesParams) -> list[Lease]:
        return await self.db.read(lambda tx: list_leases(tx, p), snapshot=False)

    async def lease_events_since(
        self, namespace: str, key_prefix: str, start_revision: int, limit: int = 500
    ) -> EventPage:
        """Events with revision >= start_revision under the prefix, oldest first."""

        async def read(tx: Tx) -> EventPage:
            page = await events.since(tx, rows.AREA, namespace, key_prefix, start_revision, limit)
            return EventPage(
                [
                    LeaseEventRecord(
                        revision=row["revision"],
                        type=LeaseEventType(row["type"]),
                        lease=rows.lease_from_json(row["snapshot"]),
                        occurred_at_us=row["occurred_at_us"],
                    )
                    for row in page.rows
                ],
                page.header.current,
                page.header.compacted,
            )

        return await self.db.read(read)

    async def lease_count_active(self) -> int:
        return int(
            await self.db.read(lambda tx: tx.fetchval(_COUNT_ACTIVE, tx.now_us), snapshot=False)
        )

    async def lease_next_deadline(self) -> int | None:
        value = await self.db.read(lambda tx: tx.fetchval(NEXT_DEADLINE), snapshot=False)
        return int(value) if value is not None else None
