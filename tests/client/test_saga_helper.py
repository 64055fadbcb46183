"""``client.run_saga()`` and the compensation worker against a real server (in process,
SQLite and PostgreSQL), on fake clocks moved together (``clocks``): a test walks a lease past
its deadline, or a compensation past its backoff, without sleeping."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import struct_pb2

from tests.client.conftest import ClientFactory, Clocks, InProcessServer, advance_until
from tether_client import LeaseLost, TetherClient
from tether_client.errors import (
    InvalidSagaState,
    NothingClaimable,
    RequestIdConflict,
    StaleFencingToken,
    StepConflict,
)
from tether_client.pb import lease_pb2, saga_pb2
from tether_client.saga import SagaRun, from_struct, from_value, to_struct, to_value

TTL = 9.0


async def get_saga(client: TetherClient, saga_id: str) -> saga_pb2.Saga:
    return (await client.sagas.get_saga(saga_pb2.GetSagaRequest(saga_id=saga_id))).saga


def compensations(saga: saga_pb2.Saga) -> dict[int, tuple[str, str, int]]:
    """step index → (name, status, attempts)."""
    return {
        record.step_index: (
            record.name,
            saga_pb2.CompensationStatus.Name(record.status).removeprefix("COMPENSATION_STATUS_"),
            record.attempts,
        )
        for record in saga.compensations
    }


def steps(saga: saga_pb2.Saga) -> list[tuple[str, str]]:
    return [
        (step.name, saga_pb2.StepStatus.Name(step.status).removeprefix("STEP_STATUS_"))
        for step in saga.steps
    ]


class Undo:
    """Compensation handlers that record what they were called with, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def sync(self, label: str) -> Callable[[Any], None]:
        def handler(payload: Any) -> None:
            self.calls.append((label, payload))

        return handler

    def async_(self, label: str) -> Callable[[Any], Any]:
        async def handler(payload: Any) -> None:
            await asyncio.sleep(0)
            self.calls.append((label, payload))

        return handler


class Boom(Exception):
    pass


# --- JSON values, no server -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, 7, -3, 2.5, "text", [], [1, "a", None], {}, {"a": {"b": [1, 2.5]}}],
)
def test_json_values_round_trip(value: Any) -> None:
    assert from_value(to_value(value)) == value
    assert type(from_value(to_value(value))) is type(value)


def test_values_that_are_not_json_are_refused() -> None:
    with pytest.raises(TypeError):
        to_value({1, 2})
    with pytest.raises(TypeError):
        to_value({1: "a"})
    with pytest.raises(ValueError, match="string"):
        to_value(2**60)
    with pytest.raises(ValueError, match="JSON number"):
        to_value(math.nan)
    assert from_value(struct_pb2.Value()) is None
    assert from_value(to_value((1, 2))) == [1, 2]
    assert from_struct(to_struct({"a": 1})) == {"a": 1}


# --- run_saga -----------------------------------------------------------------------------


