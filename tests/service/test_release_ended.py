"""Release of a lease that already ended: only a lease its holder released reads as released.

A holder releasing a lease that expired or was revoked worked unprotected for a while (a
successor may already hold the key); an ``OK`` would hide that. It gets
``FAILED_PRECONDITION`` with ``LEASE_EXPIRED`` / ``LEASE_REVOKED``, and the refusal changes
nothing. Releasing a released lease again stays ``OK``. Each test runs on both backends.
"""

from __future__ import annotations

import grpc

from tether_client.pb import lease_pb2
from tether_server.domain.time import format_us

from .conftest import Harness, dur, expect_error, ts_us

FP = grpc.StatusCode.FAILED_PRECONDITION


def release_request(lease: lease_pb2.Lease) -> lease_pb2.ReleaseRequest:
    return lease_pb2.ReleaseRequest(
        lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder=lease.holder
    )


async def test_release_after_the_deadline_is_refused_as_expired(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=5)
    # Exactly at the deadline is already too late; the expiry loop has not run.
    tether.clock.advance(5)
    before = await tether.snapshot()
    metadata = await expect_error(tether.stub.Release(release_request(lease)), FP, "LEASE_EXPIRED")
    assert metadata == {
        "lease_id": lease.lease_id,
        "state": "LEASE_STATE_EXPIRED",
        "expires_at": format_us(ts_us(lease.expires_at)),
    }
    assert await tether.snapshot() == before  # a refusal writes nothing
    # Once the expiry is recorded the answer is the same.
    await tether.server.expiry.run_once()
    recorded = await tether.get(lease.lease_id)
    assert recorded.state == lease_pb2.LEASE_STATE_EXPIRED
    tether.clock.advance(60)
    metadata = await expect_error(tether.stub.Release(release_request(lease)), FP, "LEASE_EXPIRED")
    assert metadata["expires_at"] == format_us(ts_us(lease.expires_at))
    assert await tether.get(lease.lease_id) == recorded


async def test_release_just_before_the_deadline_releases(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=5)
    tether.clock.advance(5 - 1e-6)
    released = (await tether.stub.Release(release_request(lease))).lease
    assert released.state == lease_pb2.LEASE_STATE_RELEASED


async def test_release_after_a_revocation_is_refused_as_revoked(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=60, lock_delay=dur(10))
    revoked = (await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id))).lease
    assert revoked.state == lease_pb2.LEASE_STATE_REVOKED
    before = await tether.snapshot()
    metadata = await expect_error(tether.stub.Release(release_request(lease)), FP, "LEASE_REVOKED")
    assert metadata == {"lease_id": lease.lease_id, "state": "LEASE_STATE_REVOKED"}
    assert await tether.snapshot() == before
    # The refusal did not cut the revocation's lock-delay short either.
    await expect_error(
        tether.stub.Acquire(lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10))),
        FP,
        "LOCK_DELAY",
    )


async def test_release_of_a_released_lease_stays_ok(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=5)
    first = (await tether.stub.Release(release_request(lease))).lease
    assert first.state == lease_pb2.LEASE_STATE_RELEASED
    before = await tether.snapshot()
    # Long after its deadline too: a released lease never turns into an expired one.
    tether.clock.advance(60)
    await tether.server.expiry.run_once()
    second = (await tether.stub.Release(release_request(lease))).lease
    assert second == first
    assert await tether.snapshot() == before


async def test_checks_before_the_state_still_come_first(tether: Harness) -> None:
    """Who may release is checked before what state the lease is in: a stranger learns
    nothing about a revoked lease."""
    lease = await tether.acquire("jobs/a", "w1", ttl_s=60)
    await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id))
    await expect_error(
        tether.stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w2"
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_LEASE_HOLDER",
    )
    await expect_error(
        tether.stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token + 1, holder="w1"
            )
        ),
        FP,
        "STALE_FENCING_TOKEN",
    )
