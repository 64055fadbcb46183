"""The garbage collector's pure decisions and the uids objects get."""

from __future__ import annotations

import uuid

import pytest

from tether_server.domain.object_validation import new_uid
from tether_server.domain.objects import (
    FOREGROUND_FINALIZER,
    ORPHAN_FINALIZER,
    AlreadyTerminating,
    Collect,
    Keep,
    MarkTerminating,
    Obj,
    OwnerRef,
    OwnerState,
    Policy,
    Remove,
    decide_delete,
    decide_dependent,
)

SOLID, WAITING, GONE = OwnerState.SOLID, OwnerState.WAITING, OwnerState.GONE


def test_uids_are_version_7_and_ordered_by_time() -> None:
    earlier, later = new_uid(1_700_000_000_000), new_uid(1_700_000_000_001)
    assert uuid.UUID(earlier).version == 7
    assert uuid.UUID(earlier).variant == uuid.RFC_4122
    assert earlier < later
    assert len({new_uid(5) for _ in range(1000)}) == 1000


def obj(finalizers: tuple[str, ...] = (), deleting: bool = False) -> Obj:
    return Obj(
        "ns", "Thing", "x", "u", finalizers=finalizers, deletion_ts_us=7 if deleting else None
    )


@pytest.mark.parametrize(
    ("finalizers", "policy", "has_dependents", "expected"),
    [
        ((), Policy.BACKGROUND, True, None),
        ((), Policy.FOREGROUND, False, None),
        ((), Policy.ORPHAN, False, None),
        ((), Policy.FOREGROUND, True, (FOREGROUND_FINALIZER,)),
        ((), Policy.ORPHAN, True, (ORPHAN_FINALIZER,)),
        (("a.io/x",), Policy.BACKGROUND, True, ("a.io/x",)),
        (("a.io/x",), Policy.FOREGROUND, True, ("a.io/x", FOREGROUND_FINALIZER)),
    ],
)
def test_delete_decisions(
    finalizers: tuple[str, ...],
    policy: Policy,
    has_dependents: bool,
    expected: tuple[str, ...] | None,
) -> None:
    decision = decide_delete(obj(finalizers), policy, has_dependents, now_us=99)
    if expected is None:
        assert isinstance(decision, Remove)
    else:
        assert isinstance(decision, MarkTerminating)
        assert decision.obj.finalizers == expected
        assert decision.obj.deletion_ts_us == 99
        assert decision.enqueue is (expected[-1] in (FOREGROUND_FINALIZER, ORPHAN_FINALIZER))


def test_a_repeated_delete_keeps_the_first() -> None:
    assert isinstance(decide_delete(obj(deleting=True), Policy.ORPHAN, True, 5), AlreadyTerminating)


def refs(*uids: str) -> tuple[OwnerRef, ...]:
    return tuple(OwnerRef(uid, "Thing", uid) for uid in uids)


@pytest.mark.parametrize(
    ("states", "has_dependents", "expected"),
    [
        ({"a": GONE}, False, Collect(Policy.BACKGROUND)),
        ({"a": GONE, "b": SOLID}, False, Keep(frozenset({"a"}))),
        ({"a": WAITING, "b": SOLID}, True, Keep(frozenset({"a"}))),
        ({"a": WAITING}, True, Collect(Policy.FOREGROUND)),
        ({"a": WAITING}, False, Collect(Policy.BACKGROUND)),
        ({"a": WAITING, "b": GONE}, True, Collect(Policy.FOREGROUND)),
        ({"a": SOLID, "b": SOLID}, True, Keep(frozenset())),
        # An owner the collector knows nothing about is a dangling reference.
        ({}, False, Collect(Policy.BACKGROUND)),
    ],
)
def test_dependent_decisions(
    states: dict[str, OwnerState], has_dependents: bool, expected: object
) -> None:
    uids = tuple(states) or ("a",)
    assert decide_dependent(refs(*uids), states, has_dependents) == expected


def test_an_event_snapshot_gives_back_the_object() -> None:
    from dataclasses import replace

    from tether_server.domain.objects import HistoryEntry, Refusal
    from tether_server.store.objects import rows

    full = Obj(
        "ns",
        "Kind",
        "na.me",
        "u1",
        labels={"a": "b"},
        annotations={"x": 'quote"d'},
        spec={"s": [1, 2]},
        owner_refs=(OwnerRef("u2", "K", "n", True, False),),
        finalizers=("a.io/b",),
        deletion_ts_us=123,
        created_at_us=5,
        create_revision=6,
        mod_revision=7,
        refusals=(Refusal("a.io/b", "no", 1, "me"),),
        history=(HistoryEntry(1, "me", "t", {"k": "v"}),),
        request_id='req"1',
        fingerprint="abc",
    )
    for obj in (full, replace(full, request_id=None, deletion_ts_us=None)):
        assert rows.obj_from_snapshot(rows.snapshot(obj)) == obj
        assert rows.row_to_obj(dict(zip(rows.COLUMN_NAMES, rows._columns(obj), strict=True))) == obj
