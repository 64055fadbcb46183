"""``hold()`` through outages and late news, against a real server (SQLite and PostgreSQL).

The server runs in process on a fake clock, the client on a ``ManualClock`` (``clocks``); a
TCP proxy between them cuts or black-holes the network on demand. Nothing here waits for an
expiry in real time and nothing asserts on wall-clock durations:

- a release refused because the lease ended under the body (revoked, or expired on a server
  whose clock ran ahead) makes the hold raise ``LeaseLost``; a release that only arrived
  late does not;
- a grant's safety deadline counts from the Acquire attempt that got it, not from the first
  attempt an outage earlier; a grant that arrives past its safety deadline is released and
  never handed out, so the key is not left blocked;
- unary renewals through an outage back off (growing, jittered, capped well below the
  margin) and one lease probes for all: the number of ``Renew`` calls is bounded by the
  outage's length on the fake clock, not by how many leases are held.

Retries (of Acquire, Release, ...) sleep on the client's clock too, so a test moves it to let
them happen. Time moves in steps that end once the client's attempts are back
(:func:`advance_until`); after the network comes back, the test waits for the client's
channel to connect (gRPC reconnects in real time) before time moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.client.conftest import (
    ClientFactory,
    Clocks,
    InProcessServer,
    advance_until,
    driven,
    reachable,
    wait_until,
)
from tests.support.tcp_proxy import TcpProxy
from tether_client import HeldLease, KeeperConfig, LeaseLost, RetryPolicy, TetherClient
from tether_client.clock import backoff
from tether_client.connection import Endpoint
from tether_client.errors import LeaseExpired, LeaseRevoked, LeaseUnavailable
from tether_client.pb import lease_pb2
from tether_client.retry import Attempt, Metadata

TTL = 9.0
MARGIN = 0.9  # KeeperConfig default: a tenth of the ttl
# Quick retries of Acquire and Release (on the client's clock) while the proxy is cut.
FAST_RETRY = RetryPolicy(initial_backoff=0.02, max_backoff=0.2)


@pytest.fixture
async def proxy(tether: InProcessServer) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy("127.0.0.1", tether.port).start()
    try:
        yield proxy
    finally:
        proxy.resume()
        await proxy.close()


def via(proxy: TcpProxy) -> str:
    return f"127.0.0.1:{proxy.port}"


@dataclass
class Tried:
    """One RPC attempt: its start on the client clock and how it ended (None: under way)."""

    started: float
    ended: bool = False
    error: BaseException | None = None


class Attempts:
    """Every RPC attempt ``client`` makes, in order. A test waits until an attempt that
    started after some moment has failed: the attempts of one call run one after another,
    so none from before is still under way."""

    def __init__(self, client: TetherClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tried: list[Tried] = []
        transport = client._transport
        clock, call = transport.clock, transport.call

        async def recording_call(attempt: Attempt[Any], **options: Any) -> Any:
            async def recorded(endpoint: Endpoint, left: float, metadata: Metadata) -> Any:
                tried = Tried(clock.monotonic())
                self.tried.append(tried)
                try:
                    return await attempt(endpoint, left, metadata)
                except Exception as exc:
                    tried.error = exc
                    raise
                finally:
                    tried.ended = True

            return await call(recorded, **options)

        monkeypatch.setattr(transport, "call", recording_call)

    def failed_since(self, moment: float) -> bool:
        return any(t.started >= moment and t.error is not None for t in self.tried)

    async def one_failed_since(self, moment: float) -> None:
        await wait_until(lambda: self.failed_since(moment), "a failed attempt")

    def last(self) -> Tried:
        assert self.tried, "no attempt made"
        return self.tried[-1]


async def state_of(tether: InProcessServer, lease_id: str) -> int:
    # Straight to the server: the proxy may still be cut.
    async with TetherClient(tether.target) as reader:
        return (await reader.leases.get(lease_id=lease_id)).state


async def key_is_free(tether: InProcessServer, key: str) -> bool:
    """Whether another holder gets ``key`` at once (and gives it back)."""
    async with TetherClient(tether.target, holder="someone-else") as other:
        try:
            lease = (await other.leases.acquire(key, ttl=TTL)).lease
        except LeaseUnavailable:
            return False
        await other.leases.release(lease.lease_id, lease.fencing_token)
        return True


# ---- a release refused because the lease ended under the body ----------------------------


async def test_a_revocation_found_by_the_release_raises_lease_lost(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    called: list[HeldLease] = []
    held: list[HeldLease] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL, on_lost=called.append) as lease:
            held.append(lease)
            await admin.leases.revoke(lease.lease_id, reason="test")
            # No renewal since (the clock stands still): the keeper cannot know yet.
            assert not lease.lost

    with pytest.raises(LeaseLost) as caught:
        await body()
    (lease,) = held
    assert isinstance(caught.value.cause, LeaseRevoked)
    assert "ran without it" in caught.value.message
    assert lease.lost
    assert lease.lost_error is caught.value
    assert called == [lease]
    with pytest.raises(LeaseLost):
        _ = lease.fencing_token
    assert await state_of(tether, lease.lease_id) == lease_pb2.LEASE_STATE_REVOKED


async def test_an_expiry_on_a_server_whose_clock_ran_ahead_raises_lease_lost(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    held: list[HeldLease] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL) as lease:
            held.append(lease)
            # Only the server's clock moves: its deadline passes while the client's safety
            # deadline has not, so the release goes out "in time" and is refused.
            clocks.server.advance(TTL)
            assert not lease.lost

    with pytest.raises(LeaseLost) as caught:
        await body()
    assert isinstance(caught.value.cause, LeaseExpired)
    assert held[0].lost


async def test_a_body_that_failed_keeps_its_error_with_a_note(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    held: list[HeldLease] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL) as lease:
            held.append(lease)
            await admin.leases.revoke(lease.lease_id)
            raise RuntimeError("the body failed")

    with pytest.raises(RuntimeError, match="the body failed") as caught:
        await body()
    assert any("LEASE_REVOKED" in note for note in caught.value.__notes__)
    assert held[0].lost


async def test_a_release_that_only_arrived_late_is_no_loss(
    tether: InProcessServer,
    clocks: Clocks,
    client_factory: ClientFactory,
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The body ended while the lease was surely live; the network was cut as it exited and
    the release got through only after the lease had expired. The work was covered: the
    hold ends quietly (the key had freed up on its own)."""
    client = client_factory(via(proxy), retry=FAST_RETRY)
    attempts = Attempts(client, monkeypatch)
    done = asyncio.Event()
    holding: list[HeldLease] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL) as lease:
            holding.append(lease)
            await done.wait()

    await reachable(client)
    task = asyncio.create_task(body())
    # Time moves only should the Acquire need a retry.
    await advance_until(clocks.advance, lambda: bool(holding), step=0.05)
    (lease,) = holding
    await proxy.cut()
    done.set()
    # The exit checked the safety deadline and started releasing.
    await wait_until(lambda: not lease.alive, "the release under way")
    await attempts.one_failed_since(clocks.client.monotonic())
    clocks.advance(TTL)
    # Only attempts sent after the safety deadline are left to get through.
    late = clocks.client.monotonic()
    await attempts.one_failed_since(late)
    await proxy.restore()
    await reachable(client)
    await advance_until(clocks.advance, task.done, step=0.05)
    await task  # no LeaseLost
    assert not lease.lost
    # The release did get through, late: the server refused it as expired.
    last = attempts.last()
    assert last.started >= late
    assert isinstance(last.error, grpc.aio.AioRpcError)
    assert last.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await state_of(tether, lease.lease_id) == lease_pb2.LEASE_STATE_EXPIRED


