"""Objects, owner references and finalizers: the Kubernetes garbage collector's decisions,
as pure functions over the facts the store loaded. No I/O.

Owner states, as the collector sees an owner reference (Kubernetes' names in brackets):
- SOLID: the owner exists and is not deleting in the foreground ("solid"), or it is an
  ACTIVE lease, or a saga that has not been purged;
- WAITING: the owner is terminating with the ``foregroundDeletion`` finalizer, waiting for
  its dependents ("waitingForDependentsDeletion");
- GONE: no such owner any more, or the uid names another object ("dangling").

A dependent with at least one SOLID owner is kept and loses its references to the others;
one without is deleted: in the foreground when a WAITING owner asked and it has dependents
of its own (so the owner waits for the whole subtree), otherwise in the background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from tether_server.domain import errors
from tether_server.domain.time import format_us

FOREGROUND_FINALIZER = "foregroundDeletion"
ORPHAN_FINALIZER = "orphan"
# Kept by the server: users cannot add them; updates keep them; ForceRemoveFinalizers can
# remove them (an operator unsticking a cascade).
SYSTEM_FINALIZERS = frozenset({FOREGROUND_FINALIZER, ORPHAN_FINALIZER})
LEASE_KIND = "tether.v1/Lease"
SAGA_KIND = "tether.v1/Saga"
BUILTIN_OWNER_KINDS = frozenset({LEASE_KIND, SAGA_KIND})
MAX_HISTORY = 50


class Policy(Enum):
    BACKGROUND = "BACKGROUND"
    FOREGROUND = "FOREGROUND"
    ORPHAN = "ORPHAN"


class OwnerState(Enum):
    SOLID = "SOLID"
    WAITING = "WAITING"
    GONE = "GONE"


class EventType(Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class OwnerRef:
    uid: str
    kind: str
    name: str
    controller: bool = False
    block_owner_deletion: bool = False


@dataclass(frozen=True)
class Refusal:
    finalizer: str
    reason: str
    recorded_at_us: int
    recorded_by: str


@dataclass(frozen=True)
class HistoryEntry:
    created_at_us: int
    author: str
    text: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Obj:
    namespace: str
    kind: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)
    owner_refs: tuple[OwnerRef, ...] = ()
    finalizers: tuple[str, ...] = ()
    deletion_ts_us: int | None = None
    created_at_us: int = 0
    create_revision: int = 0
    mod_revision: int = 0
    refusals: tuple[Refusal, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    request_id: str | None = None
    fingerprint: str = ""

    @property
    def terminating(self) -> bool:
        return self.deletion_ts_us is not None

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    def owner_state(self) -> OwnerState:
        """How this object looks to its dependents."""
        if self.terminating and FOREGROUND_FINALIZER in self.finalizers:
            return OwnerState.WAITING
        return OwnerState.SOLID


# ---- errors ---------------------------------------------------------------------------------


def not_found(namespace: str, kind: str, name: str = "", uid: str = "") -> errors.ObjectNotFound:
    which = f"{kind}/{name}" if name else f"{kind or 'object'} with uid {uid}"
    return errors.ObjectNotFound(
        f"no {which} in namespace {namespace!r}",
        {"namespace": namespace, "kind": kind, "name": name, "uid": uid},
    )


def exists(obj: Obj) -> errors.ObjectExists:
    if obj.terminating:
        message = f"{obj.key} exists and is being deleted; its name is free once it is gone"
    else:
        message = f"{obj.key} exists"
    metadata = {"uid": obj.uid, "terminating": "true" if obj.terminating else "false"}
    return errors.ObjectExists(message, metadata)


def terminating(obj: Obj, what: str) -> errors.ObjectTerminating:
    return errors.ObjectTerminating(
        f"{obj.key} is being deleted: {what}",
        {"uid": obj.uid, "deletion_timestamp": format_us(obj.deletion_ts_us or 0)},
    )


def check_uid(obj: Obj, expected_uid: str) -> None:
    if expected_uid and obj.uid != expected_uid:
        raise errors.UidMismatch(
            f"{obj.key} has uid {obj.uid}, not {expected_uid} (it was deleted and recreated)",
            {"uid": obj.uid, "expected_uid": expected_uid},
        )


def check_resource_version(obj: Obj, expected: int) -> None:
    if expected and obj.mod_revision != expected:
        raise errors.ResourceVersionConflict(
            f"{obj.key} is at resource version {obj.mod_revision}, not {expected}: read it again",
            {"resource_version": str(obj.mod_revision), "expected": str(expected)},
        )


def check_create_repeat(existing: Obj, request_id: str | None, fingerprint: str) -> None:
    """A create whose object exists: the retry of the same request, or a conflict."""
    if request_id is None or existing.request_id != request_id:
        raise exists(existing)
    if existing.fingerprint != fingerprint:
        raise errors.RequestIdConflict(
            f"request id {request_id!r} was used to create {existing.key} with another body",
            {"request_id": request_id, "uid": existing.uid},
        )


# ---- updates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """What an UpdateObject asks for (the fields it replaces)."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    owner_refs: tuple[OwnerRef, ...]
    finalizers: tuple[str, ...]


