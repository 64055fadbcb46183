"""``client.sagas``, ``client.objects`` and ``client.sweeps``: keyword methods, the client's
namespace where none is given, enums by short name or proto value, retries exactly where
the safe-to-repeat rule allows, resumed watches, and the real server's answers and typed
refusals (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tests.client.conftest import ClientFactory, InProcessServer
from tether_client import RetryPolicy, TetherClient
from tether_client.errors import (
    BY_REASON,
    ObjectNotFound,
    ObjectTerminating,
    ResourceVersionConflict,
    SagaTerminal,
    TetherError,
    Unavailable,
)
from tether_client.leases import lease_states
from tether_client.objects import propagation_policies
from tether_client.pb import (
    common_pb2,
    lease_pb2,
    lease_pb2_grpc,
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    sweep_pb2,
    sweep_pb2_grpc,
)
from tether_client.sagas import (
    claim_purposes,
    compensation_statuses,
    on_stale_policies,
    redrive_modes,
    saga_states,
    step_statuses,
)
from tether_client.sweeps import sweep_parts, sweep_triggers
from tether_client.transport import EnumNames
from tether_client.values import from_struct, from_value, to_value

grpc_max_workers = 8

FENCE = common_pb2.Fence(lease_id="nope", fencing_token=1)
# The in-process server's FakeClock starts at this Unix time.
SERVER_START = datetime.fromtimestamp(1_700_000_000, UTC)


# --- every call, once ----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One area method called with arguments naming nothing that exists."""

    name: str
    rpc: str
    run: Callable[..., Any]  # (client, **kwargs) -> awaitable or async iterator
    safe: bool
    namespaced: bool = True

    async def __call__(self, client: TetherClient, **kwargs: Any) -> Any:
        result = self.run(client, **kwargs)
        if isinstance(result, AsyncIterator):
            return [item async for item in result]
        return await result


def _update(resource_version: int) -> Callable[..., Awaitable[Any]]:
    def run(c: TetherClient, **k: Any) -> Awaitable[Any]:
        obj = owner_ref_pb2.Object(kind="Thing", name="nope", resource_version=resource_version)
        return c.objects.update(obj, **k)

    return run


CALLS = [
    Call("sagas.create", "CreateSaga", lambda c, **k: c.sagas.create("nope", "", **k), True),
    Call("sagas.claim", "ClaimSaga", lambda c, **k: c.sagas.claim("nope", ttl=10, **k), False),
    Call(
        "sagas.record_step",
        "RecordStep",
        lambda c, **k: c.sagas.record_step("nope", FENCE, 0, "a", "started", **k),
        True,
    ),
    Call(
        "sagas.heartbeat",
        "HeartbeatSaga",
        lambda c, **k: c.sagas.heartbeat("nope", FENCE, **k),
        True,
    ),
    Call(
        "sagas.complete", "CompleteSaga", lambda c, **k: c.sagas.complete("nope", FENCE, **k), True
    ),
    Call("sagas.fail", "FailSaga", lambda c, **k: c.sagas.fail("nope", FENCE, **k), True),
    Call(
        "sagas.record_compensation",
        "RecordCompensation",
        lambda c, **k: c.sagas.record_compensation("nope", FENCE, 0, "succeeded", **k),
        False,  # attempt 0 is "the next one": a repeat would count another attempt
    ),
    Call(
        "sagas.record_compensation(attempt)",
        "RecordCompensation",
        lambda c, **k: c.sagas.record_compensation("nope", FENCE, 0, "failed", attempt=2, **k),
        True,
    ),
    Call("sagas.cancel", "CancelSaga", lambda c, **k: c.sagas.cancel("nope", **k), False),
    Call(
        "sagas.quarantine", "QuarantineSaga", lambda c, **k: c.sagas.quarantine("nope", **k), False
    ),
    Call(
        "sagas.redrive",
        "RedriveSaga",
        lambda c, **k: c.sagas.redrive("nope", mode="resume", **k),
        False,
    ),
    Call(
        "sagas.mark_step_compensated",
        "MarkStepCompensated",
        lambda c, **k: c.sagas.mark_step_compensated("nope", 0, **k),
        False,
    ),
    Call(
        "sagas.annotate", "AnnotateSaga", lambda c, **k: c.sagas.annotate("nope", "hi", **k), False
    ),
    Call("sagas.get", "GetSaga", lambda c, **k: c.sagas.get("nope", **k), True),
    Call("sagas.list", "ListSagas", lambda c, **k: c.sagas.list(**k), True),
    Call(
        "objects.create",
        "CreateObject",
        lambda c, **k: c.objects.create(obj=owner_ref_pb2.Object(kind="Thing"), **k),
        True,
    ),
    Call("objects.get", "GetObject", lambda c, **k: c.objects.get("Thing", "nope", **k), True),
    Call("objects.list", "ListObjects", lambda c, **k: c.objects.list(**k), True),
    Call("objects.update", "UpdateObject", _update(0), False),
    Call("objects.update(resource_version)", "UpdateObject", _update(4), True),
    Call(
        "objects.add_finalizer",
        "AddFinalizer",
        lambda c, **k: c.objects.add_finalizer("Thing", "nope", "x.io/f", **k),
        False,
    ),
    Call(
        "objects.remove_finalizer",
        "RemoveFinalizer",
        lambda c, **k: c.objects.remove_finalizer("Thing", "nope", "x.io/f", **k),
        True,
    ),
    Call(
        "objects.remove_finalizer(refusal)",
        "RemoveFinalizer",
        lambda c, **k: c.objects.remove_finalizer("Thing", "nope", "x.io/f", refusal="no", **k),
        False,  # each refusal is appended to the object's history
    ),
    Call(
        "objects.delete",
        "DeleteObject",
        lambda c, **k: c.objects.delete("Thing", "nope", **k),
        True,
    ),
    Call(
        "objects.dependents",
        "ListDependents",
        lambda c, **k: c.objects.dependents("nope", **k),
        True,
    ),
    Call(
        "objects.owner_graph",
        "GetOwnerGraph",
        lambda c, **k: c.objects.owner_graph("Thing", "nope", **k),
        True,
    ),
    Call(
        "objects.force_remove_finalizers",
        "ForceRemoveFinalizers",
        lambda c, **k: c.objects.force_remove_finalizers("Thing", "nope", reason="stuck", **k),
        False,
    ),
    Call("sweeps.run", "RunSweep", lambda c, **k: c.sweeps.run(**k), False),
    Call("sweeps.run(dry_run)", "RunSweep", lambda c, **k: c.sweeps.run(dry_run=True, **k), True),
    Call("sweeps.reports", "ListSweepReports", lambda c, **k: c.sweeps.reports(**k), True, False),
    Call("sweeps.get", "GetSweepReport", lambda c, **k: c.sweeps.get("nope", **k), True, False),
]


