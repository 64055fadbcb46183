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
import random
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


async def sleep_or_wake(clock: Clock, seconds: float, *wake: asyncio.Event) -> bool:
    """Sleep ``seconds`` on ``clock``, or less if one of ``wake`` is set first.

    True when woken by an event (also when one is already set), False when the time passed.
    The one way this client waits for "a deadline or something happening".
    """
    if any(event.is_set() for event in wake):
        return True
    if seconds <= 0:
        await asyncio.sleep(0)
        return any(event.is_set() for event in wake)
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waiters = [asyncio.ensure_future(event.wait()) for event in wake]
    try:
        await asyncio.wait({sleeper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        for waiter in waiters:
            waiter.cancel()
    return any(event.is_set() for event in wake)


def backoff(attempt: int, initial: float, cap: float) -> float:
    """The delay before retry ``attempt`` (1 = first): ``initial * 2**(attempt-1)``, capped
    at ``cap``, half of it fixed and half random ("equal jitter"). The random half keeps
    clients from retrying in step; the fixed half bounds how often anyone retries, so an
    outage of a given length sees a bounded number of attempts. Every retry, reconnect and
    poll of this client waits this long."""
    high = min(cap, initial * 2.0 ** min(max(attempt, 1) - 1, 60))
    return high / 2 + random.uniform(0, high / 2)
