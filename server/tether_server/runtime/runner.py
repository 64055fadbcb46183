"""One runner for the server's background work (expiry, heartbeats, reaping, sweeps).

Each task used to be its own ad-hoc loop with its own idea of retries, shutdown and
timing. The runner gives every task the same rules:

- one asyncio task per TaskSpec, so a slow pass of one never delays another;
- a pass is never cancelled mid-way: ``stop()`` lets the current pass finish and only
  then ends the task. On SQLite a BEGIN IMMEDIATE cancelled on its way can keep the write
  lock, and the next writer would wait out the whole busy timeout (see expiry.py);
- after a failure: one log record, ``on_run(name, False, seconds)``, then exponential
  backoff with jitter (so replicas that failed together do not retry together), reset by
  the next success;
- every sleep goes through the injected Clock, so tests advance a FakeClock instead of
  sleeping, and ``run_once`` runs a pass directly without waiting for a tick;
- leader-only tasks run only while ``Leadership.is_leader`` and otherwise wait on
  ``wait_leader()`` instead of polling.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tether_server.clock import MICROS, Clock
from tether_server.runtime.leader import Leadership

log = logging.getLogger(__name__)

OnRun = Callable[[str, bool, float], None]

# 2**60 times any sane initial backoff is far beyond any maximum; a bigger exponent would
# only risk an OverflowError in the float conversion after a very long outage.
_MAX_BACKOFF_EXPONENT = 60


@dataclass(frozen=True)
class TaskSpec:
    """One kind of background work.

    ``run`` performs one pass and returns the seconds until it wants to run again, or None
    for ``interval_s``. Returning 0 (or less) means "there is a backlog": the runner yields
    to the event loop, so live traffic gets in, and runs the next pass straight away.
    """

    name: str
    run: Callable[[], Awaitable[float | None]]
    interval_s: float
    leader_only: bool = False
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a task needs a name (it appears in logs and metrics)")
        for label, value in (
            ("interval_s", self.interval_s),
            ("backoff_initial_s", self.backoff_initial_s),
            ("backoff_max_s", self.backoff_max_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must not be smaller than backoff_initial_s")

    def backoff_s(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Delay after ``failures`` consecutive failed passes (1 for the first).

        The base doubles from ``backoff_initial_s`` up to ``backoff_max_s``; the delay is a
        random point in the upper half of the base ("equal jitter") but never below
        ``backoff_initial_s``. So the delay always lies in [initial, max], the ranges of
        successive failures do not overlap (the backoff visibly grows), and replicas that
        failed at the same moment (a database restart) spread their retries.
        """
        exponent = min(max(failures, 1) - 1, _MAX_BACKOFF_EXPONENT)
        base = min(self.backoff_max_s, self.backoff_initial_s * 2.0**exponent)
        return max(self.backoff_initial_s, base * (0.5 + 0.5 * rand()))


@dataclass
class _TaskState:
    spec: TaskSpec
    # Set by wake(); cleared when a pass starts, so a wake during a pass is not lost.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Passes of one task never overlap, whether the loop or run_once started them.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    failures: int = 0


