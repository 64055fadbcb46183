"""``TetherClient.watch`` resumes after a server crash without losing or repeating events."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import ServerFactory
from tether_client import TetherClient
from tether_client.pb import lease_pb2

pytestmark = pytest.mark.e2e


async def test_watch_resumes_across_a_server_crash(
    db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url)
    async with TetherClient(server.target) as client:
        events: list[lease_pb2.LeaseEvent] = []
        arrived = asyncio.Event()

        async def collect() -> None:
            async for event in client.watch(key_prefix="jobs/", start_revision=1):
                events.append(event)
                arrived.set()

        watcher = asyncio.create_task(collect())
        try:
            await client.acquire("jobs/a", ttl=60)
            await asyncio.wait_for(arrived.wait(), 10)
            server.kill()
            await server.start_async()
            await client.acquire("jobs/b", ttl=60)
            await client.acquire("other/c", ttl=60)  # outside the prefix
            async with asyncio.timeout(20):
                while len(events) < 2:
                    arrived.clear()
                    await arrived.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    assert [(e.revision, e.lease.key) for e in events] == [(1, "jobs/a"), (2, "jobs/b")]
    assert all(e.type == lease_pb2.LEASE_EVENT_TYPE_ACQUIRED for e in events)
