"""Races over gRPC: many callers for one key, renewals against expiry, two ends at once.

Each Acquire race splits its callers over two server replicas sharing one database (the
fixture's server and a second one started here), so the store's locking is what decides,
not one process's scheduling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.app import TetherServer

from .conftest import WAIT_S, Harness, dur, error_info, ts_us

S = 1_000_000


@pytest.fixture
async def replica(tether: Harness) -> AsyncIterator[lease_pb2_grpc.LeaseServiceStub]:
    """A second server on the same database and clock; returns a stub for it."""
    config = dataclasses.replace(tether.server.config, replica="replica-b")
    server = TetherServer(config, tether.clock)
    port = await server.start()
    await server.expiry.stop()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield lease_pb2_grpc.LeaseServiceStub(channel)
    finally:
        try:
            await server.stop(0)
        finally:
            await channel.close()


async def test_one_winner_among_fifty_concurrent_acquirers(
    tether: Harness, replica: lease_pb2_grpc.LeaseServiceStub
) -> None:
    stubs = [tether.stub, replica]
    for round_ in range(10):
        key = f"race/{round_}"

        async def attempt(index: int, key: str = key) -> lease_pb2.AcquireResponse | Exception:
            try:
                return await stubs[index % 2].Acquire(
                    lease_pb2.AcquireRequest(key=key, holder=f"h{index}", ttl=dur(30)),
                    timeout=WAIT_S * 3,
                )
            except grpc.aio.AioRpcError as exc:
                return exc

        outcomes = await asyncio.gather(*(attempt(i) for i in range(50)))
        winners = [o for o in outcomes if isinstance(o, lease_pb2.AcquireResponse)]
        losers = [o for o in outcomes if not isinstance(o, lease_pb2.AcquireResponse)]
        assert len(winners) == 1, f"round {round_}: {len(winners)} winners"
        winner = winners[0].lease
        assert winners[0].created is True
        assert winner.fencing_token == 1
        assert len(losers) == 49
        for loser in losers:
            code, reason, metadata = error_info(loser)
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_HELD")
            assert metadata["holder"] == winner.holder
            assert metadata["lease_id"] == winner.lease_id
        stored = await tether.list_all(key_prefix=key)
        assert [lease.lease_id for lease in stored] == [winner.lease_id]


async def test_the_same_holder_racing_itself_gets_one_lease(
    tether: Harness, replica: lease_pb2_grpc.LeaseServiceStub
) -> None:
    stubs = [tether.stub, replica]
    responses = await asyncio.gather(
        *(
            stubs[i % 2].Acquire(
                lease_pb2.AcquireRequest(key="race/self", holder="me", ttl=dur(30)),
                timeout=WAIT_S * 3,
            )
            for i in range(20)
        )
    )
    assert len({r.lease.lease_id for r in responses}) == 1
    assert sum(r.created for r in responses) == 1


async def test_renewal_racing_expiry_never_both_wins(tether: Harness) -> None:
    """The clock crosses a lease's deadline while a Renew is on its way through the server
    (in the committer's queue, in a batch, or committing), and the expiry loop runs right
    then. Renewed or expired, never both, and a renewal is never computed from a moment at
    or past the deadline.

    Every third round crosses before the Renew reaches the store (it must be refused), every
    third after it returned (it must have been renewed), and the rest after a varying number
    of event-loop turns, landing on any stage of the Renew's path: the renewal and the
    expiry pass may then share one group-committed batch, in either order.
    """
    rng = random.Random(7)
    outcomes = {"renewed": 0, "expired": 0}
    store = tether.server.leases
    original_renew_many = store.lease_renew_many
    crossed = asyncio.Event()
    cross_before_store = [False]

    async def renew_many(*args: Any, **kwargs: Any) -> Any:
        if cross_before_store[0]:
            tether.clock.advance(2e-6)
            crossed.set()
        return await original_renew_many(*args, **kwargs)

    store.lease_renew_many = renew_many  # type: ignore[method-assign]
    for round_ in range(39):
        lease = await tether.acquire(f"race/renew/{round_}", "w1", ttl_s=10)
        deadline = ts_us(lease.expires_at)
        tether.clock.set(deadline - 1)
        kind = ("before", "after", "racing")[round_ % 3]
        cross_before_store[0] = kind == "before"
        crossed.clear()
        returned = asyncio.Event()
        turns = rng.randrange(0, 60)

        async def renew(
            lease: lease_pb2.Lease = lease, returned: asyncio.Event = returned
        ) -> lease_pb2.RenewResponse | Exception:
            try:
                return await tether.stub.Renew(
                    lease_pb2.RenewRequest(
                        lease_id=lease.lease_id, fencing_token=lease.fencing_token
                    ),
                    timeout=WAIT_S,
                )
            except grpc.aio.AioRpcError as exc:
                return exc
            finally:
                returned.set()

        async def cross_deadline_and_expire(
            kind: str = kind, turns: int = turns, returned: asyncio.Event = returned
        ) -> list[str]:
            if kind == "before":
                await asyncio.wait_for(crossed.wait(), WAIT_S)
            else:
                if kind == "after":
                    await asyncio.wait_for(returned.wait(), WAIT_S)
                for _ in range(turns):
                    await asyncio.sleep(0)
                tether.clock.advance(2e-6)  # one microsecond past the deadline
            result = await tether.server.expiry.run_once()
            return [expired.lease_id for expired in result.expired]

        renewed, expired_ids = await asyncio.gather(renew(), cross_deadline_and_expire())
        expired = lease.lease_id in expired_ids
        stored = await tether.get(lease.lease_id)
        if kind != "racing":
            assert isinstance(renewed, lease_pb2.RenewResponse) == (kind == "after"), kind
        if isinstance(renewed, lease_pb2.RenewResponse):
            outcomes["renewed"] += 1
            assert not expired, f"round {round_}: renewed and expired"
            # Decided before the crossing, so computed from deadline - 1.
            assert ts_us(renewed.expires_at) == deadline - 1 + 10 * S
            assert stored.state == lease_pb2.LEASE_STATE_ACTIVE
            assert ts_us(stored.expires_at) == ts_us(renewed.expires_at)
        else:
            outcomes["expired"] += 1
            code, reason, _ = error_info(renewed)
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_EXPIRED")
            assert stored.state == lease_pb2.LEASE_STATE_EXPIRED
            assert ts_us(stored.expires_at) == deadline
            # The loop records it now if it had not yet.
            await tether.server.expiry.run_once()
            assert (await tether.get(lease.lease_id)).state == lease_pb2.LEASE_STATE_EXPIRED
        # Leave no lease near its deadline for the next round.
        await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id))
    assert outcomes["expired"] >= 13, outcomes
    assert outcomes["renewed"] >= 13, outcomes


@pytest.mark.parametrize("order", ["release-first", "revoke-first"])
async def test_release_racing_revoke_ends_the_lease_once(
    tether: Harness, replica: lease_pb2_grpc.LeaseServiceStub, order: str
) -> None:
    lease = await tether.acquire("race/end", "w1", ttl_s=30)
    before, _ = await tether.server.db.current_revision()
    release = tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w1"
        ),
        timeout=WAIT_S,
    )
    revoke = replica.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id), timeout=WAIT_S)
    calls = [release, revoke] if order == "release-first" else [revoke, release]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    released, revoked = outcomes if order == "release-first" else outcomes[::-1]
    assert not isinstance(revoked, BaseException), revoked
    if isinstance(released, grpc.aio.AioRpcError):
        # The revocation won: the holder is told so, not that it released the lease.
        code, reason, _ = error_info(released)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_REVOKED")
        assert revoked.lease.state == lease_pb2.LEASE_STATE_REVOKED
    else:
        assert not isinstance(released, BaseException), released
        # The release won; the revocation reports the same single end.
        assert released.lease == revoked.lease
        assert released.lease.state == lease_pb2.LEASE_STATE_RELEASED
    after, _ = await tether.server.db.current_revision()
    assert after == before + 1, "exactly one end event"
