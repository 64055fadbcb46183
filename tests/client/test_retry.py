"""Retries: only safe calls, only on UNAVAILABLE, jittered, bounded, and failing over.

A scripted server (pytest-grpc, a real port) answers with a chosen status a number of
times before it succeeds, and counts what it received. Backoffs and deadlines run on the
client's clock: the tests about time give the client a ``ManualClock`` and move it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from tests.client.conftest import advance_until, wait_until
from tests.support.ports import free_port
from tests.support.tcp_proxy import TcpProxy
from tether_client import ManualClock, RetryPolicy, TetherClient
from tether_client.connection import Endpoint
from tether_client.errors import ClientClosed, DeadlineExceeded, FailedPrecondition, Unavailable
from tether_client.pb import lease_pb2, lease_pb2_grpc, saga_pb2, saga_pb2_grpc
from tether_client.transport import Transport

grpc_max_workers = 8

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, default_timeout=10.0)


@dataclass
class Script:
    """What the scripted servicers answer: ``code`` for the next ``failures`` calls."""

    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    calls: list[tuple[str, Message]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        with self.lock:
            self.failures, self.code, self.calls = failures, code, []

    def answer(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        """Record the call; abort it while failures remain (-1: fail forever)."""
        with self.lock:
            self.calls.append((method, request))
            fail = self.failures != 0
            if self.failures > 0:
                self.failures -= 1
            code = self.code
        if fail:
            context.abort(code, f"scripted {code.name}")

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for name, _ in self.calls if name == method)

    def requests(self, method: str) -> list[Any]:
        with self.lock:
            return [request for name, request in self.calls if name == method]


LEASE = lease_pb2.Lease(lease_id="lease-1", key="jobs/a", holder="w1", fencing_token=7)


class ScriptedLeases(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def GetLease(
        self, request: lease_pb2.GetLeaseRequest, context: grpc.ServicerContext
    ) -> lease_pb2.GetLeaseResponse:
        self.script.answer("GetLease", request, context)
        return lease_pb2.GetLeaseResponse(lease=LEASE)

    def Acquire(
        self, request: lease_pb2.AcquireRequest, context: grpc.ServicerContext
    ) -> lease_pb2.AcquireResponse:
        self.script.answer("Acquire", request, context)
        return lease_pb2.AcquireResponse(lease=LEASE, created=True)


class ScriptedSagas(saga_pb2_grpc.SagaServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def CompleteSaga(
        self, request: saga_pb2.CompleteSagaRequest, context: grpc.ServicerContext
    ) -> saga_pb2.CompleteSagaResponse:
        self.script.answer("CompleteSaga", request, context)
        return saga_pb2.CompleteSagaResponse(saga=saga_pb2.Saga(saga_id=request.saga_id))

    def CancelSaga(
        self, request: saga_pb2.CancelSagaRequest, context: grpc.ServicerContext
    ) -> saga_pb2.CancelSagaResponse:
        self.script.answer("CancelSaga", request, context)
        return saga_pb2.CancelSagaResponse(saga=saga_pb2.Saga(saga_id=request.saga_id))

    def GetSaga(
        self, request: saga_pb2.GetSagaRequest, context: grpc.ServicerContext
    ) -> saga_pb2.GetSagaResponse:
        self.script.answer("GetSaga", request, context)
        return saga_pb2.GetSagaResponse(saga=saga_pb2.Saga(saga_id=request.saga_id))


@dataclass
class Servicers:
    script: Script
    leases: ScriptedLeases
    sagas: ScriptedSagas


@pytest.fixture(scope="module")
def grpc_servicer() -> Servicers:
    script = Script()
    # The stubs declare every RPC abstract; the generated classes answer UNIMPLEMENTED.
    leases = ScriptedLeases(script)  # type: ignore[abstract]
    sagas = ScriptedSagas(script)  # type: ignore[abstract]
    return Servicers(script, leases, sagas)


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    def add(servicers: Servicers, server: grpc.Server) -> None:
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(servicers.leases, server)
        saga_pb2_grpc.add_SagaServiceServicer_to_server(servicers.sagas, server)

    return add


@pytest.fixture(scope="module")
def grpc_stub_cls() -> Any:
    return lease_pb2_grpc.LeaseServiceStub


@pytest.fixture
def script(grpc_servicer: Servicers, grpc_server: grpc.Server) -> Iterator[Script]:
    """The (module-wide) script, reset for this test."""
    grpc_servicer.script.reset()
    yield grpc_servicer.script
    grpc_servicer.script.reset()


@pytest.fixture
async def client(grpc_addr: str, script: Script) -> AsyncIterator[TetherClient]:
    client = TetherClient(grpc_addr, holder="w1", retry=FAST)
    yield client
    await client.close()


def test_the_script_fails_then_succeeds(script: Script, grpc_stub: Any) -> None:
    script.reset(failures=1)
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.GetLease(lease_pb2.GetLeaseRequest(lease_id="lease-1"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_stub.GetLease(lease_pb2.GetLeaseRequest(), timeout=5).lease == LEASE
    assert script.count("GetLease") == 2


async def test_a_read_is_retried_until_it_succeeds(client: TetherClient, script: Script) -> None:
    script.reset(failures=3)
    lease = await client.leases.get(lease_id="lease-1")
    assert lease == LEASE
    assert script.count("GetLease") == 4


async def test_a_retry_waits_on_the_clients_clock(grpc_addr: str, script: Script) -> None:
    script.reset(failures=1)
    clock = ManualClock()
    client = TetherClient(grpc_addr, retry=FAST, clock=clock)
    try:
        call = asyncio.ensure_future(client.leases.get(lease_id="lease-1"))
        # The first attempt failed and the call sleeps its backoff on the clock...
        await wait_until(lambda: clock.sleepers == 1 or call.done(), "the backoff")
        assert not call.done()
        assert script.count("GetLease") == 1
        # ...until the clock moves past it (at most the first retry's ceiling).
        clock.advance(FAST.initial_backoff)
        assert await asyncio.wait_for(call, 10) == LEASE
        assert script.count("GetLease") == 2
    finally:
        await client.close()


async def test_acquire_retries_carry_one_request_id(client: TetherClient, script: Script) -> None:
    script.reset(failures=2)
    response = await client.leases.acquire("jobs/a", ttl=10)
    assert response.lease == LEASE
    ids = [request.request_id for request in script.requests("Acquire")]
    assert len(ids) == 3
    assert ids[0]
    assert len(set(ids)) == 1


async def test_separate_acquires_get_separate_request_ids(
    client: TetherClient, script: Script
) -> None:
    await client.leases.acquire("jobs/a", ttl=10)
    await client.leases.acquire("jobs/a", ttl=10)
    ids = [request.request_id for request in script.requests("Acquire")]
    assert len(ids) == 2
    assert len(set(ids)) == 2


async def test_an_unsafe_saga_call_is_tried_once(client: TetherClient, script: Script) -> None:
    script.reset(failures=1)
    with pytest.raises(Unavailable):
        await client.sagas.cancel("s1")
    assert script.count("CancelSaga") == 1
    # The same failure on a safe saga call is retried.
    script.reset(failures=1)
    saga = await client.sagas.get("s1")
    assert saga.saga_id == "s1"
    assert script.count("GetSaga") == 2


async def test_a_raw_call_retries_only_when_marked_safe(
    client: TetherClient, script: Script
) -> None:
    async def attempt(
        endpoint: Endpoint, left: float, metadata: tuple[tuple[str, str], ...]
    ) -> lease_pb2.GetLeaseResponse:
        return await endpoint.lease.GetLease(
            lease_pb2.GetLeaseRequest(lease_id="lease-1"), timeout=left, metadata=metadata
        )

    transport: Transport = client._transport
    script.reset(failures=1)
    with pytest.raises(Unavailable):
        await transport.call(attempt, safe=False, timeout=5)
    assert script.count("GetLease") == 1
    script.reset(failures=1)
    assert (await transport.call(attempt, safe=True, timeout=5)).lease == LEASE
    assert script.count("GetLease") == 2


async def test_a_non_transient_error_is_not_retried(client: TetherClient, script: Script) -> None:
    script.reset(failures=1, code=grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(FailedPrecondition):
        await client.leases.get(lease_id="lease-1")
    assert script.count("GetLease") == 1


async def test_retries_stop_at_the_callers_timeout(grpc_addr: str, script: Script) -> None:
    script.reset(failures=-1)
    policy = RetryPolicy(initial_backoff=0.02, max_backoff=0.1)
    clock = ManualClock()
    client = TetherClient(grpc_addr, retry=policy, clock=clock)
    timeout, step = 0.8, 0.01
    started = clock.monotonic()
    try:
        call = asyncio.ensure_future(client.leases.get(lease_id="lease-1", timeout=timeout))
        await wait_until(lambda: call.done() or clock.sleepers > 0, "the first backoff")
        # Time moves only while the call sleeps a backoff on the clock; each step is over
        # once the woken retry has failed and sleeps again (or the call gave up).
        await advance_until(
            clock.advance, call.done, step=step, quiet=lambda: call.done() or clock.sleepers > 0
        )
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await call
    finally:
        await client.close()
    assert script.count("GetLease") > 1
    # The call gave up by its deadline on the client's clock (give or take one step).
    assert clock.monotonic() - started <= timeout + step


def test_backoff_delays_are_jittered_and_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.4)
    for attempt in (1, 3, 10):
        delays = [policy.delay(attempt) for _ in range(50)]
        assert len(set(delays)) > 40, "no jitter"
        assert all(0 <= delay <= policy.max_backoff for delay in delays)
    # The ceiling grows with the attempt until the cap: first retries stay short.
    assert max(policy.delay(1) for _ in range(50)) <= policy.initial_backoff
    assert max(policy.delay(10) for _ in range(200)) > policy.initial_backoff


async def test_calls_fail_over_to_the_next_target(grpc_addr: str, script: Script) -> None:
    closed = f"127.0.0.1:{free_port()}"
    client = TetherClient([closed, grpc_addr], retry=FAST)
    try:
        assert (await client.leases.get(lease_id="lease-1", timeout=10)).lease_id == "lease-1"
        connection = client._transport.connection
        assert connection.fail_overs >= 1
        assert connection.current.target == grpc_addr
        response = await client.leases.acquire("jobs/a", ttl=10, timeout=10)
        assert response.created
    finally:
        await client.close()
    assert script.count("GetLease") == 1
    assert script.count("Acquire") == 1


async def test_a_target_that_never_answers_costs_one_attempt_bound_not_the_deadline(
    grpc_addr: str, script: Script
) -> None:
    # A black hole: the proxy accepts connections and forwards nothing.
    host, port = grpc_addr.rsplit(":", 1)
    black_hole = await TcpProxy(host, int(port)).start()
    black_hole.stall()
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, attempt_timeout=0.5)
    client = TetherClient([f"127.0.0.1:{black_hole.port}", grpc_addr], retry=policy)
    try:
        # Without the attempt bound the first attempt would wait out the whole 20 s and
        # end the call with DeadlineExceeded; bounded, it counts as unavailable and the
        # retry goes to the next target.
        assert (await client.leases.get(lease_id="lease-1", timeout=20)).lease_id == "lease-1"
        connection = client._transport.connection
        assert connection.fail_overs == 1
        assert connection.current.target == grpc_addr
    finally:
        await client.close()
        black_hole.resume()
        await black_hole.close()


async def test_a_closed_client_refuses_calls(grpc_addr: str, script: Script) -> None:
    client = TetherClient(grpc_addr, retry=FAST)
    await client.close()
    with pytest.raises(ClientClosed):
        await client.leases.get(lease_id="lease-1")
    assert script.count("GetLease") == 0
