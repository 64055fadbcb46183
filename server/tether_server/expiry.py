"""The expiry loop: turns passed deadlines into EXPIRED events within a bounded delay.

Like etcd's lessor it works in bounded batches per tick and retries after a failed pass;
unlike a heap in memory it asks the store for the next deadline, so leases granted by other
replicas are expired too. It sleeps until that deadline, and a commit of this process that
creates an earlier one wakes it at once (``deadline_created``): no fixed tick. Replicas
running it at once split rows with SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from tether_server.clock import MICROS, Clock
from tether_server.domain.lease import Lease
from tether_server.store.leases import LeaseStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpiryConfig:
    batch_size: int = 500
    # Batches per tick before yielding to live traffic; the rest waits for the next tick.
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
    def __init__(self, store: LeaseStore, clock: Clock, config: ExpiryConfig | None = None):
        self._store = store
        self._clock = clock
        self._config = config or ExpiryConfig()
        self._task: asyncio.Task[None] | None = None
        # When the sleeping loop plans to look next, and how to wake it sooner.
        self._next_look_us: int | None = None
        self._poke = asyncio.Event()

    def deadline_created(self, deadline_us: int) -> None:
        """A commit of this process created a deadline: if it falls before the loop's next
        look, wake the loop now so it sleeps until that deadline instead (no polling)."""
        if self._next_look_us is None or deadline_us < self._next_look_us:
            self._poke.set()

    async def run_once(self) -> ExpiryPass:
        cfg = self._config
        result = ExpiryPass(sleep_s=cfg.max_interval_s)
        for _ in range(cfg.max_batches_per_tick):
            batch = await self._store.lease_expire_due(cfg.batch_size)
            result.expired.extend(batch.expired)
            if len(batch.expired) < cfg.batch_size:
                if batch.next_deadline_us is not None:
                    until = (batch.next_deadline_us - batch.now_us) / MICROS
                    # A deadline already past that this pass could not take is locked by
                    # another transaction (an acquire, another replica): do not spin on it.
                    floor = cfg.min_interval_s if until <= 0 else 0.0
                    result.sleep_s = min(cfg.max_interval_s, max(floor, until))
                return result
        result.backlog = True
        result.sleep_s = 0.0
        return result

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tether-expiry")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            # A pass is never cut off mid-transaction: on SQLite a BEGIN IMMEDIATE cancelled
            # on its way can leave the write lock held, and the next writer (deregistering
            # at shutdown) would wait out the whole busy timeout. stop() waits for the pass.
            current = asyncio.ensure_future(self.run_once())
            try:
                result = await asyncio.shield(current)
            except asyncio.CancelledError:
                await asyncio.wait([current])
                raise
            except Exception:
                log.exception("expiry pass failed; retrying")
                await asyncio.sleep(self._config.retry_after_error_s)
                continue
            if result.expired:
                log.info("expired leases", extra={"count": len(result.expired)})
            if result.backlog:
                # Let live traffic in before the next batch.
                await asyncio.sleep(0)
                continue
            self._poke.clear()
            self._next_look_us = self._clock.now_us() + round(result.sleep_s * MICROS)
            await _first_of(self._clock.sleep(result.sleep_s), self._poke.wait())
            self._next_look_us = None


async def _first_of(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
