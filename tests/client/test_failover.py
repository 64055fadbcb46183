"""A client given several replicas keeps its leases when the one it talks to dies.

Two ``tether serve`` processes share one PostgreSQL database (PostgreSQL only by nature)
and one file clock; the client lists both. SIGKILL the replica carrying the keep-alive
stream: the keeper reconnects to the other and the lease goes on, same token, no loss.
"""

from __future__ import annotations

import pytest

from tests.client.conftest import Activity, reachable
from tests.client.test_outages import TTL, Outage
from tests.conftest import DbFactory, ServerFactory
from tests.support.server_process import FileClockDriver
from tether_client import KeeperConfig, ManualClock, TetherClient
from tether_client.pb import lease_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def test_keeper_fails_over_to_another_replica_without_losing_the_lease(
    db_factory: DbFactory, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    url = db_factory("postgres")
    first = server_factory(url, name="replica-a", env=file_clock.env)
    second = server_factory(url, name="replica-b", env=file_clock.env)
    clock = ManualClock()
    # Outage gives the lockstep clock helpers; its fault is the SIGKILL of ``first``.
    outage = Outage("kill", first, None, file_clock, clock)
    async with TetherClient(
        [first.target, second.target],
        clock=clock,
        keeper=KeeperConfig(reconnect_initial=0.1, reconnect_max=0.5),
    ) as client:
        outage.activity = Activity(client)
        await reachable(client)
        stats = client.keeper_stats
        async with client.hold("jobs/a", ttl=TTL) as lease:
            token = lease.fencing_token
            await outage.advance_until(lambda: stats.renewals_acked >= 1)
            first.kill()
            acked = stats.renewals_acked
            await outage.advance_until(lambda: stats.renewals_acked > acked, step=0.1)
            assert not lease.lost
            assert lease.fencing_token == token
            connection = client._transport.connection
            assert connection.fail_overs >= 1
            assert connection.current.target == second.target
            stored = await client.leases.get(lease_id=lease.lease_id)
            assert stored.state == lease_pb2.LEASE_STATE_ACTIVE
            assert stored.fencing_token == token
        # Released through the surviving replica.
        assert (await client.leases.get(lease_id=lease.lease_id)).state == (
            lease_pb2.LEASE_STATE_RELEASED
        )
