"""Protobuf <-> domain conversions, validating what the wire cannot."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from tether_client.pb import lease_pb2
from tether_server.domain.errors import InvalidField
from tether_server.domain.lease import Lease, LeaseEventType, LeaseState

_NANOS = 1_000_000_000
_MAX_DURATION_SECONDS = 315_576_000_000

# By the name error metadata also uses (LeaseState.proto_name): one spelling everywhere.
LEASE_STATE_TO_PB = {state: lease_pb2.LeaseState.Value(state.proto_name) for state in LeaseState}
LEASE_STATE_FROM_PB = {v: k for k, v in LEASE_STATE_TO_PB.items()}
EVENT_TYPE_TO_PB = {
    LeaseEventType.ACQUIRED: lease_pb2.LEASE_EVENT_TYPE_ACQUIRED,
    LeaseEventType.RENEWED: lease_pb2.LEASE_EVENT_TYPE_RENEWED,
    LeaseEventType.RELEASED: lease_pb2.LEASE_EVENT_TYPE_RELEASED,
    LeaseEventType.EXPIRED: lease_pb2.LEASE_EVENT_TYPE_EXPIRED,
    LeaseEventType.REVOKED: lease_pb2.LEASE_EVENT_TYPE_REVOKED,
}


def duration_us(value: duration_pb2.Duration, field_name: str) -> int:
    """Microseconds in a Duration, refusing the malformed ones protobuf lets through."""
    seconds, nanos = value.seconds, value.nanos
    if not -_NANOS < nanos < _NANOS or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidField(field_name, "is not a valid Duration (seconds and nanos disagree)")
    if abs(seconds) > _MAX_DURATION_SECONDS:
        raise InvalidField(field_name, "is out of the Duration range")
    if nanos % 1000:
        raise InvalidField(field_name, "must be a whole number of microseconds")
    return seconds * 1_000_000 + nanos // 1000


def to_duration(us: int) -> duration_pb2.Duration:
    seconds, rest = divmod(us, 1_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=rest * 1000)


def to_timestamp(us: int) -> timestamp_pb2.Timestamp:
    seconds, rest = divmod(us, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def lease_to_pb(lease: Lease) -> lease_pb2.Lease:
    message = lease_pb2.Lease(
        namespace=lease.namespace,
        key=lease.key,
        lease_id=lease.lease_id,
        holder=lease.holder,
        ttl=to_duration(lease.ttl_us),
        fencing_token=lease.fencing_token,
        state=LEASE_STATE_TO_PB[lease.state],
        acquired_at=to_timestamp(lease.acquired_at_us),
        renewed_at=to_timestamp(lease.renewed_at_us),
        expires_at=to_timestamp(lease.expires_at_us),
        labels=dict(lease.labels),
        progress=lease.progress,
        lock_delay=to_duration(lease.lock_delay_us),
        heartbeat_stream_attached=lease.stream_attached,
        principal=lease.principal,
        create_revision=lease.create_revision,
        mod_revision=lease.mod_revision,
    )
    if lease.ended_at_us is not None:
        message.ended_at.CopyFrom(to_timestamp(lease.ended_at_us))
    return message


def lease_states(values: list[int]) -> frozenset[LeaseState]:
    states = set()
    for value in values:
        state = LEASE_STATE_FROM_PB.get(value)  # type: ignore[call-overload]
        if state is None:
            raise InvalidField("states", f"{value} is not a lease state")
        states.add(state)
    return frozenset(states)
