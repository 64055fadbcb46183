"""SagaService races, on both backends, each repeated many times: concurrent claims of one
saga and of a queue, a claim racing the expiry of the previous claim's lease, duplicate
step records, CompleteSaga / FailSaga / CancelSaga racing, creates of one id racing, a
cancel racing the first claim, workers racing to take over stale sagas, and workers,
expiries and cancels all at once (fencing safety).

Requests go out over several gRPC channels (each with its own connection) and, for the
claim races, to two server replicas sharing the database, so that the store's locking is
what decides, not one connection's or one process's ordering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tether_client.pb import lease_pb2, saga_pb2
from tether_server.app import TetherServer

from .conftest import Harness, ts_us
from .saga_support import (
    C_OK,
    COMPENSATE,
    COMPENSATING,
    COMPLETED,
    EXECUTE,
    FP,
    RUNNING,
    STARTED,
    SUCCEEDED,
    TERMINAL,
    Refusal,
    SagaApi,
    comp,
    fence_of,
    outcome,
    saga_api_for,
)

CHANNELS = 4


def _channel(port: int) -> grpc.aio.Channel:
    # A local subchannel pool: each channel gets a connection of its own.
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


@dataclass
class Cluster:
    """The fixture's server and a replica on the same database and clock, with several
    channels to each."""

    tether: Harness
    apis: list[SagaApi]

    @property
    def api(self) -> SagaApi:
        return self.apis[0]

    def spread(self, index: int) -> SagaApi:
        return self.apis[index % len(self.apis)]


@pytest.fixture
async def cluster(tether: Harness) -> AsyncIterator[Cluster]:
    await saga_api_for(tether)  # stops the fixture server's deadline task
    config = dataclasses.replace(tether.server.config, replica="replica-b")
    replica = TetherServer(config, tether.clock)
    port = await replica.start()
    await replica.expiry.stop()
    await replica.runner.stop_task("saga-deadlines")
    channels = [_channel(tether.port) for _ in range(CHANNELS)]
    channels += [_channel(port) for _ in range(CHANNELS)]
    try:
        yield Cluster(tether, [SagaApi(c) for c in channels])
    finally:
        try:
            await replica.stop(0)
        finally:
            for channel in channels:
                await channel.close()


async def test_concurrent_claims_of_one_saga_have_one_winner(cluster: Cluster) -> None:
    claimers = 16
    for round_ in range(12):
        saga_id = f"race-{round_}"
        await cluster.api.create(saga_id)
        results = await asyncio.gather(
            *(
                outcome(cluster.spread(i).claim(saga_id, holder=f"w{i}", ttl_s=30))
                for i in range(claimers)
            )
        )
        winners = [r for r in results if not isinstance(r, Refusal)]
        losers = [r for r in results if isinstance(r, Refusal)]
        assert len(winners) == 1, f"round {round_}: {len(winners)} winners"
        winner = winners[0]
        assert Counter(r.key for r in losers) == {(FP, "SAGA_CLAIMED"): claimers - 1}, losers
        assert {r.metadata["holder"] for r in losers} == {winner.lease.holder}
        saga = await cluster.api.get(saga_id)
        assert saga.state == RUNNING
        assert saga.attempt == 1
        assert fence_of(saga.claim) == fence_of(winner.fence)
        assert saga.holder == winner.lease.holder
        assert winner.fence.fencing_token == 1
        # The winner's fence works; nobody else's claim left anything behind.
        step = await cluster.api.step(saga_id, winner.fence, 0, "plan")
        assert step.step.attempt == 1


async def test_concurrent_workers_claim_every_saga_of_a_queue_once(cluster: Cluster) -> None:
    sagas, workers = 12, 10
    for round_ in range(5):
        kind = f"queue-{round_}"
        ids = {f"{kind}-{i:02d}" for i in range(sagas)}
        for saga_id in sorted(ids):
            await cluster.api.create(saga_id, kind)

        async def work(worker: int, kind: str = kind) -> list[saga_pb2.ClaimSagaResponse]:
            taken: list[saga_pb2.ClaimSagaResponse] = []
            api = cluster.spread(worker)
            for _ in range(sagas + 1):
                result = await outcome(api.claim(kind=kind, holder=f"w{worker}", ttl_s=30))
                if isinstance(result, Refusal):
                    assert result.key == (FP, "NOTHING_CLAIMABLE"), result
                    return taken
                taken.append(result)
            raise AssertionError(f"worker {worker} claimed more sagas than there are")

        claims = [
            c for batch in await asyncio.gather(*(work(w) for w in range(workers))) for c in batch
        ]
        claimed = Counter(c.saga.saga_id for c in claims)
        assert set(claimed) == ids, f"round {round_}: unclaimed {ids - set(claimed)}"
        assert set(claimed.values()) == {1}, f"round {round_}: claimed twice {claimed}"
        # Each claim holds its own lease on its saga's key, with the first token.
        assert len({c.fence.lease_id for c in claims}) == sagas
        for c in claims:
            assert c.lease.key == f"sagas/{c.saga.saga_id}"
            assert c.fence.fencing_token == 1
            assert c.saga.attempt == 1
        listed = await cluster.api.list_all(kind=kind)
        assert len(listed) == sagas
        for saga in listed:
            assert saga.state == RUNNING
            assert saga.attempt == 1
        final = await outcome(cluster.api.claim(kind=kind, holder="late"))
        assert isinstance(final, Refusal)
        assert final.key == (FP, "NOTHING_CLAIMABLE")


async def _answer_then_set(call: Awaitable[Any], answered: asyncio.Event) -> Any:
    try:
        return await outcome(call)
    finally:
        answered.set()


async def test_a_claim_racing_the_expiry_of_the_previous_claim(cluster: Cluster) -> None:
    """The old worker's RecordStep and a new worker's ClaimSaga go out together.

    A third of the rounds put the clock exactly at the old claim's lease deadline first:
    the old fence is never accepted (LEASE_EXPIRED, or STALE_FENCING_TOKEN once the new
    claim took the saga) and the new claim always is. The others start a microsecond
    before the deadline and cross it (running the expiry loop too) once the step has been
    answered, or after a varying number of event-loop turns, so that either call may come
    first: both may then be accepted only in the order step, then claim (the step was made
    under a live lease, and the new worker reads it); never a step under the old fence
    after the new claim.
    """
    tether = cluster.tether
    rng = random.Random(11)
    seen: Counter[str] = Counter()
    for round_ in range(30):
        saga_id = f"expiry-{round_}"
        await cluster.api.create(saga_id)
        old = await cluster.api.claim(saga_id, holder="old", ttl_s=10)
        await cluster.api.step(saga_id, old.fence, 0, "plan", STARTED, compensation=comp("u"))
        deadline = ts_us(old.lease.expires_at)
        how = ("at-deadline", "after-step", "racing")[round_ % 3]
        at_deadline = how == "at-deadline"
        tether.clock.set(deadline if at_deadline else deadline - 1)
        turns = rng.randrange(0, rng.choice([10, 100, 1000]))
        answered = asyncio.Event()

        async def cross(
            how: str = how, turns: int = turns, deadline: int = deadline, answered: Any = answered
        ) -> None:
            if how == "after-step":
                await answered.wait()
            for _ in range(turns):
                await asyncio.sleep(0)
            if tether.clock.now_us() < deadline:
                tether.clock.set(deadline)
            await tether.server.expiry.run_once()

        step, claim, _ = await asyncio.gather(
            _answer_then_set(
                cluster.spread(round_).step(saga_id, old.fence, 0, "plan", SUCCEEDED), answered
            ),
            outcome(cluster.spread(round_ + 1).claim(saga_id, holder="new", ttl_s=10)),
            cross(),
        )
        if how == "after-step":
            assert not isinstance(step, Refusal), (round_, step)
        saga = await cluster.api.get(saga_id)
        if isinstance(step, Refusal):
            stale = {(FP, "STALE_FENCING_TOKEN")} if not isinstance(claim, Refusal) else set()
            assert step.key in {(FP, "LEASE_EXPIRED")} | stale, (round_, step)
        if at_deadline:
            assert isinstance(step, Refusal), f"round {round_}: a step under an expired lease"
            assert not isinstance(claim, Refusal), (round_, claim)
        if isinstance(claim, Refusal):
            # Decided before the deadline: the old claim was still live.
            assert claim.key == (FP, "SAGA_CLAIMED"), (round_, claim)
            assert fence_of(saga.claim) == fence_of(old.fence)
            assert saga.attempt == 1
            seen["step only" if not isinstance(step, Refusal) else "neither"] += 1
            # Past the deadline now: the next claim takes the saga over.
            taken = await cluster.api.claim(saga_id, holder="new", ttl_s=10)
            assert taken.saga.attempt == 2
        else:
            assert saga.state == RUNNING
            assert saga.attempt == 2
            assert fence_of(saga.claim) == fence_of(claim.fence)
            assert claim.fence.fencing_token == old.fence.fencing_token + 1
            assert saga.steps[0].attempt == 1
            if isinstance(step, Refusal):
                seen["claim only"] += 1
                assert saga.steps[0].status == STARTED
            else:
                # Both: the step came first, under the live old claim, and the new worker
                # read it.
                seen["step, then claim"] += 1
                assert step.revision < claim.saga.revision, round_
                assert claim.saga.steps[0].status == SUCCEEDED
                assert saga.steps[0].status == SUCCEEDED
                assert ts_us(saga.steps[0].finished_at) < deadline
            # The old worker is fenced out for good.
            late = await outcome(cluster.api.step(saga_id, old.fence, 1, "more"))
            assert isinstance(late, Refusal)
            assert late.key == (FP, "STALE_FENCING_TOKEN")
        tether.clock.advance(60)  # nothing left near a deadline for the next round
    assert seen["claim only"] >= 10, seen
    assert seen["step only"] + seen["step, then claim"] >= 10, seen


async def test_duplicate_step_records_are_idempotent(cluster: Cluster) -> None:
    """The same (step, status) sent many times at once in one attempt: every answer is the
    step as recorded once, and the saga gets exactly one new revision."""
    tether = cluster.tether
    duplicates = 12
    for round_ in range(10):
        saga_id = f"dup-{round_}"
        await cluster.api.create(saga_id)
        fence = (await cluster.api.claim(saga_id, ttl_s=60)).fence
        for index in range(2):
            status = STARTED if index == 0 else SUCCEEDED
            before = await cluster.api.get(saga_id)
            revision_before, _ = await tether.server.db.current_revision()
            answers: list[Any] = await asyncio.gather(
                *(
                    outcome(
                        cluster.spread(i).step(
                            saga_id, fence, index, f"step-{index}", status, compensation=comp("u")
                        )
                    )
                    for i in range(duplicates)
                )
            )
            refused = [a for a in answers if isinstance(a, Refusal)]
            assert not refused, refused
            after = await cluster.api.get(saga_id)
            revision_after, _ = await tether.server.db.current_revision()
            assert revision_after == revision_before + 1, f"round {round_}: one write only"
            assert after.revision == revision_after
            assert {a.revision for a in answers} == {after.revision}
            assert {a.step.SerializeToString(deterministic=True) for a in answers} == {
                after.steps[index].SerializeToString(deterministic=True)
            }
            assert len(after.steps) == index + 1
            assert after.steps[index].status == status
            assert after.revision > before.revision
        # The same again later in the same attempt changes nothing either.
        revision_before, _ = await tether.server.db.current_revision()
        again = await cluster.api.step(saga_id, fence, 1, "step-1", SUCCEEDED)
        assert again.revision == (await cluster.api.get(saga_id)).revision
        assert (await tether.server.db.current_revision())[0] == revision_before


async def test_complete_fail_and_cancel_racing_decide_once(cluster: Cluster) -> None:
    """A worker's CompleteSaga and FailSaga and an operator's CancelSaga race: exactly one
    of them decides how the saga ends, and the others see that decision."""
    seen: Counter[str] = Counter()
    for round_ in range(12):
        saga_id = f"end-{round_}"
        await cluster.api.create(saga_id)
        fence = (await cluster.api.claim(saga_id, ttl_s=60)).fence
        await cluster.api.step(saga_id, fence, 0, "plan", STARTED, compensation=comp("u"))
        calls = [
            cluster.spread(round_).complete(saga_id, fence),
            cluster.spread(round_ + 3).fail(saga_id, fence, reason="boom"),
            cluster.spread(round_ + 6).cancel(saga_id, "stop"),
        ]
        order = list(range(3))
        random.Random(round_).shuffle(order)
        results: list[Any] = [None] * 3
        for index, result in zip(
            order, await asyncio.gather(*(outcome(calls[i]) for i in order)), strict=True
        ):
            results[index] = result
        complete, fail, cancel = results
        saga = await cluster.api.get(saga_id)
        if not isinstance(complete, Refusal):
            seen["completed"] += 1
            assert saga.state == COMPLETED
            assert complete.saga.state == COMPLETED
            assert isinstance(fail, Refusal)
            assert fail.key == (FP, "SAGA_TERMINAL")
            assert isinstance(cancel, Refusal)
            assert cancel.key == (FP, "SAGA_TERMINAL")
            continue
        # Failed or cancelled first: compensating, and the worker may not complete.
        assert saga.state == COMPENSATING
        assert [c.step_index for c in saga.compensations] == [0]
        assert complete.key == (FP, "INVALID_SAGA_STATE"), complete
        if not isinstance(fail, Refusal):
            seen["failed"] += 1
            assert saga.failure_reason == "boom"
            # The cancel came after: the compensations run to the end anyway.
            assert not isinstance(cancel, Refusal), cancel
            assert not saga.annotations
            assert fence_of(saga.claim) == fence_of(fence)
        else:
            seen["cancelled"] += 1
            assert fail.key == (FP, "INVALID_SAGA_STATE"), fail
            assert not isinstance(cancel, Refusal), cancel
            assert saga.failure_reason.startswith("cancelled by")
            assert len(saga.annotations) == 1
            assert not saga.HasField("claim")
    assert len(seen) >= 2, seen


async def test_concurrent_creates_of_one_id_create_it_once(cluster: Cluster) -> None:
    """Creates of one id race: one creates it; the same body answers the saga created
    (created = false), another body is ALREADY_EXISTS; never a server fault."""
    creators = 12
    for round_ in range(8):
        saga_id = f"create-{round_}"
        # Even creators send one body, odd ones another.
        results = await asyncio.gather(
            *(
                outcome(cluster.spread(i).create(saga_id, max_attempts=1 + i % 2))
                for i in range(creators)
            )
        )
        created = [r for r in results if not isinstance(r, Refusal) and r.created]
        assert len(created) == 1, f"round {round_}: {len(created)} created"
        winner = created[0].saga
        saga = await cluster.api.get(saga_id)
        assert saga.create_revision == winner.create_revision
        for i, result in enumerate(results):
            same_body = 1 + i % 2 == winner.max_attempts
            if same_body:
                assert not isinstance(result, Refusal), (i, result)
                assert result.saga.create_revision == winner.create_revision
            else:
                assert isinstance(result, Refusal), (i, result)
                assert result.key == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT")


async def test_a_cancel_racing_the_first_claim(cluster: Cluster) -> None:
    """CancelSaga and the first ClaimSaga of a saga race. Either order ends CANCELLED
    (claimed first, it has run but registered no compensation); a claim after the cancel
    is refused, and a claim before it ends with it, lease included."""
    seen: Counter[str] = Counter()
    for round_ in range(16):
        saga_id = f"cancel-{round_}"
        await cluster.api.create(saga_id)
        calls = [
            outcome(cluster.spread(round_).claim(saga_id, holder="w", ttl_s=30)),
            outcome(cluster.spread(round_ + 1).cancel(saga_id, "stop")),
        ]
        if round_ % 2:
            calls.reverse()
        first, second = await asyncio.gather(*calls)
        claim, cancel = (first, second) if round_ % 2 == 0 else (second, first)
        assert not isinstance(cancel, Refusal), cancel
        saga = await cluster.api.get(saga_id)
        assert saga.state == saga_pb2.SAGA_STATE_CANCELLED
        assert not saga.HasField("claim")
        if isinstance(claim, Refusal):
            seen["cancel first"] += 1
            assert claim.key == (FP, "SAGA_TERMINAL"), claim
            assert saga.attempt == 0
        else:
            seen["claim first"] += 1
            assert saga.attempt == 1
            # The claim ended with the cancel, and its lease with it.
            late = await outcome(cluster.api.step(saga_id, claim.fence, 0, "plan"))
            assert isinstance(late, Refusal)
            assert late.key == (FP, "SAGA_TERMINAL")
            lease = await cluster.tether.get(claim.lease.lease_id)
            assert lease.state == lease_pb2.LEASE_STATE_RELEASED
    assert sum(seen.values()) == 16, seen


async def test_workers_race_to_take_over_stale_sagas(cluster: Cluster) -> None:
    """Every saga of a queue goes stale at once; workers race to take them over (each
    claim settles the stale claim first): each saga is taken over exactly once, as its
    second attempt, under a new fencing token."""
    sagas, workers = 10, 8
    for round_ in range(4):
        kind = f"stale-{round_}"
        first: dict[str, saga_pb2.ClaimSagaResponse] = {}
        for i in range(sagas):
            saga_id = f"{kind}-{i:02d}"
            await cluster.api.create(saga_id, kind)
            first[saga_id] = await cluster.api.claim(saga_id, holder="dead", ttl_s=5)
        cluster.tether.clock.advance(5)  # exactly every deadline
        stale = await cluster.api.list_all(kind=kind, stale_only=True)
        assert len(stale) == sagas

        async def work(worker: int, kind: str = kind) -> list[saga_pb2.ClaimSagaResponse]:
            taken: list[saga_pb2.ClaimSagaResponse] = []
            api = cluster.spread(worker)
            for _ in range(sagas + 1):
                result = await outcome(api.claim(kind=kind, holder=f"w{worker}", ttl_s=30))
                if isinstance(result, Refusal):
                    assert result.key == (FP, "NOTHING_CLAIMABLE"), result
                    return taken
                taken.append(result)
            raise AssertionError(f"worker {worker} took more sagas than there are")

        claims = [
            c for batch in await asyncio.gather(*(work(w) for w in range(workers))) for c in batch
        ]
        taken = Counter(c.saga.saga_id for c in claims)
        assert set(taken) == set(first), f"round {round_}: not taken {set(first) - set(taken)}"
        assert set(taken.values()) == {1}, f"round {round_}: taken twice {taken}"
        for c in claims:
            assert c.saga.attempt == 2
            assert c.fence.fencing_token == first[c.saga.saga_id].fence.fencing_token + 1
            late = await outcome(
                cluster.api.step(c.saga.saga_id, first[c.saga.saga_id].fence, 0, "late")
            )
            assert isinstance(late, Refusal)
            assert late.key == (FP, "STALE_FENCING_TOKEN")
        assert not await cluster.api.list_all(kind=kind, stale_only=True)


async def test_workers_expiries_and_cancels_at_once_keep_fencing_safe(cluster: Cluster) -> None:
    """Workers run sagas of one queue from claim to completion or failure, across both
    replicas, while the clock moves leases past their deadlines and an operator cancels.
    Whatever interleaving happens: no server fault; a refusal is one the contract names;
    on each saga, no write under a claim is accepted after a write under a later claim
    (accepted writes, by revision, never go back to an older fencing token); the attempts
    a saga counts are the execution claims the workers got."""
    fenced_out: Counter[str] = Counter()
    for round_ in range(3):
        refusals = await _chaos_round(cluster, random.Random(round_), f"chaos-{round_}")
        fenced_out.update(reason for (_, reason) in refusals.elements())
    # The clock did overtake workers in the middle of their work.
    assert fenced_out["LEASE_EXPIRED"] + fenced_out["STALE_FENCING_TOKEN"] > 0, fenced_out


async def _chaos_round(
    cluster: Cluster, rng: random.Random, kind: str
) -> Counter[tuple[grpc.StatusCode, str]]:
    tether = cluster.tether
    count = 10
    ids = [f"{kind}-{i:02d}" for i in range(count)]
    for saga_id in ids:
        await cluster.api.create(saga_id, kind, max_attempts=3)
    allowed = {
        (FP, reason)
        for reason in (
            "STALE_FENCING_TOKEN",
            "LEASE_EXPIRED",
            "LEASE_RELEASED",
            "INVALID_SAGA_STATE",
            "SAGA_TERMINAL",
            "SAGA_CLAIMED",
            "NOTHING_CLAIMABLE",
        )
    }
    writes: dict[str, list[tuple[int, int]]] = {saga_id: [] for saga_id in ids}
    execute_claims: Counter[str] = Counter()
    refusals: Counter[tuple[grpc.StatusCode, str]] = Counter()
    done = asyncio.Event()

    def refused(result: Any) -> bool:
        if isinstance(result, Refusal):
            refusals[result.key] += 1
            assert result.key in allowed, result
            return True
        return False

    async def run(api: SagaApi, saga_id: str, fence: Any, succeeded: set[int]) -> None:
        token = fence.fencing_token
        for index in range(3):
            if index in succeeded:
                continue  # the next worker skips a step that succeeded
            for status in (STARTED, SUCCEEDED):
                result = await outcome(
                    api.step(saga_id, fence, index, f"s{index}", status, compensation=comp("u"))
                )
                if refused(result):
                    return
                writes[saga_id].append((result.revision, token))
        choice = rng.random()
        if choice < 0.6:
            result = await outcome(api.complete(saga_id, fence))
        else:
            result = await outcome(
                api.fail(saga_id, fence, reason=f"r{rng.random()}", retryable=choice < 0.8)
            )
        if refused(result):
            return
        writes[saga_id].append((result.saga.revision, token))
        if result.saga.state == COMPENSATING and result.saga.HasField("claim"):
            await compensate(api, result.saga, fence)

    async def compensate(api: SagaApi, saga: saga_pb2.Saga, fence: Any) -> None:
        saga_id = saga.saga_id
        pending = [c.step_index for c in saga.compensations if c.status != C_OK]
        for index in sorted(pending, reverse=True):
            result = await outcome(api.compensate(saga_id, fence, index))
            if refused(result):
                return
            writes[saga_id].append((result.revision, fence.fencing_token))

    async def worker(number: int) -> None:
        api = cluster.spread(number)
        while not done.is_set():
            purpose = EXECUTE if rng.random() < 0.7 else COMPENSATE
            claim = await outcome(
                api.claim(kind=kind, holder=f"w{number}", ttl_s=10, purpose=purpose)
            )
            if refused(claim):
                await asyncio.sleep(0)
                continue
            saga_id = claim.saga.saga_id
            if purpose == EXECUTE:
                execute_claims[saga_id] += 1
                done_steps = {st.index for st in claim.saga.steps if st.status == SUCCEEDED}
                await run(api, saga_id, claim.fence, done_steps)
            else:
                await compensate(api, claim.saga, claim.fence)

    async def clock_and_operator() -> None:
        for tick in range(300):
            for _ in range(rng.randrange(5, 60)):
                await asyncio.sleep(0)
            tether.clock.advance(rng.choice([0.5, 1, 3]))
            if tick % 25 == 0:
                target = rng.choice(ids)
                if rng.random() < 0.5:
                    refused(await outcome(cluster.api.cancel(target, "operator")))
                else:
                    await cluster.api.annotate(target, "look")
            listed = await cluster.api.list_all(kind=kind)
            if all(s.state in TERMINAL for s in listed):
                break
        done.set()

    await asyncio.gather(clock_and_operator(), *(worker(n) for n in range(6)))
    for saga_id in ids:
        ordered = sorted(writes[saga_id])
        tokens = [token for _, token in ordered]
        assert tokens == sorted(tokens), f"{saga_id}: a write under an older claim came later"
        saga = await cluster.api.get(saga_id)
        assert saga.attempt == execute_claims[saga_id], saga_id
        for step in saga.steps:
            assert step.attempt <= saga.attempt
    assert sum(execute_claims.values()) >= count, execute_claims
    return refusals
