"""Store fixtures: every test here runs once per backend through ``db_url``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tether_server.clock import Clock, FakeClock
from tether_server.store.database import Database
from tether_server.store.leases import LeaseStore

OpenStore = Callable[..., Awaitable[LeaseStore]]


@pytest.fixture
async def database(db_url: str, fake_clock: FakeClock) -> AsyncIterator[Database]:
    """A migrated database on the test's fresh URL, driven by ``fake_clock``."""
    db = Database(db_url, fake_clock)
    await db.migrate()
    yield db
    await db.dispose()


@pytest.fixture
async def lease_store(database: Database) -> LeaseStore:
    return LeaseStore(database)


@pytest.fixture
async def open_store(db_url: str, fake_clock: FakeClock) -> AsyncIterator[OpenStore]:
    """``await open_store(clock=None)``: another LeaseStore on its own engine, same URL.

    Separate engines give separate connection pools, so transactions really run in
    parallel (on SQLite: separate connections contending for the write lock). Every store
    opened here is disposed when the test ends. The schema must already exist (depend on
    ``lease_store`` or call ``migrate()`` on the first one).
    """
    opened: list[Database] = []

    async def open_one(clock: Clock | None = None) -> LeaseStore:
        db = Database(db_url, clock or fake_clock)
        opened.append(db)
        return LeaseStore(db)

    yield open_one
    for db in opened:
        await db.dispose()
