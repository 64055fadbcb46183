"""Sweeps, pure: which parts run, what a settled saga counts as, and the report.

A sweep is a list of parts. Reconciliations put crash residue back on a path to
completion or cleanup (each write is guarded by the condition it selected on, in the same
locked transaction); purges apply retention in bounded batches. The report says what each
part did (or, for a dry run, would do).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from tether_server.domain import errors
from tether_server.domain.saga import Saga, SagaState


class SweepPart(StrEnum):
    EXPIRE_LEASES = "expire-leases"
    STALE_SAGAS = "stale-sagas"
    COLLECT_GARBAGE = "collect-garbage"
    BLOCKED_OBJECTS = "blocked-objects"
    PURGE_LEASES = "purge-leases"
    PURGE_SAGAS = "purge-sagas"
    PURGE_EVENTS = "purge-events"
    PURGE_REPORTS = "purge-reports"


class SweepTrigger(StrEnum):
    STARTUP = "startup"
    PERIODIC = "periodic"
    ON_DEMAND = "on-demand"


# The order parts run in: reconcile, purge (a purged saga queues what it owned), then
# collect (what expiries and purges queued) and last list what is still blocked.
ALL_PARTS = (
    SweepPart.EXPIRE_LEASES,
    SweepPart.STALE_SAGAS,
    SweepPart.PURGE_LEASES,
    SweepPart.PURGE_SAGAS,
    SweepPart.PURGE_EVENTS,
    SweepPart.PURGE_REPORTS,
    SweepPart.COLLECT_GARBAGE,
    SweepPart.BLOCKED_OBJECTS,
)
# What the recovery sweep at start runs: reconciliation only (purges wait for the leader).
RECOVERY_PARTS = (
    SweepPart.EXPIRE_LEASES,
    SweepPart.STALE_SAGAS,
    SweepPart.COLLECT_GARBAGE,
    SweepPart.BLOCKED_OBJECTS,
)
# Global by nature: the event log has one compacted revision; reports have no namespace.
GLOBAL_PARTS = frozenset({SweepPart.PURGE_EVENTS, SweepPart.PURGE_REPORTS})


def choose_parts(requested: Sequence[SweepPart], namespace: str) -> tuple[SweepPart, ...]:
    """The parts to run, in their fixed order (ALL_PARTS)."""
    if not requested:
        return tuple(p for p in ALL_PARTS if not (namespace and p in GLOBAL_PARTS))
    wanted = set(requested)
    if namespace:
        refused = sorted(p.value for p in wanted & GLOBAL_PARTS)
        if refused:
            raise errors.InvalidField(
                "parts",
                f"{', '.join(refused)} cannot be limited to a namespace (the event log and the"
                " sweep reports are global); leave namespace empty to run them",
            )
    return tuple(p for p in ALL_PARTS if p in wanted)


class SagaOutcome(StrEnum):
    REQUEUED = "requeued"
    COMPENSATING = "compensating"
    FAILED = "failed"
    QUARANTINED = "quarantined"


def saga_outcome(before: Saga, after: Saga) -> SagaOutcome:
    """What settling a stale or overdue saga did to it, for the report."""
    if after.state is SagaState.QUARANTINED:
        return SagaOutcome.QUARANTINED
    if after.state is SagaState.FAILED:
        return SagaOutcome.FAILED
    if after.state is SagaState.COMPENSATING and before.state is not SagaState.COMPENSATING:
        return SagaOutcome.COMPENSATING
    # Its claim ended and nothing else changed: claimable again (for execution, or for
    # compensation if it was compensating).
    return SagaOutcome.REQUEUED


@dataclass(frozen=True)
class Retention:
    """How long ended rows are kept (seconds). 0 keeps them forever."""

    ended_leases_s: float = 24 * 3600.0
    terminal_sagas_s: float = 7 * 24 * 3600.0
    events_s: float = 24 * 3600.0
    reports_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ValueError(f"retention {name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class SweepLimits:
    # Rows per reconciliation transaction, and the most per purge transaction.
    batch_size: int = 1000
    # A purge transaction aims to take this long (real seconds): its batch shrinks or
    # grows (down to min_batch_size, up to batch_size) to fit, so a heartbeat queued behind
    # it (every write of a process shares one committer; on SQLite, the whole store) never
    # waits much longer. 0: fixed batches.
    batch_target_s: float = 0.025
    min_batch_size: int = 50
    # Real seconds between purge batches: live writes get the store in between.
    pause_s: float = 0.01
    # Batches per part per sweep; what is left is the backlog for the next sweep.
    max_batches: int = 10_000
    # An object terminating longer than this is reported as blocked.
    blocked_after_s: float = 3600.0
    # Blocked objects listed in one report (all are counted).
    max_blocked_listed: int = 100
    # A backlog above this after a sweep logs a warning: a crash storm.
    backlog_warning: int = 10_000

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_batches < 1 or self.max_blocked_listed < 0:
            raise ValueError("batch_size and max_batches must be positive")
        if self.min_batch_size < 1 or self.batch_target_s < 0:
            raise ValueError("min_batch_size must be positive, batch_target_s >= 0")
        if self.pause_s < 0 or self.blocked_after_s < 0 or self.backlog_warning < 0:
            raise ValueError("pause_s, blocked_after_s and backlog_warning must be >= 0")


@dataclass(frozen=True)
class SweepConfig:
    # The periodic sweep (leader only): every interval, spread by +/- jitter (a fraction),
    # the first one start_delay after this process starts leading.
    interval_s: float = 300.0
    jitter: float = 0.1
    start_delay_s: float = 30.0
    retention: Retention = field(default_factory=Retention)
    limits: SweepLimits = field(default_factory=SweepLimits)

    def __post_init__(self) -> None:
        if not self.interval_s > 0 or not 0 <= self.jitter < 1 or self.start_delay_s < 0:
            raise ValueError("sweep interval must be > 0, jitter in [0, 1), start delay >= 0")


def next_batch_size(size: int, seconds: float, limits: SweepLimits) -> int:
    """The next purge batch's size, after one of ``size`` rows took ``seconds``: scaled
    towards the time target, at most doubling at once, within the limits."""
    if limits.batch_target_s <= 0:
        return limits.batch_size
    if seconds <= 0:
        return min(limits.batch_size, size * 2)
    scaled = round(size * limits.batch_target_s / seconds)
    smallest = min(limits.min_batch_size, limits.batch_size)
    return max(smallest, min(limits.batch_size, size * 2, scaled))


@dataclass(frozen=True)
class BlockedObject:
    namespace: str
    kind: str
    name: str
    uid: str
    finalizers: tuple[str, ...]
    reason: str
    deletion_ts_us: int
    age_us: int


@dataclass(frozen=True)
class CollectorFailure:
    namespace: str
    owner_uid: str
    attempts: int
    last_error: str
    next_attempt_us: int


ACTIONS = (
    "leases_expired",
    "sagas_requeued",
    "sagas_compensating",
    "sagas_failed",
    "sagas_quarantined",
    "objects_collected",
    "objects_orphaned",
)


@dataclass
class SweepReport:
    sweep_id: str
    trigger: SweepTrigger
    dry_run: bool
    replica: str
    namespace: str
    parts: tuple[SweepPart, ...]
    started_at_us: int
    finished_at_us: int = 0
    leases_expired: int = 0
    sagas_requeued: int = 0
    sagas_compensating: int = 0
    sagas_failed: int = 0
    sagas_quarantined: int = 0
    objects_collected: int = 0
    objects_orphaned: int = 0
    blocked: list[BlockedObject] = field(default_factory=list)
    blocked_total: int = 0
    rows_purged: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    backlog: int = 0
    gc_queue_depth: int = 0
    collector_failures: list[CollectorFailure] = field(default_factory=list)

    def count_saga(self, outcome: SagaOutcome) -> None:
        name = f"sagas_{outcome.value}"
        setattr(self, name, getattr(self, name) + 1)

    def purged_rows(self, by_table: Mapping[str, int]) -> None:
        for table, rows in by_table.items():
            if rows:
                self.rows_purged[table] = self.rows_purged.get(table, 0) + rows

    def actions(self) -> dict[str, int]:
        """What it reconciled, by name (the metrics' ``action`` label)."""
        return {name: getattr(self, name) for name in ACTIONS}

    def summary(self) -> dict[str, Any]:
        """The one log line's fields."""
        return {
            "sweep_id": self.sweep_id,
            "trigger": self.trigger.value,
            "dry_run": self.dry_run,
            "duration_s": round((self.finished_at_us - self.started_at_us) / 1e6, 3),
            **self.actions(),
            "blocked": self.blocked_total,
            "rows_purged": dict(self.rows_purged),
            "failures": len(self.failures),
            "backlog": self.backlog,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> SweepReport:
        raw: dict[str, Any] = json.loads(text)
        raw["trigger"] = SweepTrigger(raw["trigger"])
        raw["parts"] = tuple(SweepPart(p) for p in raw["parts"])
        raw["blocked"] = [_blocked(b) for b in raw["blocked"]]
        raw["collector_failures"] = [CollectorFailure(**f) for f in raw["collector_failures"]]
        return SweepReport(**raw)


def _blocked(raw: Mapping[str, Any]) -> BlockedObject:
    return BlockedObject(**{**raw, "finalizers": tuple(raw["finalizers"])})
