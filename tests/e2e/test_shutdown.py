"""Graceful shutdown: SIGTERM with long-lived streams open never hangs.

The server reports NOT_SERVING, stops accepting, gives calls the grace period and exits 0;
a KeepAlive and a Watch stream open at the time end with a status instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e import ServerFactory, error_info, open_renewing_stream
from tether_client.pb import lease_pb2, lease_pb2_grpc

pytestmark = pytest.mark.e2e

GRACE_S = 3.0
STREAMS = 4
# Exit must come within the grace; allow for process teardown on a loaded machine.
EXIT_BOUND_S = GRACE_S + 4.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start_lines(log: str) -> list[dict[str, object]]:
    lines = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue  # the test harness's own "=== start" headers
        entry = json.loads(line)
        if entry.get("msg") == "tether started":
            lines.append(entry)
    return lines


async def read_until_end(call: Any) -> grpc.StatusCode:
    """Read a stream until it ends; return its final status code."""
    try:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                break
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()


async def test_sigterm_with_open_streams_exits_cleanly(
    db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url, extra_args=["--grace", f"{GRACE_S:g}s"])

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        lease = (
            await stub.Acquire(
                lease_pb2.AcquireRequest(
                    key="jobs/streaming", holder="worker-1", ttl=Duration(seconds=60)
                ),
                timeout=10,
            )
        ).lease

        # A KeepAlive stream with one acknowledged renewal.
        keepalive = await open_renewing_stream(stub, lease)

        # A Watch stream, confirmed.
        watch = stub.Watch(lease_pb2.WatchRequest(start_revision=0))
        first = await asyncio.wait_for(watch.read(), 10)
        assert not first.events

        # A health watch: tells us when the server stops serving.
        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(health_watch.read(), 10)).status == SERVING

        keepalive_end = asyncio.create_task(read_until_end(keepalive))
        watch_end = asyncio.create_task(read_until_end(watch))

        async def health_statuses() -> list[int]:
            seen: list[int] = []
            try:
                while True:
                    response = await health_watch.read()
                    if response is grpc.aio.EOF:
                        return seen
                    seen.append(response.status)
            except grpc.aio.AioRpcError:
                return seen

        health_seen = asyncio.create_task(health_statuses())

        started = time.monotonic()
        code = await asyncio.to_thread(server.terminate, EXIT_BOUND_S)
        took = time.monotonic() - started
        assert code == 0, server.log_tail()
        assert took < EXIT_BOUND_S

        # Every stream ended with a status: nothing hangs after the process is gone.
        ends = await asyncio.wait_for(asyncio.gather(keepalive_end, watch_end), 10)
        statuses = await asyncio.wait_for(health_seen, 10)
        assert all(isinstance(end, grpc.StatusCode) for end in ends), ends
        # Neither stream can finish by itself, so each ended with an error status...
        assert all(end != grpc.StatusCode.OK for end in ends), ends
        # ...and health said NOT_SERVING as soon as draining began.
        assert NOT_SERVING in statuses, statuses

    log = server.log_text()
    started_lines = start_lines(log)
    assert len(started_lines) == 1, log
    entry = started_lines[0]
    for field in ("store", "listen", "version"):
        assert entry.get(field), (field, entry)
    assert entry["listen"] == server.target
    assert "tether stopped" in log


async def test_sigterm_detaches_keepalive_streams(
    db_url: str, server_factory: ServerFactory
) -> None:
    """After a graceful stop no lease may claim a live heartbeat stream."""
    server = server_factory(db_url, extra_args=["--grace", f"{GRACE_S:g}s"])
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        leases = []
        streams = []
        # Several streams, one lease each, as several workers would have.
        for index in range(STREAMS):
            lease = (
                await stub.Acquire(
                    lease_pb2.AcquireRequest(
                        key=f"jobs/drained/{index}",
                        holder=f"worker-{index}",
                        ttl=Duration(seconds=60),
                    ),
                    timeout=10,
                )
            ).lease
            keepalive = await open_renewing_stream(stub, lease)
            leases.append(lease)
            streams.append(keepalive)
        listed = await stub.ListLeases(lease_pb2.ListLeasesRequest(), timeout=10)
        assert all(x.heartbeat_stream_attached for x in listed.leases)

        assert await asyncio.to_thread(server.terminate, EXIT_BOUND_S) == 0
        ends = await asyncio.wait_for(
            asyncio.gather(*(read_until_end(stream) for stream in streams)), 10
        )
        assert all(end != grpc.StatusCode.OK for end in ends), ends

    await asyncio.to_thread(server.start)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        listed = await stub.ListLeases(lease_pb2.ListLeasesRequest(), timeout=10)
    assert [x.lease_id for x in listed.leases] == [x.lease_id for x in leases]
    assert all(x.state == lease_pb2.LEASE_STATE_ACTIVE for x in listed.leases)
    attached = [x.key for x in listed.leases if x.heartbeat_stream_attached]
    assert attached == [], server.log_tail()


async def test_sigterm_ends_streams_promptly_with_server_draining(
    db_url: str, server_factory: ServerFactory
) -> None:
    """Streams never finish by themselves: draining should end them at once with
    UNAVAILABLE / SERVER_DRAINING so clients reconnect elsewhere, not after the grace."""
    grace_s = 5.0
    server = server_factory(db_url, extra_args=["--grace", f"{grace_s:g}s"])
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        keepalive = stub.KeepAlive()
        await keepalive.write(lease_pb2.KeepAliveRequest(sequence=1))  # a ping
        assert (await asyncio.wait_for(keepalive.read(), 10)).sequence == 1
        watch = stub.Watch(lease_pb2.WatchRequest())
        assert not (await asyncio.wait_for(watch.read(), 10)).events

        async def final_error(call: Any) -> grpc.aio.AioRpcError | None:
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

        ends = asyncio.gather(final_error(keepalive), final_error(watch))
        started = time.monotonic()
        exit_code = asyncio.create_task(asyncio.to_thread(server.terminate, grace_s + 7))
        errors = await asyncio.wait_for(ends, grace_s + 7)
        ended_after = time.monotonic() - started
        assert await exit_code == 0
        exited_after = time.monotonic() - started

    for exc in errors:
        assert exc is not None
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(exc).reason == "SERVER_DRAINING"
    assert ended_after < grace_s / 2
    assert exited_after < grace_s / 2


async def test_graceful_stop_with_keepalive_stream_logs_no_error(
    db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url, extra_args=["--grace", "1s"])
    async with grpc.aio.insecure_channel(server.target) as channel:
        keepalive = lease_pb2_grpc.LeaseServiceStub(channel).KeepAlive()
        await keepalive.write(lease_pb2.KeepAliveRequest(sequence=1))
        assert (await asyncio.wait_for(keepalive.read(), 10)).sequence == 1
        assert await asyncio.to_thread(server.terminate, EXIT_BOUND_S) == 0
        await asyncio.wait_for(read_until_end(keepalive), 10)

    errors = [
        line
        for line in server.log_text().splitlines()
        if line.startswith("{") and json.loads(line)["level"] in ("error", "critical")
    ]
    assert errors == []
