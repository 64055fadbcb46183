"""Sweep protobuf <-> domain conversions."""

from __future__ import annotations

from tether_client.pb import sweep_pb2
from tether_server.domain.sweep import SweepPart, SweepReport, SweepTrigger
from tether_server.services.convert import to_duration, to_timestamp

PART_TO_PB = {
    SweepPart.EXPIRE_LEASES: sweep_pb2.SWEEP_PART_EXPIRE_LEASES,
    SweepPart.STALE_SAGAS: sweep_pb2.SWEEP_PART_STALE_SAGAS,
    SweepPart.COLLECT_GARBAGE: sweep_pb2.SWEEP_PART_COLLECT_GARBAGE,
    SweepPart.BLOCKED_OBJECTS: sweep_pb2.SWEEP_PART_BLOCKED_OBJECTS,
    SweepPart.PURGE_LEASES: sweep_pb2.SWEEP_PART_PURGE_LEASES,
    SweepPart.PURGE_SAGAS: sweep_pb2.SWEEP_PART_PURGE_SAGAS,
    SweepPart.PURGE_EVENTS: sweep_pb2.SWEEP_PART_PURGE_EVENTS,
    SweepPart.PURGE_REPORTS: sweep_pb2.SWEEP_PART_PURGE_REPORTS,
}
PART_FROM_PB = {v: k for k, v in PART_TO_PB.items()}
TRIGGER_TO_PB = {
    SweepTrigger.STARTUP: sweep_pb2.SWEEP_TRIGGER_STARTUP,
    SweepTrigger.PERIODIC: sweep_pb2.SWEEP_TRIGGER_PERIODIC,
    SweepTrigger.ON_DEMAND: sweep_pb2.SWEEP_TRIGGER_ON_DEMAND,
}
TRIGGER_FROM_PB = {v: k for k, v in TRIGGER_TO_PB.items()}


def report_to_pb(r: SweepReport) -> sweep_pb2.SweepReport:
    return sweep_pb2.SweepReport(
        sweep_id=r.sweep_id,
        trigger=TRIGGER_TO_PB[r.trigger],
        dry_run=r.dry_run,
        replica=r.replica,
        started_at=to_timestamp(r.started_at_us),
        finished_at=to_timestamp(r.finished_at_us),
        duration=to_duration(r.finished_at_us - r.started_at_us),
        leases_expired=r.leases_expired,
        sagas_requeued=r.sagas_requeued,
        sagas_compensating=r.sagas_compensating,
        sagas_quarantined=r.sagas_quarantined,
        sagas_failed=r.sagas_failed,
        objects_collected=r.objects_collected,
        objects_orphaned=r.objects_orphaned,
        blocked=[
            sweep_pb2.BlockedObject(
                namespace=b.namespace,
                kind=b.kind,
                name=b.name,
                uid=b.uid,
                finalizers=list(b.finalizers),
                reason=b.reason,
                deletion_timestamp=to_timestamp(b.deletion_ts_us),
                age=to_duration(b.age_us),
            )
            for b in r.blocked
        ],
        blocked_total=r.blocked_total,
        rows_purged=r.rows_purged,
        failures=r.failures,
        backlog=r.backlog,
        parts=[PART_TO_PB[p] for p in r.parts],
        namespace=r.namespace,
        gc_queue_depth=r.gc_queue_depth,
        collector_failures=[
            sweep_pb2.CollectorFailure(
                namespace=f.namespace,
                owner_uid=f.owner_uid,
                attempts=f.attempts,
                last_error=f.last_error,
                next_attempt_at=to_timestamp(f.next_attempt_us),
            )
            for f in r.collector_failures
        ],
    )
