"""A server SIGKILLed with leases held, sagas claimed and a foreground deletion half done:
restarted on the same database once the ttls have passed, its STARTUP sweep reclaims
exactly what the crash left (lease expiries, each stale saga's on-stale policy, the rest
of the cascade), and a sweep after it finds nothing to do.

The tree is written through the store before the server starts (populating is not what is
tested); the delete goes through the real RPC and the real collector, with small batches
so the cascade takes many transactions and the kill lands inside it. Time is the server's
file clock: "the ttls passed while no server ran" is one write to that file.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2

from tests.e2e import ServerFactory, lease_stub
from tests.e2e.test_object_crash import _live, _params
from tests.e2e.test_restart import acquire
from tests.e2e.test_restart import get as get_lease
from tests.e2e.test_saga_pipeline import KIND, STARTED, SUCCEEDED, claim, saga_stub, step
from tests.e2e.test_saga_pipeline import get as get_saga
from tests.service.sweep_support import BLOCKED, RECONCILE
from tests.support.server_process import FileClockDriver
from tether_client.pb import (
    lease_pb2,
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    sweep_pb2,
    sweep_pb2_grpc,
)
from tether_server.clock import FakeClock
from tether_server.domain.objects import OwnerRef
from tether_server.domain.sweep import ACTIONS
from tether_server.store.database import Database
from tether_server.store.objects import units
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

pytestmark = pytest.mark.e2e

BRANCHES = 40
LEAVES = 20  # per branch
GC_BATCH = 20
# Objects deleted or marked by the collector before the kill (about 5 of its 45 batches).
KILL_AFTER = 100
SHORT_TTL_S = 10
LONG_TTL_S = 3600
# Past the short ttls, the claims' ttl (test_saga_pipeline.CLAIM_TTL_S) and the collector's
# 60 s park of a waiting owner; well within the long ttls.
DOWN_S = 90
# Every live object of the tree (the root included), and those already terminating.
_TREE = sql(
    "SELECT count(*) AS live, sum(CASE WHEN deletion_ts_us IS NULL THEN 0 ELSE 1 END) AS marked"
    " FROM objects WHERE name <> 'bystander'"
)
RECOVERY = [*RECONCILE, BLOCKED]
COUNTS = (*ACTIONS, "blocked_total", "gc_queue_depth", "backlog")


def _counts(report: sweep_pb2.SweepReport) -> dict[str, int]:
    return {name: getattr(report, name) for name in COUNTS}


async def _populate(db_url: str, now_us: int) -> None:
    """tree-root <- branch-i <- leaf-i-j, every reference blocking its owner's foreground
    deletion; and a bystander outside the tree. Stamped with the servers' clock."""
    db = Database(db_url, FakeClock(now_us))

    def ref(name: str) -> OwnerRef:
        return OwnerRef(uid=f"uid-{name}", kind="Thing", name=name, block_owner_deletion=True)

    async def bulk(tx: Tx) -> None:
        for name in ("tree-root", "bystander"):
            await units.create(tx, _params(name, [], f"uid-{name}"))
        for i in range(BRANCHES):
            await units.create(tx, _params(f"branch-{i}", [ref("tree-root")], f"uid-branch-{i}"))
            for j in range(LEAVES):
                leaf = f"leaf-{i}-{j}"
                await units.create(tx, _params(leaf, [ref(f"branch-{i}")], f"uid-{leaf}"))

    try:
        await db.write(bulk)
    finally:
        await db.dispose()


async def _tree_left(db_url: str) -> tuple[int, int]:
    """(live, terminating) objects of the tree, read straight from the store."""
    db = Database(db_url, FakeClock())
    try:
        row = await db.read(lambda tx: tx.fetchrow(_TREE))
    finally:
        await db.dispose()
    assert row is not None
    return int(row["live"]), int(row["marked"] or 0)


