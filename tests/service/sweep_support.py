"""Helpers shared by the sweep tests: ``SweepEnv`` is the harness with the background work
that a sweep also does stopped (so each count is the sweep's alone), plus the calls the
tests repeat; ``table_contents`` reads every table whole."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tether_client.pb import lease_pb2, sweep_pb2, sweep_pb2_grpc
from tether_server.app import TetherServer
from tether_server.domain.sweep import ACTIONS
from tether_server.store import schema
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

from .conftest import WAIT_S, Harness
from .object_support import ObjApi
from .saga_support import SagaApi

DAY_S = 24 * 3600.0
EXPIRE = sweep_pb2.SWEEP_PART_EXPIRE_LEASES
STALE = sweep_pb2.SWEEP_PART_STALE_SAGAS
COLLECT = sweep_pb2.SWEEP_PART_COLLECT_GARBAGE
BLOCKED = sweep_pb2.SWEEP_PART_BLOCKED_OBJECTS
PURGE_LEASES = sweep_pb2.SWEEP_PART_PURGE_LEASES
PURGE_SAGAS = sweep_pb2.SWEEP_PART_PURGE_SAGAS
PURGE_EVENTS = sweep_pb2.SWEEP_PART_PURGE_EVENTS
PURGE_REPORTS = sweep_pb2.SWEEP_PART_PURGE_REPORTS
RECONCILE = (EXPIRE, STALE, COLLECT)
# The background tasks whose work a sweep also does.
SWEEPING_TASKS = ("sweep", "garbage-collector", "saga-deadlines")


async def quiet(server: TetherServer) -> None:
    """Stop what would do a sweep's work behind the test's back (expiry included)."""
    await server.expiry.stop()
    for task in SWEEPING_TASKS:
        await server.runner.stop_task(task)


@dataclass
class SweepEnv:
    tether: Harness
    sweeps: sweep_pb2_grpc.SweepServiceStub
    sagas: SagaApi
    objects: ObjApi

    @property
    def server(self) -> TetherServer:
        return self.tether.server

    def advance(self, seconds: float) -> None:
        self.tether.clock.advance(seconds)

    async def run(
        self, *parts: int, dry_run: bool = False, namespace: str = "", timeout: float = WAIT_S * 4
    ) -> sweep_pb2.SweepReport:
        return await run_sweep(
            self.sweeps, *parts, dry_run=dry_run, namespace=namespace, timeout=timeout
        )


async def run_sweep(
    stub: sweep_pb2_grpc.SweepServiceStub,
    *parts: int,
    dry_run: bool = False,
    namespace: str = "",
    timeout: float = WAIT_S * 4,
) -> sweep_pb2.SweepReport:
    response = await stub.RunSweep(
        sweep_pb2.RunSweepRequest(parts=list(parts), dry_run=dry_run, namespace=namespace),
        timeout=timeout,
    )
    report: sweep_pb2.SweepReport = response.report
    return report


async def release(tether: Harness, lease: lease_pb2.Lease) -> None:
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder=lease.holder
        ),
        timeout=WAIT_S,
    )


async def sweep_env_for(tether: Harness) -> SweepEnv:
    await quiet(tether.server)
    return SweepEnv(
        tether,
        sweep_pb2_grpc.SweepServiceStub(tether.channel),
        SagaApi(tether.channel),
        ObjApi.on(tether.channel, tether.server),
    )


def actions(report: sweep_pb2.SweepReport, fields: Sequence[str] = ACTIONS) -> dict[str, int]:
    """The report's counts, by name (zeros included), and rows purged per kind."""
    counts: dict[str, Any] = {name: getattr(report, name) for name in fields}
    counts["rows_purged"] = dict(report.rows_purged)
    return counts


async def table_contents(server: TetherServer, skip: Sequence[str] = ()) -> dict[str, list[str]]:
    """Every row of every table, as sorted text: equal results mean nothing changed."""

    async def read(tx: Tx) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for table in schema.metadata.sorted_tables:
            if table.name in skip:
                continue
            rows = await tx.fetch(sql(f"SELECT * FROM {table.name}"))
            found[table.name] = sorted(repr(tuple(row)) for row in rows)
        return found

    return await server.db.read(read)
