"""The blocking client against a real server (in process, SQLite and PostgreSQL).

The ``tether`` server runs on the test's event loop; a ``TetherClientSync`` runs its own loop
in a thread, and blocks its caller. So each test's body runs in a worker thread
(``Harness.run``) while the test's loop serves. Nothing waits on real time: server
(``FakeClock``) and client clocks (a ``ManualClock`` per client, notifying each sleep) move
when a test advances them, and a test waits for a signal from the code under test (a clock
sleep, an ``on_lost`` callback, a step's thread), never for a while.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from tests.client.conftest import Clocks, InProcessServer
from tether_client import HeldLease, LeaseLost, ManualClock, TetherClientSync
from tether_client.errors import (
    DeadlineExceeded,
    LeaseHeld,
    LeaseRevoked,
    ObjectNotFound,
    SagaNotFound,
    SweepReportNotFound,
    Unavailable,
)
from tether_client.pb import common_pb2, lease_pb2, saga_pb2
from tether_client.sync import (
    CompensationWorkerSync,
    FinalizerWorkerSync,
    LeasesClientSync,
    SagaRunSync,
)
from tether_client.values import from_struct
from tether_server.clock import FakeClock

ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
RELEASED = lease_pb2.LEASE_STATE_RELEASED
REVOKED = lease_pb2.LEASE_STATE_REVOKED
TTL = 9.0
FINALIZER = "example.com/worktree"
# A bound on every wait for a signal, so a broken test fails instead of hanging; nothing
# comes close to it, and no test measures time.
WITHIN = 10.0


class Boom(Exception):
    pass


class SignalClock(ManualClock):
    """A ``ManualClock`` that records every sleep and notifies ``changed``: a test waits
    for a condition that is checked each time a task of the client goes to sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        with self.changed:
            self.slept.append(seconds)
            self.changed.notify_all()
        await super().sleep(seconds)

    def wait_for(self, predicate: Callable[[], object], what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout=WITHIN):
                raise AssertionError(f"no {what}")


async def _advance(clock: ManualClock | FakeClock, seconds: float) -> None:
    clock.advance(seconds)  # on the clock's own loop: its sleepers are futures of that loop


@dataclass
class Harness:
    """The in-process server and the blocking clients of one test."""

    target: str
    loop: asyncio.AbstractEventLoop  # the test's: the server's
    server_clock: FakeClock
    clocks: dict[TetherClientSync, SignalClock] = field(default_factory=dict)

    def connect(self, **kwargs: Any) -> TetherClientSync:
        clock = SignalClock()
        client = TetherClientSync(self.target, clock=clock, **kwargs)
        self.clocks[client] = clock
        return client

    def clock(self, client: TetherClientSync) -> SignalClock:
        return self.clocks[client]

    def advance(self, seconds: float) -> None:
        """Move the server's clock and every client's by ``seconds`` (from a test body)."""
        moved = asyncio.run_coroutine_threadsafe(_advance(self.server_clock, seconds), self.loop)
        moved.result(WITHIN)
        for client, clock in self.clocks.items():
            if not client.closed:
                client.run_coroutine(_advance(clock, seconds))

    async def run(self, body: Callable[[], None]) -> None:
        """Run the blocking ``body`` in a thread while the test's loop serves."""
        await asyncio.to_thread(body)

    def close(self) -> None:
        for client in self.clocks:
            client.close()


@pytest.fixture
async def h(tether: InProcessServer, clocks: Clocks) -> AsyncIterator[Harness]:
    harness = Harness(tether.target, asyncio.get_running_loop(), clocks.server)
    try:
        yield harness
    finally:
        await asyncio.to_thread(harness.close)


# --- leases -------------------------------------------------------------------------------


