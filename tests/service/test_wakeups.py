"""Targeted wake-ups across replicas: a release committed through one server wakes a
waiting Acquire and a Watch on another through PostgreSQL's NOTIFY, with the services'
poll fallback set to an hour, so nothing else could wake them within the test's bound."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from tests.conftest import DbFactory
from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.app import TetherServer
from tether_server.clock import FakeClock
from tether_server.domain.lease import Refuse
from tether_server.notify import ChangeHub
from tether_server.store.leases import AcquireParams

from .conftest import WAIT_S, make_test_server

HOUR_S = 3600.0


@pytest.fixture
async def two_replicas(
    db_factory: DbFactory, fake_clock: FakeClock
) -> AsyncIterator[tuple[list[lease_pb2_grpc.LeaseServiceStub], asyncio.Event]]:
    """Two servers on one database; the event is set when the second refuses an Acquire.
    The fake clock never moves, so a waiting Acquire's timers never fire either."""
    url = db_factory("postgres")
    servers: list[TetherServer] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for _ in range(2):
            server = make_test_server(url, fake_clock)
            server.config = dataclasses.replace(
                server.config,
                lease=dataclasses.replace(server.config.lease, poll_interval_s=HOUR_S),
            )
            port = await server.start()
            servers.append(server)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        refused = asyncio.Event()
        store = servers[1].leases
        original = store.lease_acquire

        async def spying_acquire(params: AcquireParams) -> Any:
            outcome = await original(params)
            if isinstance(outcome, Refuse):
                refused.set()
            return outcome

        store.lease_acquire = spying_acquire  # type: ignore[method-assign]
        yield [lease_pb2_grpc.LeaseServiceStub(c) for c in channels], refused
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(0)


@pytest.mark.postgres
async def test_a_release_on_one_replica_wakes_a_waiter_and_a_watcher_on_another(
    two_replicas: tuple[list[lease_pb2_grpc.LeaseServiceStub], asyncio.Event],
) -> None:
    (a, b), refused = two_replicas
    held = await a.Acquire(
        lease_pb2.AcquireRequest(key="wake/k", holder="w1", ttl=duration_pb2.Duration(seconds=60))
    )
    watch = b.Watch(lease_pb2.WatchRequest(key_prefix="wake/"))
    header = await asyncio.wait_for(watch.read(), WAIT_S)
    waiting = asyncio.ensure_future(
        b.Acquire(
            lease_pb2.AcquireRequest(
                key="wake/k",
                holder="w2",
                ttl=duration_pb2.Duration(seconds=60),
                wait=duration_pb2.Duration(seconds=300),
            ),
            timeout=WAIT_S,
        )
    )
    await asyncio.wait_for(refused.wait(), WAIT_S)  # the waiter was refused and waits
    assert not waiting.done()
    await a.Release(
        lease_pb2.ReleaseRequest(
            lease_id=held.lease.lease_id, fencing_token=held.lease.fencing_token, holder="w1"
        )
    )
    granted = await asyncio.wait_for(waiting, WAIT_S)
    assert granted.lease.fencing_token == 2
    seen: list[int] = []
    while len(seen) < 2:
        message = await asyncio.wait_for(watch.read(), WAIT_S)
        seen.extend(event.type for event in message.events)
    assert seen[:2] == [lease_pb2.LEASE_EVENT_TYPE_RELEASED, lease_pb2.LEASE_EVENT_TYPE_ACQUIRED]
    assert header.header_revision == 1
    watch.cancel()


async def test_the_hub_wakes_only_matching_waiters() -> None:
    hub = ChangeHub()
    with (
        hub.watch_key("lease", "ns", "a") as key_a,
        hub.watch_key("lease", "ns", "b") as key_b,
        hub.watch_prefix("lease", "ns", "a/") as prefix_a,
        hub.watch_prefix("lease", "other", "") as other_ns,
    ):
        hub.publish([("lease", "ns", "a")])
        assert key_a.is_set()
        assert not key_b.is_set()
        assert not prefix_a.is_set()
        assert not other_ns.is_set()
        hub.publish([("lease", "ns", "a/1"), ("saga", "ns", "b")])
        assert prefix_a.is_set()
        assert not key_b.is_set()
        hub.publish_all()
        assert key_b.is_set()
        assert other_ns.is_set()
    hub.publish_all()  # nobody registered any more: nothing to wake, nothing fails
