"""``TetherClient.hold()`` against a real server (in process, SQLite and PostgreSQL).

Server and client clocks are fake and move together (``clocks``): the keeper renews when
the client clock says so and the server measures deadlines on its own clock, so a test can
walk through renewals and losses without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.client.conftest import (
    ClientFactory,
    Clocks,
    InProcessServer,
    advance_until,
    wait_until,
)
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
            clocks.advance, lambda: client.keeper_stats.renewals_acked >= 3, step=1.0
        )
        assert lease.expires_at > first_expiry
        stored = await client.leases.get(lease_id=lease.lease_id)
        assert stored.state == lease_pb2.LEASE_STATE_ACTIVE
        assert stored.heartbeat_stream_attached
        assert stored.labels["team"] == "ci"
    assert client.keeper_stats.streams_opened == 1
    assert tether.server.metrics.keepalive_streams_total == 1
    ended = await client.leases.get(lease_id=lease.lease_id)
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
            clocks.advance, lambda: client.keeper_stats.renewals_acked >= 1, step=1.0
        )
        assert (await client.leases.get(lease_id=lease.lease_id)).progress == b"step 1"
        lease.set_progress(b"step 2")
        acked = client.keeper_stats.renewals_acked
        await advance_until(
            clocks.advance, lambda: client.keeper_stats.renewals_acked > acked, step=1.0
        )
        assert (await client.leases.get(lease_id=lease.lease_id)).progress == b"step 2"


async def test_revoked_lease_is_lost_at_once_with_callbacks_and_no_release(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    called: list[HeldLease] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL, on_lost=called.append) as lease:
            await admin.leases.revoke(lease.lease_id, reason="test")
            await advance_until(clocks.advance, lambda: lease.lost)
            assert called == [lease]
            error = await lease.wait_lost()
            assert isinstance(error.cause, LeaseRevoked)
            with pytest.raises(LeaseLost):
                _ = lease.fence
            late: list[HeldLease] = []
            lease.on_lost(late.append)
            assert late == [lease]
            assert client._keeper.held == []

    # The body ended normally, but without the lease: the block says so.
    with pytest.raises(LeaseLost) as caught:
        await body()
    (lease,) = called
    assert caught.value is lease.lost_error
    assert (await admin.leases.get(lease_id=lease.lease_id)).state == (
        lease_pb2.LEASE_STATE_REVOKED
    )


async def test_on_lost_cancel_cancels_the_body_and_raises_lease_lost(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    reached_end = False

    async def body() -> None:
        nonlocal reached_end
        async with client.hold("jobs/a", ttl=TTL, on_lost="cancel") as lease:
            await admin.leases.revoke(lease.lease_id)
            await asyncio.Event().wait()  # the loss must cancel this
            reached_end = True

    task = asyncio.create_task(body())
    await advance_until(clocks.advance, task.done)
    with pytest.raises(LeaseLost):
        await task
    assert not reached_end
    # The cancellation the loss caused was taken back.
    assert task.cancelling() == 0


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
    lease = await client.leases.get(key="jobs/a")
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
        stored = await client.leases.get(lease_id=outer.lease_id)
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
        # The server parks the Acquire until the key changes: nothing is granted meanwhile.
        await wait_until(lambda: tether.waits_for_key("jobs/a"), "the parked Acquire")
        assert not waiter.done()
    # The first hold released on exit; the waiter gets the key with a fresh token.
    taken = await asyncio.wait_for(waiter, 10)
    assert taken.fencing_token > held.acquired.fencing_token
    # Granted during a wait: its deadline comes from a renewal sent after the grant.
    assert taken.safe_until == pytest.approx(clocks.client.monotonic() + TTL - 0.9)
    second._keeper.remove(taken)


async def test_expired_on_the_server_is_lost_on_the_client_first(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    """A keeper that cannot renew (its stream and calls hang) reports the loss before the
    server's deadline, measured on both clocks."""
    client = client_factory(tether.target)
    server_deadline: list[float] = []
    lost_server_time: list[float] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL) as lease:
            server_deadline.append(lease.expires_at.timestamp())
            # Freeze the keeper: nothing it sends is answered from now on.
            await tether.server.stop(0)
            lease.on_lost(lambda _: lost_server_time.append(clocks.server.now_us() / 1e6))
            # The loss is the client's own decision: each step waits only for the failed
            # reconnects and renewals to come back, never for an answer.
            await advance_until(clocks.advance, lambda: lease.lost)

    with pytest.raises(LeaseLost):
        await body()
    assert lost_server_time[0] < server_deadline[0]


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
            clocks.advance, lambda: client.keeper_stats.renewals_acked >= count, step=1.0
        )
        assert all(lease.expires_at > before[lease.lease_id] for lease in leases)
        assert all(lease.alive for lease in leases)
        assert client.keeper_stats.streams_opened == 1
        assert tether.server.metrics.keepalive_streams_total == 1
        # Batched: far fewer requests than renewals.
        assert client.keeper_stats.requests_sent < count / 10
    listed = [
        lease
        async for lease in client.leases.list(key_prefix="many/", page_size=1000)
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


# --- on_lost="cancel": the loss ends the block, its cancellation never leaks -------------
#
# A ttl of 2 s has a safety margin of 0.2 s: past 1.8 s of client time without a renewal the
# lease is lost. The bodies below move both clocks themselves, synchronously, so the keeper
# never gets a turn: the body is the first to see the loss. Each body runs in the test's own
# task, so the test sees what the caller of the block would: the next awaits, and the
# task's count of cancellation requests.

SHORT_TTL = 2.0


async def no_cancellation_pending() -> bool:
    """Whether the next awaits of this task pass (a cancellation left pending by the block
    would raise at the first)."""
    try:
        for _ in range(5):
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        return False
    return True


def this_task() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task


class Bodies:
    """Blocks under ``hold("k", ttl=SHORT_TTL, on_lost="cancel")`` that lose the lease."""

    def __init__(self, client: TetherClient, clocks: Clocks) -> None:
        self.client = client
        self.clocks = clocks
        self.held: list[HeldLease] = []
        self.swallowed = False

    @property
    def lease(self) -> HeldLease:
        (lease,) = self.held
        return lease

    async def reads_the_loss(self) -> None:
        async with self.client.hold("k", ttl=SHORT_TTL, on_lost="cancel") as lease:
            self.held.append(lease)
            self.clocks.advance(SHORT_TTL)  # past the safety deadline, no await since
            assert lease.lost

    async def uses_the_token(self) -> None:
        async with self.client.hold("k", ttl=SHORT_TTL, on_lost="cancel") as lease:
            self.held.append(lease)
            self.clocks.advance(SHORT_TTL)
            _ = lease.fencing_token

    async def swallows_the_cancellation(self) -> None:
        async with self.client.hold("k", ttl=SHORT_TTL, on_lost="cancel") as lease:
            self.held.append(lease)
            self.clocks.advance(SHORT_TTL)
            assert lease.lost
            try:
                await asyncio.Event().wait()  # the loss cancels this...
            except asyncio.CancelledError:
                self.swallowed = True  # ...and the body carries on as if nothing happened

    async def raises(self, after_the_cancellation: bool) -> None:
        async with self.client.hold("k", ttl=SHORT_TTL, on_lost="cancel") as lease:
            self.held.append(lease)
            self.clocks.advance(SHORT_TTL)
            assert lease.lost
            if after_the_cancellation:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.swallowed = True
            raise RuntimeError("the body's own failure")


async def test_a_body_that_reads_the_loss_ends_with_lease_lost_and_leaves_no_cancellation(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    """The defect: the body's own read of ``lease.lost`` past the safety deadline cancelled
    the running task; a body that then ended without another await left the block quietly
    and carried the cancellation to the caller's next await."""
    bodies = Bodies(client_factory(tether.target), clocks)
    cancelling = this_task().cancelling()
    caught: LeaseLost | None = None
    try:
        await bodies.reads_the_loss()
    except LeaseLost as exc:
        caught = exc
    assert await no_cancellation_pending(), "the hold's cancellation leaked out of the block"
    assert caught is not None, "the block ended normally although the lease was lost"
    assert caught is bodies.lease.lost_error
    assert caught.__cause__ is None
    assert this_task().cancelling() == cancelling
    assert bodies.client._keeper.held == []


async def test_a_body_that_uses_the_token_after_the_loss_gets_lease_lost_and_no_cancellation(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    bodies = Bodies(client_factory(tether.target), clocks)
    cancelling = this_task().cancelling()
    with pytest.raises(LeaseLost) as caught:
        await bodies.uses_the_token()
    assert await no_cancellation_pending()
    # The body's own LeaseLost goes out as it is, not chained to itself.
    assert caught.value is bodies.lease.lost_error
    assert this_task().cancelling() == cancelling


async def test_a_body_that_swallows_the_cancellation_still_ends_with_lease_lost(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    bodies = Bodies(client_factory(tether.target), clocks)
    cancelling = this_task().cancelling()
    with pytest.raises(LeaseLost) as caught:
        await bodies.swallows_the_cancellation()
    assert bodies.swallowed
    assert caught.value is bodies.lease.lost_error
    assert await no_cancellation_pending()
    # The cancellation the hold delivered was taken back.
    assert this_task().cancelling() == cancelling


async def test_a_lease_lost_under_a_swallowed_cancellation_found_by_the_keeper(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    """The same with the keeper seeing the loss (a revocation) while the body waits."""
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    swallowed = asyncio.Event()

    async def body() -> None:
        async with client.hold("k", ttl=TTL, on_lost="cancel") as lease:
            await admin.leases.revoke(lease.lease_id)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.set()

    task = asyncio.create_task(body())
    await advance_until(clocks.advance, task.done)
    with pytest.raises(LeaseLost) as caught:
        await task
    assert swallowed.is_set()
    assert isinstance(caught.value.cause, LeaseRevoked)
    assert task.cancelling() == 0


@pytest.mark.parametrize("after_the_cancellation", [False, True], ids=["before", "after"])
async def test_a_body_that_raises_its_own_error_ends_with_lease_lost_chained_from_it(
    tether: InProcessServer,
    clocks: Clocks,
    client_factory: ClientFactory,
    after_the_cancellation: bool,
) -> None:
    bodies = Bodies(client_factory(tether.target), clocks)
    cancelling = this_task().cancelling()
    with pytest.raises(LeaseLost) as caught:
        await bodies.raises(after_the_cancellation)
    assert bodies.swallowed == after_the_cancellation
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert str(caught.value.__cause__) == "the body's own failure"
    assert caught.value is bodies.lease.lost_error
    assert await no_cancellation_pending()
    assert this_task().cancelling() == cancelling


@pytest.mark.parametrize("first", ["the loss", "the cancellation"])
async def test_an_outside_cancellation_of_a_body_whose_lease_is_lost_passes_through(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory, first: str
) -> None:
    client = client_factory(tether.target)
    held: list[HeldLease] = []
    entered = asyncio.Event()

    async def body() -> None:
        async with client.hold("k", ttl=SHORT_TTL, on_lost="cancel") as lease:
            held.append(lease)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await entered.wait()
    (lease,) = held
    clocks.advance(SHORT_TTL)
    if first == "the loss":
        assert lease.lost  # seen from outside the body: the hold cancels it at once
        task.cancel()
    else:
        task.cancel()
        assert lease.lost
    with pytest.raises(asyncio.CancelledError):
        await task
    # The hold took back its own cancellation; the outside one remains.
    assert task.cancelling() == 1
    assert client._keeper.held == []
