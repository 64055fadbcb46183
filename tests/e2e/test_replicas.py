"""Two server replicas over one PostgreSQL database (PostgreSQL only by nature: SQLite has
exactly one server process).

Racing Acquires split across both replicas never both win; a lease is usable through any
replica; a Watch on one replica sees what another replica committed (it polls the store
about once a second, so the wait is bounded, not instant).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.e2e import DbFactory, EventCollector, ServerFactory, error_info, lease_stub, ts_us
from tests.support.server_process import ServerProcess
from tether_client.pb import lease_pb2, lease_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

CALLERS = 50
KEYS = 5
# The Watch poll interval is 1 s; allow generously for a loaded 2-core machine.
CROSS_REPLICA_WAIT_S = 10.0


@pytest.fixture
def replicas(
    db_factory: DbFactory, server_factory: ServerFactory
) -> tuple[ServerProcess, ServerProcess]:
    url = db_factory("postgres")
    first = server_factory(url, name="replica-a")
    second = server_factory(url, name="replica-b")
    return first, second


async def try_acquire(
    stub: lease_pb2_grpc.LeaseServiceStub, key: str, holder: str
) -> lease_pb2.AcquireResponse | grpc.aio.AioRpcError:
    try:
        return await stub.Acquire(
            lease_pb2.AcquireRequest(key=key, holder=holder, ttl=Duration(seconds=60)),
            timeout=30,
        )
    except grpc.aio.AioRpcError as exc:
        return exc


async def test_racing_acquires_across_replicas_have_one_winner(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    async with lease_stub(a.target) as stub_a, lease_stub(b.target) as stub_b:
        stubs = (stub_a, stub_b)
        for round_ in range(KEYS):
            key = f"race/{round_}"
            holders = [f"holder-{round_}-{i:02d}" for i in range(CALLERS)]
            outcomes = await asyncio.gather(
                *(try_acquire(stubs[i % 2], key, holder) for i, holder in enumerate(holders))
            )
            winners = [
                (holder, outcome)
                for holder, outcome in zip(holders, outcomes, strict=True)
                if isinstance(outcome, lease_pb2.AcquireResponse)
            ]
            assert len(winners) == 1, [(h, o.lease.lease_id) for h, o in winners]
            winner, granted = winners[0]
            assert granted.created is True
            assert granted.lease.holder == winner
            assert granted.lease.fencing_token == 1

            losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(losers) == CALLERS - 1
            for refused in losers:
                assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
                info = error_info(refused)
                assert info.reason == "LEASE_HELD", info
                assert info.metadata["holder"] == winner
                assert info.metadata["lease_id"] == granted.lease.lease_id
                assert info.metadata["fencing_token"] == "1"

            # Both replicas agree on who holds the key.
            for stub in stubs:
                current = await stub.GetLease(lease_pb2.GetLeaseRequest(key=key), timeout=10)
                assert current.lease.lease_id == granted.lease.lease_id
                assert current.lease.state == lease_pb2.LEASE_STATE_ACTIVE


async def test_lease_moves_between_replicas_and_watch_sees_other_replica(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    async with lease_stub(a.target) as stub_a, lease_stub(b.target) as stub_b:
        watch_b = await EventCollector.open(stub_b, key_prefix="moving/")
        try:
            started = time.monotonic()
            granted = await stub_a.Acquire(
                lease_pb2.AcquireRequest(
                    key="moving/1", holder="worker-1", ttl=Duration(seconds=30)
                ),
                timeout=10,
            )
            lease = granted.lease

            # B sees the ACQUIRED event committed through A, within the poll bound.
            seen = await watch_b.wait_for(
                lambda e: e.type == lease_pb2.LEASE_EVENT_TYPE_ACQUIRED,
                within=CROSS_REPLICA_WAIT_S,
            )
            latency = time.monotonic() - started
            assert seen.lease.lease_id == lease.lease_id
            assert seen.revision == lease.create_revision
            assert latency < CROSS_REPLICA_WAIT_S

            # Renewed through B.
            renewed = await stub_b.Renew(
                lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=1), timeout=10
            )
            assert renewed.lease_id == lease.lease_id
            assert renewed.fencing_token == 1
            assert ts_us(renewed.expires_at) > ts_us(lease.expires_at)
            assert renewed.ttl.seconds == 30
            on_a = (await stub_a.GetLease(lease_pb2.GetLeaseRequest(lease_id=lease.lease_id))).lease
            assert ts_us(on_a.expires_at) == ts_us(renewed.expires_at)

            # A stale token is refused through either replica.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub_b.Renew(
                    lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=2), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # Released through B; A reads it released.
            released = await stub_b.Release(
                lease_pb2.ReleaseRequest(
                    lease_id=lease.lease_id, fencing_token=1, holder="worker-1"
                ),
                timeout=10,
            )
            assert released.lease.state == lease_pb2.LEASE_STATE_RELEASED
            on_a = (await stub_a.GetLease(lease_pb2.GetLeaseRequest(lease_id=lease.lease_id))).lease
            assert on_a.state == lease_pb2.LEASE_STATE_RELEASED

            gone = await watch_b.wait_for(
                lambda e: e.type == lease_pb2.LEASE_EVENT_TYPE_RELEASED, within=10
            )
            assert gone.revision == seen.revision + 1
            assert [e.revision for e in watch_b.events] == [seen.revision, gone.revision]

            # The key is free for the next holder, through A, with a higher token.
            again = await stub_a.Acquire(
                lease_pb2.AcquireRequest(
                    key="moving/1", holder="worker-2", ttl=Duration(seconds=30)
                ),
                timeout=10,
            )
            assert again.lease.fencing_token == 2
        finally:
            await watch_b.close()
