"""A step of the server's wall clock (NTP, a resumed VM) does not expire every lease at
once: the step is held back until live deadlines moved by it (docs/clock.md).

The injected clock is the store's clock on both backends here, so the correction is
tested on both; the last test shows, with the real clocks, where PostgreSQL differs (the
database's clock rules, a step of this host's clock changes nothing, a step of the
database host's clock is not corrected).
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import AsyncIterator

import grpc
import pytest

import tether_server.clock
import tether_server.store.database
from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.app import TetherServer
from tether_server.domain.lease import ANONYMOUS
from tether_server.domain.time import format_us
from tether_server.store.leases import AcquireParams
from tether_server.store.leases.acquire import AcquireResult

from .conftest import Harness, dur, eventually, expect_error, make_test_config, ts_us

S = 1_000_000
HOUR_S = 3600
HOUR = HOUR_S * S
FP = grpc.StatusCode.FAILED_PRECONDITION
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
EXPIRED = lease_pb2.LEASE_STATE_EXPIRED


async def lock_delay_until(tether: Harness, key: str) -> str:
    """The end of the key's lock-delay, as a refused Acquire reports it."""
    request = lease_pb2.AcquireRequest(key=key, holder="someone-else", ttl=dur(5))
    metadata = await expect_error(tether.stub.Acquire(request), FP, "LOCK_DELAY")
    return metadata["available_at"]


