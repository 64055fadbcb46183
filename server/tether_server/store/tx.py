"""The open transaction that every unit of work takes, on either backend.

A unit of work is ``async def unit(tx: Tx) -> T``: it reads and writes only through the
``Tx`` it is given, so one request can compose several (end a lease, move a saga, collect
objects) and the committer can run many in one database transaction. Units must be
re-runnable from the start: the PostgreSQL committer may roll a batch back and run it
again with one savepoint per unit.

On SQLite the ``Tx`` methods never suspend: the committer drives each unit's coroutine
synchronously inside the one writer thread, so a batch costs no thread hop per statement.
A unit therefore awaits nothing but its ``Tx``.

Events: ``emit`` gives the event its global revision at once (the units need it for the
rows they write) from a counter the batch locked first (see committer.py for the lock
order), and buffers the row; the batch writes every buffered event, and the counter, in
one statement before it commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tether_server.clock import Clock
from tether_server.store.sql import Sql, sql

Row = Any  # sqlite3.Row or asyncpg.Record: both index by position and by column name.

LOCK_REVISIONS = sql(
    "UPDATE revisions SET current = current WHERE id = 1 RETURNING current, token_floor"
)


@dataclass(frozen=True)
class Event:
    """One row of the event log, shared by every area (leases now; sagas, objects next)."""

    revision: int
    area: str
    namespace: str
    key: str
    object_id: str
    type: str
    occurred_at_us: int
    snapshot: str


class Tx:
    """Statement execution plus the batch's bookkeeping; backends implement the I/O."""

    is_pg: bool = False

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.now_us = clock.now_us()
        self._revision: int | None = None
        self._revision_at_start: int | None = None
        # Read with the revision lock: a key leased for the first time (or again after
        # its row was purged) starts its fencing tokens above it.
        self.token_floor = 0
        self.events: list[Event] = []
        self.deadlines: list[int] = []
        self._unit_wrote = False
        self._marks: tuple[int | None, int, int] = (None, 0, 0)

    # ---- statements (backends override) --------------------------------------------

    async def fetch(self, stmt: Sql, *args: Any) -> list[Row]:
        raise NotImplementedError

    async def execute(self, stmt: Sql, *args: Any) -> int:
        """Run a statement; returns the number of rows it changed."""
        raise NotImplementedError

    async def executemany(self, stmt: Sql, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    async def fetchrow(self, stmt: Sql, *args: Any) -> Row | None:
        rows = await self.fetch(stmt, *args)
        return rows[0] if rows else None

    async def fetchval(self, stmt: Sql, *args: Any) -> Any:
        row = await self.fetchrow(stmt, *args)
        return None if row is None else row[0]

    # ---- time -----------------------------------------------------------------------

    def refresh_now(self) -> int:
        """Read the clock again once the rows a decision depends on are locked: a wait on a
        lock must not leave the decision judging deadlines by a time already past."""
        self.now_us = max(self.now_us, self._clock.now_us())
        return self.now_us

    # ---- events and notes for after the commit --------------------------------------

    async def lock_revisions(self) -> None:
        if self._revision is None:
            row = await self.fetchrow(LOCK_REVISIONS)
            assert row is not None
            self._revision = int(row["current"])
            self._revision_at_start = self._revision
            self.token_floor = int(row["token_floor"])

    async def next_revision(self) -> int:
        """Reserve the next global revision (rows written now can carry it)."""
        await self.lock_revisions()
        assert self._revision is not None
        self._revision += 1
        self._note_write()
        return self._revision

    def unreserve_revision(self, revision: int) -> None:
        """Give back the revision just reserved, unused (a write that found nothing to do):
        revisions stay contiguous."""
        assert revision == self._revision, "only the last reserved revision can go back"
        self._revision -= 1

    def record_event(
        self,
        revision: int,
        area: str,
        namespace: str,
        key: str,
        object_id: str,
        type_: str,
        snapshot: str,
    ) -> None:
        """Buffer an event under a revision from ``next_revision``; the batch writes it."""
        self.events.append(
            Event(revision, area, namespace, key, object_id, type_, self.now_us, snapshot)
        )

    def note_deadline(self, deadline_us: int) -> None:
        """A deadline this batch created: the expiry task wakes for it without polling."""
        self.deadlines.append(deadline_us)

    @property
    def revision_changed(self) -> bool:
        return self._revision != self._revision_at_start

    @property
    def last_revision(self) -> int | None:
        return self._revision

    # ---- unit boundaries (the committer's) ------------------------------------------

    def _note_write(self) -> None:
        self._unit_wrote = True

    def begin_unit(self) -> None:
        self._unit_wrote = False
        self._marks = (self._revision, len(self.events), len(self.deadlines))
        self.now_us = max(self.now_us, self._clock.now_us())

    def drop_unit(self) -> None:
        """The unit's writes were rolled back: forget what it noted too."""
        revision, events, deadlines = self._marks
        # A counter first locked inside the unit was unlocked by its rollback.
        self._revision = revision
        if revision is None:
            self._revision_at_start = None
        del self.events[events:]
        del self.deadlines[deadlines:]

    @property
    def unit_wrote(self) -> bool:
        return self._unit_wrote
