"""``client.run_saga()`` and the compensation worker against a real server (in process,
SQLite and PostgreSQL), on fake clocks moved together (``clocks``): a test walks a lease past
its deadline, or a compensation past its backoff, without sleeping."""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import struct_pb2

from tests.client.conftest import (
    ClientFactory,
    Clocks,
    InProcessServer,
    advance_until,
    wait_until,
)
from tether_client import Fence, LeaseLost, SagaAlreadyEnded, SagaTerminal, TetherClient
from tether_client.errors import (
    InvalidSagaState,
    NothingClaimable,
    RequestIdConflict,
    StaleFencingToken,
    StepConflict,
)
from tether_client.pb import lease_pb2, saga_pb2
from tether_client.saga_run import SagaRun
from tether_client.values import from_struct, from_value, to_struct, to_value

TTL = 9.0


async def get_saga(client: TetherClient, saga_id: str) -> saga_pb2.Saga:
    return await client.sagas.get(saga_id)


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
    lease = await client.leases.get("sagas/task-168")
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
    await client.sagas.create("s1", "open-pr", input={"x": 1})
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
        await client.sagas.create(saga_id, "open-pr")
    await client.sagas.create("s0", "other")
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
            await admin.leases.revoke(saga.lease.lease_id)
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
            await admin.sagas.cancel("s1")
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


# --- sync user code runs off the loop, while the claim is renewed --------------------------

# The claim's ttl: a step blocking for several of these keeps the claim only if the lease
# keeper on the event loop goes on renewing meanwhile.
SHORT_TTL = 2.0
# Set by the body before a step; sync user code must see it (run with the caller's context).
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="unset")
# Real-time bound on a thread blocked by a test, reached only if the test fails to let go.
GUARD_S = 30.0


