"""The periodic sweep runs on the leader only, once per interval, and after the leader is
SIGKILLed the other replica takes it over: within a leader check and one sweep interval
of the servers' clock, and not at once (the interval counts from the latest periodic
sweep of any replica).

The interval is spread by +/- 10 % (SweepConfig.jitter), so a sweep is due between 54 s
and 66 s after the previous one. The test moves the file clock from one sweep to 53 s
after it (none can be due), then to 66 s after it (one must be): each new report must
then start exactly at that second step. The runners sleep on the file clock, so the test
polls for the report (bounded) instead of asserting at once.
"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from tests.e2e import DbFactory, ServerFactory, ts_us
from tests.e2e.test_leader import leaders, until_leaders
from tests.support.server_process import MICROS, FileClockDriver
from tether_client.pb import sweep_pb2, sweep_pb2_grpc

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

INTERVAL_S = 60
CHECK_S = 1
# SweepConfig's default jitter: a sweep is due 54-66 s after the previous one.
EARLIEST_S = INTERVAL_S * 0.9
LATEST_S = INTERVAL_S * 1.1
BEFORE_DUE_S = EARLIEST_S - 1
INTERVALS = 3


async def periodic(stub: sweep_pb2_grpc.SweepServiceStub) -> list[sweep_pb2.SweepReport]:
    """Every PERIODIC report, oldest first."""
    response = await stub.ListSweepReports(
        sweep_pb2.ListSweepReportsRequest(
            triggers=[sweep_pb2.SWEEP_TRIGGER_PERIODIC], page_size=100
        ),
        timeout=10,
    )
    return list(reversed(response.reports))


async def until_reports(
    stub: sweep_pb2_grpc.SweepServiceStub, count: int
) -> list[sweep_pb2.SweepReport]:
    """Poll (bounded) until ``count`` PERIODIC reports exist; then exactly that many."""
    found: list[sweep_pb2.SweepReport] = []
    for _ in range(1000):
        found = await periodic(stub)
        if len(found) >= count:
            break
        await asyncio.sleep(0.02)
    assert len(found) == count, [(r.replica, ts_us(r.started_at)) for r in found]
    return found


async def test_one_periodic_sweep_per_interval_on_the_leader_then_on_the_survivor(
    db_factory: DbFactory, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    url = db_factory("postgres")
    args = ["--sweep-interval", f"{INTERVAL_S}s", "--sweep-start-delay", "0s"]
    args += ["--leader-check-interval", f"{CHECK_S}s"]
    servers = {
        name: server_factory(url, env=file_clock.env, extra_args=[*args, "--replica", name])
        for name in ("a", "b")
    }
    conn = await asyncpg.connect(url)
    try:
        await until_leaders(conn, lambda held: len(held) == 1)
        (leader,) = await leaders(conn)
        follower = "b" if leader == "a" else "a"
        # The other replica answers the reports too: they are in the shared store.
        async with grpc.aio.insecure_channel(servers[follower].target) as channel:
            stub = sweep_pb2_grpc.SweepServiceStub(channel)
            # No delay and no earlier periodic sweep: the leader sweeps at once.
            (first,) = await until_reports(stub, 1)
            assert first.replica == leader
            assert ts_us(first.started_at) == file_clock.now_us()

            last = file_clock.now_us()
            for n in range(2, INTERVALS + 2):
                file_clock.advance(BEFORE_DUE_S)
                assert len(await periodic(stub)) == n - 1
                file_clock.set_us(last + round(LATEST_S * MICROS))
                reports = await until_reports(stub, n)
                assert [r.replica for r in reports] == [leader] * n
                assert ts_us(reports[-1].started_at) == file_clock.now_us()
                last = file_clock.now_us()
            assert not any(r.failures for r in reports)

            assert servers[leader].kill() == -9
            await until_leaders(conn, lambda held: leader not in held)
            file_clock.advance(CHECK_S)
            await until_leaders(conn, lambda held: held == [follower])
            # Leading now, but the dead leader swept less than an interval ago.
            file_clock.set_us(last + round(BEFORE_DUE_S * MICROS))
            assert len(await periodic(stub)) == INTERVALS + 1
            file_clock.set_us(last + round(LATEST_S * MICROS))
            reports = await until_reports(stub, INTERVALS + 2)
            taken = reports[-1]
            assert taken.replica == follower
            assert ts_us(taken.started_at) == last + round(LATEST_S * MICROS)
            assert list(taken.failures) == []
            assert [r.replica for r in reports] == [leader] * (INTERVALS + 1) + [follower]
    finally:
        await conn.close()
