"""PostgreSQL: a dedicated writer connection runs whole batches; a pool serves reads.

A batch is one transaction. Units first run without savepoints (most refusals are decided
before anything is written, and a savepoint costs a round trip); when a unit raises after
writing, or a statement fails (which aborts the whole transaction), the batch is rolled
back and run again with one savepoint per unit, so one failure undoes only its own unit.

Lock order on every path: the revision counter (batches that may append events lock it
first), then key rows, then lease rows. So two batches of two replicas never wait on each
other in a cycle over the counter, and an emitting batch commits its events in revision
order (a watcher that saw revision N never later finds a smaller one appear).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import asyncpg

from tether_server.clock import Clock
from tether_server.domain.errors import StoreUnavailable, TetherError
from tether_server.store.batch import RACE_CONSTRAINTS, BatchResult, Pending, Retry, Unit
from tether_server.store.sql import Sql, sql
from tether_server.store.tx import Row, Tx

log = logging.getLogger(__name__)
T = TypeVar("T")

# Transient conflicts after which a unit simply runs again: serialization failures,
# deadlocks, and a unique violation only of a known race (see batch.KNOWN_RACES).
_RETRY_SQLSTATES = {"40001", "40P01"}
_UNIQUE_VIOLATION = "23505"
# Errors of the statement itself (data exception, integrity violation, syntax or access
# rule): a server bug, never an outage, so never answered UNAVAILABLE.
_FAULT_CLASSES = {"22", "23", "42"}
_COMMAND_TIMEOUT_S = 15.0
_CONNECT_TIMEOUT_S = 5.0
DEFAULT_POOL_SIZE = 10
# How long a read waits for a pooled connection before answering UNAVAILABLE.
DEFAULT_POOL_TIMEOUT_S = 10.0


def is_race(exc: BaseException) -> bool:
    """A conflict the unit wins by running again."""
    state = getattr(exc, "sqlstate", None)
    if state in _RETRY_SQLSTATES:
        return True
    return state == _UNIQUE_VIOLATION and getattr(exc, "constraint_name", None) in RACE_CONSTRAINTS


def _is_fault(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in _FAULT_CLASSES


# Events, the counter and the cross-replica wake-up in one round trip.
_FLUSH = sql(
    """
    WITH ins AS (
        INSERT INTO events (revision, area, namespace, key, object_id, type, occurred_at_us,
                            snapshot)
        SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::bigint[], $8::text[])
    ), rev AS (
        UPDATE revisions SET current = $9 WHERE id = 1 AND $10
    )
    SELECT pg_notify($11, $12)
    """,
    sqlite="SELECT 1",
)
_NOTIFY = sql("SELECT pg_notify($1, $2)", sqlite="SELECT 1")
CHANNEL = "tether_changes"


class PgTx(Tx):
    is_pg = True

    def __init__(self, conn: asyncpg.Connection, clock: Clock) -> None:
        super().__init__(clock)
        self._conn = conn

    async def fetch(self, stmt: Sql, *args: Any) -> list[Row]:
        if stmt.writes:
            self._note_write()
        return list(await self._conn.fetch(stmt.pg, *args))

    async def execute(self, stmt: Sql, *args: Any) -> int:
        if stmt.writes:
            self._note_write()
        status: str = await self._conn.execute(stmt.pg, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, stmt: Sql, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._note_write()
            await self._conn.executemany(stmt.pg, rows)

    async def flush(self, notify_payload: str | None) -> None:
        events = self.events
        if events:
            await self._conn.fetch(
                _FLUSH.pg,
                [e.revision for e in events],
                [e.area for e in events],
                [e.namespace for e in events],
                [e.key for e in events],
                [e.object_id for e in events],
                [e.type for e in events],
                [e.occurred_at_us for e in events],
                [e.snapshot for e in events],
                self.last_revision,
                self.revision_changed,
                CHANNEL,
                notify_payload or "",
            )
        elif notify_payload is not None:
            await self._conn.fetch(_NOTIFY.pg, CHANNEL, notify_payload)


def _fault(exc: asyncpg.PostgresError) -> asyncpg.PostgresError:
    """A unit's statement failed for a reason no retry fixes: its caller gets the error."""
    if (getattr(exc, "sqlstate", None) or "").startswith("23"):
        log.error("constraint violation that is no known race: %s", exc)
    return exc


class _NeedsIsolation(Exception):
    """Run the batch again with one savepoint per unit."""