def ids(call: Call) -> str:
    return call.name


SERVICES: list[tuple[ServiceDescriptor, type, Callable[[Any, grpc.Server], None]]] = [
    (
        saga_pb2.DESCRIPTOR.services_by_name["SagaService"],
        saga_pb2_grpc.SagaServiceServicer,
        saga_pb2_grpc.add_SagaServiceServicer_to_server,
    ),
    (
        owner_ref_pb2.DESCRIPTOR.services_by_name["OwnerRefService"],
        owner_ref_pb2_grpc.OwnerRefServiceServicer,
        owner_ref_pb2_grpc.add_OwnerRefServiceServicer_to_server,
    ),
    (
        sweep_pb2.DESCRIPTOR.services_by_name["SweepService"],
        sweep_pb2_grpc.SweepServiceServicer,
        sweep_pb2_grpc.add_SweepServiceServicer_to_server,
    ),
]
LEASE_WATCH = lease_pb2.DESCRIPTOR.services_by_name["LeaseService"].methods_by_name["Watch"]


async def test_every_rpc_is_called_by_an_area_method() -> None:
    unary = {m.name for s, _, _ in SERVICES for m in s.methods if not m.server_streaming}
    assert len(unary) == 14 + 10 + 3
    assert {call.rpc for call in CALLS} == unary
    async with TetherClient("127.0.0.1:1") as client:
        for area in (client.leases, client.sagas, client.objects):
            assert callable(area.watch)


# --- against the real server (sweeps: tests/client/test_sweep_client.py) ---------------


@pytest.mark.parametrize("call", [c for c in CALLS if not c.name.startswith("sweeps.")], ids=ids)
async def test_calls_get_typed_answers_from_the_real_server(
    call: Call, tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, namespace="team-a")
    if call.rpc in ("ListSagas", "ListObjects", "ListDependents"):
        assert await call(client, timeout=10) == []
        return
    if call.rpc == "RemoveFinalizer":
        # For an object that is not there, the finalizer is gone, and so is the object.
        written = await call(client, timeout=10)
        assert written.deleted
        assert not written.object.uid
        return
    with pytest.raises(TetherError) as caught:
        await call(client, timeout=10)
    # A refusal the client knows by its reason (a missing field, no such saga, ...).
    assert type(caught.value) is BY_REASON.get(caught.value.reason), caught.value


