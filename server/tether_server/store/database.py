"""Engine, transactions, time and revisions: the one seam between the store and a driver.

SQLite runs in WAL mode with a busy timeout; write transactions begin with
``BEGIN IMMEDIATE`` so two writers never both read and then both write, and one process
serialises its own writers on an asyncio lock instead of spinning on the busy timeout.
PostgreSQL runs READ COMMITTED with row locks (``FOR UPDATE``) and conditional updates;
its clock supplies ``now`` unless a test injected a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import event, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tether_server.clock import Clock
from tether_server.domain.errors import StoreUnavailable
from tether_server.store.schema import revisions

log = logging.getLogger(__name__)
T = TypeVar("T")

# Transient conflicts that a whole transaction may simply be retried after.
_PG_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_MAX_ATTEMPTS = 5
# Two replicas starting at once must not both run migrations.
_MIGRATION_LOCK_ID = 0x7E7E_E12


def normalize_url(url: str) -> str:
    """Accept plain ``sqlite:///`` and ``postgresql://`` URLs and pick the async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…")


def describe_url(url: str) -> str:
    """The URL with any password masked, for logs."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass
class Tx:
    """An open transaction and the one ``now`` every decision in it uses."""

    conn: AsyncConnection
    now_us: int
    read_clock: Callable[[AsyncConnection], Awaitable[int]]
    # Set when the transaction appended to an event log, so watchers can be woken.
    wrote_events: bool = False

    async def refresh_now(self) -> int:
        """Read the clock again once the rows a decision depends on are locked: a wait on a
        lock must not leave the decision judging deadlines by a time already past."""
        self.now_us = max(self.now_us, await self.read_clock(self.conn))
        return self.now_us

    async def next_revisions(self, count: int) -> int:
        """Reserve ``count`` revisions; returns the first. Holds the counter row lock until
        commit, which orders commits by revision (see schema.lease_events)."""
        result = await self.conn.execute(
            update(revisions)
            .where(revisions.c.id == 1)
            .values(current=revisions.c.current + count)
            .returning(revisions.c.current)
        )
        last = int(result.scalar_one())
        return last - count + 1


class Database:
    def __init__(self, url: str, clock: Clock) -> None:
        self.url = normalize_url(url)
        self.clock = clock
        self.is_sqlite = self.url.startswith("sqlite")
        self.engine: AsyncEngine = _create_engine(self.url, self.is_sqlite)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # PostgreSQL supplies now() unless a test injected an authoritative clock.
        self._db_clock = not self.is_sqlite and not clock.authoritative
        self._after_commit: list[Callable[[Tx], None]] = []

    @property
    def backend(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    def after_commit(self, callback: Callable[[Tx], None]) -> None:
        """Call ``callback(tx)`` after every committed ``run_write`` transaction."""
        self._after_commit.append(callback)

    async def migrate(self) -> None:
        """Apply every Alembic migration not yet applied (idempotent)."""
        async with self._guard(), self._begin(readonly=False) as conn:
            if not self.is_sqlite:
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )
            await conn.run_sync(_upgrade_to_head)

    async def ping(self) -> None:
        async with self._guard(), self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        async with self._guard(), self._begin(readonly=True) as conn:
            yield Tx(conn, await self._now(conn), self._now)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        """One write transaction. Callers that can be retried use ``run_write`` instead."""
        lock = self._write_lock or contextlib.nullcontext()
        async with lock, self._guard(), self._begin(readonly=False) as conn:
            yield Tx(conn, await self._now(conn), self._now)

    async def run_write(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run ``work(tx)`` in a write transaction, retrying transient conflicts."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with self.write() as tx:
                    result = await work(tx)
                for callback in self._after_commit:
                    callback(tx)
                return result
            except _Retry:
                if attempt == _MAX_ATTEMPTS:
                    raise StoreUnavailable("the store kept reporting conflicts; retry") from None
                await asyncio.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    async def current_revision(self) -> tuple[int, int]:
        """(latest revision, highest purged revision)."""
        async with self.read() as tx:
            row = (await tx.conn.execute(select(revisions.c.current, revisions.c.compacted))).one()
            return int(row.current), int(row.compacted)

    async def _now(self, conn: AsyncConnection) -> int:
        if self._db_clock:
            result = await conn.execute(
                text("SELECT (extract(epoch from clock_timestamp()) * 1000000)::bigint")
            )
            return int(result.scalar_one())
        return self.clock.now_us()

    @contextlib.asynccontextmanager
    async def _begin(self, *, readonly: bool) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if readonly:
                await conn.execution_options(tether_readonly=True)
                if not self.is_sqlite:
                    # One snapshot for every statement of a read: a header revision and the
                    # events read after it agree (SQLite's read transactions already do).
                    await conn.execution_options(isolation_level="REPEATABLE READ")
            try:
                async with conn.begin():
                    yield conn
            except BaseException:
                # A cancelled task must not leave a half-used connection in the pool.
                if conn.in_transaction():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.rollback())
                raise

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """The one place driver errors are interpreted."""
        try:
            yield
        except IntegrityError:
            # Two transactions inserted the same unique row at once: the loser retries and
            # then sees the winner's row.
            raise _Retry() from None
        except (DBAPIError, OSError) as exc:
            sqlstate = _sqlstate(exc)
            if sqlstate in _PG_RETRY_SQLSTATES:
                raise _Retry() from exc
            if isinstance(exc, OperationalError | OSError) or _is_disconnect(exc):
                log.warning("store unavailable: %s", exc)
                raise StoreUnavailable("the store is unavailable; retry with backoff") from exc
            raise


class _Retry(Exception):
    """A transient conflict: rerun the whole transaction."""


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def _is_disconnect(exc: BaseException) -> bool:
    return bool(getattr(exc, "connection_invalidated", False))


def _create_engine(url: str, is_sqlite: bool) -> AsyncEngine:
    if not is_sqlite:
        return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so we can issue BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        readonly = conn.get_execution_options().get("tether_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _enable_wal(cursor: Any) -> None:
    """Switching a new database file to WAL needs an exclusive lock, and SQLite answers
    "database is locked" at once instead of waiting when two processes open the same new
    file together. It happens only at the first open of a file, so a brief retry is enough."""
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.02)  # only on the first open of a new file, and briefly


def _upgrade_to_head(sync_conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("tether_server.store") / "migrations")
    )
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
