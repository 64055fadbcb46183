"""Lease keys: one row per key ever leased, holding the fencing-token counter (tokens never
repeat, even after every lease row of the key is purged) and the key's lock-delay."""

from __future__ import annotations

from tether_server.domain.lease import LeaseKey
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

# Creates the row on first use and locks it in one statement (the no-op update takes the
# row lock, waiting for a concurrent holder, and RETURNING reads the row after the wait).
_LOCK = sql(
    """
    INSERT INTO lease_keys (namespace, key, last_fencing_token, available_at_us,
                            current_lease_id)
    VALUES ($1, $2, 0, 0, NULL)
    ON CONFLICT (namespace, key) DO UPDATE SET namespace = EXCLUDED.namespace
    RETURNING last_fencing_token, available_at_us, current_lease_id
    """
)


async def lock(tx: Tx, namespace: str, key: str) -> LeaseKey:
    row = await tx.fetchrow(_LOCK, namespace, key)
    assert row is not None
    return LeaseKey(
        namespace=namespace,
        key=key,
        last_fencing_token=row["last_fencing_token"],
        available_at_us=row["available_at_us"],
        current_lease_id=row["current_lease_id"],
    )