async def test_a_saga_runs_fails_and_compensates(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, namespace="team-a")
    sagas = client.sagas
    deadline = SERVER_START + timedelta(days=1)
    created = await sagas.create(
        "task-1",
        "open-pr",
        input={"repo": "tether", "n": 3},
        labels={"team": "ci"},
        on_stale="quarantine",
        max_attempts=2,
        deadline=deadline,
    )
    assert created.created
    saga = created.saga
    assert (saga.namespace, saga.saga_id, saga.kind) == ("team-a", "task-1", "open-pr")
    assert saga.state == saga_pb2.SAGA_STATE_PLANNED
    assert from_struct(saga.input) == {"repo": "tether", "n": 3}
    assert dict(saga.labels) == {"team": "ci"}
    assert saga.on_stale == saga_pb2.ON_STALE_POLICY_QUARANTINE
    assert saga.max_attempts == 2
    assert saga.deadline.ToDatetime(tzinfo=UTC) == deadline
    again = await sagas.create(
        "task-1",
        "open-pr",
        input={"repo": "tether", "n": 3},
        labels={"team": "ci"},
        on_stale=saga_pb2.ON_STALE_POLICY_QUARANTINE,
        max_attempts=2,
        deadline=deadline,
    )
    assert not again.created
    assert again.saga.create_revision == saga.create_revision
    with pytest.raises(ValueError, match="timezone-aware"):
        await sagas.create("task-2", "open-pr", deadline=datetime(2030, 1, 1))

    claim = await sagas.claim(kind="open-pr", ttl=30)
    assert claim.saga.saga_id == "task-1"
    assert claim.saga.state == saga_pb2.SAGA_STATE_RUNNING
    assert claim.lease.holder == client.holder
    assert claim.fence.lease_id == claim.lease.lease_id
    assert claim.fence.fencing_token == claim.lease.fencing_token
    assert [s.saga_id async for s in sagas.list(states="running")] == ["task-1"]
    assert [s.saga_id async for s in sagas.list(states=[saga_pb2.SAGA_STATE_PLANNED])] == []

    undo = saga_pb2.Compensation(name="delete-branch", payload=to_value({"branch": "b1"}))
    started = await sagas.record_step(
        "task-1", claim.fence, 0, "branch", "started", compensation=undo
    )
    assert started.step.status == saga_pb2.STEP_STATUS_STARTED
    assert started.state == saga_pb2.SAGA_STATE_RUNNING
    done = await sagas.record_step(
        "task-1", claim.fence, 0, "branch", saga_pb2.STEP_STATUS_SUCCEEDED, output={"sha": "abc"}
    )
    assert from_value(done.step.output) == {"sha": "abc"}
    assert done.revision > started.revision
    beat = await sagas.heartbeat("task-1", claim.fence, progress=b"half way")
    assert beat.state == saga_pb2.SAGA_STATE_RUNNING
    assert beat.ttl == timedelta(seconds=30)
    assert beat.expires_at == SERVER_START + timedelta(seconds=30)

    failed = await sagas.fail("task-1", claim.fence, reason="tests broke")
    assert failed.state == saga_pb2.SAGA_STATE_COMPENSATING
    assert failed.failure_reason == "tests broke"
    undone = await sagas.record_compensation("task-1", claim.fence, 0, "succeeded", attempt=1)
    assert undone.compensation.status == saga_pb2.COMPENSATION_STATUS_SUCCEEDED
    assert undone.compensation.name == "delete-branch"
    assert undone.state == saga_pb2.SAGA_STATE_COMPENSATED
    note = await sagas.annotate("task-1", "looked at it", attributes={"by": "ops"})
    assert (note.text, dict(note.attributes)) == ("looked at it", {"by": "ops"})

    got = await sagas.get("task-1")
    assert got.state == saga_pb2.SAGA_STATE_COMPENSATED
    assert got.progress == b"half way"
    assert [(s.name, s.status) for s in got.steps] == [("branch", saga_pb2.STEP_STATUS_SUCCEEDED)]
    assert got.annotations[-1].text == "looked at it"
    with pytest.raises(SagaTerminal):
        await sagas.cancel("task-1")


