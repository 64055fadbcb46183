"""Moving live deadlines by a forward step of the clock (see clock_step.py, docs/clock.md).

One unit, one transaction, run while the clock still reports the time before the step
(``tx.now_us``): every deadline still ahead of that time moves by the step, so each keeps
the time it had left. What moves:

- ``leases.expires_at_us`` of ACTIVE leases not yet past it (a lease already past its
  deadline stays expired: moving it would bring it back). Saga claims are leases, so their
  deadlines move with them.
- ``lease_keys.available_at_us`` still ahead: the lock-delay of a revocation.
- the lock-delay of an expiry, which is derived from the lease (``expires_at_us +
  lock_delay_us``, see ``decide_acquire``) and not stored: for a key whose current lease
  expired (or passed its deadline) and is still in its lock-delay, the key's
  ``available_at_us`` is raised to the moved end of that lock-delay.

What does not: saga deadlines and retry times (absolute times, or times that only make
work available), finalizer and collector retries, sweep schedules, replica heartbeats.

Units after this one in the same batch must judge deadlines by the new time, so the unit
moves the batch's ``tx.now_us`` forward by the step; the clock itself reports the new time
only once the batch committed (``ShiftResult`` in the batch's outcomes, see
ExpiryLoop), so a rolled-back shift leaves everything as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether_server.store.batch import BatchResult
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

# Keys first, then leases: the lock order of every lease unit (acquire, release, revoke).
_EXPIRY_LOCK_DELAYS = sql(
    """
    SELECT l.namespace, l.key, l.expires_at_us + l.lock_delay_us AS available_at_us
    FROM lease_keys k JOIN leases l ON l.lease_id = k.current_lease_id
    WHERE l.state IN ('ACTIVE', 'EXPIRED') AND l.lock_delay_us > 0
      AND l.expires_at_us <= $1 AND l.expires_at_us + l.lock_delay_us > $1
    FOR UPDATE OF k
    """
)
_SHIFT_KEYS = sql(
    "UPDATE lease_keys SET available_at_us = available_at_us + $1 WHERE available_at_us > $2"
)
_RAISE_KEY = sql(
    "UPDATE lease_keys SET available_at_us = $3 WHERE namespace = $1 AND key = $2"
    " AND available_at_us < $3"
)
_SHIFT_LEASES = sql(
    "UPDATE leases SET expires_at_us = expires_at_us + $1"
    " WHERE state = 'ACTIVE' AND expires_at_us > $2"
)


@dataclass(frozen=True)
class ShiftResult:
    step_us: int
    # Live leases whose deadline moved.
    leases: int
    # Keys whose lock-delay moved (stored or derived from an expiry).
    keys: int


async def shift_deadlines(tx: Tx, step_us: int) -> ShiftResult:
    """Move every live lease deadline and lock-delay by ``step_us`` (> 0)."""
    if step_us <= 0:
        raise ValueError("only a forward step moves deadlines")
    now = tx.now_us
    # Read before the stored lock-delays move, so none moves twice.
    derived = [
        (row["namespace"], row["key"], int(row["available_at_us"]) + step_us)
        for row in await tx.fetch(_EXPIRY_LOCK_DELAYS, now)
    ]
    keys = await tx.execute(_SHIFT_KEYS, step_us, now)
    for namespace, key, available_at in derived:
        keys += await tx.execute(_RAISE_KEY, namespace, key, available_at)
    leases = await tx.execute(_SHIFT_LEASES, step_us, now)
    # Later units of this batch see the moved deadlines: they must judge by the new time.
    tx.now_us = now + step_us
    return ShiftResult(step_us=step_us, leases=leases, keys=keys)


def committed_shifts(result: BatchResult) -> list[ShiftResult]:
    """The shifts a committed batch carried (an after-commit hook's view)."""
    return [outcome for outcome in result.outcomes if isinstance(outcome, ShiftResult)]