async def test_three_steps_complete(tether: InProcessServer, client_factory: ClientFactory) -> None:
    client = client_factory(tether.target)
    ran: list[str] = []

    async def branch() -> str:
        ran.append("branch")
        return "feature/168"

    def pull_request() -> dict[str, Any]:
        ran.append("pr")
        return {"number": 42, "draft": False}

    async with client.run_saga(
        "open-pr", "task-168", {"repo": "tether"}, ttl=TTL, labels={"team": "ci"}
    ) as saga:
        assert saga.saga_id == "task-168"
        assert saga.kind == "open-pr"
        assert saga.input == {"repo": "tether"}
        assert saga.attempt == 1
        assert saga.steps == ()
        assert saga.state == saga_pb2.SAGA_STATE_RUNNING
        assert saga.fence.lease_id == saga.lease.lease_id
        plan = await saga.step("plan", lambda: ["a", "b"])
        name = await saga.step(
            "branch",
            branch,
            compensate=Undo().sync("branch"),
            compensation_payload=lambda out: {"branch": out},
        )
        pr = await saga.step("pull-request", pull_request)
        await saga.heartbeat(b"pr opened")
        saga.set_output({"pr": pr["number"]})
    assert plan == ["a", "b"]
    assert name == "feature/168"
    assert pr == {"number": 42, "draft": False}
    assert ran == ["branch", "pr"]
    assert saga.state == saga_pb2.SAGA_STATE_COMPLETED

    stored = await get_saga(client, "task-168")
    assert stored.state == saga_pb2.SAGA_STATE_COMPLETED
    assert steps(stored) == [
        ("plan", "SUCCEEDED"),
        ("branch", "SUCCEEDED"),
        ("pull-request", "SUCCEEDED"),
    ]
    assert from_value(stored.steps[2].output) == {"number": 42, "draft": False}
    # Registered with STARTED (no payload yet), then again with the step's output.
    assert stored.steps[1].compensation.name == "undo-branch"
    assert from_value(stored.steps[1].compensation.payload) == {"branch": "feature/168"}
    assert not stored.steps[0].HasField("compensation")
    assert from_struct(stored.output) == {"pr": 42}
    assert stored.labels["team"] == "ci"
    assert stored.progress == b"pr opened"
    lease = await client.get_lease(key="sagas/task-168")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