class Blocking:
    """Sync user code (a step action, or a compensation with its payload) that blocks its
    thread until the test releases it, recording where it ran and what context it saw."""

    def __init__(self, output: object = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.entered = asyncio.Event()
        self.release = threading.Event()
        self.output = output
        self.thread: int | None = None
        self.request: str | None = None
        self.args: tuple[object, ...] | None = None

    def __call__(self, *args: object) -> object:
        self.thread = threading.get_ident()
        self.request = REQUEST.get()
        self.args = args
        self._loop.call_soon_threadsafe(self.entered.set)
        if self.thread == self.loop_thread:
            # Nothing else runs while the loop is blocked, the test's release included.
            raise AssertionError("sync user code ran on the event loop's thread")
        if not self.release.wait(GUARD_S):
            raise AssertionError("the test never released the blocked call")
        return self.output


async def renew_through(clocks: Clocks, client: TetherClient, span: float) -> int:
    """Move both clocks ``span`` s on, in small steps, each time until the keeper's next
    renewal was acknowledged (never more than a ttl without one); the renewals seen."""
    stats = client.keeper_stats
    start = stats.renewals_acked
    advanced = 0.0

    def renewed_since(acked: int) -> Callable[[], bool]:
        return lambda: stats.renewals_acked > acked

    while advanced < span:
        advanced += await advance_until(
            clocks.advance,
            renewed_since(stats.renewals_acked),
            step=0.1,
            limit=SHORT_TTL,
            # The blocked thread is under way until the test lets it go: wait for the
            # network only.
            quiet=lambda: all(activity.quiet() for activity in clocks.activities),
        )
    return stats.renewals_acked - start


@asynccontextmanager
async def running(coroutine: Any, *blocked: Blocking) -> AsyncIterator[asyncio.Task[Any]]:
    """``coroutine`` as a task; if the test fails halfway, the blocked calls are let go and
    the task cancelled."""
    task: asyncio.Task[Any] = asyncio.create_task(coroutine)
    try:
        yield task
    finally:
        for call in blocked:
            call.release.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_long_sync_step_runs_in_a_thread_while_the_claim_is_renewed(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    agent = Blocking({"commits": 3})
    runs: list[SagaRun] = []

    async def body() -> Any:
        async with client.run_saga("open-pr", "s1", {}, ttl=SHORT_TTL) as saga:
            runs.append(saga)
            REQUEST.set("task-168")
            out = await saga.step("agent", agent)
            assert await saga.step("after", lambda: "ok") == "ok"  # the claim still works
            saga.set_output({"agent": out})
            return out

    async with running(body(), agent) as task:
        await wait_until(agent.entered.is_set, "the step to start")
        assert agent.thread != agent.loop_thread
        # Well past the ttl, several times: only renewals keep the claim.
        renewals = await renew_through(clocks, client, 3 * SHORT_TTL)
        assert renewals >= 3
        saga = runs[0]
        assert not saga.lease.lost
        assert not task.done()
        agent.release.set()
        assert await task == {"commits": 3}

    assert agent.request == "task-168"
    assert agent.args == ()
    assert client.keeper_stats.leases_lost == 0
    assert saga.fenced_out is None
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPLETED
    assert stored.attempt == 1
    assert steps(stored) == [("agent", "SUCCEEDED"), ("after", "SUCCEEDED")]
    assert from_value(stored.steps[0].output) == {"commits": 3}
    assert from_struct(stored.output) == {"agent": {"commits": 3}}
    # Released at the end, not expired on the way.
    lease = await client.leases.get("sagas/s1")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


async def test_a_sync_inline_compensation_runs_in_a_thread_while_the_claim_is_renewed(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    undo = Blocking()
    runs: list[SagaRun] = []

    async def body() -> None:
        async with client.run_saga("open-pr", "s1", {}, ttl=SHORT_TTL) as saga:
            runs.append(saga)
            await saga.step("branch", lambda: "b1", compensate=undo, compensation_payload="b1")
            REQUEST.set("failing")
            raise Boom("agent crashed")

    async with running(body(), undo) as task:
        await wait_until(undo.entered.is_set, "the compensation to start")
        assert undo.thread != undo.loop_thread
        renewals = await renew_through(clocks, client, 3 * SHORT_TTL)
        assert renewals >= 3
        assert not runs[0].lease.lost
        assert not task.done()
        undo.release.set()
        with pytest.raises(Boom, match="agent crashed"):
            await task

    assert undo.args == ("b1",)
    assert undo.request == "failing"
    assert client.keeper_stats.leases_lost == 0
    stored = await get_saga(client, "s1")
    assert stored.state == saga_pb2.SAGA_STATE_COMPENSATED
    assert compensations(stored) == {0: ("undo-branch", "SUCCEEDED", 1)}
    lease = await client.leases.get("sagas/s1")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


# --- running a saga that has already ended ---------------------------------------------------


class _Names:
    """Stands in for an endpoint's stubs: ``lambda e: e.saga.GetSaga`` gives its name."""

    def __getattr__(self, service: str) -> Any:
        class Methods:
            def __getattr__(self, method: str) -> str:
                return f"{service}.{method}"

        return Methods()


class Rpcs:
    """The unary RPCs a client sends from now on, by name (``saga.GetSaga``)."""

    def __init__(self, client: TetherClient) -> None:
        self.names: list[str] = []
        self.calls = 0
        transport = client._transport
        unary_timed, call = transport.unary_timed, transport.call

        async def named(method: Any, request: Any, **kwargs: Any) -> Any:
            self.names.append(method(_Names()))
            return await unary_timed(method, request, **kwargs)

        async def counted(attempt: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await call(attempt, **kwargs)

        transport.unary_timed = named  # type: ignore[method-assign]
        transport.call = counted  # type: ignore[method-assign]

    def clear(self) -> None:
        self.names.clear()
        self.calls = 0

    def sent(self) -> set[str]:
        return set(self.names)

    def only_named(self) -> bool:
        """Whether every unary call (all go through ``Transport.call``) was a named one:
        none came from elsewhere, the lease keeper's renewals and releases for one."""
        return self.calls == len(self.names)


# What a run_saga that only reads may send: the read, or a create that is a repeat.
READS = {"saga.GetSaga", "saga.CreateSaga"}


def never(*args: object) -> Any:
    raise AssertionError("a step of an ended saga must not run")


def chain(exc: BaseException) -> list[BaseException]:
    """The exceptions ``exc`` was raised from or while handling."""
    found: list[BaseException] = []
    link = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    while link is not None:
        found.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return found


async def end_saga(client: TetherClient, saga_id: str, end: str) -> saga_pb2.Saga:
    """Drive the new saga ``saga_id`` (PLANNED, kind ``open-pr``) to ``end`` with the area
    calls, under a claim's own lease: as another worker or an operator would."""
    if end == "CANCELLED":
        return await client.sagas.cancel(saga_id, reason="not needed")
    if end == "QUARANTINED":
        return await client.sagas.quarantine(saga_id, reason="look at it")
    # Under a lease of its own: run_saga's lease on sagas/<saga_id> may be held already.
    held = await client.leases.acquire(f"workers/{client.holder}", ttl=TTL)
    fence = Fence(lease_id=held.lease.lease_id, fencing_token=held.lease.fencing_token)
    claim = await client.sagas.claim(saga_id, fence=fence)
    compensation = saga_pb2.Compensation(name="undo-a") if end == "COMPENSATED" else None
    await client.sagas.record_step(
        saga_id, claim.fence, 0, "a", "started", compensation=compensation
    )
    await client.sagas.record_step(saga_id, claim.fence, 0, "a", "succeeded", output="A")
    if end == "COMPLETED":
        return await client.sagas.complete(saga_id, claim.fence, output={"done": True})
    failed = await client.sagas.fail(saga_id, claim.fence, reason="boom")
    if end == "COMPENSATED":
        assert failed.state == saga_pb2.SAGA_STATE_COMPENSATING
        await client.sagas.record_compensation(saga_id, claim.fence, 0, "succeeded", attempt=1)
    saga = await client.sagas.get(saga_id)
    assert saga_pb2.SagaState.Name(saga.state) == f"SAGA_STATE_{end}"
    return saga


OTHER_ENDS = ["COMPENSATED", "FAILED", "CANCELLED", "QUARANTINED"]


async def test_a_completed_saga_runs_again_as_a_replay(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    async with client.run_saga("open-pr", "s1", {"repo": "tether"}, ttl=TTL) as saga:
        await saga.step("a", lambda: "A")
        await saga.step("b", lambda: {"n": 1}, compensate=Undo().sync("b"))
        saga.set_output({"pr": 1})
    before = await get_saga(client, "s1")
    lease = await client.leases.get("sagas/s1")
    rpcs = Rpcs(client)

    for input in ({"repo": "tether"}, None):  # a create that repeats; a read
        rpcs.clear()
        async with client.run_saga("open-pr", "s1", input, ttl=TTL) as replay:
            assert replay.replay
            assert replay.state == saga_pb2.SAGA_STATE_COMPLETED
            assert replay.input == {"repo": "tether"}
            assert await replay.step("a", never) == "A"
            assert await replay.step("b", never, compensate=never) == {"n": 1}
            with pytest.raises(StepConflict):
                await replay.step("c", never)  # the completed run had no such step
            await replay.heartbeat(b"nothing to renew")
            replay.set_output({"pr": 2})
        assert rpcs.sent() <= READS, rpcs.names
        assert rpcs.only_named(), (rpcs.calls, rpcs.names)
        assert replay.state == saga_pb2.SAGA_STATE_COMPLETED

    after = await get_saga(client, "s1")
    assert after.revision == before.revision
    assert after == before  # steps, output, progress, attempt: nothing recorded
    # No lease was taken for the replay.
    assert await client.leases.get("sagas/s1") == lease


@pytest.mark.parametrize("end", OTHER_ENDS)
async def test_a_saga_that_ended_otherwise_raises_saga_already_ended(
    tether: InProcessServer, client_factory: ClientFactory, end: str
) -> None:
    client = client_factory(tether.target, holder="late")
    admin = client_factory(tether.target, holder="admin")
    await admin.sagas.create("s1", "open-pr", input={"x": 1})
    await end_saga(admin, "s1", end)
    before = await get_saga(client, "s1")
    rpcs = Rpcs(client)

    for input in ({"x": 1}, None):
        rpcs.clear()
        entered = False
        with pytest.raises(SagaAlreadyEnded) as caught:
            async with client.run_saga("open-pr", "s1", input, ttl=TTL):
                entered = True
        assert not entered
        error = caught.value
        assert isinstance(error, SagaTerminal)
        assert error.state == end
        assert error.saga_id == "s1"
        assert end in str(error)
        assert chain(error) == []  # one clear error, not a chain of gRPC refusals
        assert rpcs.sent() <= READS, rpcs.names
        assert rpcs.only_named(), (rpcs.calls, rpcs.names)

    after = await get_saga(client, "s1")
    assert after.revision == before.revision
    assert after == before
    # Raised on entering: no lease was taken for it.
    assert [lease async for lease in client.leases.list(holder="late")] == []


def end_before_the_claim(client: TetherClient, other: TetherClient, end: str) -> list[str]:
    """Make ``client``'s next ``sagas.claim`` find the saga ended by ``other`` first: it
    ended between run_saga's read and its claim. The sagas ended that way."""
    claim = client.sagas.claim
    ended: list[str] = []

    async def ending_first(saga_id: str | None = None, **kwargs: Any) -> Any:
        assert saga_id is not None
        await end_saga(other, saga_id, end)
        ended.append(saga_id)
        return await claim(saga_id, **kwargs)

    client.sagas.claim = ending_first  # type: ignore[method-assign]
    return ended


async def test_a_saga_completed_between_read_and_claim_runs_as_a_replay(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, holder="late")
    other = client_factory(tether.target, holder="first")
    ended = end_before_the_claim(client, other, "COMPLETED")

    async with client.run_saga("open-pr", "s1", {"x": 1}, ttl=TTL) as replay:
        assert ended == ["s1"]
        completed = await get_saga(other, "s1")
        rpcs = Rpcs(client)
        assert replay.replay
        assert replay.state == saga_pb2.SAGA_STATE_COMPLETED
        assert await replay.step("a", never) == "A"
        replay.set_output({"done": False})
    assert not {name for name in rpcs.sent() if name.startswith("saga.")} - {"saga.GetSaga"}

    after = await get_saga(other, "s1")
    assert after.revision == completed.revision
    assert after == completed
    assert from_struct(after.output) == {"done": True}
    # The lease taken for the claim was let go.
    lease = await client.leases.get("sagas/s1")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


@pytest.mark.parametrize("end", OTHER_ENDS)
async def test_a_saga_ended_otherwise_between_read_and_claim_raises_saga_already_ended(
    tether: InProcessServer, client_factory: ClientFactory, end: str
) -> None:
    client = client_factory(tether.target, holder="late")
    other = client_factory(tether.target, holder="first")
    ended = end_before_the_claim(client, other, end)
    entered = False

    with pytest.raises(SagaAlreadyEnded) as caught:
        async with client.run_saga("open-pr", "s1", {"x": 1}, ttl=TTL):
            entered = True
    assert ended == ["s1"]
    assert not entered
    error = caught.value
    assert isinstance(error, SagaTerminal)
    assert error.state == end
    assert end in str(error)
    assert chain(error) == []
    stored = await get_saga(other, "s1")
    assert saga_pb2.SagaState.Name(stored.state) == f"SAGA_STATE_{end}"
    lease = await client.leases.get("sagas/s1")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED
