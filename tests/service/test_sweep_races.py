"""Sweep races on both backends, with real concurrency, each repeated over several rounds:
two sweeps at once on two servers sharing the database (a leader that has not noticed it
lost the lock) apply nothing twice; a sweep racing workers that complete their sagas
leaves every completion standing; a purge of a key's history racing a new acquire of the
key never lets its fencing token go backwards."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from tether_client.pb import lease_pb2, lease_pb2_grpc, saga_pb2, sweep_pb2_grpc
from tether_server.app import TetherServer

from .conftest import WAIT_S, Harness, dur
from .saga_support import (
    COMPLETED,
    ON_STALE_COMPENSATE,
    ON_STALE_QUARANTINE,
    REQUEUE,
    RUNNING,
    outcome,
)
from .sweep_support import (
    DAY_S,
    EXPIRE,
    PURGE_LEASES,
    RECONCILE,
    STALE,
    SweepEnv,
    quiet,
    release,
    run_sweep,
    sweep_env_for,
)

ROUNDS = 3


@dataclass
class Pair:
    """The fixture's server and a second replica on the same database and clock."""

    env: SweepEnv
    other: TetherServer
    other_channel: grpc.aio.Channel

    @property
    def stubs(self) -> list[sweep_pb2_grpc.SweepServiceStub]:
        return [self.env.sweeps, sweep_pb2_grpc.SweepServiceStub(self.other_channel)]


@pytest.fixture
async def pair(tether: Harness) -> AsyncIterator[Pair]:
    env = await sweep_env_for(tether)
    config = dataclasses.replace(tether.server.config, replica="replica-b")
    other = TetherServer(config, tether.clock)
    port = await other.start()
    await quiet(other)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Pair(env, other, channel)
    finally:
        try:
            await other.stop(0)
        finally:
            await channel.close()


async def test_two_sweeps_at_once_apply_nothing_twice(pair: Pair) -> None:
    api = pair.env.sagas
    policies = [REQUEUE, ON_STALE_COMPENSATE, ON_STALE_QUARANTINE]
    for round_ in range(ROUNDS):
        ids = [f"r{round_}-{n}" for n in range(24)]
        for n, saga_id in enumerate(ids):
            await api.create(saga_id, on_stale=policies[n % 3])
            await api.claim(saga_id, ttl_s=10)
        pair.env.advance(11)
        reports = await asyncio.gather(*(run_sweep(stub, *RECONCILE) for stub in pair.stubs))
        assert sum(r.leases_expired for r in reports) == len(ids)
        assert sum(r.sagas_requeued for r in reports) == 8
        # COMPENSATE with no step to undo ends FAILED.
        assert sum(r.sagas_failed for r in reports) == 8
        assert sum(r.sagas_quarantined for r in reports) == 8
        assert sum(r.sagas_compensating for r in reports) == 0
        again = await asyncio.gather(*(run_sweep(stub, *RECONCILE) for stub in pair.stubs))
        assert all(r.leases_expired + r.sagas_requeued == 0 for r in again)
        # Each requeued saga had its claim ended exactly once.
        for saga_id in ids[::3]:
            saga = await api.get(saga_id)
            assert saga.state == RUNNING, saga_id
            assert not saga.HasField("claim"), saga_id


async def test_a_sweep_racing_workers_leaves_every_completion_standing(pair: Pair) -> None:
    api = pair.env.sagas
    for round_ in range(ROUNDS):
        ids = [f"w{round_}-{n}" for n in range(16)]
        fences = {}
        for saga_id in ids:
            await api.create(saga_id)
            fences[saga_id] = (await api.claim(saga_id, ttl_s=10)).fence
        pair.env.advance(6)
        # Half the workers prove themselves alive; the other half went quiet.
        alive = ids[::2]
        for saga_id in alive:
            await api.heartbeat(saga_id, fences[saga_id])
        pair.env.advance(5)  # the quiet ones' leases are past their ttl now

        results = await asyncio.gather(
            *(outcome(api.complete(saga_id, fences[saga_id])) for saga_id in ids),
            *(run_sweep(stub, EXPIRE, STALE) for stub in pair.stubs),
        )
        completions = dict(zip(ids, results[: len(ids)], strict=True))
        reports = results[len(ids) :]
        requeued = 0
        for saga_id, result in completions.items():
            saga = await api.get(saga_id)
            if isinstance(result, saga_pb2.CompleteSagaResponse):
                assert saga.state == COMPLETED, saga_id  # the completion stands
            else:
                assert saga.state == RUNNING, saga_id
                requeued += 1
        assert all(isinstance(completions[s], saga_pb2.CompleteSagaResponse) for s in alive)
        assert requeued == len(ids) - len(alive)
        assert sum(r.sagas_requeued for r in reports) == requeued


async def test_a_purge_racing_an_acquire_never_lowers_the_fencing_token(pair: Pair) -> None:
    tether = pair.env.tether
    other_leases = lease_pb2_grpc.LeaseServiceStub(pair.other_channel)
    for round_ in range(ROUNDS * 3):
        key = f"jobs/{round_}"
        highest = 0
        for _ in range(2):
            lease = await tether.acquire(key)
            highest = max(highest, lease.fencing_token)
            await release(tether, lease)
        pair.env.advance(DAY_S + 1)
        request = lease_pb2.AcquireRequest(key=key, holder="racer", ttl=dur(10))
        stubs = pair.stubs
        acquired, report = await asyncio.gather(
            other_leases.Acquire(request, timeout=WAIT_S),
            run_sweep(stubs[round_ % 2], PURGE_LEASES),
        )
        assert acquired.lease.fencing_token > highest, (round_, dict(report.rows_purged))
        await release(tether, acquired.lease)
