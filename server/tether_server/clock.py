"""One injectable time source for the whole server.

Stored times are integer microseconds since the Unix epoch (UTC), the same on SQLite and
PostgreSQL. Tests inject a FakeClock and advance it instead of sleeping. With PostgreSQL
and the system clock, the store asks the database for ``now`` so replicas whose clocks
drift still agree on deadlines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Protocol

MICROS = 1_000_000


class Clock(Protocol):
    def now_us(self) -> int:
        """Wall-clock time in microseconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep in this clock's time; a fake clock wakes sleepers when advanced."""
        ...

    @property
    def authoritative(self) -> bool:
        """False when the store should prefer the database clock (PostgreSQL)."""
        ...


class SystemClock:
    authoritative = False

    def now_us(self) -> int:
        return time.time_ns() // 1000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when a test advances it."""

    authoritative = True

    def __init__(self, start_us: int = 1_700_000_000 * MICROS) -> None:
        self._now = start_us
        self._changed = asyncio.Event()

    def now_us(self) -> int:
        return self._now

    def advance(self, seconds: float) -> None:
        self.set(self._now + round(seconds * MICROS))

    def set(self, now_us: int) -> None:
        if now_us < self._now:
            raise ValueError("a FakeClock never goes backwards")
        self._now = now_us
        # Wake every sleeper so each re-checks its own deadline.
        self._changed.set()
        self._changed = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        wake_at = self._now + round(seconds * MICROS)
        while self._now < wake_at:
            await self._changed.wait()


class FileClock:
    """Reads the time from a file holding microseconds since the epoch.

    Lets a test drive the clock of a server running in another process (restart tests)
    without sleeping. Sleeps are real but short, re-reading the file each time.
    """

    authoritative = True
    POLL_SECONDS = 0.02

    def __init__(self, path: Path) -> None:
        self._path = path

    def now_us(self) -> int:
        return int(self._path.read_text().strip())

    async def sleep(self, seconds: float) -> None:
        wake_at = self.now_us() + round(seconds * MICROS)
        while self.now_us() < wake_at:  # noqa: ASYNC110 - another process moves this clock
            await asyncio.sleep(self.POLL_SECONDS)


def clock_from_spec(spec: str) -> Clock:
    """``system`` (default) or ``file:PATH`` (tests driving a server process)."""
    if spec in ("", "system"):
        return SystemClock()
    if spec.startswith("file:"):
        return FileClock(Path(spec.removeprefix("file:")))
    raise ValueError(f"unknown clock {spec!r}: use 'system' or 'file:PATH'")
