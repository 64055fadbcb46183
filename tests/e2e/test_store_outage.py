"""Health follows the store: NOT_SERVING while PostgreSQL is unreachable, SERVING again
when it is back; calls meanwhile get UNAVAILABLE / STORE_UNAVAILABLE, never INTERNAL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DbFactory
from tests.e2e import error_info
from tests.support.tcp_proxy import TcpProxy
from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.app import TetherServer
from tether_server.config import ServerConfig

pytestmark = pytest.mark.postgres
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = (
        f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def proxied_server(db_factory: DbFactory) -> AsyncIterator[tuple[TetherServer, TcpProxy]]:
    url = db_factory("postgres")
    parts = urlsplit(url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    server = TetherServer(
        ServerConfig(listen="127.0.0.1:0", db_url=through(proxy, url), store_check_interval_s=0.1)
    )
    await server.start()
    try:
        yield server, proxy
    finally:
        await proxy.restore()
        await server.stop(grace_s=0)
        await proxy.close()


async def statuses(stub: health_pb2_grpc.HealthStub) -> AsyncIterator[int]:
    async for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
        yield response.status


async def next_status(stream: AsyncIterator[int], wanted: int) -> None:
    async def until() -> None:
        async for status in stream:
            if status == wanted:
                return

    await asyncio.wait_for(until(), 20)


async def test_health_and_calls_follow_the_store(
    proxied_server: tuple[TetherServer, TcpProxy],
) -> None:
    server, proxy = proxied_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = statuses(health_pb2_grpc.HealthStub(channel))
        leases = lease_pb2_grpc.LeaseServiceStub(channel)
        request = lease_pb2.AcquireRequest(
            key="outage/1", holder="w", ttl=duration_pb2.Duration(seconds=30)
        )
        await next_status(health, SERVING)

        await proxy.cut()
        await next_status(health, NOT_SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await leases.Acquire(request, timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(refused.value).reason == "STORE_UNAVAILABLE"

        await proxy.restore()
        await next_status(health, SERVING)
        granted = await leases.Acquire(request, timeout=20)
        assert granted.lease.fencing_token == 1
