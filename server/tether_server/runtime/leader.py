"""Which replica runs the leader-only background work.

Most background work (expiry) is safe on every replica at once: rows are split with SKIP
LOCKED. Some is cheaper or clearer with one runner (reaping, sweeps). On PostgreSQL the
replicas elect that one with a session-level advisory lock; on SQLite there is exactly one
server process per file, so it always leads.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # asyncpg ships no type information

from tether_server.clock import Clock

log = logging.getLogger(__name__)

OnChange = Callable[[bool], None]

_BIGINT_MIN = -(2**63)
_BIGINT_MAX = 2**63 - 1
# Connecting is only ever done while not leading, so a slow connect delays nothing but
# this replica's candidacy; the bound keeps stop() from waiting on a dead host forever.
_CONNECT_TIMEOUT_S = 10.0
_KEEPALIVE_COUNT = 3


class Leadership(Protocol):
    """What the Runner needs to know about leadership.

    ``is_leader`` is read-only (a property here, so a plain attribute or a property
    implements it). ``wait_leader()`` returns only once ``is_leader`` is true; the Runner
    waits on it instead of polling. Implementations may take an ``on_change(is_leader)``
    callback (metrics, logs).
    """

    @property
    def is_leader(self) -> bool: ...

    async def wait_leader(self) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class AlwaysLeader:
    """Leadership for SQLite: one server process per database file, so it always leads."""

    def __init__(self, on_change: OnChange | None = None) -> None:
        self._on_change = on_change
        self._announced = False

    @property
    def is_leader(self) -> bool:
        return True

    async def wait_leader(self) -> None:
        return None

    def start(self) -> None:
        # Tell on_change once, so a leadership gauge reads the same on both backends.
        if not self._announced:
            self._announced = True
            _notify(self._on_change, True)

    async def stop(self) -> None:
        return None


class _Connection(Protocol):
    """The part of asyncpg.Connection used here (asyncpg ships no type information)."""

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...

    async def close(self, *, timeout: float | None = None) -> None: ...

    def terminate(self) -> None: ...

    def is_closed(self) -> bool: ...

    def get_server_pid(self) -> int: ...


class PgAdvisoryLeader:
    """Leader election with a session-level ``pg_try_advisory_lock(lock_key)``.

    The elector keeps one dedicated connection (not from the store's pool: a pooled
    connection would carry the lock back into the pool; for the same reason the DSN must
    reach PostgreSQL directly, not through a transaction-pooling PgBouncer). Advisory lock
    keys are per database, so clusters sharing a server but not a database do not collide.

    Every ``interval_s``:

    - leader: ``SELECT 1`` with a timeout of ``interval_s`` proves the session, and with it
      the lock, still exists. Any error, timeout or closed connection steps down at once
      and drops the connection (terminating it releases the lock if the session survived);
    - follower: try the lock. After a lost connection the elector only reconnects in that
      step and contends from the next one, so the replica that was already waiting gets
      the lock first.

    Handover. The lock belongs to the session, so it is released as soon as PostgreSQL ends
    that session: on ``stop()`` (explicit unlock), when a process dies (SIGKILL closes the
    socket, which PostgreSQL sees at once) or when it is terminated. The next follower check,
    within ``interval_s``, takes it. A host that vanishes without closing its socket is
    found by TCP keepalives, set per session below to about ``5 * interval_s`` of silence.

    Subtlety: a leader cut off from PostgreSQL keeps believing it leads until its next check
    fails: at most ``interval_s`` until the check plus ``interval_s`` for its timeout, so
    ``2 * interval_s``. PostgreSQL keeps the old session (and the lock) for about
    ``5 * interval_s`` of silence, so a cut-off leader steps down before anyone else can
    take over. Leader-only passes already running are not interrupted (the Runner never
    cancels a pass); they fail on their own if they need the database.
    """

    def __init__(
        self,
        dsn: str,
        clock: Clock,
        lock_key: int,
        interval_s: float = 1.0,
        on_change: OnChange | None = None,
        application_name: str = "tether-leader",
    ) -> None:
        if not _BIGINT_MIN <= lock_key <= _BIGINT_MAX:
            raise ValueError("lock_key must fit in a PostgreSQL bigint")
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError("interval_s must be a positive number of seconds")
        self._dsn = asyncpg_dsn(dsn)
        self._clock = clock
        self._lock_key = lock_key
        self._interval_s = interval_s
        self._on_change = on_change
        # Shown in pg_stat_activity: operators (and tests) see which replica leads.
        self._application_name = application_name
        self._conn: _Connection | None = None
        self._leader = False
        self._leader_event = asyncio.Event()
        # One step at a time, whether the loop or check() runs it.
        self._step_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Set after a lost connection: reconnect now, contend from the next step.
        self._hold_back = False
        self._connect_failing = False

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def backend_pid(self) -> int | None:
        """PostgreSQL backend pid of the elector's connection (None when disconnected)."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return None
        return conn.get_server_pid()

    async def wait_leader(self) -> None:
        await self._leader_event.wait()

    def start(self) -> None:
        """Start electing: the first attempt runs at once, then one every ``interval_s``."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tether-leader-election")

    async def stop(self) -> None:
        """Step down, release the lock and close the connection; safe to call twice.

        Stop the Runner first, so no leader-only pass is running when the lock goes.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with self._step_lock:
            conn, self._conn = self._conn, None
            was_leader = self._leader
            self._set_leader(False, "stopping")
            if conn is not None:
                await self._release(conn, was_leader)

    async def check(self) -> bool:
        """Run one election step now and return ``is_leader`` (tools and tests)."""
        await self._step()
        return self._leader

    async def _run(self) -> None:
        while True:
            await self._step()
            await self._clock.sleep(self._interval_s)

    async def _step(self) -> None:
        async with self._step_lock:
            try:
                await self._step_locked()
            except Exception:
                # Not expected (every database error is handled below); never let it end
                # the loop, and never lead on a state we do not understand.
                log.exception("leader election step failed", extra={"lock_key": self._lock_key})
                self._lose("unexpected error")

    async def _step_locked(self) -> None:
        if self._conn is not None and self._conn.is_closed():
            self._lose("connection closed")
        if self._conn is None:
            # First connection: contend at once. Reconnection after a loss: only connect,
            # and contend from the next step.
            contend = not self._hold_back
            await self._reconnect()
            if self._conn is None or not contend:
                return
        conn = self._conn
        try:
            if self._leader:
                await conn.fetchval("SELECT 1", timeout=self._interval_s)
            else:
                got = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1)", self._lock_key, timeout=self._interval_s
                )
                if got:
                    self._set_leader(True, "lock acquired")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # After a timeout we cannot know whether the lock was taken: terminating the
            # connection settles it (the session and its locks go with it).
            self._lose(f"check failed: {exc!r}")
            await self._reconnect()

    async def _reconnect(self) -> None:
        self._hold_back = False
        self._conn = await self._connect()

    async def _connect(self) -> _Connection | None:
        # Keepalives are PostgreSQL's side of the socket: they let the server end the
        # session (and free the lock) of a leader whose host vanished without a FIN. They
        # are set well above the 2 * interval_s a cut-off leader needs to step down.
        keepalive_interval = max(1, math.ceil(self._interval_s))
        keepalive_idle = max(1, math.ceil(2 * self._interval_s))
        silence_s = keepalive_idle + keepalive_interval * _KEEPALIVE_COUNT
        settings = {
            "tcp_keepalives_idle": str(keepalive_idle),
            "tcp_keepalives_interval": str(keepalive_interval),
            "tcp_keepalives_count": str(_KEEPALIVE_COUNT),
            # Bounds the same wait when the server has unacknowledged data in flight.
            "tcp_user_timeout": str(silence_s * 1000),
            "application_name": self._application_name,
        }
        try:
            conn: _Connection = await asyncpg.connect(
                self._dsn,
                timeout=max(self._interval_s, _CONNECT_TIMEOUT_S),
                server_settings=settings,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if not self._connect_failing:
                self._connect_failing = True
                log.warning(
                    "leader election cannot connect; retrying every interval",
                    extra={"lock_key": self._lock_key, "error": repr(exc)},
                )
            return None
        if self._connect_failing:
            self._connect_failing = False
            log.info("leader election connected again", extra={"lock_key": self._lock_key})
        return conn

    def _lose(self, reason: str) -> None:
        """Step down at once and drop the connection; contend again after one interval."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
            self._hold_back = True
        self._set_leader(False, reason)

    async def _release(self, conn: _Connection, was_leader: bool) -> None:
        try:
            if was_leader and not conn.is_closed():
                await conn.fetchval(
                    "SELECT pg_advisory_unlock($1)", self._lock_key, timeout=self._interval_s
                )
            await conn.close(timeout=self._interval_s)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            # Ending the session releases its locks just the same.
            conn.terminate()

    def _set_leader(self, leader: bool, reason: str) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self._leader_event.set()
        else:
            self._leader_event.clear()
        log.info(
            "leadership %s",
            "acquired" if leader else "lost",
            extra={"lock_key": self._lock_key, "reason": reason, "backend_pid": self.backend_pid},
        )
        _notify(self._on_change, leader)


def asyncpg_dsn(url: str) -> str:
    """asyncpg takes postgres:// or postgresql:// only, not SQLAlchemy's ``+driver`` forms."""
    parts = urlsplit(url)
    if "+" not in parts.scheme:
        return url
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def _notify(on_change: OnChange | None, leader: bool) -> None:
    if on_change is None:
        return
    try:
        on_change(leader)
    except Exception:
        log.exception("leadership on_change callback failed")
