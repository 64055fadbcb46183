"""Issue #11: "a few cancelled KeepAlive handler tasks (2 of 300) stay in the server's open
stream table". A stream leaves the table however and whenever it ends, and its leases are
detached; the table is what a stopping server waits for."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.services.lease import LeaseService

from .conftest import WAIT_S, Harness, eventually

STREAMS = 300
# Streams cancelled inside their cleanup, one after another.
LATE = 50
# Connections the streams are spread over (at most 100 streams each by default).
CONNECTIONS = 6


def table(tether: Harness) -> LeaseService:
    service = tether.server._lease_service
    assert service is not None
    return service


async def answer(call: Any) -> lease_pb2.KeepAliveResponse:
    response = await asyncio.wait_for(call.read(), WAIT_S)
    assert response is not grpc.aio.EOF
    return response


async def test_cancelled_keepalive_streams_leave_the_table(tether: Harness) -> None:
    leases = [await tether.acquire(f"table/{i}", "w1", ttl_s=60) for i in range(10)]
    # The stream's cleanup (detaching its leases) waits here until released, so a cancel
    # can arrive while a handler is in it.
    gate = asyncio.Event()
    entered = 0
    detach = tether.server.leases.lease_detach_stream

    async def gated_detach(stream_id: str) -> int:
        nonlocal entered
        entered += 1
        await gate.wait()
        return await detach(stream_id)

    tether.server.leases.lease_detach_stream = gated_detach  # type: ignore[method-assign]
    renewal = [
        lease_pb2.KeepAliveRenewal(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        for lease in leases
    ]

    # Several connections: one would hit the server's cap on streams per connection.
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{tether.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CONNECTIONS)
    ]
    stubs = [lease_pb2_grpc.LeaseServiceStub(channel) for channel in channels]
    opened = 0

    async def one(phase: int) -> None:
        nonlocal opened
        call = stubs[opened % CONNECTIONS].KeepAlive()
        opened += 1
        if phase == 0:  # before the handler ran, or while it waits for a first message
            await asyncio.sleep(0)
        elif phase == 1:  # after an answer, waiting for the next message
            await call.write(lease_pb2.KeepAliveRequest(sequence=1))
            await answer(call)
        elif phase == 2:  # renewals sent and (maybe) in the store, answer not read
            await call.write(lease_pb2.KeepAliveRequest(sequence=1, renewals=renewal))
        elif phase == 3:  # several answers queued for a reader that never reads
            for sequence in range(1, 6):
                await call.write(lease_pb2.KeepAliveRequest(sequence=sequence, renewals=renewal))
        elif phase == 4:  # half-closed: the handler is ending on its own
            await call.write(lease_pb2.KeepAliveRequest(sequence=1))
            await answer(call)
            await call.done_writing()
        else:  # half-closed and inside its cleanup when the cancel comes
            before = entered
            await call.write(lease_pb2.KeepAliveRequest(sequence=1, renewals=renewal))
            await answer(call)
            await call.done_writing()
            await eventually(lambda: entered > before, "the handler in its cleanup")
        call.cancel()

    await asyncio.gather(*(one(i % 5) for i in range(STREAMS - LATE)))
    metrics = tether.server.metrics
    await eventually(
        lambda: entered == metrics.keepalive_streams_total, "every started stream in its cleanup"
    )
    # One at a time, so each is cancelled while its own cleanup waits at the gate.
    for _ in range(LATE):
        await one(5)
    service = table(tether)
    # Cleanups held at the gate keep their streams in the table; none is lost.
    assert service.open_stream_count > 0
    gate.set()
    await eventually(lambda: service.open_stream_count == 0, "an empty open stream table")
    # Every stream's leases were detached: none still shows a live stream.
    listed = await tether.list_all(key_prefix="table/")
    assert [lease.heartbeat_stream_attached for lease in listed] == [False] * len(leases)
    assert metrics.keepalive_streams_open == 0
    for channel in channels:
        await channel.close()
