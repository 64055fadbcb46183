"""Decisions taken after waiting on a row lock judge deadlines by the time the lock was
granted, not by the time the transaction began (PostgreSQL; SQLite serialises writers)."""

from __future__ import annotations

import asyncio

from tests.store.test_lease_races import (
    NS,
    grant,
    needs_postgres,
    row_lock,
    wait_for_lock_waiters,
)
from tether_server.clock import FakeClock
from tether_server.domain import errors
from tether_server.domain.lease import LeaseState
from tether_server.expiry import ExpiryConfig, ExpiryLoop
from tether_server.store.leases import LeaseStore, Renewal

LOCK_LEASE = "SELECT 1 FROM leases WHERE lease_id = $1 FOR UPDATE"


async def test_a_renewal_that_waited_past_the_deadline_fails(
    db_url: str, lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    needs_postgres(db_url)
    lease = await grant(lease_store, "waits/renew")
    fake_clock.set(lease.expires_at_us - 1)
    async with row_lock(db_url, LOCK_LEASE, lease.lease_id) as conn:
        renewing = asyncio.ensure_future(
            lease_store.lease_renew_many(NS, [Renewal(lease.lease_id, lease.fencing_token)])
        )
        await wait_for_lock_waiters(conn, 1)
        # The renewal began before the deadline; its lock is granted after it.
        fake_clock.set(lease.expires_at_us + 1)
    (outcome,) = await renewing
    assert isinstance(outcome, errors.LeaseExpired)
    after = await lease_store.lease_get(NS, lease.lease_id)
    assert after.state is LeaseState.EXPIRED
    assert after.expires_at_us == lease.expires_at_us


async def test_expiry_does_not_spin_on_an_overdue_lease_locked_elsewhere(
    db_url: str, lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    needs_postgres(db_url)
    lease = await grant(lease_store, "waits/expiry")
    fake_clock.set(lease.expires_at_us + 1)
    config = ExpiryConfig()
    loop = ExpiryLoop(lease_store, fake_clock, config)
    async with row_lock(db_url, LOCK_LEASE, lease.lease_id):
        blocked = await loop.run_once()
    assert blocked.expired == []
    assert blocked.sleep_s >= config.min_interval_s
    done = await loop.run_once()
    assert [x.lease_id for x in done.expired] == [lease.lease_id]