async def test_operators_cancel_quarantine_redrive_and_mark_steps(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, namespace="team-a")
    sagas = client.sagas

    # A claim under a lease of the caller's keeps that lease's fence.
    lease = (await client.leases.acquire("workers/1", ttl=30)).lease
    fence = common_pb2.Fence(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
    await sagas.create("a", "build")
    claim = await sagas.claim("a", fence=fence)
    assert claim.fence == fence
    completed = await sagas.complete("a", claim.fence, output={"ok": True})
    assert completed.state == saga_pb2.SAGA_STATE_COMPLETED
    assert from_struct(completed.output) == {"ok": True}

    await sagas.create("b", "build")
    cancelled = await sagas.cancel("b", reason="not needed")
    assert cancelled.state == saga_pb2.SAGA_STATE_CANCELLED
    assert cancelled.failure_reason.endswith("not needed")

    await sagas.create("c", "build")
    claim = await sagas.claim("c", ttl=30, holder="worker-c", labels={"pod": "c"})
    assert claim.lease.holder == "worker-c"
    assert dict(claim.lease.labels) == {"pod": "c"}
    await sagas.record_step("c", claim.fence, 0, "compile", "failed", error="oom")
    quarantined = await sagas.quarantine("c", reason="odd")
    assert quarantined.state == saga_pb2.SAGA_STATE_QUARANTINED
    resumed = await sagas.redrive("c", mode="resume", reason="fixed the node")
    assert resumed.state == saga_pb2.SAGA_STATE_PLANNED

    await sagas.create("d", "build")
    claim = await sagas.claim("d", purpose="execute", ttl=30)
    undo = saga_pb2.Compensation(name="drop-db", payload=to_value("db-1"), max_attempts=1)
    await sagas.record_step("d", claim.fence, 0, "db", "succeeded", compensation=undo)
    await sagas.fail("d", claim.fence, reason="boom", hand_off=True)
    comp = await sagas.claim("d", purpose=saga_pb2.CLAIM_PURPOSE_COMPENSATE, ttl=30)
    exhausted = await sagas.record_compensation("d", comp.fence, 0, "failed", error="db gone?")
    assert exhausted.compensation.status == saga_pb2.COMPENSATION_STATUS_EXHAUSTED
    assert exhausted.state == saga_pb2.SAGA_STATE_QUARANTINED
    retried = await sagas.redrive("d", mode="retry-compensations")
    assert retried.state == saga_pb2.SAGA_STATE_COMPENSATING
    marked = await sagas.mark_step_compensated("d", 0, reason="dropped by hand")
    assert marked.compensations[0].status == saga_pb2.COMPENSATION_STATUS_MANUAL
    assert marked.state == saga_pb2.SAGA_STATE_COMPENSATED


async def test_claim_refuses_ambiguous_arguments(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    sagas = client_factory(tether.target).sagas
    with pytest.raises(ValueError, match="saga_id and kind"):
        await sagas.claim(ttl=10)
    with pytest.raises(ValueError, match="saga_id and kind"):
        await sagas.claim("a", kind="build", ttl=10)
    with pytest.raises(ValueError, match="fence"):
        await sagas.claim("a", fence=FENCE, ttl=10)
    with pytest.raises(ValueError, match="fence"):
        await sagas.claim("a", fence=FENCE, labels={"a": "b"})
    with pytest.raises(ValueError, match="ttl"):
        await sagas.claim("a")


async def test_objects_are_created_updated_finalized_and_deleted(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, namespace="team-a")
    objects = client.objects
    created = await objects.create(
        "Repo",
        "tether",
        spec={"url": "git://x", "depth": 1},
        status={"ok": True},
        labels={"team": "ci"},
        finalizers=["x.io/keep"],
    )
    owner = created.object
    assert created.created
    assert (owner.namespace, owner.kind, owner.name) == ("team-a", "Repo", "tether")
    assert owner.uid
    assert from_struct(owner.spec) == {"url": "git://x", "depth": 1}
    assert from_struct(owner.status) == {"ok": True}
    assert list(owner.finalizers) == ["x.io/keep"]

    ref = common_pb2.OwnerReference(
        kind="Repo", name="tether", uid=owner.uid, controller=True, block_owner_deletion=True
    )
    first = await objects.create("Worktree", "w1", owner_references=[ref], request_id="req-1")
    repeat = await objects.create("Worktree", "w1", owner_references=[ref], request_id="req-1")
    assert first.created
    assert not repeat.created
    assert repeat.object.uid == first.object.uid
    full = owner_ref_pb2.Object(
        kind="Worktree", name="w2", owner_references=[ref], annotations={"note": "by hand"}
    )
    second = (await objects.create(obj=full)).object
    assert dict(second.annotations) == {"note": "by hand"}
    with pytest.raises(ValueError, match="not both"):
        await objects.create("Worktree", "w3", obj=full)
    with pytest.raises(ValueError, match="kind and a name"):
        await objects.create("Worktree")

    by_name = await objects.get("Repo", "tether")
    assert await objects.get("Repo", uid=owner.uid) == by_name
    with pytest.raises(ValueError, match="name and uid"):
        await objects.get("Repo", "tether", uid=owner.uid)

    changed = owner_ref_pb2.Object()
    changed.CopyFrom(by_name)
    changed.labels["tier"] = "gold"
    written = await objects.update(changed)
    assert not written.deleted
    assert written.object.labels["tier"] == "gold"
    assert written.object.resource_version > by_name.resource_version
    with pytest.raises(ResourceVersionConflict):
        await objects.update(changed)  # its resource_version is now stale

    added = await objects.add_finalizer("Repo", "tether", "x.io/audit", uid=owner.uid)
    assert list(added.finalizers) == ["x.io/keep", "x.io/audit"]
    refused = await objects.remove_finalizer("Repo", "tether", "x.io/audit", refusal="busy")
    assert not refused.deleted
    assert "x.io/audit" in refused.object.finalizers
    refusal = refused.object.history[-1]
    assert refusal.attributes["event"] == "finalizer-refused"
    assert refusal.text.endswith("busy")
    removed = await objects.remove_finalizer("Repo", "tether", "x.io/audit")
    assert list(removed.object.finalizers) == ["x.io/keep"]

    dependents = [d async for d in objects.dependents(owner.uid)]
    assert sorted((d.object.name, d.depth, d.owner_uid) for d in dependents) == [
        ("w1", 1, owner.uid),
        ("w2", 1, owner.uid),
    ]
    graph = await objects.owner_graph("Repo", "tether")
    assert sorted((n.ref.name, n.depth) for n in graph.nodes) == [
        ("tether", 0),
        ("w1", 1),
        ("w2", 1),
    ]
    assert {(e.owner_uid, e.controller) for e in graph.edges} == {(owner.uid, True)}
    assert len(graph.edges) == 2
    assert not graph.truncated
    assert (await objects.owner_graph("Repo", "tether", max_objects=1)).truncated

    forced = await objects.force_remove_finalizers(
        "Repo", "tether", finalizers=["x.io/keep"], reason="stuck"
    )
    assert forced.removed == ("x.io/keep",)
    assert not forced.deleted
    assert list(forced.object.finalizers) == []

    gone = await objects.delete("Worktree", "w2", propagation="background")
    assert gone.deleted
    await objects.add_finalizer("Worktree", "w1", "x.io/cleanup")
    waiting = await objects.delete(
        "Worktree", "w1", propagation=owner_ref_pb2.PROPAGATION_POLICY_ORPHAN, uid=first.object.uid
    )
    assert not waiting.deleted
    assert waiting.object.HasField("deletion_timestamp")
    assert [o.name async for o in objects.list(terminating_only=True)] == ["w1"]
    with pytest.raises(ObjectTerminating):
        await objects.add_finalizer("Worktree", "w1", "x.io/more")
    last = await objects.remove_finalizer("Worktree", "w1", "x.io/cleanup")
    assert last.deleted
    with pytest.raises(ObjectNotFound):
        await objects.get("Worktree", "w1")


# --- every list pages --------------------------------------------------------------


async def _paged(client: TetherClient, items: Callable[[], AsyncIterator[Any]]) -> tuple[Any, int]:
    """The items of a list and how many pages were fetched for them."""
    transport = client._transport
    original = transport.unary
    pages = 0

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        return await original(*args, **kwargs)

    transport.unary = counting  # type: ignore[method-assign]
    try:
        return [item async for item in items()], pages
    finally:
        del transport.unary


async def test_every_list_pages_through_all_items_in_order(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, namespace="team-a")
    names = ["a", "b", "c", "d"]
    owner = (await client.objects.create("Repo", "r")).object
    ref = common_pb2.OwnerReference(kind="Repo", name="r", uid=owner.uid)
    for name in names:
        await client.leases.acquire(f"jobs/{name}", ttl=60)
        await client.sagas.create(name, "build")
        await client.objects.create("Worktree", name, owner_references=[ref])

    lists: dict[str, Callable[[int], AsyncIterator[Any]]] = {
        "leases": lambda size: client.leases.list(key_prefix="jobs/", page_size=size),
        "sagas": lambda size: client.sagas.list(kind="build", page_size=size),
        "objects": lambda size: client.objects.list(kind="Worktree", page_size=size),
        "dependents": lambda size: client.objects.dependents(owner.uid, page_size=size),
    }
    key: dict[str, Callable[[Any], str]] = {
        "leases": lambda lease: lease.key.removeprefix("jobs/"),
        "sagas": lambda saga: saga.saga_id,
        "objects": lambda obj: obj.name,
        "dependents": lambda dependent: dependent.object.name,
    }
    for area, make in lists.items():
        whole, one_page = await _paged(client, lambda make=make: make(0))
        paged, pages = await _paged(client, lambda make=make: make(1))
        assert one_page == 1, area
        assert pages >= len(names), area
        assert sorted(key[area](item) for item in paged) == names, area
        assert paged == whole, area  # the same items in the same order


# --- against a scripted server: what is sent, and what is retried --------------------


@dataclass
class Recorder:
    """Answers every saga/object/sweep RPC with an empty response, after ``failures``.

    A watch answers a header, then an event at revision 4, then breaks (UNAVAILABLE); the
    next watch answers the event at the revision asked for and ends."""

    failures: int = 0
    calls: list[tuple[str, Message]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, failures: int = 0) -> None:
        with self.lock:
            self.failures, self.calls = failures, []

    def record(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, request))
            fail = self.failures > 0
            self.failures -= fail
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")

    def received(self, method: str) -> list[Any]:
        with self.lock:
            return [request for name, request in self.calls if name == method]

    def handler(self, method: MethodDescriptor) -> Callable[..., Any]:
        response = message_factory.GetMessageClass(method.output_type)

        def unary(request: Message, context: grpc.ServicerContext) -> Message:
            self.record(method.name, request, context)
            return response()

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
            event = message_factory.GetMessageClass(
                method.output_type.fields_by_name["events"].message_type
            )
            with self.lock:
                self.calls.append((method.name, request))
                first = len(self.received_locked(method.name)) == 1
            if first:
                yield response(header_revision=3)
                yield response(header_revision=4, events=[event(revision=4)])
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted break")
            rev = request.start_revision
            yield response(header_revision=rev, events=[event(revision=rev)])

        return stream if method.server_streaming else unary

    def received_locked(self, method: str) -> list[Any]:
        return [request for name, request in self.calls if name == method]


@pytest.fixture(scope="module")
def grpc_servicer() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Callable[[Recorder, grpc.Server], None]:
    def add(recorder: Recorder, server: grpc.Server) -> None:
        for descriptor, base, add_servicer in SERVICES:
            servicer = base()
            for method in descriptor.methods:
                setattr(servicer, method.name, recorder.handler(method))
            add_servicer(servicer, server)
        leases = lease_pb2_grpc.LeaseServiceServicer()
        leases.Watch = recorder.handler(LEASE_WATCH)  # type: ignore[method-assign]
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(leases, server)

    return add


@pytest.fixture(scope="module")
def grpc_stub_cls() -> type:
    return saga_pb2_grpc.SagaServiceStub


@pytest.fixture
def recorder(grpc_servicer: Recorder, grpc_server: grpc.Server) -> Iterator[Recorder]:
    grpc_servicer.reset()
    yield grpc_servicer
    grpc_servicer.reset()


@pytest.fixture
async def scripted(grpc_addr: str, recorder: Recorder) -> AsyncIterator[TetherClient]:
    client = TetherClient(
        grpc_addr,
        namespace="team-a",
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02, default_timeout=10),
    )
    yield client
    await client.close()


