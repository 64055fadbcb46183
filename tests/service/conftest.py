"""Fixtures and helpers for the service tests.

``tether``: a TetherServer started in process on ``127.0.0.1:0`` over the test's fresh
database (``db_url``, so each test runs on SQLite and PostgreSQL) and driven by
``fake_clock``. Time moves only when a test advances the clock. The background expiry loop
is stopped right after start so that a test decides when expiries are recorded
(``await tether.server.expiry.run_once()``) and can observe lazy expiry without racing the
loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support import error_contract
from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.app import TetherServer
from tether_server.clock import FakeClock
from tether_server.config import ServerConfig
from tether_server.domain.sweep import SweepConfig
from tether_server.services.lease import LeaseServiceConfig
from tether_server.store.leases import AcquireParams

S = 1_000_000
# Small, so the idle test advances the fake clock only a little.
KEEPALIVE_IDLE_S = 5.0
NO_PERIODIC_SWEEP_S = 10 * 365 * 24 * 3600.0
# A bound on every real-time wait in these tests; nothing should come close to it.
WAIT_S = 10.0
ERROR_DOMAIN = "tether.dev"

LEASE_SERVICE = "tether.v1.LeaseService"


@dataclass
class Harness:
    server: TetherServer
    clock: FakeClock
    port: int
    channel: grpc.aio.Channel
    stub: lease_pb2_grpc.LeaseServiceStub
    # Every outcome the store returned to LeaseService.Acquire (AcquireResult or Refuse),
    # in order: lets a test see that a waiting Acquire has been refused and is waiting.
    acquire_outcomes: list[Any] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.server.db.backend

    def raw_unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A unary call on ``/tether.v1.LeaseService/<method>`` that sends raw bytes."""
        return self.channel.unary_unary(
            f"/{LEASE_SERVICE}/{method}",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )

    async def acquire(
        self,
        key: str = "jobs/a",
        holder: str = "worker-1",
        ttl_s: float = 10,
        **fields: Any,
    ) -> lease_pb2.Lease:
        response = await self.stub.Acquire(
            lease_pb2.AcquireRequest(key=key, holder=holder, ttl=dur(ttl_s), **fields),
            timeout=WAIT_S,
        )
        return response.lease

    async def get(self, lease_id: str, namespace: str = "") -> lease_pb2.Lease:
        response = await self.stub.GetLease(
            lease_pb2.GetLeaseRequest(namespace=namespace, lease_id=lease_id), timeout=WAIT_S
        )
        return response.lease

    async def list_all(self, **filters: Any) -> list[lease_pb2.Lease]:
        """Every lease matching the filters, walking all pages."""
        leases: list[lease_pb2.Lease] = []
        token = ""
        for _ in range(10_000):
            response = await self.stub.ListLeases(
                lease_pb2.ListLeasesRequest(page_token=token, **filters), timeout=WAIT_S
            )
            leases.extend(response.leases)
            token = response.next_page_token
            if not token:
                return leases
        raise AssertionError("ListLeases never returned a last page")

    async def snapshot(self, namespaces: tuple[str, ...] = ("",)) -> tuple[Any, ...]:
        """Everything observable about stored leases: every lease of the namespaces as
        listed and the revision counter (any write that ends or grants a lease bumps it)."""
        listed = []
        for namespace in namespaces:
            leases = await self.list_all(namespace=namespace, page_size=1000)
            listed.append(tuple(lease.SerializeToString(deterministic=True) for lease in leases))
        return (tuple(listed), await self.server.db.current_revision())


def dur(seconds: float = 0, *, nanos: int | None = None) -> duration_pb2.Duration:
    if nanos is not None:
        return duration_pb2.Duration(seconds=int(seconds), nanos=nanos)
    us = round(seconds * S)
    whole, rest = divmod(us, S)
    return duration_pb2.Duration(seconds=whole, nanos=rest * 1000)


def ts_us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * S + ts.nanos // 1000


def dur_us(d: duration_pb2.Duration) -> int:
    return d.seconds * S + d.nanos // 1000


