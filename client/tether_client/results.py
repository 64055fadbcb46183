"""What a call returns when the server says more than the resource itself.

Most methods return the resource (``Lease``, ``Saga``, ``Object``, ``SweepReport``: the
generated messages, typed by their stubs). Where the answer carries more (was it created,
what state is the saga in now), the method returns one of these small, frozen results,
the resource first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeAlias

from tether_client.pb import common_pb2, lease_pb2, owner_ref_pb2, saga_pb2

SagaStateValue: TypeAlias = saga_pb2.SagaState.ValueType


@dataclass(frozen=True)
class Acquired:
    """A granted lease; ``created`` is False when this holder already held the key (its live
    lease is handed back, not a new one)."""

    lease: lease_pb2.Lease
    created: bool


@dataclass(frozen=True)
class Renewal:
    """A renewed lease: its new deadline on the server's clock and the ttl granted."""

    lease_id: str
    fencing_token: int
    expires_at: datetime
    ttl: timedelta


@dataclass(frozen=True)
class SagaCreated:
    """A saga; ``created`` is False when a saga with that id existed (a repeat)."""

    saga: saga_pb2.Saga
    created: bool


@dataclass(frozen=True)
class Claim:
    """A claimed saga, the lease that holds the claim and the fence every later call of the
    claim presents."""

    saga: saga_pb2.Saga
    lease: lease_pb2.Lease
    fence: common_pb2.Fence


@dataclass(frozen=True)
class StepRecorded:
    step: saga_pb2.SagaStep
    state: SagaStateValue
    revision: int


@dataclass(frozen=True)
class SagaHeartbeat:
    """The claim's lease after a heartbeat, and the saga's state."""

    expires_at: datetime
    ttl: timedelta
    state: SagaStateValue


@dataclass(frozen=True)
class CompensationRecorded:
    compensation: saga_pb2.CompensationRecord
    state: SagaStateValue
    revision: int


@dataclass(frozen=True)
class ObjectCreated:
    """An object; ``created`` is False when the request was a repeat of an earlier create."""

    object: owner_ref_pb2.Object
    created: bool


@dataclass(frozen=True)
class ObjectWritten:
    """An object after a write; ``deleted`` when the write let it go (its last finalizer
    removed, or a deletion with nothing to wait for): ``object`` is then its last state."""

    object: owner_ref_pb2.Object
    deleted: bool


@dataclass(frozen=True)
class FinalizersForced:
    object: owner_ref_pb2.Object
    deleted: bool
    removed: tuple[str, ...]


@dataclass(frozen=True)
class OwnerGraph:
    """An object's owners and dependents; ``truncated`` when ``max_objects`` cut it short."""

    nodes: tuple[owner_ref_pb2.OwnerGraphNode, ...]
    edges: tuple[owner_ref_pb2.OwnerGraphEdge, ...]
    truncated: bool


__all__ = [
    "Acquired",
    "Claim",
    "CompensationRecorded",
    "FinalizersForced",
    "ObjectCreated",
    "ObjectWritten",
    "OwnerGraph",
    "Renewal",
    "SagaCreated",
    "SagaHeartbeat",
    "StepRecorded",
]
