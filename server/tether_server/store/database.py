"""The store's front door: a backend (SQLite or PostgreSQL), the group committer in front
of its writes, the clock every decision uses, migrations, and after-commit hooks.

- ``await db.write(unit)`` runs a unit of work in the next batch (see committer.py).
- ``await db.read(unit)`` runs a read-only unit on its own snapshot.
- ``db.after_commit(hook)`` is called with every committed batch (its events and the
  deadlines it created), on the event loop, before any caller of that batch resumes.

Connections: a read waits at most ``pool_timeout_s`` for a connection (PostgreSQL's pool
of ``pool_size``, SQLite's reader threads); past that, and when PostgreSQL refuses more
connections, the call answers UNAVAILABLE / STORE_UNAVAILABLE with retry advice.

SQLite: ``migrate()``, which a server runs first thing at start, also takes the file's
process lock (see sqlite_backend.py), held until ``dispose()``: a second server on the
file refuses to start. ``tether migrate`` takes it too, briefly, so it refuses to change
the schema under a running server (whose code expects the schema it started with) instead
of racing it; stop the server first.

Time: with SQLite the process clock; with PostgreSQL the database's clock, read once and
then followed on this process's monotonic clock (``DbClock``), so replicas whose clocks
drift still agree on deadlines and no statement pays a round trip to read the time. A test
may inject a clock instead (FakeClock, FileClock).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tether_server.clock import Clock
from tether_server.domain.errors import StoreUnavailable
from tether_server.store import events
from tether_server.store.batch import BatchResult, Unit
from tether_server.store.committer import Committer, CommitterConfig
from tether_server.store.pg_backend import DEFAULT_POOL_SIZE, DEFAULT_POOL_TIMEOUT_S, PgBackend
from tether_server.store.sql import sql
from tether_server.store.sqlite_backend import SqliteBackend
from tether_server.store.tx import Event

log = logging.getLogger(__name__)
T = TypeVar("T")

# Two replicas starting at once must not both run migrations.
_MIGRATION_LOCK_ID = 0x7E7E_E12
# NOTIFY payloads are limited to 8000 bytes; past this, a notification says "everything".
_MAX_NOTIFY_BYTES = 7000
_DB_NOW = sql("SELECT (extract(epoch from clock_timestamp()) * 1000000)::bigint")


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


class DbClock:
    """The database's clock, followed locally: one read of ``clock_timestamp()`` (taken at
    the midpoint of its round trip) plus this process's monotonic time since. ``sync()``
    refreshes the reference; the clock never goes backwards."""

    authoritative = False

    def __init__(self) -> None:
        self._reference: tuple[int, int] | None = None
        self._last = 0

    def now_us(self) -> int:
        if self._reference is None:
            value = time.time_ns() // 1000
        else:
            db_us, mono_ns = self._reference
            value = db_us + (time.monotonic_ns() - mono_ns) // 1000
        self._last = max(self._last, value)
        return self._last

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sync(self, read_db_us: Callable[[], Any]) -> None:
        best: tuple[int, int, int] | None = None
        for _ in range(3):
            before = time.monotonic_ns()
            db_us = int(await read_db_us())
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, db_us, (before + after) // 2)
        assert best is not None
        self._reference = (best[1], best[2])


class Database:
    def __init__(
        self,
        url: str,
        clock: Clock,
        committer: CommitterConfig | None = None,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    ) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.instance_id = ""
        self._hooks: list[Callable[[BatchResult], None]] = []
        self.backend_impl: SqliteBackend | PgBackend
        self.db_clock: DbClock | None = None
        if self.is_sqlite:
            self.clock = clock
            self.backend_impl = SqliteBackend(
                make_url(self.url).database or "", clock, pool_timeout_s=pool_timeout_s
            )
        else:
            if not clock.authoritative:
                self.db_clock = DbClock()
                clock = self.db_clock
            self.clock = clock
            dsn = make_url(self.url).set(drivername="postgresql")
            self.backend_impl = PgBackend(
                dsn.render_as_string(hide_password=False),
                clock,
                pool_size=pool_size,
                notify_payload=self._payload,
                pool_timeout_s=pool_timeout_s,
            )
        if committer is None and not self.is_sqlite:
            # A batch that needs one savepoint per unit (see pg_backend.py) has as many
            # subtransactions; past 64 PostgreSQL overflows their cache for every session.
            # Keep such batches moderate.
            committer = CommitterConfig(max_batch=256)
        self.committer = Committer(
            self.backend_impl, committer, on_commit=self._on_commit, on_batch=self._on_batch
        )
        self.on_batch: Callable[[int, float], None] | None = None

    @property
    def backend(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    def after_commit(self, hook: Callable[[BatchResult], None]) -> None:
        self._hooks.append(hook)

    async def write(self, unit: Unit[T], *, emits: bool = True) -> T:
        """Run ``unit`` in the next group-committed batch; ``emits=False`` promises it
        appends no event (its batch need not lock the revision counter)."""
        return await self.committer.submit(unit, emits=emits)

    async def read(self, unit: Unit[T], *, snapshot: bool = True) -> T:
        return await self.backend_impl.read(unit, snapshot=snapshot)

    async def current_revision(self) -> tuple[int, int]:
        """(latest revision, highest purged revision)."""
        head = await self.read(events.header, snapshot=False)
        return head.current, head.compacted

    async def sync_clock(self) -> None:
        """PostgreSQL without an injected clock: re-read the database's clock."""
        if self.db_clock is not None and isinstance(self.backend_impl, PgBackend):
            backend = self.backend_impl

            async def read_db_us() -> int:
                return int(await backend.read(lambda tx: tx.fetchval(_DB_NOW), snapshot=False))

            await self.db_clock.sync(read_db_us)

    def lock(self) -> None:
        """SQLite: take the file's process lock until ``dispose()`` (DatabaseInUse when
        another process serves the file); idempotent. PostgreSQL: nothing (replicas share
        it)."""
        if isinstance(self.backend_impl, SqliteBackend):
            self.backend_impl.lock()

    async def migrate(self) -> None:
        """Apply every Alembic migration not yet applied (idempotent). SQLite: under the
        file's process lock, kept until ``dispose()`` (see the module docstring)."""
        self.lock()
        engine = create_async_engine(self.url, poolclass=NullPool)
        if self.is_sqlite:
            _begin_immediate(engine.sync_engine)
        try:
            async with engine.begin() as conn:
                if not self.is_sqlite:
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                    )
                await conn.run_sync(_upgrade_to_head)
        except (OperationalError, DBAPIError, OSError) as exc:
            # A refused statement is a bug to report; a lost connection is an outage.
            lost = isinstance(exc, OperationalError | OSError) or getattr(
                exc, "connection_invalidated", False
            )
            if not lost:
                raise
            raise StoreUnavailable("the store is unavailable; retry with backoff") from exc
        finally:
            await engine.dispose()
        await self.sync_clock()

    async def dispose(self) -> None:
        await self.committer.close()
        await self.backend_impl.close()

    # ---- after commit ---------------------------------------------------------------

    def _on_commit(self, result: BatchResult) -> None:
        for hook in self._hooks:
            hook(result)

    def _on_batch(self, size: int, seconds: float) -> None:
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    def _payload(self, batch_events: Sequence[Event]) -> str | None:
        """What other replicas need to wake their waiters: the changed keys per area."""
        if not batch_events:
            return None
        keys = sorted({(e.area, e.namespace, e.key) for e in batch_events})
        payload = json.dumps({"from": self.instance_id, "keys": keys}, separators=(",", ":"))
        if len(payload.encode()) > _MAX_NOTIFY_BYTES:
            payload = json.dumps({"from": self.instance_id, "all": True})
        return payload


def _begin_immediate(engine: Any) -> None:
    """Migrations from two processes on one new file: the second waits for the first."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _upgrade_to_head(sync_conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("tether_server.store") / "migrations")
    )
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