def error_info(exc: BaseException) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(status code, ErrorInfo reason, ErrorInfo metadata) of a failed call.

    The reason is "" when the status carries no ErrorInfo (e.g. a client-side deadline).
    """
    assert isinstance(exc, grpc.aio.AioRpcError), f"not a gRPC error: {exc!r}"
    status = rpc_status.from_call(exc)
    if status is None:
        return exc.code(), "", {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == ERROR_DOMAIN, info
            error_contract.check(exc.code(), info.reason, info.metadata)
            return exc.code(), info.reason, dict(info.metadata)
    return exc.code(), "", {}


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> dict[str, str]:
    """Await ``call``, assert it fails with ``code`` and ``reason``; return the metadata."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    got_code, got_reason, metadata = error_info(caught.value)
    assert (got_code, got_reason) == (code, reason), caught.value.details()
    return metadata


async def eventually(
    predicate: Callable[[], Any], what: str = "condition", within: float = WAIT_S
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; bounded."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > give_up:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


async def advance_until_done(
    clock: FakeClock,
    task: asyncio.Future[Any],
    step_s: float,
    max_steps: int,
    progress: Callable[[], int] | None = None,
) -> float:
    """Advance the fake clock by ``step_s`` at a time until ``task`` finishes.

    A sleeper on a FakeClock computes its wake-up time when it starts sleeping, so a single
    jump could land before the server began its sleep; small repeated steps cannot miss.
    After each step, waits (bounded, real time) until ``task`` is done or ``progress()``
    changes (e.g. the server made another attempt). Returns the fake seconds advanced.
    """
    loop = asyncio.get_running_loop()
    advanced = 0.0
    for _ in range(max_steps):
        if task.done():
            return advanced
        before = progress() if progress is not None else None
        clock.advance(step_s)
        advanced += step_s
        give_up = loop.time() + 0.1
        while not task.done() and loop.time() < give_up:
            if progress is not None and progress() != before:
                break
            await asyncio.sleep(0.002)
    if task.done():
        return advanced
    raise AssertionError(f"task still running after advancing {advanced}s of fake time")


def make_test_config(db_url: str) -> ServerConfig:
    """For in-process tests: a free loopback port, no grace, a short keep-alive idle
    timeout (so an idle test advances the fake clock only a little), and no periodic sweep
    before ten years of fake time (tests advance it by days; a test sweeps by RunSweep)."""
    return ServerConfig(
        listen="127.0.0.1:0",
        db_url=db_url,
        grace_s=0.0,
        lease=dataclasses.replace(LeaseServiceConfig(), keepalive_idle_timeout_s=KEEPALIVE_IDLE_S),
        sweep=SweepConfig(start_delay_s=NO_PERIODIC_SWEEP_S),
    )


def make_test_server(db_url: str, clock: FakeClock) -> TetherServer:
    return TetherServer(make_test_config(db_url), clock)


@pytest.fixture
async def tether(db_url: str, fake_clock: FakeClock) -> AsyncIterator[Harness]:
    server = make_test_server(db_url, fake_clock)
    port = await server.start()
    # Tests decide when expiries are recorded (and, by their config, when sweeps run); see
    # the module docstring.
    await server.expiry.stop()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    harness = Harness(
        server=server,
        clock=fake_clock,
        port=port,
        channel=channel,
        stub=lease_pb2_grpc.LeaseServiceStub(channel),
    )

    # A spy on the store: the service holds this same LeaseStore object.
    store = server.leases
    original_acquire = store.lease_acquire

    async def spying_acquire(params: AcquireParams) -> Any:
        outcome = await original_acquire(params)
        harness.acquire_outcomes.append(outcome)
        return outcome

    store.lease_acquire = spying_acquire  # type: ignore[method-assign]
    try:
        yield harness
    finally:
        try:
            await server.stop(0)
        finally:
            await channel.close()
            await _settle()


async def _settle(within: float = 5.0) -> None:
    """Let tasks the server left behind finish while the loop still runs.

    ``server.stop(0)`` cancels handler tasks but does not wait for them; one cancelled in
    the middle of a SQLite call is still closing its connection (SQLAlchemy terminates
    it in a shielded task). If pytest-asyncio closed the loop now, it would cancel that task
    a second time, and aiosqlite's close then waits forever for a worker thread that has
    already exited. Waiting here (bounded) avoids that.
    """
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    if others:
        await asyncio.wait(others, timeout=within)