class Runner:
    """Runs TaskSpecs in the background; see the module docstring for the rules.

    ``on_run(name, ok, seconds)`` is called after every background pass with the pass's
    duration in real (monotonic) seconds: the injected clock schedules passes, but a
    FakeClock does not move while a pass runs, so it cannot time one. Exceptions from
    ``on_run`` are logged and otherwise ignored: metrics must not stop the work.

    Stop the runner before the Leadership it uses, so no leader-only pass is running when
    leadership is released.
    """

    def __init__(self, clock: Clock, leader: Leadership, on_run: OnRun | None = None) -> None:
        self._clock = clock
        self._leader = leader
        self._on_run = on_run
        self._states: dict[str, _TaskState] = {}
        self._started = False

    def add(self, spec: TaskSpec) -> None:
        """Register a task; if the runner is already started, the task starts now."""
        if spec.name in self._states:
            raise ValueError(f"a task named {spec.name!r} is already registered")
        state = _TaskState(spec)
        self._states[spec.name] = state
        if self._started:
            self._spawn(state)

    def start(self) -> None:
        """Start one asyncio task per registered task; calling it again does nothing."""
        if self._started:
            return
        self._started = True
        for state in self._states.values():
            self._spawn(state)

    async def stop(self) -> None:
        """End every task, letting each finish the pass it is in; safe to call twice.

        A pass that never returns keeps stop() waiting: bound it from outside with a
        timeout if needed. Cancelling stop() then ends the tasks without waiting, but still
        never cancels the pass itself.
        """
        self._started = False
        tasks = [s.task for s in self._states.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for state in self._states.values():
            if state.task is not None and state.task.done():
                state.task = None
        for result in results:
            if isinstance(result, Exception):
                log.error("background task ended with an error", exc_info=result)

    def start_task(self, name: str) -> None:
        """Start one task (again) once the runner is started; a no-op if it runs."""
        if self._started:
            self._spawn(self._states[name])

    async def stop_task(self, name: str) -> None:
        """End one task, letting the pass it is in finish (tests that drive a task's
        passes themselves, and components that stop before the rest)."""
        state = self._states[name]
        task, state.task = state.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def wake(self, name: str) -> None:
        """Run ``name`` now instead of sleeping out its timer.

        If a pass is in progress, the next one starts as soon as it ends. Used when a
        write creates a deadline earlier than the one the task is sleeping towards.
        """
        self._states[name].wake.set()

    async def run_once(self, name: str) -> float | None:
        """Run one pass of ``name`` right now and return what it returned.

        For tests and tools: no timer, no leadership check, no backoff and no ``on_run``;
        an exception from the pass propagates. It still waits for a background pass of
        the same task to end first, and is not cancelled mid-pass either.
        """
        state = self._states[name]
        return await self._shielded_pass(state)

    def _spawn(self, state: _TaskState) -> None:
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(
                self._loop(state), name=f"tether-task-{state.spec.name}"
            )

    async def _pass(self, state: _TaskState) -> float | None:
        async with state.lock:
            return await state.spec.run()

    async def _shielded_pass(self, state: _TaskState) -> float | None:
        """One pass in its own asyncio task, which a cancellation of ours does not reach."""
        current = asyncio.ensure_future(self._pass(state))
        try:
            return await asyncio.shield(current)
        except asyncio.CancelledError:
            await asyncio.wait([current])
            if not current.cancelled() and current.exception() is not None:
                log.error(
                    "background pass failed while stopping",
                    extra={"task": state.spec.name},
                    exc_info=current.exception(),
                )
            raise

    async def _loop(self, state: _TaskState) -> None:
        spec = state.spec
        while True:
            while spec.leader_only and not self._leader.is_leader:
                await self._leader.wait_leader()
            state.wake.clear()
            started = time.monotonic()
            try:
                result = await self._shielded_pass(state)
            except Exception:
                elapsed = time.monotonic() - started
                state.failures += 1
                delay = spec.backoff_s(state.failures)
                log.exception(
                    "background task failed",
                    extra={"task": spec.name, "failures": state.failures, "retry_in_s": delay},
                )
                await self._sleep(state, self._deadline(delay), delay, ok=False, elapsed=elapsed)
                continue
            elapsed = time.monotonic() - started
            if state.failures:
                log.info(
                    "background task recovered",
                    extra={"task": spec.name, "failures": state.failures},
                )
                state.failures = 0
            if result is not None and result <= 0:
                self._report(spec.name, True, elapsed)
                # A backlog: let live traffic in, then go on.
                await asyncio.sleep(0)
                continue
            delay = spec.interval_s if result is None else result
            await self._sleep(state, self._deadline(delay), delay, ok=True, elapsed=elapsed)

    def _deadline(self, delay_s: float) -> int:
        """Fix the next run time as soon as a pass ends.

        The sleep itself starts a little later, in a task of its own; measuring from here
        means a FakeClock advanced in between (a test that saw the pass end) is not lost.
        """
        return self._clock.now_us() + round(delay_s * MICROS)

    async def _sleep(
        self, state: _TaskState, deadline_us: int, delay_s: float, *, ok: bool, elapsed: float
    ) -> None:
        """Report the pass, then sleep until the deadline or until wake()."""
        self._report(state.spec.name, ok, elapsed)
        if state.wake.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep_until(deadline_us, delay_s))
        waker = asyncio.ensure_future(state.wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _sleep_until(self, deadline_us: int, longest_s: float) -> None:
        # Never longer than the delay asked for, so a wall clock stepped backwards (the
        # system clock is wall time) cannot stretch a sleep.
        remaining = min(longest_s, (deadline_us - self._clock.now_us()) / MICROS)
        if remaining > 0:
            await self._clock.sleep(remaining)

    def _report(self, name: str, ok: bool, seconds: float) -> None:
        if self._on_run is None:
            return
        try:
            self._on_run(name, ok, seconds)
        except Exception:
            log.exception("on_run callback failed", extra={"task": name})