async def test_a_failing_body_compensates_in_reverse_order(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    undo = Undo()

    async def delete_worktree(payload: Any) -> None:
        undo.calls.append(("worktree", payload))

    def agent() -> None:
        raise Boom("agent crashed")

    runs: list[SagaRun] = []

    async def body() -> None:
        async with client.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            runs.append(saga)
            await saga.step(
                "branch", lambda: "b1", compensate=undo.sync("branch"), compensation_payload="b1"
            )
            await saga.step("plan", lambda: 3)  # nothing to undo
            await saga.step(
                "worktree",
                lambda: "/tmp/wt",
                compensate=delete_worktree,
                compensation_payload=lambda path: {"path": path},
            )
            # Registered before it ran: a step that failed halfway is compensated too.
            await saga.step("agent", agent, compensate=undo.async_("agent"))

    with pytest.raises(Boom, match="agent crashed"):
        await body()
    saga = runs[-1]
    assert undo.calls == [("agent", None), ("worktree", {"path": "/tmp/wt"}), ("branch", "b1")]
    assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED

    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPENSATED
    assert "agent crashed" in stored.failure_reason
    assert steps(stored) == [
        ("branch", "SUCCEEDED"),
        ("plan", "SUCCEEDED"),
        ("worktree", "SUCCEEDED"),
        ("agent", "FAILED"),
    ]
    assert "agent crashed" in stored.steps[3].error
    assert compensations(stored) == {
        3: ("undo-agent", "SUCCEEDED", 1),
        2: ("undo-worktree", "SUCCEEDED", 1),
        0: ("undo-branch", "SUCCEEDED", 1),
    }


async def test_a_failing_compensation_is_retried_then_quarantines(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    tries: list[str] = []

    def flaky(payload: Any) -> None:
        tries.append("flaky")
        if len(tries) == 1:
            raise OSError("busy")

    def broken(payload: Any) -> None:
        tries.append("broken")
        raise OSError("gone")

    async def body() -> None:
        async with client.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            await saga.step("one", lambda: 1, compensate=broken, max_attempts=2)
            await saga.step("two", lambda: 2, compensate=flaky)
            raise Boom("stop")

    task = asyncio.create_task(body())
    await advance_until(clocks.advance, task.done)
    with pytest.raises(Boom):
        await task
    # Step 1's compensation failed once (backoff), then passed; step 0's failed twice.
    assert tries == ["flaky", "flaky", "broken", "broken"]
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_QUARANTINED
    assert compensations(stored) == {
        1: ("undo-two", "SUCCEEDED", 2),
        0: ("undo-one", "EXHAUSTED", 2),
    }
    (exhausted,) = [record for record in stored.compensations if record.step_index == 0]
    assert "gone" in exhausted.error


async def test_a_second_worker_resumes_after_the_first_lease_expired(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    first = client_factory(tether.target, holder="worker-1")
    second = client_factory(tether.target, holder="worker-2")
    ran: list[str] = []
    reached = asyncio.Event()

    def run(name: str, output: Any) -> Callable[[], Any]:
        def action() -> Any:
            ran.append(name)
            return output

        return action

    async def crashing() -> None:
        async with first.run_saga("open-pr", "s1", {"x": 1}, ttl=TTL) as saga:
            await saga.step("a", run("a", "out-a"))
            await saga.step("b", run("b", {"k": [1, 2]}), compensate="drop_b")
            await saga.heartbeat(b"after b")
            reached.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(crashing())
    await reached.wait()
    # The worker dies: nothing renews its lease and nothing releases it.
    await first.close()
    with pytest.raises(LeaseLost):
        await task
    clocks.advance(TTL + 1)

    async with second.run_saga("open-pr", "s1", {"x": 1}, ttl=TTL) as saga:
        assert saga.attempt == 2
        assert [step.name for step in saga.steps] == ["a", "b"]
        assert saga.progress == b"after b"
        with pytest.raises(StepConflict) as caught:
            await saga.step("not-a", run("never", None))
        assert caught.value.step_index == 0
        assert await saga.step("a", run("never", None)) == "out-a"
        assert await saga.step("b", run("never", None)) == {"k": [1, 2]}
        assert await saga.step("c", run("c", 3)) == 3
    assert ran == ["a", "b", "c"]
    stored = await get_saga(second, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPLETED
    assert [step.attempt for step in stored.steps] == [1, 1, 2]


async def test_without_an_input_an_existing_saga_is_taken_as_is(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    await client.sagas.create_saga(
        saga_pb2.CreateSagaRequest(saga_id="s1", kind="open-pr", input=to_struct({"x": 1}))
    )
    with pytest.raises(RequestIdConflict):
        async with client.run_saga("open-pr", "s1", {"x": 2}, ttl=TTL):
            pytest.fail("a different body must not run")
    async with client.run_saga("open-pr", "s1", ttl=TTL) as saga:
        assert saga.input == {"x": 1}
    async with client.run_saga("open-pr", "s2", ttl=TTL) as saga:
        assert saga.input == {}
    with pytest.raises(ValueError, match="kind"):
        async with client.run_saga("other", "s1", ttl=TTL):
            pytest.fail("another kind must not run")


async def test_claim_by_kind_takes_the_oldest(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    with pytest.raises(NothingClaimable):
        async with client.run_saga("open-pr", ttl=TTL):
            pytest.fail("nothing to claim")
    for saga_id in ("s1", "s2"):
        await client.sagas.create_saga(saga_pb2.CreateSagaRequest(saga_id=saga_id, kind="open-pr"))
    await client.sagas.create_saga(saga_pb2.CreateSagaRequest(saga_id="s0", kind="other"))
    async with client.run_saga("open-pr", ttl=TTL) as saga:
        assert saga.saga_id == "s1"
        assert saga.lease.key.startswith(f"sagas/workers/{client.holder}/")
    async with client.run_saga("open-pr", ttl=TTL) as saga:
        assert saga.saga_id == "s2"
    assert (await get_saga(client, "s2")).state == saga_pb2.SAGA_STATE_COMPLETED
    with pytest.raises(ValueError, match="saga_id"):
        async with client.run_saga("open-pr", input={"x": 1}):
            pass


async def test_a_retryable_failure_puts_the_saga_back(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    undo = Undo()

    async def body() -> None:
        async with client.run_saga("open-pr", "s1", {}, ttl=TTL, retryable=True) as saga:
            await saga.step("one", lambda: 1, compensate=undo.sync("one"))
            raise Boom("flaky network")

    with pytest.raises(Boom):
        await body()
    assert undo.calls == []
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_PLANNED
    async with client.run_saga("open-pr", "s1", ttl=TTL) as saga:
        assert saga.attempt == 2
        assert await saga.step("one", lambda: pytest.fail("not again")) == 1
    assert (await get_saga(client, "s1")).state == saga_pb2.SAGA_STATE_COMPLETED


async def test_hand_off_then_a_compensation_worker(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, holder="worker-1")
    other = client_factory(tether.target, holder="compensator")
    undo = Undo()

    async def body() -> None:
        async with client.run_saga("deploy", "s1", {}, ttl=TTL, compensate="hand_off") as saga:
            await saga.step("one", lambda: "x", compensate="drop", compensation_payload={"id": 1})
            await saga.step(
                "two", lambda: "y", compensate="drop", compensation_payload=lambda out: [out]
            )
            raise Boom("bad")

    with pytest.raises(Boom):
        await body()
    assert undo.calls == []
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPENSATING
    assert compensations(stored) == {1: ("drop", "PENDING", 0), 0: ("drop", "PENDING", 0)}

    worker = other.compensation_worker("deploy", {"drop": undo.async_("drop")}, ttl=TTL)
    assert await worker.run_once() == saga_pb2.SAGA_STATE_COMPENSATED
    assert undo.calls == [("drop", ["y"]), ("drop", {"id": 1})]
    assert worker.handled == [("s1", saga_pb2.SAGA_STATE_COMPENSATED)]
    assert await worker.run_once() is None
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPENSATED
    assert compensations(stored) == {1: ("drop", "SUCCEEDED", 1), 0: ("drop", "SUCCEEDED", 1)}


async def test_a_missing_handler_hands_off_and_the_worker_loop_stops(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    undo = Undo()

    async def body() -> None:
        async with client.run_saga("deploy", "s1", {}, ttl=TTL) as saga:
            await saga.step("one", lambda: 1, compensate="drop")  # no handler here
            raise Boom("bad")

    with pytest.raises(Boom):
        await body()
    assert (await get_saga(client, "s1")).state == saga_pb2.SAGA_STATE_COMPENSATING

    stop = asyncio.Event()
    worker = client.compensation_worker(
        "deploy", {"drop": undo.sync("drop")}, ttl=TTL, stop=stop, poll_interval=1.0
    )
    running = asyncio.create_task(worker.run())
    await advance_until(clocks.advance, lambda: bool(worker.handled))
    stop.set()
    await asyncio.wait_for(running, 10)
    assert undo.calls == [("drop", None)]
    assert (await get_saga(client, "s1")).state == saga_pb2.SAGA_STATE_COMPENSATED


async def test_a_lost_lease_cancels_the_body_and_records_nothing_more(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    undo = Undo()
    reached_end = False

    async def body() -> None:
        nonlocal reached_end
        async with client.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            await saga.step("one", lambda: 1, compensate=undo.sync("one"))
            await admin.revoke(saga.lease.lease_id)
            await asyncio.Event().wait()  # the loss must cancel this
            reached_end = True

    task = asyncio.create_task(body())
    await advance_until(clocks.advance, task.done)
    with pytest.raises(LeaseLost):
        await task
    assert not reached_end
    assert undo.calls == []
    stored = await get_saga(admin, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_RUNNING
    assert stored.stale
    assert steps(stored) == [("one", "SUCCEEDED")]
    assert not stored.compensations


async def test_a_cancelled_claim_refuses_the_next_step_and_nothing_more_is_recorded(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    admin = client_factory(tether.target)
    undo = Undo()
    runs: list[SagaRun] = []

    async def body() -> None:
        async with client.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            runs.append(saga)
            await saga.step("one", lambda: 1, compensate=undo.sync("one"))
            await admin.sagas.cancel_saga(saga_pb2.CancelSagaRequest(saga_id="s1"))
            await saga.step("two", lambda: pytest.fail("must not run"))

    with pytest.raises(InvalidSagaState):
        await body()
    assert isinstance(runs[0].fenced_out, InvalidSagaState)
    assert undo.calls == []
    stored = await get_saga(admin, "s1")
    # The cancel compensates (for a compensation worker); this worker recorded nothing.
    assert stored.state == saga_pb2.SAGA_STATE_COMPENSATING
    assert steps(stored) == [("one", "SUCCEEDED")]
    assert compensations(stored) == {0: ("undo-one", "PENDING", 0)}


async def test_a_later_attempt_compensates_earlier_steps_with_its_handlers(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    first = client_factory(tether.target, holder="worker-1")
    second = client_factory(tether.target, holder="worker-2")
    undo = Undo()
    reached = asyncio.Event()

    async def crashing() -> None:
        async with first.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            await saga.step("a", lambda: "A", compensate=undo.sync("never"))
            await saga.step("b", lambda: "B", compensate="drop_b", compensation_payload="B")
            reached.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(crashing())
    await reached.wait()
    await first.close()
    with pytest.raises(LeaseLost):
        await task
    clocks.advance(TTL + 1)

    async def failing() -> None:
        handlers = {"drop_b": undo.sync("drop_b")}
        async with second.run_saga("open-pr", "s1", ttl=TTL, handlers=handlers) as saga:
            # Skipped, but this process's callable undoes it: the names agree (undo-a).
            await saga.step("a", lambda: pytest.fail("not again"), compensate=undo.sync("a"))
            await saga.step("b", lambda: pytest.fail("not again"), compensate="drop_b")
            raise Boom("later")

    with pytest.raises(Boom):
        await failing()
    assert undo.calls == [("drop_b", "B"), ("a", None)]
    assert (await get_saga(second, "s1")).state == saga_pb2.SAGA_STATE_COMPENSATED


async def test_a_failure_with_nothing_to_compensate_ends_failed(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)

    async def body() -> None:
        async with client.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            await saga.step("read", lambda: 1)
            raise Boom("no luck")

    with pytest.raises(Boom):
        await body()
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_FAILED
    assert "no luck" in stored.failure_reason


async def test_creation_fields_reach_the_saga(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    deadline = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with client.run_saga(
        "open-pr",
        "s1",
        {"x": [1, 2]},
        ttl=TTL,
        labels={"team": "ci"},
        on_stale="quarantine",
        max_attempts=5,
        deadline=deadline,
    ) as saga:
        assert saga.saga.on_stale == saga_pb2.ON_STALE_POLICY_QUARANTINE
        assert saga.saga.max_attempts == 5
        assert saga.saga.deadline.ToDatetime(tzinfo=UTC) == deadline
        assert saga.saga.labels == {"team": "ci"}
        assert saga.input == {"x": [1, 2]}


async def test_a_worker_that_comes_back_after_a_takeover_is_fenced_out(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    first = client_factory(tether.target, holder="worker-1")
    second = client_factory(tether.target, holder="worker-2")
    undo = Undo()
    reached, go_on = asyncio.Event(), asyncio.Event()
    runs: list[SagaRun] = []

    async def paused_worker() -> None:
        async with first.run_saga("open-pr", "s1", {}, ttl=TTL) as saga:
            runs.append(saga)
            await saga.step("a", lambda: "A", compensate=undo.sync("a"))
            reached.set()
            await go_on.wait()
            await saga.step("b", lambda: pytest.fail("must not run"))

    task = asyncio.create_task(paused_worker())
    await reached.wait()
    # Only the server's time passes: the paused worker does not know its lease expired.
    clocks.server.advance(TTL + 1)
    async with second.run_saga("open-pr", "s1", ttl=TTL) as saga:
        assert saga.attempt == 2
        go_on.set()
        with pytest.raises(StaleFencingToken):
            await task
        assert isinstance(runs[0].fenced_out, StaleFencingToken)
        assert await saga.step("a", lambda: pytest.fail("not again")) == "A"
        assert await saga.step("b", lambda: "B") == "B"
    assert undo.calls == []
    stored = await get_saga(second, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPLETED
    assert [(step.name, step.attempt) for step in stored.steps] == [("a", 1), ("b", 2)]
