"""Leader-only background tasks run on one PostgreSQL replica at a time, and when the
leader is SIGKILLed the other replica takes over within one leader-check interval (of the
servers' clock, which the test drives)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from tests.conftest import DbFactory, ServerFactory
from tests.support.server_process import FileClockDriver

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

# The default --leader-check-interval.
INTERVAL_S = 1.0
LEADER_QUERY = """
    SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
    WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
      AND a.application_name LIKE 'tether-leader:%'
"""


async def leaders(conn: asyncpg.Connection) -> list[str]:
    return sorted(r["application_name"].split(":", 1)[1] for r in await conn.fetch(LEADER_QUERY))


async def until_leaders(conn: asyncpg.Connection, ok: Callable[[list[str]], bool]) -> None:
    """Poll the database's own lock table (a signal, not a guess), bounded."""
    for _ in range(2000):
        if ok(await leaders(conn)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"leaders stayed {await leaders(conn)}")


async def test_the_other_replica_takes_over_when_the_leader_is_sigkilled(
    db_factory: DbFactory, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    url = db_factory("postgres")
    servers = {
        name: server_factory(url, env=file_clock.env, extra_args=["--replica", name])
        for name in ("a", "b")
    }
    conn = await asyncpg.connect(url)
    try:
        # Exactly one replica leads, whichever started first.
        for _ in range(3):
            file_clock.advance(INTERVAL_S)
        found: list[str] = []
        for _ in range(2000):
            found = await leaders(conn)
            if found:
                break
            await asyncio.sleep(0.01)
        assert len(found) == 1, found
        (leader,) = found
        follower = "b" if leader == "a" else "a"
        assert servers[leader].kill() == -9
        # PostgreSQL ends the dead session and its lock goes with it. The follower may
        # already hold it by then: on a loaded machine it can still be working through
        # the ticks advanced above, so only the dead leader's absence is certain.
        await until_leaders(conn, lambda held: leader not in held)
        # One interval of the servers' clock: the follower's next check takes the lock.
        file_clock.advance(INTERVAL_S)
        await until_leaders(conn, lambda held: held == [follower])
    finally:
        await conn.close()
