"""``TetherClient.hold()`` against a real server (in process, SQLite and PostgreSQL).

Server and client clocks are fake and move together (``clocks``): the keeper renews when
the client clock says so and the server measures deadlines on its own clock, so a test can
walk through renewals and losses without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.client.conftest import ClientFactory, Clocks, InProcessServer, advance_until
from tether_client import HeldLease, LeaseLost, LeaseNotHeld, TetherClient
from tether_client.errors import LeaseHeld, LeaseRevoked
from tether_client.pb import lease_pb2

TTL = 9.0


async def test_hold_renews_on_one_stream_and_releases_on_exit(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    async with client.hold("jobs/a", ttl=TTL, labels={"team": "ci"}) as lease:
        first_expiry = lease.expires_at
        assert lease.alive
        assert not lease.lost
        assert lease.fencing_token >= 1
        await advance_until(
            clocks.advance, lambda: client.keeper.stats.renewals_acked >= 3, step=1.0
        )
        assert lease.expires_at > first_expiry
        stored = await client.get_lease(lease_id=lease.lease_id)
        assert stored.state == lease_pb2.LEASE_STATE_ACTIVE
        assert stored.heartbeat_stream_attached
        assert stored.labels["team"] == "ci"
    assert client.keeper.stats.streams_opened == 1
    assert tether.server.metrics.keepalive_streams_total == 1
    ended = await client.get_lease(lease_id=lease.lease_id)
    assert ended.state == lease_pb2.LEASE_STATE_RELEASED
    assert not lease.alive
    with pytest.raises(LeaseNotHeld):
        _ = lease.fencing_token


async def test_progress_goes_out_with_the_next_renewal(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    async with client.hold("jobs/a", ttl=TTL, progress=b"step 1") as lease:
        await advance_until(
            clocks.advance, lambda: client.keeper.stats.renewals_acked >= 1, step=1.0
        )
        assert (await client.get_lease(lease_id=lease.lease_id)).progress == b"step 1"
        lease.set_progress(b"step 2")
        acked = client.keeper.stats.renewals_acked
        await advance_until(
            clocks.advance, lambda: client.keeper.stats.renewals_acked > acked, step=1.0
        )
        assert (await client.get_lease(lease_id=lease.lease_id)).progress == b"step 2"


async def test_revoked_lease_is_lost_at_once_with_callbacks_and_no_release(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    called: list[HeldLease] = []
    async with client.hold("jobs/a", ttl=TTL, on_lost=called.append) as lease:
        await admin.revoke(lease.lease_id, reason="test")
        await advance_until(clocks.advance, lambda: lease.lost)
        assert called == [lease]
        error = await lease.wait_lost()
        assert isinstance(error.cause, LeaseRevoked)
        with pytest.raises(LeaseLost):
            _ = lease.fence
        late: list[HeldLease] = []
        lease.on_lost(late.append)
        assert late == [lease]
        assert client.keeper.held == []
    assert (await admin.get_lease(lease_id=lease.lease_id)).state == (lease_pb2.LEASE_STATE_REVOKED)


async def test_on_lost_cancel_cancels_the_body_and_raises_lease_lost(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    reached_end = False

    async def body() -> None:
        nonlocal reached_end
        async with client.hold("jobs/a", ttl=TTL, on_lost="cancel") as lease:
            await admin.revoke(lease.lease_id)
            await asyncio.Event().wait()  # the loss must cancel this
            reached_end = True

    task = asyncio.create_task(body())
    await advance_until(clocks.advance, task.done)
    with pytest.raises(LeaseLost):
        await task
    assert not reached_end


async def test_outside_cancellation_is_not_mistaken_for_a_loss(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    started = asyncio.Event()

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL, on_lost="cancel"):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lease = await client.get_lease(key="jobs/a")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


async def test_a_hold_is_not_reentrant(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    async with client.hold("jobs/a", ttl=TTL) as outer:
        # The server hands the same holder its live lease back; a second hold on it would
        # release it under the first.
        with pytest.raises(LeaseHeld):
            async with client.hold("jobs/a", ttl=TTL):
                pytest.fail("the body must not run")
        assert outer.alive
        stored = await client.get_lease(lease_id=outer.lease_id)
        assert stored.state == lease_pb2.LEASE_STATE_ACTIVE


async def test_lease_held_by_another_and_waiting_hold(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    first = client_factory(tether.target, holder="worker-1")
    second = client_factory(tether.target, holder="worker-2")
    async with first.hold("jobs/a", ttl=TTL) as held:
        with pytest.raises(LeaseHeld) as caught:
            async with second.hold("jobs/a", ttl=TTL):
                pass
        assert caught.value.holder == "worker-1"
        assert caught.value.expires_at is not None
        waiter = asyncio.create_task(second.hold("jobs/a", ttl=TTL, wait=30).__aenter__())
        await asyncio.sleep(0.05)
        assert not waiter.done()
    # The first hold released on exit; the waiter gets the key with a fresh token.
    taken = await asyncio.wait_for(waiter, 10)
    assert taken.fencing_token > held.acquired.fencing_token
    # Granted during a wait: its deadline comes from a renewal sent after the grant.
    assert taken.safe_until == pytest.approx(clocks.client.monotonic() + TTL - 0.9)
    second.keeper.remove(taken)


async def test_expired_on_the_server_is_lost_on_the_client_first(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    """A keeper that cannot renew (its stream and calls hang) reports the loss before the
    server's deadline, measured on both clocks."""
    client = client_factory(tether.target)
    async with client.hold("jobs/a", ttl=TTL) as lease:
        server_deadline = lease.expires_at
        # Freeze the keeper: nothing it sends is answered from now on.
        await tether.server.stop(0)
        lost_server_time: list[float] = []
        lease.on_lost(lambda _: lost_server_time.append(clocks.server.now_us() / 1e6))
        # The loss is the client's own decision: nothing to wait for on the network.
        await advance_until(clocks.advance, lambda: lease.lost, settle=5)
        assert lost_server_time[0] < server_deadline.timestamp()


async def test_thousand_leases_renew_over_one_stream(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    count = 1000
    async with contextlib.AsyncExitStack() as stack:
        semaphore = asyncio.Semaphore(32)

        async def hold(i: int) -> HeldLease:
            async with semaphore:
                return await stack.enter_async_context(client.hold(f"many/{i:04d}", ttl=TTL))

        leases = await asyncio.gather(*(hold(i) for i in range(count)))
        before = {lease.lease_id: lease.expires_at for lease in leases}
        await advance_until(
            clocks.advance, lambda: client.keeper.stats.renewals_acked >= count, step=1.0
        )
        assert all(lease.expires_at > before[lease.lease_id] for lease in leases)
        assert all(lease.alive for lease in leases)
        assert client.keeper.stats.streams_opened == 1
        assert tether.server.metrics.keepalive_streams_total == 1
        # Batched: far fewer requests than renewals.
        assert client.keeper.stats.requests_sent < count / 10
    listed = [
        lease
        async for lease in client.iter_leases(key_prefix="many/", page_size=1000)
        if lease.state == lease_pb2.LEASE_STATE_RELEASED
    ]
    assert len(listed) == count


async def test_closing_the_client_reports_held_leases_lost(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = TetherClient(tether.target)
    hold = client.hold("jobs/a", ttl=TTL)
    lease = await hold.__aenter__()
    await client.close()
    assert lease.lost
    with pytest.raises(LeaseLost):
        _ = lease.fencing_token