# ---- Acquire across an outage -------------------------------------------------------------


async def test_an_acquire_retried_across_a_long_outage_anchors_on_the_attempt_that_got_it(
    tether: InProcessServer,
    clocks: Clocks,
    client_factory: ClientFactory,
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = client_factory(via(proxy), retry=FAST_RETRY)
    attempts = Attempts(client, monkeypatch)
    await proxy.cut()
    entering = asyncio.create_task(client.hold("jobs/a", ttl=TTL).__aenter__())
    # The first attempt went out (and failed) at the current client time...
    first = clocks.client.monotonic()
    await attempts.one_failed_since(first)
    # ...and the outage outlasts the ttl before an attempt gets through.
    clocks.advance(2 * TTL)
    await attempts.one_failed_since(clocks.client.monotonic())
    await proxy.restore()
    await reachable(client)
    await advance_until(clocks.advance, entering.done, step=0.05)
    lease = entering.result()
    try:
        granted_from = attempts.last().started
        assert attempts.last().error is None
        assert granted_from >= first + 2 * TTL
        assert lease.safe_until == pytest.approx(granted_from + TTL - MARGIN)
        assert not lease.lost
        assert lease.alive
    finally:
        # Exit the hold the way `async with` would.
        client._keeper.remove(lease)
        await client._keeper.release(lease)
    assert await state_of(tether, lease.lease_id) == lease_pb2.LEASE_STATE_RELEASED
    assert await key_is_free(tether, "jobs/a")


async def test_a_grant_that_arrives_past_its_safety_deadline_is_released_not_handed_out(
    tether: InProcessServer,
    clocks: Clocks,
    client_factory: ClientFactory,
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = client_factory(via(proxy), retry=FAST_RETRY)
    attempts = Attempts(client, monkeypatch)
    proxy.stall()  # the attempt goes out, and nothing comes back for now
    entering = asyncio.create_task(client.hold("jobs/a", ttl=TTL).__aenter__())
    await wait_until(lambda: attempts.tried and proxy.connections >= 1, "the attempt on its way")
    sent_at = clocks.client.monotonic()
    clocks.advance(TTL)  # the answer will arrive a whole ttl after the send
    proxy.resume()
    with pytest.raises(LeaseLost, match="after its safety deadline"):
        await asyncio.wait_for(entering, 30)
    (acquire, release) = attempts.tried
    assert acquire.started == sent_at
    assert acquire.error is None
    assert release.error is None
    assert client._keeper.held == []
    # It was given back, not left to block the key for the rest of its ttl.
    async with TetherClient(tether.target) as reader:
        stored = await reader.leases.get("jobs/a")
    assert stored.state == lease_pb2.LEASE_STATE_RELEASED
    assert await key_is_free(tether, "jobs/a")


# ---- unary renewals through an outage ----------------------------------------------------


def test_backoff_grows_jitters_and_stays_under_its_cap() -> None:
    for attempt in range(1, 40):
        high = min(1.0, 0.05 * 2 ** (attempt - 1))
        delays = [backoff(attempt, 0.05, 1.0) for _ in range(50)]
        assert all(high / 2 <= d <= high for d in delays)
    assert len({backoff(8, 0.05, 1.0) for _ in range(20)}) > 1
    assert backoff(10_000, 0.05, 1.0) <= 1.0  # no overflow far out


async def test_unary_renewals_through_an_outage_back_off_and_probe_for_all_leases(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory, proxy: TcpProxy
) -> None:
    ttl, leases_held = 30.0, 5
    cap = min(KeeperConfig().renew_retry_max, ttl * 0.1 / 2)  # half the margin
    client = client_factory(
        via(proxy), keeper=KeeperConfig(reconnect_initial=0.1, reconnect_max=0.5)
    )
    stats = client.keeper_stats
    await reachable(client)
    async with contextlib.AsyncExitStack() as stack:

        async def enter() -> list[HeldLease]:
            return [
                await stack.enter_async_context(client.hold(f"jobs/{i}", ttl=ttl))
                for i in range(leases_held)
            ]

        leases = await driven(clocks.advance, enter())
        await advance_until(clocks.advance, lambda: stats.renewals_acked >= leases_held)
        assert stats.unary_renewals == 0
        last_safe = {lease.lease_id: lease.safe_until for lease in leases}
        await proxy.cut()
        # 15 s of outage on the fake clock, in 50 ms steps, each over once the client's
        # attempts have failed: the streams fail, the keeper falls back to unary Renew when
        # renewals fall due (a third of the ttl), and keeps trying for about 5 s. The old
        # keeper sent one call per lease per step here.
        outage, step = 15.0, 0.05
        until = clocks.client.monotonic() + outage
        await advance_until(
            clocks.advance, lambda: clocks.client.monotonic() >= until - 1e-9, step=step
        )
        calls = stats.unary_renewals
        unary_phase = outage - ttl / 3
        # One wave for every lease, then one probe at a time at least cap/2 apart (after
        # a short ramp of growing delays): a bound set by time, not by the leases held.
        bound = leases_held + 6 + unary_phase / (cap / 2)
        assert 3 <= calls <= bound, (calls, bound)
        assert stats.unary_renewals_held_back > 0
        assert not any(lease.lost for lease in leases)
        # Back online, the probe gets through and the others follow at once, well before
        # any safety deadline.
        await proxy.restore()
        await reachable(client)
        await advance_until(
            clocks.advance,
            lambda: all(lease.safe_until > last_safe[lease.lease_id] for lease in leases),
            step=0.1,
        )
        assert not any(lease.lost for lease in leases)