class PgBackend:
    is_pg = True

    def __init__(
        self,
        dsn: str,
        clock: Clock,
        pool_size: int = DEFAULT_POOL_SIZE,
        notify_payload: Any = None,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    ) -> None:
        self.dsn = dsn
        self._clock = clock
        self.pool_size = pool_size
        # A full pool (or a server refusing more connections) is an outage of the store
        # for this call: UNAVAILABLE with retry advice, after at most this long.
        self.pool_timeout_s = pool_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
        self._pool_lock = asyncio.Lock()
        # events -> NOTIFY payload (or None for no notification); set by the Database.
        self.notify_payload = notify_payload

    async def run_batch(self, batch: Sequence[Pending]) -> BatchResult:
        try:
            conn = await self._writer_connection()
            try:
                return await self._attempt(conn, batch, savepoints=False)
            except _NeedsIsolation:
                return await self._attempt(conn, batch, savepoints=True)
        except (TetherError, asyncio.CancelledError):
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            await self._drop_writer()
            if _is_fault(exc):
                raise
            log.warning("store unavailable: %s", exc)
            raise StoreUnavailable("the store is unavailable; retry with backoff") from exc

    async def read(self, unit: Unit[T], *, snapshot: bool = True) -> T:
        try:
            pool = await self._read_pool()
            try:
                conn = await pool.acquire(timeout=self.pool_timeout_s)
            except TimeoutError as exc:
                # Every pooled connection stayed busy (or none could be opened) that long.
                log.warning("store unavailable: no connection within %ss", self.pool_timeout_s)
                raise StoreUnavailable(
                    f"no store connection free within {self.pool_timeout_s:g}s; retry with backoff"
                ) from exc
            try:
                tx = PgTx(conn, self._clock)
                if not snapshot:
                    return await unit(tx)
                # One snapshot for every statement of the read: a header revision and the
                # events read after it agree.
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    return await unit(tx)
            finally:
                await pool.release(conn)
        except TetherError:
            raise
        # TooManyConnectionsError (the server's max_connections) is a PostgresError.
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if _is_fault(exc):
                raise
            log.warning("store unavailable: %s", exc)
            raise StoreUnavailable("the store is unavailable; retry with backoff") from exc

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own (LISTEN, leader election, clock sync)."""
        return await asyncpg.connect(
            self.dsn, timeout=_CONNECT_TIMEOUT_S, command_timeout=_COMMAND_TIMEOUT_S
        )

    async def close(self) -> None:
        await self._drop_writer()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)

    # ---- pieces ---------------------------------------------------------------------

    async def _attempt(
        self, conn: asyncpg.Connection, batch: Sequence[Pending], *, savepoints: bool
    ) -> BatchResult:
        tx = PgTx(conn, self._clock)
        outcomes: list[Any] = []
        async with conn.transaction():
            if any(p.emits for p in batch):
                await tx.lock_revisions()
            for pending in batch:
                tx.begin_unit()
                if savepoints:
                    await conn.execute("SAVEPOINT unit")
                try:
                    result: Any = await pending.unit(tx)
                except asyncpg.PostgresError as exc:
                    if not savepoints:
                        raise _NeedsIsolation() from exc
                    await conn.execute("ROLLBACK TO SAVEPOINT unit")
                    tx.drop_unit()
                    result = Retry() if is_race(exc) else _fault(exc)
                except (asyncpg.InterfaceError, OSError, TimeoutError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    if savepoints:
                        await conn.execute("ROLLBACK TO SAVEPOINT unit")
                    elif tx.unit_wrote:
                        raise _NeedsIsolation() from exc
                    tx.drop_unit()
                    result = exc
                else:
                    if savepoints:
                        await conn.execute("RELEASE SAVEPOINT unit")
                outcomes.append(result)
            payload = self.notify_payload(tx.events) if self.notify_payload else None
            await tx.flush(payload)
        return BatchResult(outcomes, tx.events, tx.deadlines, tx.last_revision)

    async def _writer_connection(self) -> asyncpg.Connection:
        if self._writer is None or self._writer.is_closed():
            self._writer = await self.connect()
        return self._writer

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.terminate()

    async def _read_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=1,
                        max_size=self.pool_size,
                        timeout=_CONNECT_TIMEOUT_S,
                        command_timeout=_COMMAND_TIMEOUT_S,
                    )
        return self._pool