async def test_lease_calls_block_and_return_what_the_async_ones_do(h: Harness) -> None:
    def body() -> None:
        client = h.connect(holder="sync-1")
        assert isinstance(client.leases, LeasesClientSync)
        acquired = client.leases.acquire("jobs/a", ttl=30)
        assert acquired.created
        lease = acquired.lease
        assert lease.holder == "sync-1"
        assert client.leases.get(lease_id=lease.lease_id) == lease
        assert client.leases.get("jobs/a").lease_id == lease.lease_id
        assert [item.lease_id for item in client.leases.list(key_prefix="jobs/")] == [
            lease.lease_id
        ]
        renewal = client.leases.renew(lease.lease_id, lease.fencing_token)
        assert renewal.lease_id == lease.lease_id
        assert renewal.ttl == timedelta(seconds=30)
        # Another holder is refused with the typed error.
        other = h.connect(holder="sync-2")
        with pytest.raises(LeaseHeld) as caught:
            other.leases.acquire("jobs/a", ttl=30)
        assert caught.value.holder == "sync-1"
        released = client.leases.release(lease.lease_id, lease.fencing_token)
        assert released.state == RELEASED
        assert client.leases.get(lease_id=lease.lease_id).state == RELEASED
        revoked = other.leases.revoke(other.leases.acquire("jobs/b", ttl=30).lease.lease_id)
        assert revoked.state == REVOKED
        # Arguments are checked as the async client checks them, when the call is made.
        with pytest.raises(ValueError, match="exactly one"):
            client.leases.get()
        with pytest.raises(ValueError, match="a lease state is one of"):
            client.leases.list(states=["held"])
        # Async code can share the client's loop.
        read = client.run_coroutine(client.client.leases.get(lease_id=lease.lease_id))
        assert read.state == RELEASED

    await h.run(body)


async def test_a_list_walks_every_page(h: Harness) -> None:
    def body() -> None:
        client = h.connect()
        keys = [f"many/{i}" for i in range(5)]
        for key in keys:
            client.leases.acquire(key, ttl=30)
        leases = client.leases.list(key_prefix="many/", page_size=2)
        assert isinstance(leases, Iterator)
        assert sorted(lease.key for lease in leases) == keys

    await h.run(body)


async def test_closing_or_dropping_a_watch_ends_its_stream(h: Harness) -> None:
    def body() -> None:
        client = h.connect()
        list(client.leases.list())  # opens the channel, on the client's loop
        endpoint = client.client.stubs
        calls: list[Any] = []
        open_watch = endpoint.lease.Watch

        def spy(*args: Any, **kwargs: Any) -> Any:
            call = open_watch(*args, **kwargs)
            calls.append(call)
            return call

        endpoint.lease.Watch = spy  # type: ignore[assignment]
        acquired = client.leases.acquire("w/a", ttl=30)
        start = acquired.lease.mod_revision
        # Like the async one, the generator opens its stream at the first next().
        events = client.leases.watch(key_prefix="w/", start_revision=start)
        assert calls == []
        event = next(events)
        assert event.lease.lease_id == acquired.lease.lease_id
        assert event.type == lease_pb2.LEASE_EVENT_TYPE_ACQUIRED
        assert len(calls) == 1
        assert not calls[0].done()
        events.close()
        # Synchronously: once close() returns, the stream is gone.
        assert calls[0].cancelled()

        # A generator dropped without closing ends its stream when it is collected.
        events = client.leases.watch(key_prefix="w/", start_revision=start)
        assert next(events).lease.lease_id == acquired.lease.lease_id
        assert not calls[1].done()
        del events
        assert calls[1].cancelled()

    await h.run(body)


# --- hold -----------------------------------------------------------------------------------


async def test_hold_renews_in_the_background_and_releases_on_exit(h: Harness) -> None:
    def body() -> None:
        client = h.connect(holder="sync-1")
        clock, stats = h.clock(client), client.keeper_stats
        with client.hold("jobs/held", ttl=TTL) as lease:
            assert isinstance(lease, HeldLease)
            token = lease.fencing_token
            acked = stats.renewals_acked
            # Past the renewal point (a third of the ttl), well before the safety deadline.
            # The body blocks this thread; the renewal goes out from the client's loop.
            h.advance(TTL / 2)
            clock.wait_for(lambda: stats.renewals_acked > acked, "renewal acknowledged")
            assert not lease.lost
            assert lease.fencing_token == token
            assert client.leases.get(lease_id=lease.lease_id).state == ACTIVE
        assert client.leases.get(lease_id=lease.lease_id).state == RELEASED
        assert not lease.alive
        assert stats.leases_lost == 0

    await h.run(body)


async def test_hold_refuses_to_cancel_a_blocking_body(h: Harness) -> None:
    def body() -> None:
        client = h.connect()
        with pytest.raises(ValueError, match="a blocking body cannot be cancelled"):  # noqa: SIM117
            with client.hold("jobs/c", ttl=5, on_lost="cancel"):
                pass
        assert list(client.leases.list(key_prefix="jobs/c")) == []

    await h.run(body)


