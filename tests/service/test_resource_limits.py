"""Resource limits: concurrent unary calls, streams per connection, live leases and open
watches per principal. Each refusal is RESOURCE_EXHAUSTED with its ErrorInfo reason, and
every counter comes back down however a call ends.

The servers here are assembled in the test (services/limits.py's interceptor and the
services given a ServerLimits), with two principals known by bearer tokens.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.service.conftest import WAIT_S, advance_until_done, dur, error_info, eventually
from tether_client.pb import (
    lease_pb2,
    lease_pb2_grpc,
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
)
from tether_server.auth import AuthConfig, Authenticator
from tether_server.cli_limits import add_limit_options, limits_from_args
from tether_server.clock import FakeClock
from tether_server.domain import errors
from tether_server.metrics import Metrics
from tether_server.notify import ChangeHub
from tether_server.services.handlers import CallGate, build_generic_handler
from tether_server.services.lease import LeaseService
from tether_server.services.limits import LimitsInterceptor, ServerLimits
from tether_server.services.objects import ObjectService
from tether_server.services.saga import SagaService
from tether_server.services.streaming import WatchSlots
from tether_server.store.database import Database
from tether_server.store.leases import AcquireParams, AcquireResult, LeaseStore
from tether_server.store.objects import ObjectStore
from tether_server.store.sagas import SagaStore

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
S = 1_000_000


# Two workers of every namespace, known by their bearer tokens.
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}


def as_(principal: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[principal]}"),)


ALICE = as_("alice")


@dataclass
class Limited:
    db: Database
    clock: FakeClock
    server: grpc.aio.Server
    port: int
    interceptor: LimitsInterceptor
    leases: LeaseService
    watches: WatchSlots
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self) -> grpc.aio.Channel:
        """A channel on a connection of its own (no subchannel shared with the others)."""
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.channels.append(channel)
        return channel


StartLimited = Callable[[ServerLimits], Awaitable[Limited]]


@pytest.fixture
async def start_limited(
    db_url: str, fake_clock: FakeClock, tmp_path: Path
) -> AsyncIterator[StartLimited]:
    started: list[Limited] = []
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        "".join(f"token:{token} {name} worker *\n" for name, token in TOKENS.items())
    )
    gate = CallGate(Authenticator(AuthConfig(tokens_file=str(tokens_file))), 4 << 20)
    gate.ready = True

    async def start(limits: ServerLimits) -> Limited:
        db = Database(db_url, fake_clock)
        await db.migrate()
        changes = ChangeHub()
        watches = WatchSlots(limits.max_watches_per_principal)
        leases = LeaseService(
            LeaseStore(db), fake_clock, changes, Metrics(), limits=limits, watches=watches
        )
        sagas = SagaService(SagaStore(db), fake_clock, changes, watches=watches)
        objects = ObjectService(ObjectStore(db), changes, watches=watches)
        interceptor = LimitsInterceptor(limits)
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers(
            tuple(
                build_generic_handler(pb.DESCRIPTOR.services_by_name[name], impl, gate)
                for pb, name, impl in [
                    (lease_pb2, "LeaseService", leases),
                    (saga_pb2, "SagaService", sagas),
                    (owner_ref_pb2, "OwnerRefService", objects),
                ]
            )
        )
        checks = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        limited = Limited(db, fake_clock, server, port, interceptor, leases, watches)
        started.append(limited)
        return limited

    yield start
    for limited in started:
        for service in (limited.leases,):
            service.drain()
        await limited.server.stop(0)
        await limited.leases.wait_streams_closed(timeout_s=5.0)
        for channel in limited.channels:
            await channel.close()
        await limited.db.dispose()


def retry_delay_s(exc: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


async def refused(call: Awaitable[Any], reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert error_info(caught.value)[:2] == (EXHAUSTED, reason), caught.value.details()
    return caught.value


def acquire_request(key: str, holder: str = "w", ttl_s: float = 30, **fields: Any) -> Any:
    return lease_pb2.AcquireRequest(key=key, holder=holder, ttl=dur(ttl_s), **fields)


async def open_watch(call: Any) -> Any:
    """Reads a watch's first message: the server has counted it once that arrives."""
    first = await asyncio.wait_for(call.read(), WAIT_S)
    assert first is not grpc.aio.EOF
    return call


