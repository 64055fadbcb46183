"""One injectable time source for the whole server.

Stored times are integer microseconds since the Unix epoch (UTC), the same on SQLite and
PostgreSQL. Tests inject a FakeClock and advance it instead of sleeping. With PostgreSQL
and the system clock, the store asks the database for ``now`` so replicas whose clocks
drift still agree on deadlines.

A clock with a monotonic reference (SystemClock, FakeClock) can be *guarded*
(``guard_steps``): a forward step of its wall clock is then held back until the store has
moved live deadlines by it (see clock_step.py and docs/clock.md). The expiry loop guards the
store's clock when that clock is the process's (SQLite, or an injected clock).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tether_server.clock_step import Look, StepGuard

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


StepListener = Callable[[Look], None]


class GuardedClock:
    """The step guard of a clock that reads a wall and a monotonic time (``_readings``).

    Unguarded (the default) ``now_us`` is the wall clock. Readings come from any thread
    (the SQLite writer and readers too), hence the lock; listeners are called outside it.
    """

    def __init__(self) -> None:
        self._guard: StepGuard | None = None
        self._guard_lock = threading.Lock()
        self._step_listeners: list[StepListener] = []

    def _readings(self) -> tuple[int, int]:
        """(wall, monotonic) microseconds."""
        raise NotImplementedError

    def now_us(self) -> int:
        wall, mono = self._readings()
        if self._guard is None:
            return wall
        with self._guard_lock:
            look = self._guard.look(wall, mono)
        if look.forward_us or look.backward_us:
            for listener in list(self._step_listeners):
                listener(look)
        return look.now_us

    def guard_steps(self, threshold_us: int, listener: StepListener | None = None) -> None:
        """Hold forward steps of the wall clock back (see clock_step.py); ``listener`` is
        called, from the reading thread, with each look that detected a step. Guarding
        again keeps the guard (and its pending step) and adds the listener."""
        with self._guard_lock:
            if self._guard is None:
                self._guard = StepGuard(threshold_us)
                self._guard.look(*self._readings())
            if listener is not None:
                self._step_listeners.append(listener)

    @property
    def step_guarded(self) -> bool:
        return self._guard is not None

    def pending_step_us(self) -> int:
        with self._guard_lock:
            return 0 if self._guard is None else self._guard.pending_us

    def claim_step(self) -> int:
        """Look at the clocks, then claim the step not yet corrected (see StepGuard)."""
        self.now_us()
        with self._guard_lock:
            return 0 if self._guard is None else self._guard.claim()

    def accept_step(self, step_us: int) -> None:
        with self._guard_lock:
            if self._guard is not None:
                self._guard.accept(step_us)

    def release_step(self, step_us: int) -> None:
        with self._guard_lock:
            if self._guard is not None:
                self._guard.release(step_us)


class SystemClock(GuardedClock):
    authoritative = False

    def _readings(self) -> tuple[int, int]:
        return time.time_ns() // 1000, time.monotonic_ns() // 1000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock(GuardedClock):
    """A clock that moves only when a test advances it.

    It has a monotonic time too: ``advance`` and ``set`` move both, ``step_wall`` moves
    only the wall clock (an NTP step, a resumed VM). Sleeps count monotonic time, as
    ``asyncio.sleep`` does for the SystemClock.
    """

    authoritative = True

    def __init__(self, start_us: int = 1_700_000_000 * MICROS) -> None:
        super().__init__()
        self._now = start_us
        self._mono = 0
        self._changed = asyncio.Event()

    def _readings(self) -> tuple[int, int]:
        return self._now, self._mono

    def advance(self, seconds: float) -> None:
        self.set(self._now + round(seconds * MICROS))

    def set(self, now_us: int) -> None:
        if now_us < self._now:
            raise ValueError("a FakeClock never goes backwards")
        self._mono += now_us - self._now
        self._now = now_us
        # Wake every sleeper so each re-checks its own deadline.
        self._changed.set()
        self._changed = asyncio.Event()

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock alone (either way); a guarded clock notices it at once."""
        self._now += round(seconds * MICROS)
        self.now_us()

    async def sleep(self, seconds: float) -> None:
        wake_at = self._mono + round(seconds * MICROS)
        while self._mono < wake_at:
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