async def test_a_forward_wall_step_moves_live_deadlines_instead_of_expiring_them(
    tether: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    clock, expiry = tether.clock, tether.server.expiry
    short = await tether.acquire("jobs/short", "w1", ttl_s=10)
    long = await tether.acquire("jobs/long", "w1", ttl_s=600)
    revoked = await tether.acquire("jobs/revoked", "w1", ttl_s=600, lock_delay=dur(30))
    await tether.stub.Revoke(
        lease_pb2.RevokeRequest(namespace=revoked.namespace, lease_id=revoked.lease_id)
    )
    expiring = await tether.acquire("jobs/expiring", "w1", ttl_s=5, lock_delay=dur(60))
    clock.advance(5)
    assert [x.lease_id for x in (await expiry.run_once()).expired] == [expiring.lease_id]
    revoked_at = clock.now_us() - 5 * S
    assert await lock_delay_until(tether, "jobs/revoked") == format_us(revoked_at + 30 * S)
    expired_delay = ts_us(expiring.expires_at) + 60 * S
    assert await lock_delay_until(tether, "jobs/expiring") == format_us(expired_delay)
    before = clock.now_us()

    with caplog.at_level(logging.WARNING, logger="tether_server.expiry"):
        clock.step_wall(HOUR_S)
        # Held back: nothing judges a deadline by the stepped time yet.
        assert clock.now_us() == before
        assert (await tether.get(short.lease_id)).state == ACTIVE
        result = await expiry.run_once()

    assert result.expired == []
    assert result.shift is not None
    assert (result.shift.step_us, result.shift.leases) == (HOUR, 2)
    assert clock.now_us() == before + HOUR, "the clock reports the new time once moved"
    for lease in (short, long):
        now = await tether.get(lease.lease_id)
        assert now.state == ACTIVE
        assert ts_us(now.expires_at) == ts_us(lease.expires_at) + HOUR
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stepped forward" in m for m in messages), messages
    assert any("moved live lease deadlines" in m for m in messages), messages
    # Lock-delays keep the time they had left too: stored (revoke) and derived (expiry).
    assert await lock_delay_until(tether, "jobs/revoked") == format_us(revoked_at + 30 * S + HOUR)
    assert await lock_delay_until(tether, "jobs/expiring") == format_us(expired_delay + HOUR)

    # From here on time runs as before: the short lease had 5 s left, and has them.
    clock.advance(5 - 1e-6)
    assert (await expiry.run_once()).expired == []
    clock.advance(1e-6)
    assert [x.lease_id for x in (await expiry.run_once()).expired] == [short.lease_id]
    assert (await tether.get(long.lease_id)).state == ACTIVE


async def test_a_grant_committed_in_the_shifts_batch_after_it_keeps_its_whole_ttl(
    tether: Harness,
) -> None:
    """Units after the shift in one batch judge by the new time (the batch's now moves),
    though the clock reports it only after the commit."""
    clock, server = tether.clock, tether.server
    before = clock.now_us()
    clock.step_wall(HOUR_S)
    params = AcquireParams(
        namespace="default", key="jobs/new", holder="w2", principal=ANONYMOUS, ttl_us=10 * S
    )
    # Both are queued before the committer runs: one batch, the shift first.
    passed, granted = await asyncio.gather(
        server.expiry.run_once(), server.leases.lease_acquire(params)
    )
    assert passed.shift is not None
    assert isinstance(granted, AcquireResult)
    assert granted.lease.expires_at_us == before + HOUR + 10 * S
    stored = await tether.get(granted.lease.lease_id)
    assert (stored.state, ts_us(stored.expires_at)) == (ACTIVE, before + HOUR + 10 * S)


async def test_an_ordinary_advance_still_expires(
    tether: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Wall and monotonic clock moving together by an hour is time passing, not a step."""
    short = await tether.acquire("jobs/short", "w1", ttl_s=10)
    long = await tether.acquire("jobs/long", "w1", ttl_s=600)
    with caplog.at_level(logging.WARNING, logger="tether_server.expiry"):
        tether.clock.advance(HOUR_S)
        result = await tether.server.expiry.run_once()
    assert result.shift is None
    assert {x.lease_id for x in result.expired} == {short.lease_id, long.lease_id}
    assert not [r for r in caplog.records if "step" in r.getMessage()]


async def test_the_running_expiry_task_moves_deadlines_when_the_clock_steps(
    tether: Harness,
) -> None:
    """The clock tells the expiry task at once; nothing else has to happen."""
    lease = await tether.acquire("jobs/a", "w1", ttl_s=10)
    tether.server.expiry.start()
    tether.clock.step_wall(HOUR_S)
    await eventually(lambda: tether.clock.pending_step_us() == 0, "the deadlines to move")
    now = await tether.get(lease.lease_id)
    assert now.state == ACTIVE
    assert ts_us(now.expires_at) == ts_us(lease.expires_at) + HOUR


async def test_a_backward_step_is_not_corrected(tether: Harness) -> None:
    """Deadlines then last longer by the step, never shorter (documented)."""
    lease = await tether.acquire("jobs/a", "w1", ttl_s=10)
    tether.clock.step_wall(-HOUR_S)
    result = await tether.server.expiry.run_once()
    assert result.shift is None
    now = await tether.get(lease.lease_id)
    assert (now.state, now.expires_at) == (ACTIVE, lease.expires_at)


@pytest.fixture
async def real_clock_server(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[TetherServer, list[int]]]:
    """A server on the real clocks, whose wall clock (time.time_ns, as the clock modules
    read it) the test can step: the list holds the offset in nanoseconds."""
    offset = [0]
    shim = types.SimpleNamespace(
        time_ns=lambda: time.time_ns() + offset[0], monotonic_ns=time.monotonic_ns
    )
    monkeypatch.setattr(tether_server.clock, "time", shim)
    monkeypatch.setattr(tether_server.store.database, "time", shim)
    server = TetherServer(make_test_config(db_url))
    await server.start()
    await server.expiry.stop()
    try:
        yield server, offset
    finally:
        await server.stop(0)


async def test_real_clocks_sqlite_corrects_postgresql_follows_the_database_clock(
    real_clock_server: tuple[TetherServer, list[int]],
) -> None:
    server, offset = real_clock_server
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = lease_pb2_grpc.LeaseServiceStub(channel)
    try:
        lease = (
            await stub.Acquire(lease_pb2.AcquireRequest(key="jobs/a", holder="w1", ttl=dur(600)))
        ).lease
        offset[0] = HOUR * 1000  # this host's wall clock steps an hour forward
        result = await server.expiry.run_once()
        assert result.expired == []
        now = (await stub.GetLease(lease_pb2.GetLeaseRequest(lease_id=lease.lease_id))).lease
        assert now.state == ACTIVE
        moved = ts_us(now.expires_at) - ts_us(lease.expires_at)
        if server.db.is_sqlite:
            # The process clock is the store's clock: the step was detected and corrected
            # (measured from paired reads of both clocks, off by however long the process
            # was paused between the two reads of a pair: bounded by the step threshold).
            assert result.shift is not None
            assert abs(moved - HOUR) < 5 * S, moved
            return
        # PostgreSQL: deadlines follow the database's clock on this host's monotonic clock,
        # which the step did not touch: nothing to correct.
        assert result.shift is None
        assert moved == 0
        # A step of the database host's clock reaches each replica at its next clock sync
        # and is not corrected: leases with less time left than the step read as expired.
        db_clock = server.db.db_clock
        assert db_clock is not None
        stepped = server.db.clock.now_us() + HOUR

        async def read_db_us() -> int:
            return stepped

        await db_clock.sync(read_db_us)
        now = (await stub.GetLease(lease_pb2.GetLeaseRequest(lease_id=lease.lease_id))).lease
        assert now.state == EXPIRED
    finally:
        await channel.close()