@pytest.mark.parametrize("call", [c for c in CALLS if c.namespaced], ids=ids)
async def test_namespace_none_is_the_clients(
    call: Call, scripted: TetherClient, recorder: Recorder
) -> None:
    await call(scripted)
    (sent,) = recorder.received(call.rpc)
    # A sweep names no namespace unless told: it sweeps every namespace.
    assert sent.namespace == ("" if call.rpc == "RunSweep" else "team-a")


@pytest.mark.parametrize("call", [c for c in CALLS if c.namespaced], ids=ids)
async def test_a_given_namespace_is_kept(
    call: Call, scripted: TetherClient, recorder: Recorder
) -> None:
    await call(scripted, namespace="other")
    (sent,) = recorder.received(call.rpc)
    assert sent.namespace == "other"


async def test_a_given_request_id_is_kept_and_retries_repeat_it(
    scripted: TetherClient, recorder: Recorder
) -> None:
    recorder.reset(failures=2)
    await scripted.objects.create("Thing", "a", request_id="mine")
    assert [sent.request_id for sent in recorder.received("CreateObject")] == ["mine"] * 3
    recorder.reset(failures=1)
    await scripted.objects.create("Thing", "a")
    first, second = recorder.received("CreateObject")
    assert re.fullmatch(r"[0-9a-f]{32}", first.request_id)
    assert first.request_id == second.request_id
    recorder.reset()
    await scripted.objects.create("Thing", "a")
    (third,) = recorder.received("CreateObject")
    assert third.request_id != first.request_id


