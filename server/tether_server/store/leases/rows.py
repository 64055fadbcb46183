"""Lease rows: the column list every query selects, and conversions to and from Lease."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

from tether_server.domain.lease import Lease, LeaseState
from tether_server.store.sql import sql
from tether_server.store.tx import Row, Tx

AREA = "lease"
COLUMNS = (
    "lease_id, namespace, key, holder, principal, ttl_us, fencing_token, state, "
    "acquired_at_us, renewed_at_us, expires_at_us, ended_at_us, lock_delay_us, labels, "
    "progress, stream_id, request_id, create_revision, mod_revision"
)

SELECT_BY_ID = sql(f"SELECT {COLUMNS} FROM leases WHERE lease_id = $1")
LOCK_BY_ID = sql(f"SELECT {COLUMNS} FROM leases WHERE lease_id = $1 FOR UPDATE")
SELECT_MANY = sql(f"SELECT {COLUMNS} FROM leases WHERE lease_id = ANY($1::text[])")


def row_to_lease(row: Row) -> Lease:
    return Lease(
        lease_id=row["lease_id"],
        namespace=row["namespace"],
        key=row["key"],
        holder=row["holder"],
        principal=row["principal"],
        ttl_us=row["ttl_us"],
        fencing_token=row["fencing_token"],
        state=LeaseState(row["state"]),
        acquired_at_us=row["acquired_at_us"],
        renewed_at_us=row["renewed_at_us"],
        expires_at_us=row["expires_at_us"],
        ended_at_us=row["ended_at_us"],
        lock_delay_us=row["lock_delay_us"],
        labels=json.loads(row["labels"]),
        progress=bytes(row["progress"]),
        stream_attached=row["stream_id"] is not None,
        request_id=row["request_id"],
        create_revision=row["create_revision"],
        mod_revision=row["mod_revision"],
    )


def lease_values(lease: Lease) -> tuple[Any, ...]:
    """The values of COLUMNS, in order, for an INSERT."""
    return (
        lease.lease_id,
        lease.namespace,
        lease.key,
        lease.holder,
        lease.principal,
        lease.ttl_us,
        lease.fencing_token,
        lease.state.value,
        lease.acquired_at_us,
        lease.renewed_at_us,
        lease.expires_at_us,
        lease.ended_at_us,
        lease.lock_delay_us,
        json.dumps(dict(lease.labels), sort_keys=True),
        lease.progress,
        None,
        lease.request_id,
        lease.create_revision,
        lease.mod_revision,
    )


def lease_to_json(lease: Lease) -> str:
    data = {
        "lease_id": lease.lease_id,
        "namespace": lease.namespace,
        "key": lease.key,
        "holder": lease.holder,
        "principal": lease.principal,
        "ttl_us": lease.ttl_us,
        "fencing_token": lease.fencing_token,
        "state": lease.state.value,
        "acquired_at_us": lease.acquired_at_us,
        "renewed_at_us": lease.renewed_at_us,
        "expires_at_us": lease.expires_at_us,
        "ended_at_us": lease.ended_at_us,
        "lock_delay_us": lease.lock_delay_us,
        "labels": dict(lease.labels),
        "progress": base64.b64encode(lease.progress).decode(),
        "request_id": lease.request_id,
        "create_revision": lease.create_revision,
        "mod_revision": lease.mod_revision,
    }
    return json.dumps(data, sort_keys=True)


def lease_from_json(text: str) -> Lease:
    data = json.loads(text)
    data["state"] = LeaseState(data["state"])
    data["progress"] = base64.b64decode(data["progress"])
    return Lease(**data)


def effective(lease: Lease, now_us: int) -> Lease:
    """The lease as every reader sees it: past its deadline it is expired, recorded or not."""
    state = lease.effective_state(now_us)
    if state is lease.state:
        return lease
    return replace(lease, state=state, ended_at_us=lease.expires_at_us, stream_attached=False)


async def get(tx: Tx, lease_id: str, *, lock: bool = False) -> Lease | None:
    row = await tx.fetchrow(LOCK_BY_ID if lock else SELECT_BY_ID, lease_id)
    return None if row is None else row_to_lease(row)


async def record(tx: Tx, revision: int, event_type: str, lease: Lease) -> None:
    tx.record_event(
        revision,
        AREA,
        lease.namespace,
        lease.key,
        lease.lease_id,
        event_type,
        lease_to_json(lease),
    )
