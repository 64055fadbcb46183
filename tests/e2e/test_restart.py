"""Crash and restart: committed state survives, expiries that happened while no server ran
are recorded at start, fencing tokens and revisions continue.

Time is a file clock shared with the server process: "30 s pass while the server is down"
is one write to that file, never a sleep.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.e2e import MICROS, EventCollector, ServerFactory, lease_stub, open_renewing_stream, ts_us
from tests.support.server_process import FileClockDriver, ServerProcess
from tether_client.pb import lease_pb2, lease_pb2_grpc

pytestmark = pytest.mark.e2e

ACQUIRED = lease_pb2.LEASE_EVENT_TYPE_ACQUIRED
RELEASED = lease_pb2.LEASE_EVENT_TYPE_RELEASED
EXPIRED = lease_pb2.LEASE_EVENT_TYPE_EXPIRED
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE


async def acquire(
    stub: lease_pb2_grpc.LeaseServiceStub, key: str, holder: str, ttl_s: int
) -> lease_pb2.AcquireResponse:
    response = await stub.Acquire(
        lease_pb2.AcquireRequest(key=key, holder=holder, ttl=Duration(seconds=ttl_s)),
        timeout=10,
    )
    assert response.created, response
    return response


async def get(stub: lease_pb2_grpc.LeaseServiceStub, lease_id: str) -> lease_pb2.Lease:
    response = await stub.GetLease(lease_pb2.GetLeaseRequest(lease_id=lease_id), timeout=10)
    return response.lease


async def history(
    stub: lease_pb2_grpc.LeaseServiceStub, up_to_revision: int
) -> list[lease_pb2.LeaseEvent]:
    """Every event from revision 1 on, waiting (bounded) until ``up_to_revision`` arrived."""
    watch = await EventCollector.open(stub, start_revision=1)
    try:
        await watch.wait_for_revision(up_to_revision, within=10)
        return list(watch.events)
    finally:
        await watch.close()


async def restart_in_thread(server: ServerProcess) -> None:
    # start() blocks until SERVING; keep the test's event loop free meanwhile.
    await asyncio.to_thread(server.start)


async def test_sigkill_then_time_passes_then_restart(
    db_url: str, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    server = server_factory(db_url, env=file_clock.env)
    t0 = file_clock.now_us()

    async with lease_stub(server.target) as stub:
        short = (await acquire(stub, "jobs/short", "worker-short", 10)).lease
        long = (await acquire(stub, "jobs/long", "worker-long", 60)).lease
        done = (await acquire(stub, "jobs/done", "worker-done", 30)).lease
        released = await stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=done.lease_id, fencing_token=done.fencing_token, holder="worker-done"
            ),
            timeout=10,
        )
        assert released.lease.state == lease_pb2.LEASE_STATE_RELEASED
        before = await history(stub, 4)

    assert [(e.revision, e.type, e.lease.key) for e in before] == [
        (1, ACQUIRED, "jobs/short"),
        (2, ACQUIRED, "jobs/long"),
        (3, ACQUIRED, "jobs/done"),
        (4, RELEASED, "jobs/done"),
    ]
    assert (short.fencing_token, long.fencing_token, done.fencing_token) == (1, 1, 1)
    assert ts_us(short.expires_at) == t0 + 10 * MICROS
    assert ts_us(long.expires_at) == t0 + 60 * MICROS

    assert server.kill() == -9
    file_clock.advance(30)  # the 10 s lease expires while nothing runs
    await restart_in_thread(server)

    async with lease_stub(server.target) as stub:
        # The 60 s lease is untouched: same id, token, deadline, still ACTIVE.
        long_after = await get(stub, long.lease_id)
        assert long_after.state == ACTIVE
        assert long_after.fencing_token == long.fencing_token
        assert ts_us(long_after.expires_at) == ts_us(long.expires_at)
        assert long_after.create_revision == 2
        assert long_after.mod_revision == 2

        # The 10 s lease is EXPIRED, ended at its deadline.
        short_after = await get(stub, short.lease_id)
        assert short_after.state == lease_pb2.LEASE_STATE_EXPIRED
        assert ts_us(short_after.ended_at) == ts_us(short.expires_at)
        assert short_after.fencing_token == 1

        # The released lease stays released.
        assert (await get(stub, done.lease_id)).state == lease_pb2.LEASE_STATE_RELEASED

        # History: the earlier events unchanged, then one EXPIRED event, no gaps.
        events = await history(stub, 5)
        assert [e.revision for e in events] == [1, 2, 3, 4, 5]
        assert [(e.revision, e.type, e.lease.lease_id) for e in events[:4]] == [
            (e.revision, e.type, e.lease.lease_id) for e in before
        ]
        expired = events[4]
        assert expired.type == EXPIRED
        assert expired.lease.lease_id == short.lease_id
        assert expired.lease.state == lease_pb2.LEASE_STATE_EXPIRED
        assert expired.lease.mod_revision == 5
        # Recorded by the recovery sweep at the clock of the restart.
        assert ts_us(expired.occurred_at) == t0 + 30 * MICROS
        assert [e.lease.lease_id for e in events if e.type == EXPIRED] == [short.lease_id]
        assert short_after.mod_revision == 5

        # The expired key is free again, with a higher fencing token and a fresh revision.
        again = (await acquire(stub, "jobs/short", "worker-next", 10)).lease
        assert again.fencing_token == 2
        assert again.lease_id != short.lease_id
        assert again.create_revision == 6

        # The 60 s lease is still held by its holder.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Acquire(
                lease_pb2.AcquireRequest(key="jobs/long", holder="thief", ttl=Duration(seconds=10)),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        final = await history(stub, 6)
        assert [e.revision for e in final] == [1, 2, 3, 4, 5, 6]
        assert (final[-1].type, final[-1].lease.lease_id) == (ACQUIRED, again.lease_id)


async def test_sigterm_restart_keeps_everything(
    db_url: str, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    server = server_factory(db_url, env=file_clock.env)
    async with lease_stub(server.target) as stub:
        kept = (await acquire(stub, "jobs/kept", "worker-1", 60)).lease
        ended = (await acquire(stub, "jobs/ended", "worker-2", 60)).lease
        await stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=ended.lease_id, fencing_token=ended.fencing_token, holder="worker-2"
            ),
            timeout=10,
        )
        before = await history(stub, 3)

    assert await asyncio.to_thread(server.terminate) == 0
    file_clock.advance(5)  # well within the ttl
    await restart_in_thread(server)

    async with lease_stub(server.target) as stub:
        kept_after = await get(stub, kept.lease_id)
        assert kept_after.state == ACTIVE
        assert kept_after.fencing_token == kept.fencing_token
        assert ts_us(kept_after.expires_at) == ts_us(kept.expires_at)
        assert (await get(stub, ended.lease_id)).state == lease_pb2.LEASE_STATE_RELEASED

        # The holder renews its lease on the restarted server with the same token.
        renewed = await stub.Renew(
            lease_pb2.RenewRequest(lease_id=kept.lease_id, fencing_token=kept.fencing_token),
            timeout=10,
        )
        assert ts_us(renewed.expires_at) == file_clock.now_us() + 60 * MICROS

        events = await history(stub, 3)
        assert [(e.revision, e.type, e.lease.lease_id) for e in events] == [
            (e.revision, e.type, e.lease.lease_id) for e in before
        ]
        assert [e.revision for e in events] == [1, 2, 3]

        again = (await acquire(stub, "jobs/ended", "worker-3", 60)).lease
        assert again.fencing_token == 2
        assert again.create_revision == 4


async def test_sigkill_forgets_heartbeat_streams(
    db_url: str,
    server_factory: ServerFactory,
    file_clock: FileClockDriver,
) -> None:
    """A stream of a killed process is not open any more: Get/List must not say it is."""
    server = server_factory(db_url, env=file_clock.env)
    async with lease_stub(server.target) as stub:
        lease = (await acquire(stub, "jobs/streamed", "worker-1", 60)).lease
        stream = await open_renewing_stream(stub, lease)
        assert (await get(stub, lease.lease_id)).heartbeat_stream_attached

        server.kill()
        stream.cancel()

    file_clock.advance(1)
    await restart_in_thread(server)
    async with lease_stub(server.target) as stub:
        after = await get(stub, lease.lease_id)
        assert after.state == ACTIVE
        assert not after.heartbeat_stream_attached
