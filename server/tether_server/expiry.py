"""Expiry: turns passed deadlines into EXPIRED events within a bounded delay.

Like etcd's lessor it works in bounded batches per pass and retries after a failed pass
(the runner's backoff); unlike a heap in memory it asks the store for the next deadline,
so leases granted by other replicas are expired too. It sleeps until that deadline, and a
commit of this process that creates an earlier one wakes it at once
(``deadline_created``): no fixed tick. Replicas running it at once split rows with
SKIP LOCKED, so it runs on every replica, not only on the leader.

Clock steps: when the store's clock is this process's clock (SQLite, or an injected one)
the loop guards it (clock_step.py): a forward step of the wall clock is held back, the
task woken, and the pass first moves every live deadline by the step (one transaction),
then lets the clock report the new time once that committed. No pass expires anything on
the stepped time before the deadlines moved. See docs/clock.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tether_server.clock import MICROS, Clock, GuardedClock
from tether_server.clock_step import DEFAULT_THRESHOLD_S, Look
from tether_server.domain.lease import Lease
from tether_server.runtime.runner import Runner, TaskSpec
from tether_server.store.batch import BatchResult
from tether_server.store.leases import LeaseStore, ShiftResult
from tether_server.store.leases.shift import committed_shifts

log = logging.getLogger(__name__)

TASK = "expiry"


@dataclass(frozen=True)
class ExpiryConfig:
    batch_size: int = 1000
    # Batches per pass before yielding to live traffic; the rest waits for the next pass.
    max_batches_per_tick: int = 10
    # Longest sleep between passes: bounds the delay for leases other replicas granted.
    max_interval_s: float = 1.0
    # Shortest sleep while overdue leases are locked by someone else.
    min_interval_s: float = 0.05
    retry_after_error_s: float = 1.0
    # A wall clock advancing more than the monotonic clock by over this between two looks
    # has stepped: live deadlines move by the step (docs/clock.md). 0 turns that off.
    clock_step_threshold_s: float = DEFAULT_THRESHOLD_S

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_batches_per_tick < 1:
            raise ValueError("batch_size and max_batches_per_tick must be positive")
        if self.max_interval_s <= 0 or self.retry_after_error_s <= 0:
            raise ValueError("intervals must be positive")
        if not math.isfinite(self.clock_step_threshold_s) or self.clock_step_threshold_s < 0:
            raise ValueError("clock_step_threshold_s must be a non-negative number")


@dataclass
class ExpiryPass:
    expired: list[Lease] = field(default_factory=list)
    # Seconds until the next known deadline (capped by max_interval_s).
    sleep_s: float = 0.0
    backlog: bool = False
    # The clock step this pass moved deadlines by, before expiring anything.
    shift: ShiftResult | None = None


class ExpiryLoop:
    """The expiry pass, and its task in a Runner (``attach``)."""

    def __init__(
        self,
        store: LeaseStore,
        clock: Clock,
        config: ExpiryConfig | None = None,
        on_lag: Callable[[float], None] | None = None,
        on_clock_step: Callable[[float], None] | None = None,
    ):
        self._store = store
        # Called with how late (seconds) after its deadline each expiry was recorded.
        self._on_lag = on_lag
        # Called with the size (seconds) of each clock step the deadlines moved by.
        self._on_clock_step = on_clock_step
        self._clock = clock
        self._config = config or ExpiryConfig()
        self._runner: Runner | None = None
        # When the sleeping task plans to look next (None while a pass runs), and the
        # earliest deadline created while a pass ran (it may have read the store before).
        self._next_look_us: int | None = None
        self._created_during_pass: int | None = None
        # The guarded clock (None: steps are not corrected, e.g. the database's clock), the
        # event loop its step listener wakes the task on, and shifts not yet committed.
        self._guarded: GuardedClock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shifts_in_flight = 0
        threshold_s = self._config.clock_step_threshold_s
        if isinstance(clock, GuardedClock) and threshold_s > 0:
            self._guarded = clock
            clock.guard_steps(round(threshold_s * MICROS), self._step_detected)
            store.db.after_commit(self._after_commit)

    def attach(self, runner: Runner) -> None:
        cfg = self._config
        runner.add(
            TaskSpec(
                TASK,
                self._task_pass,
                interval_s=cfg.max_interval_s,
                backoff_initial_s=cfg.retry_after_error_s,
                backoff_max_s=max(cfg.retry_after_error_s, 10.0),
            )
        )
        self._runner = runner
        with contextlib.suppress(RuntimeError):  # no loop yet: the first pass records it
            self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        if self._runner is not None:
            self._runner.start_task(TASK)

    async def stop(self) -> None:
        """Stop the background task (after the pass in progress); run_once still works."""
        if self._runner is not None:
            await self._runner.stop_task(TASK)

    def deadline_created(self, deadline_us: int) -> None:
        """A commit of this process created a deadline: if it falls before the task's next
        look, wake it now so it sleeps until that deadline instead (no polling)."""
        if self._runner is None:
            return
        if self._next_look_us is None:
            previous = self._created_during_pass
            self._created_during_pass = (
                deadline_us if previous is None else min(previous, deadline_us)
            )
        elif deadline_us < self._next_look_us:
            self._runner.wake(TASK)

    async def run_once(self) -> ExpiryPass:
        cfg = self._config
        result = ExpiryPass(sleep_s=cfg.max_interval_s)
        # Before expiring anything: until the deadlines moved the clock holds a step back.
        result.shift = await self._shift_for_clock_step()
        for _ in range(cfg.max_batches_per_tick):
            batch = await self._store.lease_expire_due(cfg.batch_size)
            result.expired.extend(batch.expired)
            if self._on_lag is not None:
                for lease in batch.expired:
                    self._on_lag(max(0, batch.now_us - lease.expires_at_us) / MICROS)
            if len(batch.expired) < cfg.batch_size:
                if batch.next_deadline_us is not None:
                    if batch.next_deadline_us <= batch.now_us:
                        # Due when this pass ran, yet not taken: locked by another
                        # transaction (an acquire, another replica). Do not spin on it.
                        result.sleep_s = cfg.min_interval_s
                    else:
                        # Counted from now, not from the pass's start: the pass took time.
                        # The clock is the store's (the database's, on PostgreSQL).
                        now_us = max(batch.now_us, self._clock.now_us())
                        until = max(0.0, (batch.next_deadline_us - now_us) / MICROS)
                        result.sleep_s = min(cfg.max_interval_s, until)
                return result
        result.backlog = True
        result.sleep_s = 0.0
        return result

    async def _task_pass(self) -> float:
        self._loop = asyncio.get_running_loop()
        self._next_look_us = None
        self._created_during_pass = None
        result = await self.run_once()
        if result.expired:
            log.info("expired leases", extra={"count": len(result.expired)})
        if result.backlog:
            return 0.0  # the runner yields to live traffic, then goes on
        now = self._clock.now_us()
        sleep_s = result.sleep_s
        if self._created_during_pass is not None:
            # A grant committed during the pass may not have been seen by its read.
            sleep_s = min(sleep_s, max(1e-6, (self._created_during_pass - now) / MICROS))
        self._next_look_us = now + round(sleep_s * MICROS)
        return sleep_s

    # ---- clock steps ----------------------------------------------------------------

    async def _shift_for_clock_step(self) -> ShiftResult | None:
        clock = self._guarded
        if clock is None:
            return None
        step_us = clock.claim_step()
        if step_us <= 0:
            return None
        self._shifts_in_flight += 1
        try:
            shift = await self._store.lease_shift_deadlines(step_us)
        except Exception:
            # Not committed: the clock keeps holding the step back for the next pass. (A
            # cancelled caller leaves the shift in flight: its batch may still commit.)
            self._shifts_in_flight -= 1
            clock.release_step(step_us)
            raise
        log.warning(
            "moved live lease deadlines by a wall-clock step",
            extra={
                "step_s": step_us / MICROS,
                "leases": shift.leases,
                "lock_delays": shift.keys,
            },
        )
        if self._on_clock_step is not None:
            self._on_clock_step(step_us / MICROS)
        return shift

    def _after_commit(self, result: BatchResult) -> None:
        """The clock reports the stepped time only once the moved deadlines committed, and
        before the next batch runs (hooks run first)."""
        if self._shifts_in_flight <= 0 or self._guarded is None:
            return
        for shift in committed_shifts(result):
            self._shifts_in_flight -= 1
            self._guarded.accept_step(shift.step_us)

    def _step_detected(self, look: Look) -> None:
        """Called by the clock, from whatever thread read it."""
        if look.backward_us:
            log.warning(
                "wall clock stepped backwards; not corrected: deadlines last longer by it",
                extra={"step_s": look.backward_us / MICROS},
            )
        if not look.forward_us:
            return
        log.warning(
            "wall clock stepped forward; holding it back until lease deadlines move",
            extra={"step_s": look.forward_us / MICROS},
        )
        loop = self._loop
        if loop is not None and self._runner is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to wake
                loop.call_soon_threadsafe(self._runner.wake, TASK)
