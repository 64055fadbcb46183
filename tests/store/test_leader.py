"""Leader election on PostgreSQL advisory locks, with real connections and fake time.

Each elector gets its own StepClock, which records every sleep: an elector that asked to
sleep has finished an election step. Advancing its clock by ``interval_s`` runs exactly
one more step, so "took over within one interval" is checked by counting steps, not by
measuring time. Timeouts below only bound hangs.

Terminating a backend with ``pg_terminate_backend`` is what a SIGKILLed replica looks like
to PostgreSQL: the session ends and its session-level locks go with it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from tests.conftest import DbFactory
from tests.support.step_clock import StepClock
from tether_server.clock import FakeClock
from tether_server.runtime import AlwaysLeader, PgAdvisoryLeader
from tether_server.runtime.leader import asyncpg_dsn

SAFETY_S = 10.0
INTERVAL_S = 0.5
ROUNDS = 5


class Elector:
    """A PgAdvisoryLeader with its own clock and a step counter."""

    def __init__(self, dsn: str, lock_key: int) -> None:
        self.clock = StepClock()
        self.changes: list[bool] = []
        self.leader = PgAdvisoryLeader(
            dsn, self.clock, lock_key, interval_s=INTERVAL_S, on_change=self.changes.append
        )
        self.steps = 0

    def start(self) -> None:
        self.leader.start()

    async def step(self) -> None:
        """Let exactly one more election step run and finish."""
        if self.steps > 0:
            self.clock.advance(INTERVAL_S)
        self.steps += 1
        await self.clock.asleep(self.steps)

    @property
    def is_leader(self) -> bool:
        return self.leader.is_leader


ElectorFactory = Callable[[], Elector]


@pytest.fixture
async def electors(db_factory: DbFactory) -> AsyncIterator[tuple[str, ElectorFactory]]:
    """A fresh PostgreSQL database and a factory of electors on one random lock key."""
    dsn = db_factory("postgres")
    lock_key = secrets.randbits(63)
    made: list[Elector] = []

    def make() -> Elector:
        elector = Elector(dsn, lock_key)
        made.append(elector)
        return elector

    yield dsn, make
    for elector in made:
        await elector.leader.stop()


async def terminate(dsn: str, pid: int) -> None:
    """End a backend from outside, waiting until it is gone (PostgreSQL 14+)."""
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid) is True
    finally:
        await conn.close()


async def start_pair(make: ElectorFactory) -> tuple[Elector, Elector]:
    """Start two electors at once; exactly one must lead. Returns (leader, follower)."""
    a, b = make(), make()
    a.start()
    b.start()
    await asyncio.gather(a.step(), b.step())
    assert [a.is_leader, b.is_leader].count(True) == 1
    return (a, b) if a.is_leader else (b, a)


@pytest.mark.postgres
async def test_killed_leader_is_replaced_within_one_interval(
    electors: tuple[str, ElectorFactory],
) -> None:
    dsn, make = electors
    for _ in range(ROUNDS):
        leader, follower = await start_pair(make)
        old_pid = leader.leader.backend_pid
        assert old_pid is not None

        await terminate(dsn, old_pid)
        # The follower's very next step takes the lock.
        await follower.step()
        assert follower.is_leader
        async with asyncio.timeout(SAFETY_S):
            await follower.leader.wait_leader()

        # Documented window: the old leader has not checked yet, so it still believes.
        assert leader.is_leader
        # Its next check finds the session gone: it steps down and reconnects as follower.
        await leader.step()
        assert not leader.is_leader
        new_pid = leader.leader.backend_pid
        assert new_pid is not None
        assert new_pid != old_pid
        # And it stays a follower while the new leader is alive.
        for _ in range(2):
            await asyncio.gather(leader.step(), follower.step())
            assert not leader.is_leader
            assert follower.is_leader
        assert leader.changes == [True, False]
        assert follower.changes == [True]

        await leader.leader.stop()
        await follower.leader.stop()


@pytest.mark.postgres
async def test_stop_hands_over(electors: tuple[str, ElectorFactory]) -> None:
    _, make = electors
    for _ in range(ROUNDS):
        leader, follower = await start_pair(make)
        await leader.leader.stop()
        assert not leader.is_leader
        assert leader.leader.backend_pid is None
        await leader.leader.stop()  # twice is fine

        await follower.step()
        assert follower.is_leader
        assert leader.changes == [True, False]
        await follower.leader.stop()
        await follower.leader.stop()
        assert follower.changes == [True, False]


@pytest.mark.postgres
async def test_stopped_elector_can_take_the_lock_again(
    electors: tuple[str, ElectorFactory],
) -> None:
    """An elector started after every other stopped leads at its first step."""
    _, make = electors
    leader, follower = await start_pair(make)
    await leader.leader.stop()
    await follower.leader.stop()
    late = make()
    late.start()
    await late.step()
    assert late.is_leader


@pytest.mark.postgres
async def test_sqlalchemy_url_is_accepted(db_factory: DbFactory) -> None:
    dsn = db_factory("postgres").replace("postgresql://", "postgresql+asyncpg://", 1)
    leader = PgAdvisoryLeader(dsn, FakeClock(), lock_key=secrets.randbits(63))
    try:
        assert await leader.check()
    finally:
        await leader.stop()


async def test_unreachable_database_never_leads() -> None:
    # Port 1 on localhost refuses connections at once.
    leader = PgAdvisoryLeader("postgresql://nobody@127.0.0.1:1/x", FakeClock(), lock_key=1)
    try:
        assert not await leader.check()
        assert leader.backend_pid is None
    finally:
        await leader.stop()


def test_lock_key_must_fit_a_bigint() -> None:
    with pytest.raises(ValueError, match="bigint"):
        PgAdvisoryLeader("postgresql://x/y", FakeClock(), lock_key=2**63)


async def test_always_leader_leads() -> None:
    leader = AlwaysLeader()
    leader.start()
    assert leader.is_leader
    async with asyncio.timeout(SAFETY_S):
        await leader.wait_leader()
    await leader.stop()
    await leader.stop()
    assert leader.is_leader