async def _claim_for(
    stub: saga_pb2_grpc.SagaServiceStub, saga_id: str, on_stale: int, ttl_s: int | None = None
) -> saga_pb2.ClaimSagaResponse:
    """Create ``saga_id`` with ``on_stale`` and claim it (the pipeline's 30 s claim unless
    ``ttl_s``)."""
    await stub.CreateSaga(
        saga_pb2.CreateSagaRequest(saga_id=saga_id, kind=KIND, on_stale=on_stale),  # type: ignore[arg-type]
        timeout=10,
    )
    if ttl_s is None:
        return await claim(stub, saga_id, f"worker-{saga_id}")
    response: saga_pb2.ClaimSagaResponse = await stub.ClaimSaga(
        saga_pb2.ClaimSagaRequest(
            saga_id=saga_id,
            purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE,
            new_lease=saga_pb2.ClaimLeaseSpec(
                holder=f"worker-{saga_id}", ttl=duration_pb2.Duration(seconds=ttl_s)
            ),
        ),
        timeout=10,
    )
    return response


async def test_startup_sweep_reclaims_exactly_what_a_sigkill_left(
    db_url: str, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    await _populate(db_url, file_clock.now_us())
    server = server_factory(
        db_url, env=file_clock.env, extra_args=["--gc-batch-size", str(GC_BATCH)]
    )

    async with lease_stub(server.target) as leases:
        short = [
            (await acquire(leases, f"jobs/short-{n}", "w", SHORT_TTL_S)).lease for n in range(3)
        ]
        long = [(await acquire(leases, f"jobs/long-{n}", "w", LONG_TTL_S)).lease for n in range(2)]
        done = (await acquire(leases, "jobs/done", "w", SHORT_TTL_S)).lease
        await leases.Release(
            lease_pb2.ReleaseRequest(
                lease_id=done.lease_id, fencing_token=done.fencing_token, holder="w"
            ),
            timeout=10,
        )

    async with saga_stub(server.target) as sagas:
        policies = {
            "requeue": saga_pb2.ON_STALE_POLICY_REQUEUE,
            "compensate": saga_pb2.ON_STALE_POLICY_COMPENSATE,
            "nothing-to-undo": saga_pb2.ON_STALE_POLICY_COMPENSATE,
            "quarantine": saga_pb2.ON_STALE_POLICY_QUARANTINE,
        }
        claims = {
            saga_id: (await _claim_for(sagas, saga_id, policy)).lease
            for saga_id, policy in policies.items()
        }
        for saga_id in ("requeue", "compensate", "quarantine"):
            fence = (await get_saga(sagas, saga_id)).claim
            await step(sagas, saga_id, fence, 0, "plan", STARTED, undo="undo-plan")
            await step(sagas, saga_id, fence, 0, "plan", SUCCEEDED)
        kept = await _claim_for(sagas, "kept", saga_pb2.ON_STALE_POLICY_REQUEUE, LONG_TTL_S)
        await sagas.CreateSaga(saga_pb2.CreateSagaRequest(saga_id="planned", kind=KIND), timeout=10)
        before = {s: await get_saga(sagas, s) for s in [*policies, "kept", "planned"]}

    async with grpc.aio.insecure_channel(server.target) as channel:
        objects = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
        watch = objects.WatchObjects(owner_ref_pb2.WatchObjectsRequest(), timeout=60)
        await watch.read()  # the header: the watch is in place
        deleted = await objects.DeleteObject(
            owner_ref_pb2.DeleteObjectRequest(
                kind="Thing",
                name="tree-root",
                propagation_policy=owner_ref_pb2.PROPAGATION_POLICY_FOREGROUND,
            ),
            timeout=30,
        )
        assert not deleted.deleted
        assert deleted.object.HasField("deletion_timestamp")
        # Kill once the collector has committed a few batches below the root: every
        # branch marked, the leaves of a few deleted, most of the cascade still to come.
        seen = 0
        while seen < KILL_AFTER:
            message = await watch.read()
            assert message is not grpc.aio.EOF
            seen += sum(e.object.name != "tree-root" for e in message.events)
        assert server.kill() == -9
        watch.cancel()

    # Half done: the root waits, some dependents are gone or terminating, most are not.
    live, marked = await _tree_left(db_url)
    assert (1 + BRANCHES + BRANCHES * LEAVES) - live + marked > 1
    assert live - marked > BRANCHES * LEAVES // 4, "the cascade ended before the kill"
    file_clock.advance(DOWN_S)
    await asyncio.to_thread(server.start)

    async with grpc.aio.insecure_channel(server.target) as channel:
        sweeps = sweep_pb2_grpc.SweepServiceStub(channel)
        listed = await sweeps.ListSweepReports(
            sweep_pb2.ListSweepReportsRequest(triggers=[sweep_pb2.SWEEP_TRIGGER_STARTUP]),
            timeout=10,
        )
        # One per start, newest first: the first start found nothing.
        assert len(listed.reports) == 2
        report, first = listed.reports
        assert not any(_counts(first).values()), first
        got = await sweeps.GetSweepReport(
            sweep_pb2.GetSweepReportRequest(sweep_id=report.sweep_id), timeout=10
        )
        assert got.report == report
        assert report.trigger == sweep_pb2.SWEEP_TRIGGER_STARTUP
        assert not report.dry_run
        assert list(report.parts) == RECOVERY
        assert list(report.failures) == []
        assert report.started_at.ToMicroseconds() == file_clock.now_us()
        assert _counts(report) == {
            # The short leases and the four 30 s claims; not the long ones nor the
            # released one.
            "leases_expired": len(short) + len(claims),
            "sagas_requeued": 1,
            "sagas_compensating": 1,
            "sagas_failed": 1,
            "sagas_quarantined": 1,
            # Each dependent not yet deleted or marked at the kill, once (a marked one
            # leaves with its finalizer, not counted again).
            "objects_collected": live - marked,
            "objects_orphaned": 0,
            "blocked_total": 0,
            "gc_queue_depth": 0,
            "backlog": 0,
        }

        # Nothing is left for a second sweep.
        again = await sweeps.RunSweep(sweep_pb2.RunSweepRequest(parts=list(RECONCILE)), timeout=30)
        assert list(again.report.failures) == []
        assert not any(_counts(again.report).values()), again.report

    # The tree is gone, the bystander is not.
    assert set(await _live(server.target)) == {"bystander"}

    async with lease_stub(server.target) as leases:
        for lease in [*short, *claims.values()]:
            ended = await get_lease(leases, lease.lease_id)
            assert ended.state == lease_pb2.LEASE_STATE_EXPIRED, lease.key
            assert ended.ended_at.ToMicroseconds() == lease.expires_at.ToMicroseconds()
        for lease in [*long, kept.lease]:
            assert (await get_lease(leases, lease.lease_id)).state == lease_pb2.LEASE_STATE_ACTIVE
        assert (await get_lease(leases, done.lease_id)).state == lease_pb2.LEASE_STATE_RELEASED

    async with saga_stub(server.target) as sagas:
        after = {s: await get_saga(sagas, s) for s in before}
        assert {s: saga.state for s, saga in after.items()} == {
            "requeue": saga_pb2.SAGA_STATE_RUNNING,
            "compensate": saga_pb2.SAGA_STATE_COMPENSATING,
            "nothing-to-undo": saga_pb2.SAGA_STATE_FAILED,
            "quarantine": saga_pb2.SAGA_STATE_QUARANTINED,
            "kept": saga_pb2.SAGA_STATE_RUNNING,
            "planned": saga_pb2.SAGA_STATE_PLANNED,
        }
        assert not any(saga.stale for saga in after.values())
        # The claims that went stale ended; the live one and the step logs stay.
        assert [s for s, saga in after.items() if saga.HasField("claim")] == ["kept"]
        assert after["kept"] == before["kept"]
        assert after["planned"] == before["planned"]
        assert [(c.step_index, c.status) for c in after["compensate"].compensations] == [
            (0, saga_pb2.COMPENSATION_STATUS_PENDING)
        ]
        assert [s.status for s in after["requeue"].steps] == [SUCCEEDED]
        # Requeued: the next worker claims it as attempt 2, with the step log.
        resumed = await claim(sagas, "requeue", "worker-next")
        assert resumed.saga.attempt == 2
        assert [s.name for s in resumed.saga.steps] == ["plan"]