def apply_update(current: Obj, desired: Desired) -> Obj:
    """The object after an update: system finalizers are the server's and stay; a
    terminating object accepts no new finalizer."""
    kept_system = tuple(f for f in current.finalizers if f in SYSTEM_FINALIZERS)
    user = tuple(f for f in desired.finalizers if f not in SYSTEM_FINALIZERS)
    if current.terminating:
        added = [f for f in user if f not in current.finalizers]
        if added:
            raise terminating(current, f"finalizer {added[0]!r} cannot be added")
    return replace(
        current,
        labels=dict(desired.labels),
        annotations=dict(desired.annotations),
        spec=dict(desired.spec),
        status=dict(desired.status),
        owner_refs=desired.owner_refs,
        finalizers=user + tuple(f for f in kept_system if f not in user),
        refusals=tuple(r for r in current.refusals if r.finalizer in user + kept_system),
    )


def add_finalizer(current: Obj, finalizer: str) -> Obj | None:
    """The object with the finalizer added; None when it is already there."""
    if finalizer in current.finalizers:
        return None
    if current.terminating:
        raise terminating(current, f"finalizer {finalizer!r} cannot be added")
    return replace(current, finalizers=(*current.finalizers, finalizer))


def without_finalizers(current: Obj, finalizers: Sequence[str]) -> Obj:
    drop = set(finalizers)
    return replace(
        current,
        finalizers=tuple(f for f in current.finalizers if f not in drop),
        refusals=tuple(r for r in current.refusals if r.finalizer not in drop),
    )


def record_refusal(current: Obj, refusal: Refusal) -> Obj:
    refusals = tuple(r for r in current.refusals if r.finalizer != refusal.finalizer)
    entry = HistoryEntry(
        refusal.recorded_at_us,
        refusal.recorded_by,
        f"finalizer {refusal.finalizer} refused: {refusal.reason}",
        {"finalizer": refusal.finalizer, "event": "finalizer-refused"},
    )
    return replace(current, refusals=(*refusals, refusal), history=_append(current, entry))


def record_forced(current: Obj, removed: Sequence[str], who: str, reason: str, now_us: int) -> Obj:
    entry = HistoryEntry(
        now_us,
        who,
        f"finalizers force-removed ({', '.join(removed)}): {reason}",
        {"finalizers": ",".join(removed), "event": "finalizers-force-removed"},
    )
    annotations = {
        **current.annotations,
        "tether.dev/finalizers-force-removed": ",".join(removed),
        "tether.dev/finalizers-force-removed-by": who,
        "tether.dev/finalizers-force-removed-reason": reason,
    }
    return replace(
        without_finalizers(current, removed),
        annotations=annotations,
        history=_append(current, entry),
    )


def _append(current: Obj, entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
    return (*current.history, entry)[-MAX_HISTORY:]


def goes_now(obj: Obj) -> bool:
    """A terminating object with no finalizer left is removed."""
    return obj.terminating and not obj.finalizers


# ---- deletes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remove:
    """The object goes now."""


@dataclass(frozen=True)
class MarkTerminating:
    """The object stays with a deletion timestamp (and maybe a system finalizer); with
    ``enqueue`` the collector works on its dependents."""

    obj: Obj
    enqueue: bool


@dataclass(frozen=True)
class AlreadyTerminating:
    """A repeated delete: the first one's policy stands."""


DeleteDecision = Remove | MarkTerminating | AlreadyTerminating


def decide_delete(obj: Obj, policy: Policy, has_dependents: bool, now_us: int) -> DeleteDecision:
    if obj.terminating:
        return AlreadyTerminating()
    system: tuple[str, ...] = ()
    if has_dependents and policy is Policy.FOREGROUND:
        system = (FOREGROUND_FINALIZER,)
    elif has_dependents and policy is Policy.ORPHAN:
        system = (ORPHAN_FINALIZER,)
    if not system and not obj.finalizers:
        return Remove()
    marked = replace(obj, deletion_ts_us=now_us, finalizers=(*obj.finalizers, *system))
    return MarkTerminating(marked, enqueue=bool(system))


# ---- the collector --------------------------------------------------------------------------


@dataclass(frozen=True)
class Keep:
    """The dependent stays; it loses its references to these owners."""

    strip: frozenset[str]


@dataclass(frozen=True)
class Collect:
    policy: Policy


DependentAction = Keep | Collect


def decide_dependent(
    refs: Sequence[OwnerRef], states: Mapping[str, OwnerState], has_dependents: bool
) -> DependentAction:
    """What to do with a dependent one of whose owners is gone or waiting."""
    # A cascade asks this once per dependent: module constants, not Enum lookups.
    solid = [r.uid for r in refs if states.get(r.uid, _GONE) is _SOLID]
    if solid:
        return Keep(frozenset(r.uid for r in refs if r.uid not in solid))
    if has_dependents and any(states.get(r.uid) is _WAITING for r in refs):
        return _COLLECT_FOREGROUND
    return _COLLECT_BACKGROUND


_SOLID, _WAITING, _GONE = OwnerState.SOLID, OwnerState.WAITING, OwnerState.GONE
_COLLECT_FOREGROUND = Collect(Policy.FOREGROUND)
_COLLECT_BACKGROUND = Collect(Policy.BACKGROUND)


def strip_owners(obj: Obj, uids: frozenset[str]) -> Obj:
    return replace(obj, owner_refs=tuple(r for r in obj.owner_refs if r.uid not in uids))


# ---- termination status ---------------------------------------------------------------------


@dataclass(frozen=True)
class Termination:
    pending_finalizers: tuple[str, ...]
    blocking_dependents: int
    blocking_examples: tuple[tuple[str, str, str], ...]  # (kind, name, uid)
    refusals: tuple[Refusal, ...]
