"""Fixtures for client tests.

``tether``: a TetherServer in process on a real loopback port over the test's fresh
database (``db_url``: each test runs on SQLite and PostgreSQL), on a ``FakeClock``.
``clocks``: that server clock and a ``ManualClock`` for clients, advanced together, so a
test walks a lease past its deadline on both sides without sleeping.
``client_factory``: ``TetherClient`` instances on the client clock, closed at teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.service.conftest import _settle, make_test_server
from tether_client import ManualClock, TetherClient
from tether_server.app import TetherServer
from tether_server.clock import FakeClock


@dataclass
class Clocks:
    """The server's FakeClock and the clients' ManualClock, moved in lockstep."""

    server: FakeClock
    client: ManualClock

    def advance(self, seconds: float) -> None:
        self.server.advance(seconds)
        self.client.advance(seconds)


@dataclass
class InProcessServer:
    server: TetherServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


ClientFactory = Callable[..., TetherClient]


async def advance_until(
    advance: Callable[[float], None],
    predicate: Callable[[], bool],
    *,
    step: float = 0.25,
    limit: float = 60.0,
    settle: int = 50,
) -> float:
    """Move fake time (``advance``) in small steps until ``predicate()``; the fake seconds used.

    After each step the real loop gets up to ``settle`` short turns for the client, server
    and network to act on the new time. Bounded by ``limit`` seconds of fake time.
    """
    advanced = 0.0
    while not predicate():
        if advanced >= limit:
            raise AssertionError(f"not reached after {advanced:.1f} s of fake time")
        advance(step)
        advanced += step
        for _ in range(settle):
            await asyncio.sleep(0.004)
            if predicate():
                break
    return advanced


@pytest.fixture
def clocks(fake_clock: FakeClock) -> Clocks:
    return Clocks(server=fake_clock, client=ManualClock())


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
    """``client_factory(target, **TetherClient kwargs)``; clients use ``clocks.client``."""
    clients: list[TetherClient] = []

    def make(target: str, **kwargs: Any) -> TetherClient:
        kwargs.setdefault("clock", clocks.client)
        client = TetherClient(target, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
