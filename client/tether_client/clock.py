"""The client's own time: a monotonic clock and sleeping on it, injectable for tests.

The lease keeper decides everything about time (when to renew, when a lease is lost, how
long to back off) from a :class:`Clock`. ``SystemClock`` is ``time.monotonic`` and
``asyncio.sleep``. ``ManualClock`` moves only when told to, so a test (yours or ours) can
walk a lease past its safety deadline without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``monotonic()`` has moved ``seconds`` on."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only on :meth:`advance`; sleepers wake when their time comes."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move the clock on and wake every sleeper whose time has come."""
        if seconds < 0:
            raise ValueError("a ManualClock never goes backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting (lets a test know a task reached its sleep)."""
        return sum(1 for _, _, future in self._sleepers if not future.done())