# ---- concurrent unary calls ------------------------------------------------------------


async def test_unary_calls_beyond_the_cap_are_refused_with_retry_advice(
    start_limited: StartLimited,
) -> None:
    env = await start_limited(ServerLimits(max_concurrent_rpcs=2))
    channel = env.channel()
    stub = lease_pb2_grpc.LeaseServiceStub(channel)
    await stub.Acquire(acquire_request("busy", "owner"), metadata=as_("alice"))
    # Two acquires that wait for the key stay in flight: the fake clock never moves.
    waiting = [
        asyncio.ensure_future(
            stub.Acquire(acquire_request("busy", "other", wait=dur(60)), metadata=as_("bob"))
        )
        for _ in range(2)
    ]
    await eventually(lambda: env.interceptor.calls == 2, "two calls in flight")

    exc = await refused(
        stub.GetLease(lease_pb2.GetLeaseRequest(key="busy"), timeout=WAIT_S, metadata=ALICE),
        "CONCURRENCY_LIMIT",
    )
    assert retry_delay_s(exc) == errors.ConcurrencyLimit.retry_after_s
    # Health and streams are not counted.
    checked = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=WAIT_S
    )
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    watch = await open_watch(stub.Watch(lease_pb2.WatchRequest(), metadata=as_("bob")))
    watch.cancel()

    # A cancelled call gives its slot back.
    waiting[0].cancel()
    await eventually(lambda: env.interceptor.calls == 1, "the cancelled call's slot back")
    got = await stub.GetLease(lease_pb2.GetLeaseRequest(key="busy"), timeout=WAIT_S, metadata=ALICE)
    assert got.lease.holder == "owner"
    waiting[1].cancel()
    await eventually(lambda: env.interceptor.calls == 0, "every slot back")


