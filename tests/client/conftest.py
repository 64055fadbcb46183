"""Fixtures for client tests.

``tether``: a TetherServer in process on a real loopback port over the test's fresh
database (``db_url``: each test runs on SQLite and PostgreSQL), on a ``FakeClock``.
``clocks``: that server clock and a ``ManualClock`` for clients, advanced together, so a
test walks a lease past its deadline on both sides without sleeping.
``client_factory``: ``TetherClient`` instances on the client clock, closed at teardown; each
is watched (:class:`Activity`) so that :func:`advance_until` moves fake time on only once
the client has nothing under way that real time must finish.

No test here waits for something to happen by sleeping, and none asserts on how long
something took in real time. A test waits for a signal from the code under test
(:func:`wait_until`: a predicate, polled; its time bound only turns a hang into a failure
and is never what the test checks).

Retries run on the client's clock: a call of a client on a ``ManualClock`` that fails
transiently waits for the test to move the clock. Where a test does not mean to test that,
it awaits the call with :func:`driven` (time moves only once the call waits on the clock),
and before the first call of a client whose target was down or is a fresh proxy it waits
for the channel to connect (:func:`reachable`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import grpc
import pytest

from tests.service.conftest import _settle, make_test_server
from tether_client import ManualClock, TetherClient
from tether_client import threads as client_threads
from tether_client.retry import Attempt
from tether_server.app import TetherServer
from tether_server.clock import FakeClock

# A bound on every wait for a signal: only a hang comes close to it.
HANG_S = 30.0
# Loop turns (``asyncio.sleep(0)``, no real time) that let every task a step of fake time
# woke run up to its next real wait: a send, a thread, a sleep. A count, not a duration.
SETTLE_TURNS = 50

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], object], what: str = "the condition", *, within: float = HANG_S
) -> None:
    """Return once ``predicate()`` holds, polling it between loop turns.

    ``within`` (real seconds) only turns a hang into a failure: a test never asserts on it.
    The first polls are bare loop turns; later ones pause a millisecond so that gRPC's
    threads, the server and the database get the CPU.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    polls = 0
    while not predicate():
        if loop.time() > give_up:
            raise AssertionError(f"gave up waiting for {what} (a hang?); {Activity.report()}")
        polls += 1
        await asyncio.sleep(0 if polls < 20 else 0.001)


async def turns(count: int = SETTLE_TURNS, until: Callable[[], object] | None = None) -> None:
    """Give the loop ``count`` turns (no real time), fewer once ``until()`` holds."""
    for _ in range(count):
        await asyncio.sleep(0)
        if until is not None and until():
            return


class Activity:
    """What one client has under way that only real time can finish.

    Counts the RPC attempts in progress (every unary call of the client goes through
    ``Transport.call``, the keeper's renewals and releases too) and reads the keeper's
    unanswered keep-alive requests. Long polls (an Acquire or claim that waits on the
    server, for the server's fake time) are not counted: moving time is what ends them.
    ``quiet()``: nothing under way. A call between attempts waits out a retry's backoff on
    the client's clock (``backing_off``): only moving the clock lets it go on.
    """

    live: ClassVar[weakref.WeakSet[Activity]] = weakref.WeakSet()

    def __init__(self, client: TetherClient) -> None:
        self.client = client
        self.attempts = 0
        self.calls = 0
        transport = client._transport
        call = transport.call

        async def counted_call(attempt: Attempt[Any], **options: Any) -> Any:
            bound = options.get("attempt_timeout")
            if bound is not None and bound > transport.retry.attempt_timeout:
                return await call(attempt, **options)  # a long poll

            async def counted(endpoint: Any, left: float, metadata: Any) -> Any:
                self.attempts += 1
                try:
                    return await attempt(endpoint, left, metadata)
                finally:
                    self.attempts -= 1

            self.calls += 1
            try:
                return await call(counted, **options)
            finally:
                self.calls -= 1

        transport.call = counted_call  # type: ignore[method-assign]
        Activity.live.add(self)

    def keepalives_unanswered(self) -> int:
        stream = self.client._keeper._stream
        return 0 if stream is None else len(stream.pending)

    @property
    def backing_off(self) -> int:
        return self.calls - self.attempts

    def quiet(self) -> bool:
        return self.attempts == 0 and self.keepalives_unanswered() == 0

    @classmethod
    def report(cls) -> str:
        """What the watched clients are doing (for a failure message)."""
        if not cls.live:
            return "no client watched"
        return "; ".join(
            f"client {id(a.client):#x}: {a.attempts} attempts under way, {a.backing_off} calls "
            f"waiting out a retry backoff on the clock, {a.keepalives_unanswered()} "
            "keep-alives unanswered"
            for a in cls.live
            if not a.client._transport.connection.closed
        )


@dataclass
class Clocks:
    """The server's FakeClock and the clients' ManualClock, moved in lockstep.

    ``client_factory`` registers its clients here: :meth:`quiet` says none of them has an
    RPC, a keep-alive answer or a thread of user code (saga steps, handlers) under way.
    """

    server: FakeClock
    client: ManualClock
    activities: list[Activity] = field(default_factory=list)
    threads: int = 0

    def advance(self, seconds: float) -> None:
        self.server.advance(seconds)
        self.client.advance(seconds)

    def quiet(self) -> bool:
        return self.threads == 0 and all(activity.quiet() for activity in self.activities)


