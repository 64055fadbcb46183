"""Saga claims across two server replicas on one PostgreSQL database (PostgreSQL only:
SQLite has exactly one server process).

- 16 claimers, half on each replica, race to claim sagas by kind: every saga is claimed
  exactly once, never twice, round after round.
- A long-poll claim waiting on replica A is woken by a CreateSaga on replica B: the change
  travels through PostgreSQL's LISTEN/NOTIFY. Both servers share a file clock that the
  test never moves, so A's fallback poll (a sleep on that clock) never fires: only the
  notification can wake the claim.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.e2e import DbFactory, ServerFactory, error_info
from tests.support.server_process import FileClockDriver, ServerProcess
from tether_client.pb import saga_pb2, saga_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

CLAIMERS = 16
SAGAS = 40
ROUNDS = 3
RPC_TIMEOUT_S = 30.0
# The long-poll: the server waits at most this long (on its clock) for a saga ...
WAIT_S = 20
# ... and the test gives the call this long (real time) to return it.
WAKE_WITHIN_S = 30.0


@pytest.fixture
def replicas(
    db_factory: DbFactory, server_factory: ServerFactory, file_clock: FileClockDriver
) -> tuple[ServerProcess, ServerProcess]:
    url = db_factory("postgres")
    first = server_factory(url, name="replica-a", env=file_clock.env)
    second = server_factory(url, name="replica-b", env=file_clock.env)
    return first, second


@pytest.fixture
async def stubs(
    replicas: tuple[ServerProcess, ServerProcess],
) -> AsyncIterator[tuple[saga_pb2_grpc.SagaServiceStub, saga_pb2_grpc.SagaServiceStub]]:
    async with AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(server.target))
            for server in replicas
        ]
        yield saga_pb2_grpc.SagaServiceStub(channels[0]), saga_pb2_grpc.SagaServiceStub(channels[1])


def claim_request(kind: str, holder: str, wait_s: int = 0) -> saga_pb2.ClaimSagaRequest:
    return saga_pb2.ClaimSagaRequest(
        kind=kind,
        purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE,
        new_lease=saga_pb2.ClaimLeaseSpec(holder=holder, ttl=Duration(seconds=600)),
        wait=Duration(seconds=wait_s),
    )


async def claim_until_empty(
    stub: saga_pb2_grpc.SagaServiceStub, kind: str, holder: str
) -> list[saga_pb2.ClaimSagaResponse]:
    """Claim by kind until nothing is claimable; any other refusal fails the test."""
    won = []
    for _ in range(SAGAS + 1):
        try:
            won.append(await stub.ClaimSaga(claim_request(kind, holder), timeout=RPC_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            if (
                exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                and error_info(exc).reason == "NOTHING_CLAIMABLE"
            ):
                return won
            raise
    raise AssertionError(f"{holder} claimed more than the {SAGAS} sagas there are")


async def test_racing_claims_across_replicas_take_each_saga_once(
    stubs: tuple[saga_pb2_grpc.SagaServiceStub, saga_pb2_grpc.SagaServiceStub],
) -> None:
    for round_ in range(ROUNDS):
        kind = f"race-{round_}"
        ids = [f"{kind}/saga-{i:02d}" for i in range(SAGAS)]
        await asyncio.gather(
            *(
                stubs[i % 2].CreateSaga(
                    saga_pb2.CreateSagaRequest(saga_id=saga_id, kind=kind), timeout=RPC_TIMEOUT_S
                )
                for i, saga_id in enumerate(ids)
            )
        )
        holders = [f"claimer-{round_}-{i:02d}" for i in range(CLAIMERS)]
        results = await asyncio.gather(
            *(claim_until_empty(stubs[i % 2], kind, h) for i, h in enumerate(holders))
        )
        won = {
            claimed.saga.saga_id: (holder, claimed)
            for holder, claims in zip(holders, results, strict=True)
            for claimed in claims
        }
        counts = Counter(c.saga.saga_id for claims in results for c in claims)
        twice = {saga_id: n for saga_id, n in counts.items() if n > 1}
        assert not twice, f"round {round_}: claimed more than once: {twice}"
        assert sorted(counts) == ids, f"round {round_}: never claimed: {set(ids) - set(counts)}"

        fences = {(c.fence.lease_id, c.fence.fencing_token) for _, c in won.values()}
        assert len(fences) == SAGAS
        for holder, claimed in won.values():
            assert claimed.saga.state == saga_pb2.SAGA_STATE_RUNNING
            assert claimed.saga.attempt == 1
            assert claimed.saga.holder == holder
            assert claimed.lease.key == f"sagas/{claimed.saga.saga_id}"
        # Both replicas agree on who holds each saga.
        for stub in stubs:
            for saga_id in ids:
                saga = (
                    await stub.GetSaga(
                        saga_pb2.GetSagaRequest(saga_id=saga_id), timeout=RPC_TIMEOUT_S
                    )
                ).saga
                holder, claimed = won[saga_id]
                assert (saga.holder, saga.attempt) == (holder, 1)
                assert saga.claim == claimed.fence
        # Each claim's fence works through either replica: one step on each, then done.
        for i, (_, claimed) in enumerate(won.values()):
            saga_id, fence = claimed.saga.saga_id, claimed.fence
            for index, stub in enumerate((stubs[i % 2], stubs[(i + 1) % 2])):
                await stub.RecordStep(
                    saga_pb2.RecordStepRequest(
                        saga_id=saga_id,
                        fence=fence,
                        index=index,
                        name=f"step-{index}",
                        status=saga_pb2.STEP_STATUS_SUCCEEDED,
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
            done = await stubs[i % 2].CompleteSaga(
                saga_pb2.CompleteSagaRequest(saga_id=saga_id, fence=fence), timeout=RPC_TIMEOUT_S
            )
            assert done.saga.state == saga_pb2.SAGA_STATE_COMPLETED
            assert [s.name for s in done.saga.steps] == ["step-0", "step-1"]


async def test_long_poll_claim_on_one_replica_is_woken_by_create_on_the_other(
    stubs: tuple[saga_pb2_grpc.SagaServiceStub, saga_pb2_grpc.SagaServiceStub],
    file_clock: FileClockDriver,
) -> None:
    a, b = stubs
    # A decoy tells us when A's claim has looked at the queue: a saga of the kind whose
    # claim went stale, with policy QUARANTINE. Only a claim of that kind settles it
    # (fenced calls and reads do not), so once it reads QUARANTINED the waiting claim has
    # made its first attempt, found nothing claimable, and is waiting.
    await b.CreateSaga(
        saga_pb2.CreateSagaRequest(
            saga_id="decoy", kind="wake", on_stale=saga_pb2.ON_STALE_POLICY_QUARANTINE
        ),
        timeout=RPC_TIMEOUT_S,
    )
    await b.ClaimSaga(
        saga_pb2.ClaimSagaRequest(
            saga_id="decoy",
            purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE,
            new_lease=saga_pb2.ClaimLeaseSpec(holder="gone", ttl=Duration(seconds=5)),
        ),
        timeout=RPC_TIMEOUT_S,
    )
    file_clock.advance(6)  # the decoy's claim is stale; the clock stays here from now on

    watch = a.WatchSagas(saga_pb2.WatchSagasRequest(kind="wake"))
    try:
        first = await asyncio.wait_for(watch.read(), RPC_TIMEOUT_S)
        assert not first.events

        waiting = asyncio.ensure_future(
            a.ClaimSaga(claim_request("wake", "poller", WAIT_S), timeout=WAKE_WITHIN_S)
        )
        async with asyncio.timeout(WAKE_WITHIN_S):
            while True:
                response = await watch.read()
                assert response is not grpc.aio.EOF
                if any(
                    e.saga.saga_id == "decoy" and e.saga.state == saga_pb2.SAGA_STATE_QUARANTINED
                    for e in response.events
                ):
                    break
        assert not waiting.done(), waiting.result()

        created = await b.CreateSaga(
            saga_pb2.CreateSagaRequest(saga_id="wake-1", kind="wake"), timeout=RPC_TIMEOUT_S
        )
        claimed = await waiting
    finally:
        watch.cancel()
    assert claimed.saga.saga_id == "wake-1"
    assert claimed.saga.create_revision == created.saga.create_revision
    assert claimed.saga.state == saga_pb2.SAGA_STATE_RUNNING
    assert claimed.saga.holder == "poller"