async def test_every_ending_gives_the_unary_slot_back(start_limited: StartLimited) -> None:
    env = await start_limited(ServerLimits(max_concurrent_rpcs=1))
    stub = lease_pb2_grpc.LeaseServiceStub(env.channel())
    # OK, a domain refusal, a malformed request, a bad field: each ends, each frees.
    await stub.Acquire(acquire_request("k"), timeout=WAIT_S, metadata=ALICE)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetLease(
            lease_pb2.GetLeaseRequest(lease_id="f" * 32), timeout=WAIT_S, metadata=ALICE
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Acquire(acquire_request("", ttl_s=-1), timeout=WAIT_S, metadata=ALICE)
    raw = env.channels[0].unary_unary(
        "/tether.v1.LeaseService/GetLease",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await raw(b"\xff\xff\xff", timeout=WAIT_S, metadata=ALICE)
    assert env.interceptor.calls == 0
    got = await stub.GetLease(lease_pb2.GetLeaseRequest(key="k"), timeout=WAIT_S, metadata=ALICE)
    assert got.lease.key == "k"


# ---- streams per connection ------------------------------------------------------------


async def test_streams_beyond_the_cap_of_one_connection_are_refused(
    start_limited: StartLimited,
) -> None:
    env = await start_limited(ServerLimits(max_streams_per_connection=3))
    first = env.channel()
    stub = lease_pb2_grpc.LeaseServiceStub(first)
    sagas = saga_pb2_grpc.SagaServiceStub(first)
    keepalive = stub.KeepAlive(metadata=ALICE)
    await keepalive.write(lease_pb2.KeepAliveRequest(sequence=1))
    assert (await asyncio.wait_for(keepalive.read(), WAIT_S)).sequence == 1
    watches = [
        await open_watch(stub.Watch(lease_pb2.WatchRequest(), metadata=ALICE)),
        await open_watch(sagas.WatchSagas(saga_pb2.WatchSagasRequest(), metadata=ALICE)),
    ]
    await refused(open_watch(stub.Watch(lease_pb2.WatchRequest(), metadata=ALICE)), "STREAM_LIMIT")
    await refused(stub.KeepAlive(metadata=ALICE).read(), "STREAM_LIMIT")

    # Unary calls and health streams of the full connection still go through.
    await stub.Acquire(acquire_request("k"), timeout=WAIT_S, metadata=ALICE)
    checks = health_pb2_grpc.HealthStub(first).Watch(health_pb2.HealthCheckRequest())
    assert (await asyncio.wait_for(checks.read(), WAIT_S)).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    checks.cancel()
    # Another connection has its own count.
    other = lease_pb2_grpc.LeaseServiceStub(env.channel())
    (await open_watch(other.Watch(lease_pb2.WatchRequest(), metadata=ALICE))).cancel()

    # Each ending frees the stream's place: a cancel, a half-close, a refusal.
    watches[0].cancel()
    await eventually(lambda: env.interceptor.streams() == 2, "the cancelled stream gone")
    again = await open_watch(stub.Watch(lease_pb2.WatchRequest(), metadata=ALICE))
    await keepalive.done_writing()
    assert await asyncio.wait_for(keepalive.read(), WAIT_S) is grpc.aio.EOF
    await eventually(lambda: env.interceptor.streams() == 2, "the finished stream gone")
    bad = stub.Watch(lease_pb2.WatchRequest(namespace="Not A Namespace"), metadata=ALICE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bad.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    again.cancel()
    watches[1].cancel()
    await eventually(lambda: env.interceptor.streams() == 0, "every stream gone")


# ---- watches per principal -------------------------------------------------------------


async def test_open_watches_are_capped_per_principal_across_services(
    start_limited: StartLimited,
) -> None:
    env = await start_limited(ServerLimits(max_watches_per_principal=2))
    channel = env.channel()
    leases = lease_pb2_grpc.LeaseServiceStub(channel)
    sagas = saga_pb2_grpc.SagaServiceStub(channel)
    objects = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
    alice = [
        await open_watch(leases.Watch(lease_pb2.WatchRequest(), metadata=as_("alice"))),
        await open_watch(sagas.WatchSagas(saga_pb2.WatchSagasRequest(), metadata=as_("alice"))),
    ]
    call = objects.WatchObjects(owner_ref_pb2.WatchObjectsRequest(), metadata=as_("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (EXHAUSTED, "WATCH_LIMIT")
    assert metadata == {"principal": "alice", "limit": "2"}
    # Another principal is not affected.
    bob = await open_watch(
        objects.WatchObjects(owner_ref_pb2.WatchObjectsRequest(), metadata=as_("bob"))
    )
    assert env.watches.count("alice") == 2

    alice[0].cancel()
    await eventually(lambda: env.watches.count("alice") == 1, "alice's cancelled watch gone")
    alice.append(
        await open_watch(
            objects.WatchObjects(owner_ref_pb2.WatchObjectsRequest(), metadata=as_("alice"))
        )
    )
    for each in [*alice, bob]:
        each.cancel()
    await eventually(
        lambda: env.watches.count("alice") + env.watches.count("bob") == 0, "no watch counted"
    )
    await eventually(lambda: env.leases.open_stream_count == 0, "no watch in the table")


# ---- live leases per principal ---------------------------------------------------------


async def test_live_leases_are_capped_per_principal(start_limited: StartLimited) -> None:
    env = await start_limited(ServerLimits(max_leases_per_principal=3))
    stub = lease_pb2_grpc.LeaseServiceStub(env.channel())

    async def acquire(key: str, who: str = "alice", **fields: Any) -> lease_pb2.AcquireResponse:
        return await stub.Acquire(
            acquire_request(key, who, **fields), metadata=as_(who), timeout=WAIT_S
        )

    held = [(await acquire(f"k{i}")).lease for i in range(3)]
    before = await env.db.current_revision()
    exc = await refused(acquire("k3"), "LEASE_LIMIT")
    assert error_info(exc)[2] == {"principal": "alice", "limit": "3"}
    # Nothing was written, not even the key.
    assert await env.db.current_revision() == before
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetLease(lease_pb2.GetLeaseRequest(key="k3"), timeout=WAIT_S, metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # At the cap: an acquire of a lease it holds returns it; a key another holds says so.
    again = await acquire("k1")
    assert (again.lease.lease_id, again.created) == (held[1].lease_id, False)
    await acquire("bobs", "bob")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await acquire("bobs")
    assert error_info(caught.value)[1] == "LEASE_HELD"

    # Released or expired leases no longer count.
    await stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=held[0].lease_id, fencing_token=held[0].fencing_token, holder="alice"
        ),
        metadata=as_("alice"),
    )
    short = await acquire("k3", ttl_s=5)
    assert short.created
    await refused(acquire("k4"), "LEASE_LIMIT")
    env.clock.advance(6)  # k3 passes its deadline (unrecorded: no expiry loop runs here)
    assert (await acquire("k4")).created


@pytest.mark.parametrize("cap", [1, 5])
async def test_two_stores_racing_never_exceed_the_cap(
    db_url: str, fake_clock: FakeClock, cap: int
) -> None:
    """Two replicas (separate engines) granting different keys to one principal at once."""
    dbs = [Database(db_url, fake_clock) for _ in range(2)]
    await dbs[0].migrate()
    try:
        stores = [LeaseStore(db) for db in dbs]

        async def one(index: int) -> bool:
            params = AcquireParams(
                "default", f"race/{index}", "h", "alice", 30 * S, max_live_leases=cap
            )
            try:
                return isinstance(await stores[index % 2].lease_acquire(params), AcquireResult)
            except errors.LeaseLimit:
                return False

        granted = await asyncio.gather(*(one(i) for i in range(16)))
        assert sum(granted) == cap
        assert await stores[0].lease_count_active() == cap
    finally:
        for db in dbs:
            await db.dispose()


# ---- what a refused acquire tells another principal --------------------------------------


async def test_lease_held_hides_the_lease_id_from_other_principals(
    start_limited: StartLimited,
) -> None:
    env = await start_limited(ServerLimits())
    stub = lease_pb2_grpc.LeaseServiceStub(env.channel())
    mine = await stub.Acquire(
        acquire_request("shared", "worker-a", request_id="req-1"), metadata=as_("alice")
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Acquire(acquire_request("shared", "worker-b"), metadata=as_("bob"))
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_HELD")
    assert metadata.keys() == {"holder", "expires_at", "key"}
    assert metadata["holder"] == "worker-a"
    assert mine.lease.lease_id not in caught.value.details()

    # After a wait, too.
    waiting = asyncio.ensure_future(
        stub.Acquire(
            acquire_request("shared", "worker-b", wait=dur(2)), metadata=as_("bob"), timeout=WAIT_S
        )
    )
    await advance_until_done(env.clock, waiting, step_s=0.5, max_steps=40)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await waiting
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "WAIT_TIMEOUT")
    assert metadata.keys() == {"holder", "expires_at", "key", "cause"}

    # Another principal reusing the request id learns no lease id either.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Acquire(
            acquire_request("shared", "worker-b", request_id="req-1"), metadata=as_("bob")
        )
    assert error_info(caught.value)[1:] == ("REQUEST_ID_CONFLICT", {"request_id": "req-1"})

    # The holding principal: its lease back, or (another holder name) the lease's facts.
    again = await stub.Acquire(acquire_request("shared", "worker-a"), metadata=as_("alice"))
    assert (again.lease.lease_id, again.created) == (mine.lease.lease_id, False)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Acquire(acquire_request("shared", "worker-c"), metadata=as_("alice"))
    metadata = error_info(caught.value)[2]
    assert metadata["lease_id"] == mine.lease.lease_id
    assert metadata["fencing_token"] == str(mine.lease.fencing_token)


# ---- configuration ---------------------------------------------------------------------


def test_limit_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*argv: str) -> ServerLimits:
        parser = argparse.ArgumentParser()
        add_limit_options(parser)
        return limits_from_args(parser.parse_args(argv))

    assert parse() == ServerLimits()
    monkeypatch.setenv("TETHER_MAX_WATCHES_PER_PRINCIPAL", "7")
    assert parse("--max-leases-per-principal", "0", "--max-concurrent-rpcs=5") == ServerLimits(
        max_concurrent_rpcs=5, max_leases_per_principal=0, max_watches_per_principal=7
    )
    for bad in ("-1", "ten", "1e3", str(10**12)):
        with pytest.raises(SystemExit):
            parse("--max-streams-per-connection", bad)
    monkeypatch.setenv("TETHER_MAX_WATCHES_PER_PRINCIPAL", "-3")
    with pytest.raises(SystemExit):
        parse()
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        ServerLimits(max_concurrent_rpcs=-1)