@dataclass
class InProcessServer:
    server: TetherServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def waits_for_key(self, key: str) -> bool:
        """Whether the server has a waiter parked on ``key`` (a waiting Acquire): its wait
        counts from the server's clock reading before it parked."""
        return any(watched[2] == key for watched in self.server.changes._keys)


ClientFactory = Callable[..., TetherClient]


async def advance_until(
    advance: Callable[[float], None],
    predicate: Callable[[], bool],
    *,
    step: float = 0.25,
    limit: float = 60.0,
    settle: int = SETTLE_TURNS,
    quiet: Callable[[], bool] | None = None,
) -> float:
    """Move fake time (``advance``) in steps until ``predicate()``; the fake seconds used.

    After each step the loop gets ``settle`` turns (no real time) for the tasks the step
    woke to reach their next wait, then the step is over once ``quiet()`` holds (or the
    predicate): the clients have nothing under way, so fake time never runs on while a
    renewal waits for its answer. ``quiet`` defaults to :meth:`Clocks.quiet` when
    ``advance`` is ``clocks.advance``; ``quiet=lambda: True`` moves on after the turns
    alone (a test of what the client decides by itself, with the network gone).
    Long polls are not waited for (moving time is what ends them): a test that moves time
    for a server-side wait first waits for the server to park the call
    (:meth:`InProcessServer.waits_for_key`). Bounded by ``limit`` seconds of fake time.
    """
    if quiet is None:
        owner = getattr(advance, "__self__", None)
        if isinstance(owner, Clocks):
            quiet = owner.quiet
    # Nothing moves while the clients are busy: not even the first step.
    await settled(predicate, quiet, settle)
    advanced = 0.0
    while not predicate():
        if advanced >= limit:
            raise AssertionError(f"not reached after {advanced:.1f} s of fake time")
        advance(step)
        advanced += step
        await settled(predicate, quiet, settle)
    return advanced


async def driven(
    advance: Callable[[float], None],
    awaitable: Awaitable[T],
    *,
    step: float = 0.05,
    quiet: Callable[[], bool] | None = None,
) -> T:
    """Await ``awaitable`` (in a task of its own); should it wait on the clock (a retry's
    backoff), move fake time in steps until it is done. Time moves only once the clients
    are quiet, so a call that needs no retry completes with the clock where it was."""
    task = asyncio.ensure_future(awaitable)
    try:
        await advance_until(advance, task.done, step=step, quiet=quiet)
    finally:
        if not task.done():
            task.cancel()
    return task.result()


async def reachable(client: TetherClient) -> None:
    """Wait until the client's channel to its current target is connected. gRPC
    reconnects in real time, after a backoff of its own; a call made before fails at once
    (and, on a ``ManualClock``, waits for the test to move the clock to retry)."""
    channel = client._transport.connection.current.channel
    await wait_until(
        lambda: channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY,
        "the channel to connect",
    )


async def settled(
    predicate: Callable[[], bool],
    quiet: Callable[[], bool] | None,
    settle: int = SETTLE_TURNS,
) -> None:
    """The end of one step of :func:`advance_until`."""
    await turns(settle, predicate)
    if quiet is None or predicate():
        return
    while True:
        await wait_until(lambda: predicate() or quiet(), "the clients to finish what they sent")
        if predicate():
            return
        # Quiet must hold for a few turns: between two calls of one chain (an answer, then
        # the next request) it holds for an instant only.
        await turns(5, lambda: predicate() or not quiet())
        if predicate() or quiet():
            return


@pytest.fixture
def clocks(fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Clocks:
    clocks = Clocks(server=fake_clock, client=ManualClock())
    in_thread = client_threads.in_thread

    async def counted(fn: Callable[..., object], *args: object) -> object:
        clocks.threads += 1
        try:
            return await in_thread(fn, *args)
        finally:
            clocks.threads -= 1

    # User code run in threads (saga steps, compensations, finalizer handlers) is work
    # under way too.
    monkeypatch.setattr(client_threads, "in_thread", counted)
    return clocks


@pytest.fixture
async def tether(db_url: str, fake_clock: FakeClock) -> AsyncIterator[InProcessServer]:
    server = make_test_server(db_url, fake_clock)
    port = await server.start()
    try:
        yield InProcessServer(server, port)
    finally:
        await server.stop(0)
        await _settle()


@pytest.fixture
async def client_factory(clocks: Clocks) -> AsyncIterator[ClientFactory]:
    """``client_factory(target, **TetherClient kwargs)``; clients use ``clocks.client`` and
    are watched by ``clocks.quiet``."""
    clients: list[TetherClient] = []

    def make(target: str, **kwargs: Any) -> TetherClient:
        kwargs.setdefault("clock", clocks.client)
        client = TetherClient(target, **kwargs)
        clients.append(client)
        clocks.activities.append(Activity(client))
        return client

    yield make
    for client in clients:
        await client.close()
