"""No crash on any input, the store's part: a full connection pool is UNAVAILABLE with retry
advice (not INTERNAL), and only the known unique-key races are retried: any other
constraint violation is a server fault, reported once, never an endless UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy.engine import make_url

from tests.conftest import DbFactory
from tests.service.conftest import WAIT_S, error_info, eventually, make_test_server
from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.clock import FakeClock
from tether_server.domain.errors import StoreUnavailable
from tether_server.store import batch
from tether_server.store.database import Database
from tether_server.store.objects import rows as object_rows
from tether_server.store.objects import units as object_units
from tether_server.store.sql import Sql, sql
from tether_server.store.tx import Tx

INTEGRITY_ERRORS = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)
_OBJECT_BY_NAME = sql(
    "SELECT uid FROM objects WHERE namespace = 'default' AND kind = 'Thing' AND name = $1"
)
_ADD_REPLICA = sql(
    "INSERT INTO replicas (instance_id, name, started_at_us, heartbeat_at_us)"
    " VALUES ($1, 'r', 0, 0)"
)


# ---- a full pool ---------------------------------------------------------------------------


class Holders:
    """Reads that hold a store connection each until released."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.started = 0
        self._thread_gate = threading.Event()
        self._loop_gate = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _hold(self, tx: Tx) -> None:
        self.started += 1
        if tx.is_pg:
            await self._loop_gate.wait()
        else:
            # SQLite runs the unit in a reader thread: blocking it keeps the connection.
            self._thread_gate.wait(WAIT_S)

    async def hold(self, count: int) -> None:
        self.tasks = [asyncio.create_task(self.db.read(self._hold)) for _ in range(count)]
        await eventually(lambda: self.started == count, "every connection held")

    async def release(self) -> None:
        self._thread_gate.set()
        self._loop_gate.set()
        await asyncio.gather(*self.tasks)


def retry_delay_s(exc: BaseException) -> float | None:
    assert isinstance(exc, grpc.aio.AioRpcError)
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


async def test_a_full_pool_answers_unavailable_with_retry_advice(
    db_url: str, fake_clock: FakeClock
) -> None:
    server = make_test_server(db_url, fake_clock)
    port = await server.start()
    await server.expiry.stop()
    backend = server.db.backend_impl
    # Short, so the refused call comes back quickly; the default is 10 s.
    backend.pool_timeout_s = 0.2
    holders = Holders(server.db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = lease_pb2_grpc.LeaseServiceStub(channel)
            await holders.hold(backend.pool_size)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListLeases(lease_pb2.ListLeasesRequest(), timeout=WAIT_S)
            code, reason, _ = error_info(caught.value)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
            delay = retry_delay_s(caught.value)
            assert delay is not None
            assert delay > 0
            await holders.release()
            # Free again: the same call is answered.
            await stub.ListLeases(lease_pb2.ListLeasesRequest(), timeout=WAIT_S)
    finally:
        await holders.release()
        await server.stop(0)


@pytest.mark.postgres
async def test_postgres_refusing_connections_is_unavailable(
    db_factory: DbFactory, fake_clock: FakeClock
) -> None:
    """The server's answer to one connection too many (SQLSTATE 53300): a role allowed none."""
    url = db_factory("postgres")
    role = f"tether_nolimit_{id(url) % 100_000}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        db = Database(make_url(url).set(username=role).render_as_string(False), fake_clock)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await db.read(lambda tx: tx.fetchval(sql("SELECT 1")))
            assert isinstance(caught.value.__cause__, asyncpg.TooManyConnectionsError)
            with pytest.raises(StoreUnavailable):
                await db.write(lambda tx: tx.fetchval(sql("SELECT 1")))
        finally:
            await db.dispose()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


# ---- races and constraint bugs ---------------------------------------------------------------


class RivalInsert:
    """Wraps a unit's Tx: just before the unit inserts its object, a rival row with the same
    (namespace, kind, name) and another uid appears, as when another replica's create
    commits between this one's look-up and insert."""

    def __init__(self, tx: Tx, rivals: int) -> None:
        self._tx = tx
        self._rivals = rivals

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def execute(self, stmt: Sql, *args: Any) -> int:
        if stmt is object_rows._INSERT and self._rivals > 0:
            rival = list(args)
            rival[0] = f"rival-{args[0]}"
            await self._tx.execute(stmt, *rival)
        return await self._tx.execute(stmt, *args)


async def test_a_known_race_runs_again_and_wins(database: Database) -> None:
    runs = 0
    # PostgreSQL runs a batch whose unit failed once more with a savepoint per unit before
    # the unit's own failure counts (see pg_backend.py): the rival appears in both.
    rival_runs = 2 if database.backend == "postgresql" else 1

    async def create(tx: Tx) -> object_units.Created:
        nonlocal runs
        runs += 1
        racing: Any = RivalInsert(tx, rival_runs - runs + 1)
        params = object_units.CreateParams(namespace="default", kind="Thing", name="contested")
        return await object_units.create(racing, params)

    created = await database.write(create)
    assert created.created
    assert runs == rival_runs + 1, "the unit ran again after the race"
    uids = await database.read(lambda tx: tx.fetch(_OBJECT_BY_NAME, "contested"))
    # The rival rows were rolled back with the unit that lost; the retry's row stands.
    assert [r[0] for r in uids] == [created.obj.uid]


def test_known_races_name_real_constraints() -> None:
    assert {r.constraint for r in batch.KNOWN_RACES} == {
        "lease_requests_pkey",
        "sagas_pkey",
        "uq_objects_name",
    }
    assert (
        "UNIQUE constraint failed: objects.namespace, objects.kind, objects.name"
        in batch.RACE_SQLITE_MESSAGES
    )


async def test_an_unknown_constraint_violation_is_a_fault_not_a_retry(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    async def duplicate(tx: Tx) -> None:
        nonlocal runs
        runs += 1
        await tx.execute(_ADD_REPLICA, "twice")
        await tx.execute(_ADD_REPLICA, "twice")

    # The driver's own IntegrityError reaches the caller: not StoreUnavailable (which a
    # client would retry for ever).
    with caplog.at_level(logging.ERROR), pytest.raises(INTEGRITY_ERRORS):
        await database.write(duplicate, emits=False)
    # Once (PostgreSQL: plus the one rerun with savepoints), never the committer's retries.
    assert runs <= 2
    assert "constraint violation that is no known race" in caplog.text
    # The batch machinery is fine afterwards.
    await database.write(lambda tx: tx.execute(_ADD_REPLICA, "once"), emits=False)


async def test_an_unknown_violation_among_other_units_fails_only_its_own(
    database: Database,
) -> None:
    async def duplicate(tx: Tx) -> None:
        await tx.execute(_ADD_REPLICA, "dup")
        await tx.execute(_ADD_REPLICA, "dup")

    async def fine(tx: Tx) -> int:
        return await tx.execute(_ADD_REPLICA, "fine")

    bad, good = await asyncio.gather(
        database.write(duplicate, emits=False),
        database.write(fine, emits=False),
        return_exceptions=True,
    )
    assert isinstance(bad, INTEGRITY_ERRORS), repr(bad)
    assert good == 1