@pytest.mark.parametrize("call", CALLS, ids=ids)
async def test_only_safe_calls_are_retried(
    call: Call, scripted: TetherClient, recorder: Recorder
) -> None:
    recorder.reset(failures=1)
    if call.safe:
        await call(scripted)
        assert len(recorder.received(call.rpc)) == 2
    else:
        with pytest.raises(Unavailable):
            await call(scripted)
        assert len(recorder.received(call.rpc)) == 1


async def test_a_create_without_saga_id_is_not_retried(
    scripted: TetherClient, recorder: Recorder
) -> None:
    recorder.reset(failures=1)
    with pytest.raises(Unavailable):
        await scripted.sagas.create("", "build")
    assert len(recorder.received("CreateSaga")) == 1


@pytest.mark.parametrize("area", ["leases", "sagas", "objects"])
async def test_a_broken_watch_fails_over_and_resumes_after_its_last_event(
    area: str, grpc_addr: str, recorder: Recorder
) -> None:
    # Two targets that are the same server: a failover is visible as the index moving.
    client = TetherClient(
        [grpc_addr, grpc_addr.replace("localhost", "127.0.0.1")],
        namespace="team-a",
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02),
    )
    rpc = {"leases": "Watch", "sagas": "WatchSagas", "objects": "WatchObjects"}[area]
    try:
        events = [event async for event in getattr(client, area).watch()]
        assert client._transport.connection.fail_overs == 1
    finally:
        await client.close()
    # Events only (no header-only answer), none lost, none repeated.
    assert [type(event).__name__ for event in events] == [
        {"leases": "LeaseEvent", "sagas": "SagaEvent", "objects": "ObjectEvent"}[area]
    ] * 2
    assert [event.revision for event in events] == [4, 5]
    sent = recorder.received(rpc)
    assert [request.start_revision for request in sent] == [0, 5]
    assert {request.namespace for request in sent} == {"team-a"}