async def test_a_revoked_lease_is_reported_lost_and_ends_the_block(h: Harness) -> None:
    def body() -> None:
        client = h.connect(holder="sync-1")
        admin = h.connect(holder="admin")
        losses: list[HeldLease] = []
        refusals: list[RuntimeError] = []
        reported = threading.Event()

        def on_lost(lost: HeldLease) -> None:
            losses.append(lost)
            # Runs in the client's loop thread: a blocking call from there would hang.
            try:
                client.leases.get(lease_id=lost.lease_id)
            except RuntimeError as exc:
                refusals.append(exc)
            reported.set()

        held: list[HeldLease] = []

        def work() -> None:
            with client.hold("jobs/r", ttl=TTL, on_lost=on_lost) as lease:
                held.append(lease)
                revoked = admin.leases.revoke(lease.lease_id, reason="test")
                assert revoked.state == REVOKED
                h.advance(TTL / 2)  # the next renewal is refused
                assert reported.wait(WITHIN)
                assert lease.lost
                with pytest.raises(LeaseLost) as caught:
                    _ = lease.fencing_token
                assert isinstance(caught.value.cause, LeaseRevoked)
                assert losses == [lease]
                assert len(refusals) == 1
                assert "loop thread" in str(refusals[0])

        with pytest.raises(LeaseLost) as ended:
            work()
        [lease] = held
        # The block ended normally, but not under its lease: that is what it raises.
        assert ended.value is lease.lost_error
        # A lost lease is not released on exit: it stays revoked.
        assert client.leases.get(lease_id=lease.lease_id).state == REVOKED

    await h.run(body)


async def test_a_lease_past_its_safety_deadline_ends_the_block_with_lease_lost(
    h: Harness,
) -> None:
    def body() -> None:
        client = h.connect()

        def work() -> None:
            with client.hold("jobs/d", ttl=TTL) as lease:
                # In one move past the safety deadline: no renewal can be acknowledged.
                h.advance(TTL)
                assert lease.lost

        with pytest.raises(LeaseLost) as ended:
            work()
        assert ended.value.cause is None
        assert "safety deadline" in str(ended.value)
        assert client.keeper_stats.leases_lost == 1

        # A body that raised meanwhile: LeaseLost, chained from its error.
        def fail() -> None:
            with client.hold("jobs/e", ttl=TTL):
                h.advance(TTL)
                raise Boom("the body failed too")

        with pytest.raises(LeaseLost) as chained:
            fail()
        assert isinstance(chained.value.__cause__, Boom)

    await h.run(body)


# --- sagas, objects, sweeps ----------------------------------------------------------------


async def test_saga_object_and_sweep_calls_block(h: Harness) -> None:
    def body() -> None:
        client = h.connect(holder="sync-1")
        created = client.sagas.create("s1", "deploy", input={"a": 1})
        assert created.created
        assert client.sagas.get("s1").kind == "deploy"
        assert [saga.saga_id for saga in client.sagas.list(kind="deploy")] == ["s1"]
        claim = client.sagas.claim("s1", ttl=30)
        client.sagas.record_step("s1", claim.fence, 0, "one", "started")
        recorded = client.sagas.record_step("s1", claim.fence, 0, "one", "succeeded", output=1)
        assert recorded.step.status == saga_pb2.STEP_STATUS_SUCCEEDED
        done = client.sagas.complete("s1", claim.fence, output={"ok": True})
        assert done.state == saga_pb2.SAGA_STATE_COMPLETED
        with pytest.raises(SagaNotFound):
            client.sagas.get("nope")
        with pytest.raises(ValueError, match="a saga state is one of"):
            client.sagas.list(states=["sleeping"])

        owner = client.objects.create("Thing", "a", spec={"size": 1}).object
        ref = common_pb2.OwnerReference(kind="Thing", name="a", uid=owner.uid)
        client.objects.create("Thing", "b", owner_references=[ref])
        assert client.objects.get("Thing", "a").uid == owner.uid
        assert [obj.name for obj in client.objects.list(kind="Thing")] == ["a", "b"]
        assert [d.object.name for d in client.objects.dependents(owner.uid)] == ["b"]
        client.objects.add_finalizer("Thing", "a", FINALIZER)
        deleting = client.objects.delete("Thing", "a", propagation="background")
        assert not deleting.deleted
        removed = client.objects.remove_finalizer("Thing", "a", FINALIZER)
        assert removed.deleted
        with pytest.raises(ObjectNotFound):
            client.objects.get("Thing", "a")

        report = client.sweeps.run(dry_run=True)
        assert report.dry_run
        assert client.sweeps.get(report.sweep_id) == report
        assert report.sweep_id in [r.sweep_id for r in client.sweeps.reports(page_size=1)]
        with pytest.raises(SweepReportNotFound):
            client.sweeps.get("00000000-0000-7000-8000-000000000000")

    await h.run(body)


