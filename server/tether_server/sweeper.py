"""The sweep: runs the parts of domain/sweep.py against the store and writes the report.

Every write is one short transaction of a bounded batch that re-checks, under its row
locks, the condition it selected on (store/sweeps), so a sweep that dies halfway leaves
each row untouched or fully moved, the next sweep finishes the job, and two sweeps at
once (a leader that has not yet noticed it lost the lock) never apply anything twice.
Purges pause between batches so live writes get the store in between. A part that fails
is recorded in the report and the others still run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from tether_server.clock import MICROS, Clock
from tether_server.domain.object_validation import new_uid
from tether_server.domain.objects import Obj
from tether_server.domain.sweep import (
    BlockedObject,
    CollectorFailure,
    SweepConfig,
    SweepLimits,
    SweepPart,
    SweepReport,
    SweepTrigger,
    choose_parts,
    next_batch_size,
    saga_outcome,
)
from tether_server.expiry import ExpiryLoop
from tether_server.metrics import Metrics
from tether_server.store.objects import ObjectStore
from tether_server.store.sweeps import SweepStore

log = logging.getLogger(__name__)

# (namespace, cutoff_us, limit) -> rows purged per table; (namespace, cutoff_us) -> to purge.
PurgeBatch = Callable[[str, int, int], Awaitable[dict[str, int]]]
PurgeCount = Callable[[str, int], Awaitable[dict[str, int]]]


class Sweeper:
    def __init__(
        self,
        store: SweepStore,
        objects: ObjectStore,
        expiry: ExpiryLoop,
        clock: Clock,
        config: SweepConfig,
        metrics: Metrics,
        replica: Callable[[], str],
    ) -> None:
        self._store = store
        self._objects = objects
        self._expiry = expiry
        self._clock = clock
        self._config = config
        self._metrics = metrics
        self._replica = replica
        self._parts: dict[SweepPart, Callable[[SweepReport], Awaitable[int]]] = {
            SweepPart.EXPIRE_LEASES: self._expire_leases,
            SweepPart.STALE_SAGAS: self._settle_sagas,
            SweepPart.COLLECT_GARBAGE: self._collect_garbage,
            SweepPart.BLOCKED_OBJECTS: self._blocked_objects,
        }
        retention = config.retention
        for part, retention_s, purge, count in (
            (
                SweepPart.PURGE_LEASES,
                retention.ended_leases_s,
                store.purge_leases,
                store.count_leases,
            ),
            (
                SweepPart.PURGE_SAGAS,
                retention.terminal_sagas_s,
                store.purge_sagas,
                store.count_sagas,
            ),
            (SweepPart.PURGE_EVENTS, retention.events_s, store.purge_events, store.count_events),
            (
                SweepPart.PURGE_REPORTS,
                retention.reports_s,
                store.purge_reports,
                store.count_reports,
            ),
        ):
            self._parts[part] = functools.partial(
                self._purge, retention_s=retention_s, purge=purge, count=count
            )

    @property
    def _limits(self) -> SweepLimits:
        return self._config.limits

    async def run(
        self,
        trigger: SweepTrigger,
        *,
        parts: Sequence[SweepPart] = (),
        namespace: str = "",
        dry_run: bool = False,
    ) -> SweepReport:
        chosen = choose_parts(parts, namespace)
        now = self._clock.now_us()
        report = SweepReport(
            sweep_id=new_uid(now // 1000),
            trigger=trigger,
            dry_run=dry_run,
            replica=self._replica(),
            namespace=namespace,
            parts=chosen,
            started_at_us=now,
        )
        for part in chosen:
            try:
                report.backlog += await self._parts[part](report)
            except Exception as exc:  # recorded; the other parts still run
                log.exception("sweep part failed", extra={"part": part.value})
                report.failures.append(f"{part.value}: {type(exc).__name__}: {exc}")
        report.finished_at_us = max(report.started_at_us, self._clock.now_us())
        try:
            await self._store.save_report(report)
        except Exception as exc:  # the work is done: say the report is unsaved
            log.exception("sweep report not saved")
            report.failures.append(f"report: {type(exc).__name__}: {exc}")
        self._record(report)
        return report

    def _record(self, report: SweepReport) -> None:
        summary = report.summary()
        if report.backlog > self._limits.backlog_warning:
            log.warning("sweep left a backlog: a crash storm?", extra=summary)
        elif report.failures:
            log.warning("sweep done with failures", extra={**summary, "errors": report.failures})
        else:
            log.info("sweep done", extra=summary)
        if report.dry_run:
            return
        self._metrics.sweep(
            report.trigger.value,
            not report.failures,
            report.actions(),
            dict(report.rows_purged),
            backlog=report.backlog,
            blocked=report.blocked_total,
            seconds=(report.finished_at_us - report.started_at_us) / MICROS,
            finished_s=report.finished_at_us / MICROS,
        )

    # ---- reconciliation ------------------------------------------------------------------
    # Each part returns the work it left for the next sweep (its backlog).

    async def _expire_leases(self, report: SweepReport) -> int:
        if report.dry_run:
            report.leases_expired = await self._store.count_due_leases(report.namespace)
            return 0
        # The expiry task's own pass (global: it is what that task would do anyway).
        for _ in range(self._limits.max_batches):
            done = await self._expiry.run_once()
            report.leases_expired += len(done.expired)
            if not done.backlog:
                return 0
        return await self._store.count_due_leases(report.namespace)

    async def _settle_sagas(self, report: SweepReport) -> int:
        limits = self._limits
        if report.dry_run:
            # One read of up to ten batches' worth, decided but not written.
            planned = await self._store.settle_sagas(
                report.namespace, limits.batch_size * min(10, limits.max_batches), dry_run=True
            )
            for before, after in planned:
                report.count_saga(saga_outcome(before, after))
            return max(0, await self._store.count_due_sagas(report.namespace) - len(planned))
        for _ in range(limits.max_batches):
            settled = await self._store.settle_sagas(
                report.namespace, limits.batch_size, dry_run=False
            )
            for before, after in settled:
                report.count_saga(saga_outcome(before, after))
            if len(settled) < limits.batch_size:
                return 0
        return await self._store.count_due_sagas(report.namespace)

    async def _collect_garbage(self, report: SweepReport) -> int:
        left = 0
        if report.dry_run:
            report.objects_collected = await self._store.count_queued_dependents(report.namespace)
        else:
            # The collector's own pass (global, like its task), until a pass finds nothing
            # due: a pass's own backlog flag cannot see the work its last transaction
            # queued (a foreground owner marking its dependents), parked and backed-off
            # items are not due, and max_batches bounds it all.
            for _ in range(self._limits.max_batches):
                done = await self._objects.collect()
                report.objects_collected += done.deleted
                report.objects_orphaned += done.orphaned
                if not done.items:
                    break
        state = await self._objects.collector_state()
        report.gc_queue_depth = state.stats.depth
        report.collector_failures = [
            CollectorFailure(f.namespace, f.uid, f.attempts, f.last_error, f.next_attempt_us)
            for f in state.failing
        ]
        if not report.dry_run:
            left = state.stats.depth
        return left

    async def _blocked_objects(self, report: SweepReport) -> int:
        now = self._clock.now_us()
        cutoff = now - round(self._limits.blocked_after_s * MICROS)
        found, total = await self._store.terminating_since(
            report.namespace, cutoff, self._limits.max_blocked_listed
        )
        report.blocked = [_blocked(obj, now) for obj in found]
        report.blocked_total = total
        return 0

    # ---- purges ----------------------------------------------------------------------------

    def _cutoff(self, retention_s: float) -> int | None:
        if retention_s <= 0:
            return None  # kept forever
        return self._clock.now_us() - round(retention_s * MICROS)

    async def _batches(self, purge_batch: Callable[[int], Awaitable[int]]) -> bool:
        """Run batches (each given its size) until one comes back short; False if
        max_batches ran out first. Sizes follow the time target (next_batch_size)."""
        limits = self._limits
        size = limits.batch_size
        for index in range(limits.max_batches):
            if index and limits.pause_s:
                # Real time, not the injected clock: this only lets live traffic in.
                await asyncio.sleep(limits.pause_s)
            started = time.monotonic()
            if await purge_batch(size) < size:
                return True
            size = next_batch_size(size, time.monotonic() - started, limits)
        return False

    async def _purge(
        self, report: SweepReport, retention_s: float, purge: PurgeBatch, count: PurgeCount
    ) -> int:
        """One kind's retention: batches until done (or max_batches); a dry run counts.
        Rows come back per table, the kind's own table first (it drives the batches)."""
        cutoff = self._cutoff(retention_s)
        if cutoff is None:
            return 0
        ns = report.namespace
        if report.dry_run:
            report.purged_rows(await count(ns, cutoff))
            return 0

        async def batch(size: int) -> int:
            done = await purge(ns, cutoff, size)
            report.purged_rows(done)
            return next(iter(done.values()))

        if await self._batches(batch):
            return 0
        return next(iter((await count(ns, cutoff)).values()))

    # ---- the periodic task -----------------------------------------------------------------

    def next_delay_s(self, last_started_us: int | None, now_us: int) -> float:
        """Seconds until the next periodic sweep is due: one interval (with jitter) after
        the last one any replica ran, so a new leader does not sweep again at once. The
        jitter is drawn from the last sweep's start, so every look (and every replica)
        agrees on when it is due."""
        if last_started_us is None:
            return 0.0
        cfg = self._config
        draw = random.Random(last_started_us).random()
        interval = cfg.interval_s * (1 + cfg.jitter * (2 * draw - 1))
        return max(0.0, interval - (now_us - last_started_us) / MICROS)


def _blocked(obj: Obj, now_us: int) -> BlockedObject:
    deleted_at = obj.deletion_ts_us or now_us
    latest = max(obj.refusals, key=lambda r: r.recorded_at_us, default=None)
    return BlockedObject(
        namespace=obj.namespace,
        kind=obj.kind,
        name=obj.name,
        uid=obj.uid,
        finalizers=tuple(obj.finalizers),
        reason=latest.reason if latest is not None else "",
        deletion_ts_us=deleted_at,
        age_us=max(0, now_us - deleted_at),
    )