async def test_claim_waits_beyond_the_default_timeout(
    scripted: TetherClient, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = scripted._transport
    seen: list[Any] = []
    attempt_bounds: list[float | None] = []
    original = transport.call

    async def spy(
        attempt: Any, *, safe: bool, timeout: Any, attempt_timeout: float | None = None
    ) -> Any:
        seen.append(timeout)
        attempt_bounds.append(attempt_timeout)
        return await original(attempt, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout)

    monkeypatch.setattr(transport, "call", spy)
    await scripted.sagas.claim(kind="build", ttl=10, wait=60)
    await scripted.sagas.claim(kind="build", ttl=10, wait=timedelta(minutes=1), timeout=3)
    assert seen == [60 + transport.retry.default_timeout, 3]
    # One attempt may long-poll for the whole wait.
    assert attempt_bounds == [60 + transport.retry.attempt_timeout] * 2
    assert [request.wait.seconds for request in recorder.received("ClaimSaga")] == [60, 60]


# --- enums: short names and proto values ---------------------------------------------


@dataclass(frozen=True)
class EnumArg:
    name: str
    rpc: str
    run: Callable[[TetherClient, Any], Any]
    sent: Callable[[Any], Any]
    short: Any
    value: Any

    async def __call__(self, client: TetherClient, given: Any) -> Any:
        result = self.run(client, given)
        if isinstance(result, AsyncIterator):
            return [item async for item in result]
        return await result


ENUM_ARGS = [
    EnumArg(
        "sagas.list(states)",
        "ListSagas",
        lambda c, v: c.sagas.list(states=v),
        lambda r: list(r.states),
        ["running", "Compensating"],
        [saga_pb2.SAGA_STATE_RUNNING, saga_pb2.SAGA_STATE_COMPENSATING],
    ),
    EnumArg(
        "sagas.create(on_stale)",
        "CreateSaga",
        lambda c, v: c.sagas.create("s", "k", on_stale=v),
        lambda r: r.on_stale,
        "compensate",
        saga_pb2.ON_STALE_POLICY_COMPENSATE,
    ),
    EnumArg(
        "sagas.claim(purpose)",
        "ClaimSaga",
        lambda c, v: c.sagas.claim(kind="k", purpose=v, ttl=5),
        lambda r: r.purpose,
        "compensate",
        saga_pb2.CLAIM_PURPOSE_COMPENSATE,
    ),
    EnumArg(
        "sagas.record_step(status)",
        "RecordStep",
        lambda c, v: c.sagas.record_step("s", FENCE, 0, "a", v),
        lambda r: r.status,
        "succeeded",
        saga_pb2.STEP_STATUS_SUCCEEDED,
    ),
    EnumArg(
        "sagas.record_compensation(status)",
        "RecordCompensation",
        lambda c, v: c.sagas.record_compensation("s", FENCE, 0, v, attempt=1),
        lambda r: r.status,
        "failed",
        saga_pb2.COMPENSATION_STATUS_FAILED,
    ),
    EnumArg(
        "sagas.redrive(mode)",
        "RedriveSaga",
        lambda c, v: c.sagas.redrive("s", mode=v),
        lambda r: r.mode,
        "retry-compensations",
        saga_pb2.REDRIVE_MODE_RETRY_COMPENSATIONS,
    ),
    EnumArg(
        "objects.delete(propagation)",
        "DeleteObject",
        lambda c, v: c.objects.delete("Thing", "a", propagation=v),
        lambda r: r.propagation_policy,
        "foreground",
        owner_ref_pb2.PROPAGATION_POLICY_FOREGROUND,
    ),
    EnumArg(
        "sweeps.run(parts)",
        "RunSweep",
        lambda c, v: c.sweeps.run(dry_run=True, parts=v),
        lambda r: list(r.parts),
        ["expire-leases", "purge_events"],
        [sweep_pb2.SWEEP_PART_EXPIRE_LEASES, sweep_pb2.SWEEP_PART_PURGE_EVENTS],
    ),
    EnumArg(
        "sweeps.reports(triggers)",
        "ListSweepReports",
        lambda c, v: c.sweeps.reports(triggers=v),
        lambda r: list(r.triggers),
        "on-demand",
        [sweep_pb2.SWEEP_TRIGGER_ON_DEMAND],
    ),
]


@pytest.mark.parametrize("arg", ENUM_ARGS, ids=lambda arg: arg.name)
async def test_enums_take_short_names_and_proto_values(
    arg: EnumArg, scripted: TetherClient, recorder: Recorder
) -> None:
    await arg(scripted, arg.short)
    await arg(scripted, arg.value)
    by_name, by_value = recorder.received(arg.rpc)
    assert arg.sent(by_name) == arg.value
    assert arg.sent(by_value) == arg.value
    recorder.reset()
    with pytest.raises(ValueError, match=r"is one of .*, not 'bogus'"):
        await arg(scripted, "bogus")
    with pytest.raises(ValueError, match="not 99"):
        await arg(scripted, 99)
    assert recorder.received(arg.rpc) == []  # refused before anything was sent


NAMES: dict[str, tuple[EnumNames[Any], tuple[str, ...]]] = {
    "saga_states": (
        saga_states,
        (
            "planned",
            "running",
            "completed",
            "compensating",
            "compensated",
            "failed",
            "quarantined",
            "cancelled",
        ),
    ),
    "on_stale_policies": (on_stale_policies, ("requeue", "compensate", "quarantine")),
    "redrive_modes": (redrive_modes, ("retry-compensations", "resume")),
    "claim_purposes": (claim_purposes, ("execute", "compensate")),
    "step_statuses": (step_statuses, ("started", "succeeded", "failed")),
    "compensation_statuses": (
        compensation_statuses,
        ("pending", "succeeded", "failed", "exhausted", "manual"),
    ),
    "propagation_policies": (propagation_policies, ("background", "foreground", "orphan")),
    "sweep_triggers": (sweep_triggers, ("startup", "periodic", "on-demand")),
    "sweep_parts": (
        sweep_parts,
        (
            "expire-leases",
            "stale-sagas",
            "collect-garbage",
            "blocked-objects",
            "purge-leases",
            "purge-sagas",
            "purge-events",
            "purge-reports",
        ),
    ),
    "lease_states": (lease_states, lease_states.names),
}


@pytest.mark.parametrize("which", NAMES)
def test_enum_names_list_their_choices(which: str) -> None:
    names, expected = NAMES[which]
    assert names.names == expected
    with pytest.raises(ValueError, match=re.escape(", ".join(expected))):
        names("no-such-thing")
    with pytest.raises(ValueError, match="not True"):
        names(True)  # a bool is not an enum value
    for name in expected:
        assert names(names(name)) == names(name.upper().replace("-", "_"))