async def test_run_saga_runs_sync_steps_and_records_them(h: Harness) -> None:
    def body() -> None:
        client = h.connect(holder="sync-1", namespace="team-a")
        step_threads: list[threading.Thread] = []

        def branch() -> str:
            step_threads.append(threading.current_thread())
            # A step may call the client: its loop is not blocked while the step runs.
            key: str = client.leases.acquire("branches/168", ttl=30).lease.key
            return key

        with client.run_saga("open-pr", "task-168", {"repo": "tether"}, ttl=TTL) as saga:
            assert isinstance(saga, SagaRunSync)
            assert saga.saga_id == "task-168"
            assert saga.kind == "open-pr"
            assert saga.namespace == client.namespace == "team-a"
            assert saga.attempt == 1
            assert saga.input == {"repo": "tether"}
            assert saga.state == saga_pb2.SAGA_STATE_RUNNING
            assert not saga.replay
            assert saga.steps == ()
            assert saga.fenced_out is None
            assert saga.fence.lease_id == saga.lease.lease_id
            assert saga.step("branch", branch) == "branches/168"
            assert saga.step("pull-request", lambda: {"pr": 12}) == {"pr": 12}
            saga.heartbeat(b"halfway")
            assert saga.progress == b"halfway"
            with pytest.raises(TypeError):
                saga.set_output({"not json": {1, 2}})  # refused now, not at the end
            saga.set_output({"pr": 12})
            assert saga.saga.saga_id == "task-168"
        # The sync step ran in a thread of its own, neither the caller's nor the loop's.
        assert [t.name for t in step_threads] == ["tether-call-branch"]
        stored = client.sagas.get("task-168")
        assert stored.state == saga_pb2.SAGA_STATE_COMPLETED
        assert [(step.name, step.status) for step in stored.steps] == [
            ("branch", saga_pb2.STEP_STATUS_SUCCEEDED),
            ("pull-request", saga_pb2.STEP_STATUS_SUCCEEDED),
        ]
        assert from_struct(stored.output) == {"pr": 12}
        assert stored.progress == b"halfway"

        # Again: a replay of the completed saga runs nothing and returns what was recorded.
        with client.run_saga("open-pr", "task-168") as again:
            assert again.replay
            assert again.step("branch", lambda: pytest.fail("not again")) == "branches/168"

    await h.run(body)


async def test_a_failed_sync_saga_runs_its_compensations(h: Harness) -> None:
    def body() -> None:
        client = h.connect()
        undone: list[Any] = []

        def fail() -> None:
            with client.run_saga("deploy", "s2", {}, ttl=TTL) as saga:
                saga.step(
                    "one", lambda: "x", compensate=undone.append, compensation_payload={"id": 1}
                )
                raise Boom("bad")

        with pytest.raises(Boom):
            fail()
        assert undone == [{"id": 1}]
        assert client.sagas.get("s2").state == saga_pb2.SAGA_STATE_COMPENSATED

    await h.run(body)


async def test_a_sync_saga_that_lost_its_lease_records_nothing_more(h: Harness) -> None:
    def body() -> None:
        client = h.connect()
        ran: list[str] = []

        def work() -> None:
            with client.run_saga("deploy", "s3", {}, ttl=TTL) as saga:
                saga.step("one", lambda: ran.append("one"))
                h.advance(TTL)  # past the claim's safety deadline
                assert saga.lease.lost
                # Not cancelled (a blocking body cannot be): the next step refuses to run.
                saga.step("two", lambda: ran.append("two"))

        with pytest.raises(LeaseLost):
            work()
        assert ran == ["one"]
        assert [step.name for step in client.sagas.get("s3").steps] == ["one"]

    await h.run(body)


