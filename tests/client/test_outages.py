"""The keeper through real outages: a SIGKILLed server, a cut network, a black-holed one.

A real ``tether serve`` process (SQLite and PostgreSQL) runs on a file clock and the client
on a ``ManualClock``; the test moves both together. Faults:

- ``kill``: SIGKILL the server, later start it again on the same port and database;
- ``cut``: a TCP proxy between client and server closes every connection and refuses new
  ones, later accepts again;
- ``stall``: the proxy keeps connections open and accepts new ones but forwards nothing
  (no error reaches either side), later lets the bytes through.

A short outage (well within the ttl) must go unnoticed by the holder: same lease, same
token, no loss. A long one must be reported as a loss *before* the server's deadline, read
on the server's clock, and the client must never renew the lease again.

Fake time moves in steps, each one over once the client has what it sent back (while the
server is up) or once its failed attempts are back (during an outage; a stalled stream is
never answered, so keep-alives are not waited for then). After an outage the test waits for
the client's channel to be connected again before time moves on: gRPC reconnects in real
time, which fake time must not outrun.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from tests.client.conftest import Activity, advance_until, reachable, turns, wait_until
from tests.conftest import ServerFactory
from tests.support.server_process import FileClockDriver, ServerProcess
from tests.support.tcp_proxy import TcpProxy
from tether_client import HeldLease, KeeperConfig, LeaseLost, ManualClock, TetherClient
from tether_client.pb import lease_pb2

pytestmark = pytest.mark.e2e

TTL = 9.0
FAULTS = ("kill", "cut", "stall")


@dataclass
class Outage:
    fault: str
    server: ServerProcess
    proxy: TcpProxy | None
    file_clock: FileClockDriver
    client_clock: ManualClock
    # The client under test, once there is one: its activity ends each step of time.
    activity: Activity | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.proxy.port}" if self.proxy is not None else self.server.target

    async def begin(self) -> None:
        if self.fault == "kill":
            self.server.kill()
        elif self.fault == "cut":
            assert self.proxy is not None
            await self.proxy.cut()
        else:
            assert self.proxy is not None
            self.proxy.stall()

    async def end(self) -> None:
        if self.fault == "kill":
            await self.server.start_async()
        elif self.fault == "cut":
            assert self.proxy is not None
            await self.proxy.restore()
        else:
            assert self.proxy is not None
            self.proxy.resume()

    def advance(self, seconds: float) -> None:
        self.file_clock.advance(seconds)
        self.client_clock.advance(seconds)

    def server_now(self) -> float:
        return self.file_clock.now_us() / 1e6

    async def advance_until(
        self,
        predicate: Callable[[], bool],
        *,
        step: float = 0.25,
        quiet: Callable[[], bool] | None = None,
    ) -> None:
        """Steps of fake time, each over once ``quiet()`` (by default: the client has no
        RPC attempt and no keep-alive request unanswered)."""
        if quiet is None and self.activity is not None:
            quiet = self.activity.quiet
        await advance_until(self.advance, predicate, step=step, quiet=quiet)

    async def advance_for(
        self, seconds: float, *, step: float = 0.25, quiet: Callable[[], bool] | None = None
    ) -> None:
        until = self.client_clock.monotonic() + seconds
        await self.advance_until(
            lambda: self.client_clock.monotonic() >= until - 1e-9, step=step, quiet=quiet
        )

    def attempts_back(self) -> bool:
        """During an outage: every RPC attempt of the client has failed (a stalled stream
        never answers, so its keep-alives are not waited for)."""
        assert self.activity is not None
        return self.activity.attempts == 0


@pytest.fixture(params=FAULTS)
async def outage(
    request: pytest.FixtureRequest,
    db_url: str,
    server_factory: ServerFactory,
    file_clock: FileClockDriver,
) -> AsyncIterator[Outage]:
    server = server_factory(db_url, env=file_clock.env)
    proxy = None
    if request.param != "kill":
        proxy = await TcpProxy("127.0.0.1", server.port).start()
    try:
        yield Outage(request.param, server, proxy, file_clock, ManualClock())
    finally:
        if proxy is not None:
            proxy.resume()
            await proxy.close()


@pytest.fixture
async def client(outage: Outage) -> AsyncIterator[TetherClient]:
    client = TetherClient(
        outage.target,
        clock=outage.client_clock,
        keeper=KeeperConfig(reconnect_initial=0.1, reconnect_max=0.5),
    )
    outage.activity = Activity(client)
    await reachable(client)
    yield client
    await client.close()


async def _stored(outage: Outage, lease: HeldLease) -> lease_pb2.Lease:
    # Straight to the server: the proxy may still be cut.
    async with TetherClient(outage.server.target) as reader:
        return await reader.leases.get(lease_id=lease.lease_id)


async def test_short_outage_goes_unnoticed(outage: Outage, client: TetherClient) -> None:
    stats = client.keeper_stats
    async with client.hold("jobs/a", ttl=TTL) as lease:
        token = lease.fencing_token
        await outage.advance_until(lambda: stats.renewals_acked >= 1)
        await outage.begin()
        # A renewal falls due during the outage and goes out into it...
        sent = lease.renewals_sent
        await outage.advance_until(lambda: lease.renewals_sent > sent, quiet=outage.attempts_back)
        # ...which lasts a while longer.
        await outage.advance_for(1.0, quiet=outage.attempts_back)
        assert not lease.lost
        await outage.end()
        await reachable(client)
        acked = stats.renewals_acked
        await outage.advance_until(lambda: stats.renewals_acked > acked, step=0.1)
        assert not lease.lost
        assert lease.fencing_token == token
        stored = await _stored(outage, lease)
        assert stored.state == lease_pb2.LEASE_STATE_ACTIVE
        assert stored.fencing_token == token
        assert stored.expires_at.ToDatetime().timestamp() > outage.server_now()
    assert (await _stored(outage, lease)).state == lease_pb2.LEASE_STATE_RELEASED


async def test_long_outage_is_a_loss_reported_before_the_server_deadline(
    outage: Outage, client: TetherClient
) -> None:
    stats = client.keeper_stats
    lost_on_server_clock: list[float] = []

    async def body() -> None:
        async with client.hold("jobs/a", ttl=TTL) as lease:
            lease.on_lost(lambda _: lost_on_server_clock.append(outage.server_now()))
            await outage.advance_until(lambda: stats.renewals_acked >= 1)
            await outage.begin()
            # Nothing to wait for on the network: the loss is the client's own decision.
            await outage.advance_until(lambda: lease.lost, quiet=lambda: True)
            # The order, on the server's own clock: the client let go first.
            server_deadline = lease.expires_at.timestamp()
            assert lost_on_server_clock[0] < server_deadline
            sent = lease.renewals_sent
            await outage.end()
            if outage.fault != "stall":
                # No renewal got through after the last acknowledged one.
                stored = await _stored(outage, lease)
                assert stored.expires_at.ToDatetime().timestamp() == pytest.approx(server_deadline)
            # Long after, with the server reachable: the lost lease is never renewed again.
            # Holding nothing, the keeper has dropped its stream and waits for a lease to
            # keep, not for a moment on the clock: nothing can fall due any more.
            await outage.advance_for(2 * TTL, step=TTL / 4, quiet=outage.attempts_back)
            await wait_until(
                lambda: not client._keeper.streaming and outage.client_clock.sleepers == 0,
                "the keeper to go idle",
            )
            await turns()
            assert client._keeper.held == []
            assert lease.renewals_sent == sent
            stored = await _stored(outage, lease)
            assert stored.state == lease_pb2.LEASE_STATE_EXPIRED

    # The block ends with the loss.
    with pytest.raises(LeaseLost):
        await body()
