"""The sweep's pure rules: which parts run in what order, purge batch sizing, and the
report's round trip through its stored JSON."""

from __future__ import annotations

import pytest

from tether_server.domain import errors
from tether_server.domain.sweep import (
    ALL_PARTS,
    GLOBAL_PARTS,
    BlockedObject,
    CollectorFailure,
    SweepLimits,
    SweepPart,
    SweepReport,
    SweepTrigger,
    choose_parts,
    next_batch_size,
)


def test_all_parts_run_in_order_and_a_namespace_leaves_out_the_global_ones() -> None:
    assert choose_parts([], "") == ALL_PARTS
    assert set(ALL_PARTS) == set(SweepPart)
    scoped = choose_parts([], "team-a")
    assert set(scoped) == set(ALL_PARTS) - GLOBAL_PARTS
    # Purges come before collection (a purged saga's objects go in the same sweep).
    assert ALL_PARTS.index(SweepPart.PURGE_SAGAS) < ALL_PARTS.index(SweepPart.COLLECT_GARBAGE)


def test_requested_parts_are_deduplicated_and_put_in_order() -> None:
    asked = [SweepPart.COLLECT_GARBAGE, SweepPart.EXPIRE_LEASES, SweepPart.COLLECT_GARBAGE]
    assert choose_parts(asked, "") == (SweepPart.EXPIRE_LEASES, SweepPart.COLLECT_GARBAGE)


@pytest.mark.parametrize("part", sorted(GLOBAL_PARTS))
def test_a_global_part_cannot_be_scoped(part: SweepPart) -> None:
    with pytest.raises(errors.InvalidField) as caught:
        choose_parts([SweepPart.STALE_SAGAS, part], "team-a")
    assert caught.value.field_name == "parts"


LIMITS = SweepLimits(batch_size=1000, batch_target_s=0.02, min_batch_size=50)
SMALL = SweepLimits(batch_size=10, batch_target_s=0.02, min_batch_size=50)


@pytest.mark.parametrize(
    ("size", "seconds", "expected"),
    [
        (1000, 0.06, 333),  # three times too slow: a third
        (1000, 0.01, 1000),  # fast, but never above the maximum
        (200, 0.005, 400),  # fast: at most double at once
        (100, 2.0, 50),  # very slow: never below the minimum
        (300, 0.0, 600),  # too fast to measure: double
    ],
)
def test_purge_batches_follow_the_time_target(size: int, seconds: float, expected: int) -> None:
    assert next_batch_size(size, seconds, LIMITS) == expected


def test_a_maximum_below_the_minimum_wins() -> None:
    assert next_batch_size(10, 1.0, SMALL) == 10


def test_a_zero_target_means_fixed_batches() -> None:
    fixed = SweepLimits(batch_size=700, batch_target_s=0)
    assert next_batch_size(50, 10.0, fixed) == 700


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="min_batch_size"):
        SweepLimits(min_batch_size=0)
    with pytest.raises(ValueError, match="positive"):
        SweepLimits(batch_size=0)


def test_a_report_survives_its_stored_json() -> None:
    report = SweepReport(
        sweep_id="0190a3c4-1111-7aaa-8bbb-0123456789ab",
        trigger=SweepTrigger.PERIODIC,
        dry_run=False,
        replica="a",
        namespace="",
        parts=(SweepPart.EXPIRE_LEASES, SweepPart.BLOCKED_OBJECTS),
        started_at_us=1,
        finished_at_us=2,
        leases_expired=3,
        blocked=[BlockedObject("ns", "Worktree", "wt", "u", ("f",), "dirty", 5, 6)],
        blocked_total=1,
        rows_purged={"leases": 7},
        failures=["purge-events: boom"],
        backlog=8,
        gc_queue_depth=9,
        collector_failures=[CollectorFailure("ns", "o", 2, "err", 10)],
    )
    assert SweepReport.from_json(report.to_json()) == report
