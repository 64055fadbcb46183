"""Expiry: turns passed deadlines into EXPIRED events within a bounded delay.

Like etcd's lessor it works in bounded batches per pass and retries after a failed pass
(the runner's backoff); unlike a heap in memory it asks the store for the next deadline,
so leases granted by other replicas are expired too. It sleeps until that deadline, and a
commit of this process that creates an earlier one wakes it at once
(``deadline_created``): no fixed tick. Replicas running it at once split rows with
SKIP LOCKED, so it runs on every replica, not only on the leader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tether_server.clock import MICROS, Clock
from tether_server.domain.lease import Lease
from tether_server.runtime.runner import Runner, TaskSpec
from tether_server.store.leases import LeaseStore

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

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_batches_per_tick < 1:
            raise ValueError("batch_size and max_batches_per_tick must be positive")
        if self.max_interval_s <= 0 or self.retry_after_error_s <= 0:
            raise ValueError("intervals must be positive")


@dataclass
class ExpiryPass:
    expired: list[Lease] = field(default_factory=list)
    # Seconds until the next known deadline (capped by max_interval_s).
    sleep_s: float = 0.0
    backlog: bool = False


class ExpiryLoop:
    """The expiry pass, and its task in a Runner (``attach``)."""

    def __init__(
        self,
        store: LeaseStore,
        clock: Clock,
        config: ExpiryConfig | None = None,
        on_lag: Callable[[float], None] | None = None,
    ):
        self._store = store
        # Called with how late (seconds) after its deadline each expiry was recorded.
        self._on_lag = on_lag
        self._clock = clock
        self._config = config or ExpiryConfig()
        self._runner: Runner | None = None
        # When the sleeping task plans to look next (None while a pass runs), and the
        # earliest deadline created while a pass ran (it may have read the store before).
        self._next_look_us: int | None = None
        self._created_during_pass: int | None = None

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
