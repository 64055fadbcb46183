"""Alembic migrations: idempotent, safe to run from two processes at once, and in step with
the table definitions in store/schema.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from tether_server.clock import FakeClock
from tether_server.store.database import Database
from tether_server.store.leases import AcquireParams, AcquireResult, LeaseStore
from tether_server.store.schema import metadata, revisions

TABLES = {
    "objects",
    "object_owners",
    "gc_queue",
    "sagas",
    "saga_steps",
    "saga_compensations",
    "saga_annotations",
    "lease_keys",
    "leases",
    "events",
    "lease_requests",
    "revisions",
    "replicas",
    "sweep_reports",
}


def alembic_head() -> str:
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("tether_server.store") / "migrations")
    )
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _state(conn: Connection) -> tuple[set[str], str | None]:
    tables = set(inspect(conn).get_table_names())
    return tables, MigrationContext.configure(conn).get_current_revision()


@contextlib.asynccontextmanager
async def inspect_connection(db: Database) -> AsyncIterator[AsyncConnection]:
    """A SQLAlchemy connection of the test's own, for inspecting what migrations made."""
    engine = create_async_engine(db.url)
    try:
        async with engine.connect() as conn:
            yield conn
    finally:
        await engine.dispose()


async def schema_state(db: Database) -> tuple[set[str], str | None]:
    async with inspect_connection(db) as conn:
        return await conn.run_sync(_state)


async def test_fresh_database_has_no_tables(empty_db_url: str, fake_clock: FakeClock) -> None:
    db = Database(empty_db_url, fake_clock)
    try:
        tables, version = await schema_state(db)
        assert tables == set()
        assert version is None
    finally:
        await db.dispose()


async def test_migrate_is_idempotent(database: Database) -> None:
    store = LeaseStore(database)
    result = await store.lease_acquire(AcquireParams("default", "k", "h", "p", 10_000_000))
    assert isinstance(result, AcquireResult)

    await database.migrate()
    await database.migrate()

    tables, version = await schema_state(database)
    assert tables == TABLES | {"alembic_version"}
    assert version == alembic_head()
    async with inspect_connection(database) as conn:
        rows = (await conn.execute(select(revisions))).all()
        assert [tuple(r) for r in rows] == [(1, 1, 0, 0)]
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert len(versions) == 1
    assert await store.lease_get("default", result.lease.lease_id) == result.lease


async def test_concurrent_migrations_from_two_processes(
    empty_db_url: str, fake_clock: FakeClock
) -> None:
    dbs = [Database(empty_db_url, fake_clock) for _ in range(3)]
    try:
        await asyncio.gather(*(db.migrate() for db in dbs))
        tables, version = await schema_state(dbs[0])
        assert tables >= TABLES
        assert version == alembic_head()
        assert await dbs[1].current_revision() == (0, 0)
    finally:
        for db in dbs:
            await db.dispose()


async def test_migrated_schema_matches_schema_module(database: Database) -> None:
    def diff(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with inspect_connection(database) as conn:
        diffs = await conn.run_sync(diff)
    assert diffs == []