async def test_a_compensation_worker_runs_once_and_until_stopped(h: Harness) -> None:
    def body() -> None:
        client = h.connect(holder="worker-1")

        def fail() -> None:
            with client.run_saga("deploy", "s1", {}, ttl=TTL, compensate="hand_off") as saga:
                saga.step("one", lambda: "x", compensate="drop", compensation_payload={"id": 1})
                raise Boom("bad")

        with pytest.raises(Boom):
            fail()
        assert client.sagas.get("s1").state == saga_pb2.SAGA_STATE_COMPENSATING

        compensator = h.connect(holder="compensator")
        calls: list[Any] = []
        worker = compensator.compensation_worker(
            "deploy", {"drop": calls.append}, ttl=TTL, poll_interval=7.0
        )
        assert isinstance(worker, CompensationWorkerSync)
        assert worker.kind == "deploy"
        assert worker.run_once() == saga_pb2.SAGA_STATE_COMPENSATED
        assert calls == [{"id": 1}]
        assert worker.handled == [("s1", saga_pb2.SAGA_STATE_COMPENSATED)]
        assert worker.run_once() is None
        assert client.sagas.get("s1").state == saga_pb2.SAGA_STATE_COMPENSATED

        # run() blocks until stop() is called from another thread.
        clock = h.clock(compensator)
        polls = clock.slept.count(7.0)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(worker.run)
            clock.wait_for(lambda: clock.slept.count(7.0) > polls, "wait for the next poll")
            assert not running.done()
            worker.stop()
            assert running.result(WITHIN) is None

    await h.run(body)


async def test_a_finalizer_worker_runs_once_and_until_stopped(h: Harness) -> None:
    def body() -> None:
        client = h.connect()
        client.objects.create("Worktree", "w1", spec={"path": "/w1"}, finalizers=[FINALIZER])
        deleting = client.objects.delete("Worktree", "w1")
        assert not deleting.deleted
        handled: list[tuple[str, str]] = []

        def handler(obj: Any) -> None:
            handled.append((obj.name, threading.current_thread().name))

        worker = client.finalizer_worker(FINALIZER, "Worktree", handler, resync_interval=11.0)
        assert isinstance(worker, FinalizerWorkerSync)
        assert worker.run_once() == 1
        assert handled == [("w1", "tether-call-handler")]
        assert worker.outcomes == [(deleting.object.uid, "finalized")]
        assert worker.pending == []
        with pytest.raises(ObjectNotFound):
            client.objects.get("Worktree", "w1")

        clock = h.clock(client)
        resyncs = clock.slept.count(11.0)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(worker.run)
            clock.wait_for(lambda: clock.slept.count(11.0) > resyncs, "wait for the next listing")
            assert not running.done()
            worker.stop()
            assert running.result(WITHIN) is None

    await h.run(body)


# --- no server needed -----------------------------------------------------------------


def test_calls_after_close_raise_and_the_thread_ends() -> None:
    before = set(threading.enumerate())
    client = TetherClientSync("127.0.0.1:1", namespace="team-a", holder="me")
    started = set(threading.enumerate()) - before
    assert any(thread.name == "tether-client-sync" for thread in started)
    assert client.namespace == "team-a"
    assert client.holder == "me"
    assert not client.closed
    leases = client.leases
    client.close()
    client.close()  # idempotent
    assert client.closed
    assert not any(thread.is_alive() for thread in started)
    calls: list[Callable[[], object]] = [
        lambda: leases.acquire("jobs/a", ttl=5),
        lambda: client.leases.get("jobs/a"),
        lambda: client.leases.list(),
        lambda: client.leases.watch(),
        lambda: client.sagas.get("s1"),
        lambda: client.objects.list(),
        lambda: client.sweeps.run(dry_run=True),
        lambda: client.hold("jobs/a", ttl=5),
        lambda: client.run_saga("deploy", "s1"),
        lambda: client.compensation_worker("deploy", {}),
        lambda: client.finalizer_worker(FINALIZER, "Worktree", print),
        lambda: client.run_coroutine(asyncio.sleep(0)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_a_call_is_bounded_by_its_timeout_on_the_clients_clock() -> None:
    clock = SignalClock()
    with TetherClientSync("127.0.0.1:1", clock=clock) as client:

        def advance_once_the_call_backs_off() -> None:
            # The first attempt was refused; the call waits on its clock to retry.
            clock.wait_for(lambda: clock.slept, "backoff")
            client.run_coroutine(_advance(clock, 1.0))  # past the timeout

        with ThreadPoolExecutor(1) as pool:
            advancing = pool.submit(advance_once_the_call_backs_off)
            with pytest.raises((Unavailable, DeadlineExceeded)):
                client.leases.get("jobs/a", timeout=0.5)
            advancing.result(WITHIN)
