"""Every watch (leases, sagas, objects) resumes after its stream breaks without losing or
repeating events, and yields events only.

Two breaks: a server crash (a real ``tether serve`` process SIGKILLed and started again on
the same port and database), and a cut network (a TCP proxy between the watcher and an
in-process server closes every connection) while events happen that the watcher must
still get after the network comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.client.conftest import ClientFactory, InProcessServer, advance_until
from tests.conftest import ServerFactory
from tests.support.tcp_proxy import TcpProxy
from tether_client import ManualClock, RetryPolicy, TetherClient
from tether_client.pb import lease_pb2, owner_ref_pb2, saga_pb2


@dataclass(frozen=True)
class Watched:
    """One area's watch, a write it reports and a write it filters out."""

    watch: Callable[[TetherClient, int], AsyncIterator[Any]]
    make: Callable[[TetherClient, str], Awaitable[Any]]
    other: Callable[[TetherClient, str], Awaitable[Any]]
    name: Callable[[Any], str]
    event: type
    created: int


AREAS = {
    "leases": Watched(
        lambda c, rev: c.leases.watch(key_prefix="jobs/", start_revision=rev),
        lambda c, name: c.leases.acquire(f"jobs/{name}", ttl=60),
        lambda c, name: c.leases.acquire(f"other/{name}", ttl=60),
        lambda event: event.lease.key.removeprefix("jobs/"),
        lease_pb2.LeaseEvent,
        lease_pb2.LEASE_EVENT_TYPE_ACQUIRED,
    ),
    "sagas": Watched(
        lambda c, rev: c.sagas.watch(kind="build", start_revision=rev),
        lambda c, name: c.sagas.create(name, "build"),
        lambda c, name: c.sagas.create(name, "deploy"),
        lambda event: event.saga.saga_id,
        saga_pb2.SagaEvent,
        saga_pb2.SAGA_EVENT_TYPE_CREATED,
    ),
    "objects": Watched(
        lambda c, rev: c.objects.watch(kind="Thing", start_revision=rev),
        lambda c, name: c.objects.create("Thing", name),
        lambda c, name: c.objects.create("Other", name),
        lambda event: event.object.name,
        owner_ref_pb2.ObjectEvent,
        owner_ref_pb2.OBJECT_EVENT_TYPE_ADDED,
    ),
}


class Collector:
    """Reads a watch in a task; ``wait_for(n)`` returns once n events arrived and raises
    if the watch ended or failed first."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(events))

    async def _read(self, events: AsyncIterator[Any]) -> None:
        async for event in events:
            self.events.append(event)
            self._changed.set()

    async def wait_for(self, count: int) -> None:
        while True:
            self._changed.clear()
            if len(self.events) >= count:
                return
            changed = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({changed, self._task}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if self._task.done():
                self._task.result()
                raise AssertionError(f"the watch ended after {self.events}")

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def check(watched: Watched, events: list[Any], names: list[str]) -> None:
    """Exactly these events, in revision order: none lost, none repeated, no headers."""
    assert all(type(event) is watched.event for event in events), events
    assert [watched.name(event) for event in events] == names
    assert all(event.type == watched.created for event in events)
    revisions = [event.revision for event in events]
    assert revisions == sorted(set(revisions))
    assert revisions[0] >= 1


@pytest.mark.e2e
@pytest.mark.parametrize("area", AREAS)
async def test_watch_resumes_across_a_server_crash(
    area: str, db_url: str, server_factory: ServerFactory
) -> None:
    watched = AREAS[area]
    server = server_factory(db_url)
    retry = RetryPolicy(initial_backoff=0.05, max_backoff=0.2)
    async with TetherClient(server.target, retry=retry) as client:
        collector = Collector(watched.watch(client, 1))
        try:
            await watched.make(client, "a")
            await collector.wait_for(1)
            server.kill()
            await server.start_async()
            await watched.make(client, "b")
            await watched.other(client, "c")  # filtered out
            await watched.make(client, "d")
            await collector.wait_for(3)
        finally:
            await collector.close()
    check(watched, collector.events, ["a", "b", "d"])


class SignallingClock(ManualClock):
    """A ManualClock that says when the client first waits on it (a retry's backoff)."""

    def __init__(self) -> None:
        super().__init__()
        self.slept = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.slept.set()
        await super().sleep(seconds)


@pytest.mark.parametrize("area", AREAS)
async def test_watch_gets_what_happened_while_its_network_was_cut(
    area: str, tether: InProcessServer, client_factory: ClientFactory
) -> None:
    watched = AREAS[area]
    proxy = await TcpProxy("127.0.0.1", tether.port).start()
    clock = SignallingClock()
    watcher = client_factory(
        f"127.0.0.1:{proxy.port}",
        clock=clock,
        retry=RetryPolicy(initial_backoff=0.1, max_backoff=0.2),
    )
    writer = client_factory(tether.target)
    collector = Collector(watched.watch(watcher, 1))
    try:
        await watched.make(writer, "a")
        await collector.wait_for(1)
        await proxy.cut()
        # The watch saw its stream break: it backs off on its clock before reopening.
        await clock.slept.wait()
        await watched.make(writer, "b")
        await watched.other(writer, "c")  # filtered out
        await watched.make(writer, "d")
        await proxy.restore()
        await advance_until(clock.advance, lambda: len(collector.events) >= 3, step=0.2)
        await watched.make(writer, "e")
        await collector.wait_for(4)
    finally:
        await collector.close()
        await proxy.close()
    check(watched, collector.events, ["a", "b", "d", "e"])
    assert proxy.connections >= 2  # the watch did reconnect
