"""What the ``tether`` commands print: aligned text for people, JSON for scripts.

JSON is the protobuf JSON mapping with the proto field names (``lease_id``, as grpcurl
prints them) and every field present, so a script never has to guess a missing zero.
Errors go to stderr as ``tether: REASON: message``, then the facts a person acts on.
The few helpers every command group shares live here too: the argument type for
``--state a,b``-style options.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from tether_client.convert import duration_seconds, to_datetime
from tether_client.errors import TetherError
from tether_client.pb import lease_pb2

T = TypeVar("T")
# The server's default page size; a smaller --limit asks for no more than it needs.
DEFAULT_PAGE_SIZE = 100


def to_json(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def json_block(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def state(value: lease_pb2.LeaseState.ValueType) -> str:
    """``LEASE_STATE_ACTIVE`` → ``active``."""
    return lease_pb2.LeaseState.Name(value).removeprefix("LEASE_STATE_").lower()


STATES: dict[str, lease_pb2.LeaseState.ValueType] = {
    state(value): value
    for value in lease_pb2.LeaseState.values()
    if value != lease_pb2.LEASE_STATE_UNSPECIFIED
}


def name_list(names: Mapping[str, T], what: str) -> Callable[[str], list[T]]:
    """An argparse type for ``NAME[,NAME]`` options: each name's value from ``names``."""

    def parse(text: str) -> list[T]:
        found = [name.strip().lower() for name in text.split(",") if name.strip()]
        unknown = [name for name in found if name not in names]
        if unknown or not found:
            choices = ", ".join(names)
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r} (choose from {choices})")
        return [names[name] for name in found]

    return parse


def report(error: TetherError, facts: Iterable[str] = ()) -> None:
    """``tether: REASON: message`` plus the ``facts`` the server sent (metadata), to stderr."""
    lines = [f"tether: {error}"]
    # The server's own strings, spelt as in every language's ErrorInfo (docs/errors.md).
    lines.extend(f"  {name}: {error.metadata[name]}" for name in facts if error.metadata.get(name))
    print("\n".join(lines), file=sys.stderr, flush=True)


def event_type(value: lease_pb2.LeaseEventType.ValueType) -> str:
    """``LEASE_EVENT_TYPE_ACQUIRED`` → ``ACQUIRED``."""
    return lease_pb2.LeaseEventType.Name(value).removeprefix("LEASE_EVENT_TYPE_")


def timestamp(value: timestamp_pb2.Timestamp) -> str:
    """UTC to the second (the server's clock, not this machine's); ``-`` when unset."""
    if value.seconds == 0 and value.nanos == 0:
        return "-"
    return to_datetime(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(value: duration_pb2.Duration | float) -> str:
    """``90`` → ``1m30s``, ``0.5`` → ``500ms``, ``0`` → ``0s``."""
    total = duration_seconds(value) if isinstance(value, duration_pb2.Duration) else value
    millis = round(total * 1000)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if rest:
        parts.append(f"{rest // 1000}s" if rest % 1000 == 0 else f"{rest / 1000:g}s")
    return "".join(parts)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; no trailing blanks."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def expires(lease: lease_pb2.Lease) -> str:
    # A released or revoked lease ended before its deadline; the deadline would mislead.
    if lease.state in (lease_pb2.LEASE_STATE_ACTIVE, lease_pb2.LEASE_STATE_EXPIRED):
        return timestamp(lease.expires_at)
    return "-"


def lease_table(leases: Iterable[lease_pb2.Lease]) -> str:
    header = ("KEY", "HOLDER", "STATE", "TOKEN", "EXPIRES", "LEASE ID")
    rows = (
        (
            lease.key,
            lease.holder,
            state(lease.state),
            str(lease.fencing_token),
            expires(lease),
            lease.lease_id,
        )
        for lease in leases
    )
    return table(header, rows)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``name:  value`` lines, values aligned."""
    width = max(len(name) for name, _ in pairs) + 1
    return "\n".join(f"{name + ':':<{width}}  {value}" for name, value in pairs)


def lease_fields(lease: lease_pb2.Lease) -> list[tuple[str, str]]:
    pairs = [
        ("lease_id", lease.lease_id),
        ("fencing_token", str(lease.fencing_token)),
        ("key", lease.key),
        ("namespace", lease.namespace),
        ("holder", lease.holder),
        ("state", state(lease.state)),
        ("ttl", duration(lease.ttl)),
        ("acquired_at", timestamp(lease.acquired_at)),
        ("expires_at", timestamp(lease.expires_at)),
    ]
    if lease.HasField("ended_at"):
        pairs.append(("ended_at", timestamp(lease.ended_at)))
    if duration_seconds(lease.lock_delay) > 0:
        pairs.append(("lock_delay", duration(lease.lock_delay)))
    if lease.labels:
        pairs.append(("labels", ",".join(f"{k}={v}" for k, v in sorted(lease.labels.items()))))
    if lease.state == lease_pb2.LEASE_STATE_ACTIVE:
        attached = "yes" if lease.heartbeat_stream_attached else "no"
        pairs.append(("heartbeat_stream", attached))
    return pairs


def lease_details(lease: lease_pb2.Lease) -> str:
    return fields(lease_fields(lease))


def event_line(event: lease_pb2.LeaseEvent) -> str:
    lease = event.lease
    return (
        f"{event.revision:<6} {event_type(event.type):<8} {lease.key}  holder={lease.holder} "
        f"token={lease.fencing_token} lease={lease.lease_id} at={timestamp(event.occurred_at)}"
    )
