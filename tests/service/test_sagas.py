"""SagaService over gRPC on both backends: the state machine, fencing, claims, operators.

Time moves only when a test advances the fake clock; the deadline task is driven by hand
(``enforce_deadlines``) so a test decides when it runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from tether_client.pb import common_pb2, lease_pb2, saga_pb2, saga_pb2_grpc

from .conftest import WAIT_S, Harness, dur, eventually, expect_error

FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
IA = grpc.StatusCode.INVALID_ARGUMENT
PLANNED = saga_pb2.SAGA_STATE_PLANNED
RUNNING = saga_pb2.SAGA_STATE_RUNNING
COMPLETED = saga_pb2.SAGA_STATE_COMPLETED
COMPENSATING = saga_pb2.SAGA_STATE_COMPENSATING
COMPENSATED = saga_pb2.SAGA_STATE_COMPENSATED
FAILED = saga_pb2.SAGA_STATE_FAILED
QUARANTINED = saga_pb2.SAGA_STATE_QUARANTINED
CANCELLED = saga_pb2.SAGA_STATE_CANCELLED
EXECUTE = saga_pb2.CLAIM_PURPOSE_EXECUTE
COMPENSATE = saga_pb2.CLAIM_PURPOSE_COMPENSATE
STARTED = saga_pb2.STEP_STATUS_STARTED
SUCCEEDED = saga_pb2.STEP_STATUS_SUCCEEDED
STEP_FAILED = saga_pb2.STEP_STATUS_FAILED
C_OK = saga_pb2.COMPENSATION_STATUS_SUCCEEDED
C_FAIL = saga_pb2.COMPENSATION_STATUS_FAILED


class Sagas:
    """A SagaService stub plus the calls tests repeat."""

    def __init__(self, tether: Harness) -> None:
        self.tether = tether
        self.stub = saga_pb2_grpc.SagaServiceStub(tether.channel)

    async def create(
        self, saga_id: str = "s1", kind: str = "build", **fields: Any
    ) -> saga_pb2.Saga:
        response = await self.stub.CreateSaga(
            saga_pb2.CreateSagaRequest(saga_id=saga_id, kind=kind, **fields), timeout=WAIT_S
        )
        return response.saga

    async def claim(
        self,
        saga_id: str = "",
        *,
        kind: str = "",
        holder: str = "w1",
        ttl_s: float = 10,
        purpose: int = EXECUTE,
        **fields: Any,
    ) -> saga_pb2.ClaimSagaResponse:
        target = {"saga_id": saga_id} if saga_id else {"kind": kind}
        lease = fields.pop("existing_lease", None)
        lease_arg: dict[str, Any] = (
            {"existing_lease": lease}
            if lease is not None
            else {"new_lease": saga_pb2.ClaimLeaseSpec(holder=holder, ttl=dur(ttl_s))}
        )
        response: saga_pb2.ClaimSagaResponse = await self.stub.ClaimSaga(
            saga_pb2.ClaimSagaRequest(purpose=purpose, **target, **lease_arg, **fields),
            timeout=WAIT_S,
        )
        return response

    async def step(
        self,
        fence: common_pb2.Fence,
        index: int,
        name: str,
        status: int = SUCCEEDED,
        saga_id: str = "s1",
        **fields: Any,
    ) -> saga_pb2.RecordStepResponse:
        response: saga_pb2.RecordStepResponse = await self.stub.RecordStep(
            saga_pb2.RecordStepRequest(
                saga_id=saga_id, fence=fence, index=index, name=name, status=status, **fields
            ),
            timeout=WAIT_S,
        )
        return response

    async def get(self, saga_id: str = "s1") -> saga_pb2.Saga:
        response = await self.stub.GetSaga(saga_pb2.GetSagaRequest(saga_id=saga_id), timeout=WAIT_S)
        return response.saga

    async def fail(
        self, fence: common_pb2.Fence, saga_id: str = "s1", **fields: Any
    ) -> saga_pb2.Saga:
        response = await self.stub.FailSaga(
            saga_pb2.FailSagaRequest(saga_id=saga_id, fence=fence, **fields), timeout=WAIT_S
        )
        return response.saga

    async def compensate(
        self,
        fence: common_pb2.Fence,
        step_index: int,
        status: int = C_OK,
        saga_id: str = "s1",
        **fields: Any,
    ) -> saga_pb2.RecordCompensationResponse:
        response: saga_pb2.RecordCompensationResponse = await self.stub.RecordCompensation(
            saga_pb2.RecordCompensationRequest(
                saga_id=saga_id, fence=fence, step_index=step_index, status=status, **fields
            ),
            timeout=WAIT_S,
        )
        return response


def comp(name: str, payload: Any = None, max_attempts: int = 0) -> saga_pb2.Compensation:
    message = saga_pb2.Compensation(name=name, max_attempts=max_attempts)
    if payload is not None:
        message.payload.CopyFrom(struct_pb2.Value(string_value=payload))
    return message


@pytest.fixture
async def sagas(tether: Harness) -> Sagas:
    await tether.server.runner.stop_task("saga-deadlines")
    return Sagas(tether)


async def test_a_saga_runs_to_completion(sagas: Sagas) -> None:
    created = await sagas.create(input=_struct({"repo": "r"}))
    assert created.state == PLANNED
    assert created.input["repo"] == "r"
    claimed = await sagas.claim("s1")
    assert claimed.saga.state == RUNNING
    assert claimed.saga.attempt == 1
    fence = claimed.fence
    assert fence.lease_id == claimed.lease.lease_id
    assert claimed.lease.key == "sagas/s1"
    first = await sagas.step(fence, 0, "plan", STARTED, compensation=comp("unplan"))
    assert first.step.status == STARTED
    assert first.state == RUNNING
    await sagas.step(fence, 0, "plan", SUCCEEDED, output=struct_pb2.Value(string_value="ok"))
    done = await sagas.stub.CompleteSaga(
        saga_pb2.CompleteSagaRequest(saga_id="s1", fence=fence), timeout=WAIT_S
    )
    assert done.saga.state == COMPLETED
    got = await sagas.get()
    assert [s.name for s in got.steps] == ["plan"]
    assert got.steps[0].output.string_value == "ok"
    # Terminal: no more steps.
    await expect_error(sagas.step(fence, 1, "more"), FP, "SAGA_TERMINAL")


async def test_failure_compensates_in_reverse_order(sagas: Sagas) -> None:
    await sagas.create()
    fence = (await sagas.claim("s1")).fence
    for i, name in enumerate(["branch", "worktree", "run"]):
        await sagas.step(fence, i, name, STARTED, compensation=comp(f"undo-{name}"))
        if name != "run":
            await sagas.step(fence, i, name, SUCCEEDED)
    await sagas.step(fence, 2, "run", STEP_FAILED, error="boom")
    saga = await sagas.fail(fence, reason="boom")
    assert saga.state == COMPENSATING
    assert [c.step_index for c in saga.compensations] == [2, 1, 0]
    await expect_error(sagas.compensate(fence, 0), FP, "COMPENSATION_OUT_OF_ORDER")
    for index in (2, 1):
        await sagas.compensate(fence, index)
    last = await sagas.compensate(fence, 0)
    assert last.state == COMPENSATED
    final = await sagas.get()
    assert final.state == COMPENSATED
    assert all(c.status == C_OK for c in final.compensations)


async def test_stale_claim_is_fenced_and_requeued(sagas: Sagas, tether: Harness) -> None:
    await sagas.create()
    old = (await sagas.claim("s1", ttl_s=5)).fence
    await sagas.step(old, 0, "plan")
    tether.clock.advance(6)
    stale = await sagas.get()
    assert stale.stale
    assert stale.state == RUNNING
    # The old worker is fenced out at once, before any sweep.
    await expect_error(sagas.step(old, 1, "more"), FP, "LEASE_EXPIRED")
    second = await sagas.claim(kind="build", holder="w2")
    assert second.saga.saga_id == "s1"
    assert second.saga.attempt == 2
    assert [s.name for s in second.saga.steps] == ["plan"]
    await expect_error(sagas.step(old, 1, "more"), FP, "STALE_FENCING_TOKEN")


async def test_a_lease_created_for_the_claim_ends_with_the_claim(
    sagas: Sagas, tether: Harness
) -> None:
    await sagas.create()
    claimed = await sagas.claim("s1")
    assert (await tether.get(claimed.lease.lease_id)).state == lease_pb2.LEASE_STATE_ACTIVE
    await sagas.stub.CompleteSaga(
        saga_pb2.CompleteSagaRequest(saga_id="s1", fence=claimed.fence), timeout=WAIT_S
    )
    assert (await tether.get(claimed.lease.lease_id)).state == lease_pb2.LEASE_STATE_RELEASED
    # A caller's own lease is the caller's: completing the saga leaves it alone.
    own = await tether.acquire("workers/w9", "w9")
    await sagas.create("s2")
    fence = common_pb2.Fence(lease_id=own.lease_id, fencing_token=own.fencing_token)
    await sagas.claim("s2", existing_lease=fence)
    await sagas.stub.CompleteSaga(
        saga_pb2.CompleteSagaRequest(saga_id="s2", fence=fence), timeout=WAIT_S
    )
    assert (await tether.get(own.lease_id)).state == lease_pb2.LEASE_STATE_ACTIVE


async def test_the_deadline_task_runs_on_the_injected_clock(tether: Harness) -> None:
    sagas = Sagas(tether)
    now = tether.clock.now_us()
    await sagas.create(deadline=_ts(now + 5_000_000))
    await sagas.claim("s1", ttl_s=600)

    tether.clock.advance(6)

    async def moved() -> bool:
        return (await sagas.get()).state == FAILED

    # The task sleeps on the fake clock until the deadline; advancing it woke the task.
    await eventually(moved, "the deadline task moved the saga")
    saga = await sagas.get()
    assert saga.state == FAILED
    assert "deadline" in saga.failure_reason


async def test_retryable_failure_requeues_after_the_backoff(sagas: Sagas, tether: Harness) -> None:
    await sagas.create(max_attempts=2)
    fence = (await sagas.claim("s1")).fence
    await sagas.step(fence, 0, "plan")
    saga = await sagas.fail(fence, reason="flaky", retryable=True, retry_after=dur(30))
    assert saga.state == PLANNED
    assert saga.failure_reason == "flaky"
    # The claim ended with the failure: the old fence is no longer good.
    await expect_error(sagas.step(fence, 1, "x"), FP, "INVALID_SAGA_STATE")
    await expect_error(sagas.claim(kind="build"), FP, "NOTHING_CLAIMABLE")
    tether.clock.advance(31)
    second = await sagas.claim(kind="build", holder="w2")
    assert second.saga.attempt == 2
    assert [s.name for s in second.saga.steps] == ["plan"]
    # No attempts left: a retryable failure compensates (nothing registered: FAILED).
    final = await sagas.fail(second.fence, reason="flaky again", retryable=True)
    assert final.state == FAILED


async def test_a_repeated_complete_or_fail_answers_the_first_result(sagas: Sagas) -> None:
    await sagas.create()
    fence = (await sagas.claim("s1")).fence
    request = saga_pb2.CompleteSagaRequest(saga_id="s1", fence=fence)
    first = await sagas.stub.CompleteSaga(request, timeout=WAIT_S)
    again = await sagas.stub.CompleteSaga(request, timeout=WAIT_S)
    assert again.saga.revision == first.saga.revision
    assert again.saga.state == COMPLETED
    await sagas.create("s2")
    fence2 = (await sagas.claim("s2")).fence
    await sagas.step(fence2, 0, "a", STARTED, saga_id="s2", compensation=comp("undo-a"))
    one = await sagas.fail(fence2, saga_id="s2", reason="r", hand_off=True)
    two = await sagas.fail(fence2, saga_id="s2", reason="r", hand_off=True)
    assert one.state == COMPENSATING
    assert two.revision == one.revision


async def test_step_records_are_idempotent_per_attempt(sagas: Sagas) -> None:
    await sagas.create()
    fence = (await sagas.claim("s1")).fence
    first = await sagas.step(fence, 0, "plan", STARTED)
    again = await sagas.step(fence, 0, "plan", STARTED)
    assert again.revision == first.revision
    done = await sagas.step(fence, 0, "plan", SUCCEEDED)
    assert (await sagas.step(fence, 0, "plan", SUCCEEDED)).revision == done.revision
    await expect_error(sagas.step(fence, 0, "plan", STARTED), FP, "STEP_CONFLICT")
    await expect_error(sagas.step(fence, 0, "other", SUCCEEDED), FP, "STEP_CONFLICT")
    await expect_error(sagas.step(fence, 5, "far"), IA, "INVALID_FIELD")


async def test_hand_off_lets_a_compensation_worker_finish(sagas: Sagas) -> None:
    await sagas.create()
    fence = (await sagas.claim("s1")).fence
    await sagas.step(fence, 0, "branch", STARTED, compensation=comp("rm-branch", "b1"))
    saga = await sagas.fail(fence, reason="boom", hand_off=True)
    assert saga.state == COMPENSATING
    assert not saga.HasField("claim")
    await expect_error(sagas.claim(kind="build"), FP, "NOTHING_CLAIMABLE")
    worker = await sagas.claim(kind="build", purpose=COMPENSATE, holder="janitor")
    assert worker.saga.compensations[0].payload.string_value == "b1"
    assert (await sagas.compensate(worker.fence, 0)).state == COMPENSATED


async def test_exhausted_compensation_quarantines_and_redrive_retries(
    sagas: Sagas, tether: Harness
) -> None:
    await sagas.create()
    fence = (await sagas.claim("s1")).fence
    await sagas.step(fence, 0, "a", STARTED, compensation=comp("undo-a", max_attempts=2))
    await sagas.step(fence, 1, "b", STARTED, compensation=comp("undo-b", max_attempts=2))
    await sagas.fail(fence, reason="boom")
    await sagas.compensate(fence, 1, C_FAIL, error="disk", attempt=1)
    # A repeated report of attempt 1 changes nothing.
    again = await sagas.compensate(fence, 1, C_FAIL, error="disk", attempt=1)
    assert again.compensation.attempts == 1
    last = await sagas.compensate(fence, 1, C_FAIL, error="disk", attempt=2)
    assert last.state == QUARANTINED
    assert last.compensation.status == saga_pb2.COMPENSATION_STATUS_EXHAUSTED
    await expect_error(sagas.compensate(fence, 0), FP, "SAGA_TERMINAL")
    redriven = await sagas.stub.RedriveSaga(
        saga_pb2.RedriveSagaRequest(
            saga_id="s1", mode=saga_pb2.REDRIVE_MODE_RETRY_COMPENSATIONS, reason="disk fixed"
        ),
        timeout=WAIT_S,
    )
    assert redriven.saga.state == COMPENSATING
    assert any("disk fixed" in a.text for a in redriven.saga.annotations)
    janitor = await sagas.claim("s1", purpose=COMPENSATE, holder="janitor")
    await sagas.compensate(janitor.fence, 1)
    marked = await sagas.stub.MarkStepCompensated(
        saga_pb2.MarkStepCompensatedRequest(saga_id="s1", step_index=0, reason="done by hand"),
        timeout=WAIT_S,
    )
    assert marked.saga.state == COMPENSATED
    await expect_error(
        sagas.stub.RedriveSaga(
            saga_pb2.RedriveSagaRequest(saga_id="s1", mode=saga_pb2.REDRIVE_MODE_RESUME),
            timeout=WAIT_S,
        ),
        FP,
        "SAGA_TERMINAL",
    )
    manual = {c.step_index: c for c in marked.saga.compensations}[0]
    assert manual.status == saga_pb2.COMPENSATION_STATUS_MANUAL
    assert manual.marked_by


async def test_redrive_resume_runs_forward_again(sagas: Sagas, tether: Harness) -> None:
    await sagas.create(on_stale=saga_pb2.ON_STALE_POLICY_QUARANTINE)
    fence = (await sagas.claim("s1", ttl_s=5)).fence
    await sagas.step(fence, 0, "plan")
    tether.clock.advance(6)
    await expect_error(sagas.claim("s1", holder="w2"), FP, "SAGA_TERMINAL")
    assert (await sagas.get()).state == QUARANTINED
    resumed = await sagas.stub.RedriveSaga(
        saga_pb2.RedriveSagaRequest(saga_id="s1", mode=saga_pb2.REDRIVE_MODE_RESUME, reason="go"),
        timeout=WAIT_S,
    )
    assert resumed.saga.state == PLANNED
    again = await sagas.claim("s1", holder="w3")
    assert again.saga.state == RUNNING
    assert [s.name for s in again.saga.steps] == ["plan"]


async def test_stale_policies(sagas: Sagas, tether: Harness) -> None:
    await sagas.create("c", on_stale=saga_pb2.ON_STALE_POLICY_COMPENSATE)
    await sagas.create("r", max_attempts=1)
    fc = (await sagas.claim("c", ttl_s=5)).fence
    await sagas.step(fc, 0, "a", STARTED, saga_id="c", compensation=comp("undo"))
    fr = (await sagas.claim("r", ttl_s=5)).fence
    await sagas.step(fr, 0, "a", STARTED, saga_id="r", compensation=comp("undo"))
    tether.clock.advance(6)
    listed = await sagas.stub.ListSagas(saga_pb2.ListSagasRequest(stale_only=True), timeout=WAIT_S)
    assert sorted(s.saga_id for s in listed.sagas) == ["c", "r"]
    # Claims apply the policies: "c" compensates, "r" ran out of attempts and compensates.
    await expect_error(sagas.claim(kind="build", holder="w2"), FP, "NOTHING_CLAIMABLE")
    assert (await sagas.get("c")).state == COMPENSATING
    assert (await sagas.get("r")).state == COMPENSATING
    assert "1 of 1 attempts" in (await sagas.get("r")).failure_reason


async def test_cancel(sagas: Sagas) -> None:
    await sagas.create("never")
    cancelled = await sagas.stub.CancelSaga(
        saga_pb2.CancelSagaRequest(saga_id="never", reason="not needed"), timeout=WAIT_S
    )
    assert cancelled.saga.state == CANCELLED
    await sagas.create("running")
    fence = (await sagas.claim("running")).fence
    await sagas.step(fence, 0, "a", STARTED, saga_id="running", compensation=comp("undo"))
    cancelled = await sagas.stub.CancelSaga(
        saga_pb2.CancelSagaRequest(saga_id="running", reason="stop"), timeout=WAIT_S
    )
    assert cancelled.saga.state == COMPENSATING
    # The running worker's claim ended with the cancel.
    await expect_error(sagas.step(fence, 1, "b", saga_id="running"), FP, "INVALID_SAGA_STATE")
    janitor = await sagas.claim("running", purpose=COMPENSATE)
    assert (await sagas.compensate(janitor.fence, 0, saga_id="running")).state == COMPENSATED


async def test_deadline_moves_a_running_saga_to_compensation(sagas: Sagas, tether: Harness) -> None:
    now = tether.clock.now_us()
    await sagas.create(deadline=_ts(now + 60_000_000))
    fence = (await sagas.claim("s1", ttl_s=600)).fence
    await sagas.step(fence, 0, "a", STARTED, compensation=comp("undo"))
    tether.clock.advance(61)
    assert (await sagas.get()).overdue
    overdue = await sagas.stub.ListSagas(
        saga_pb2.ListSagasRequest(overdue_only=True), timeout=WAIT_S
    )
    assert [s.saga_id for s in overdue.sagas] == ["s1"]
    await expect_error(sagas.step(fence, 1, "b"), FP, "INVALID_SAGA_STATE")
    moved = await tether.server.sagas.enforce_deadlines()
    assert moved.moved == 1
    saga = await sagas.get()
    assert saga.state == COMPENSATING
    assert not saga.overdue
    assert "deadline" in saga.failure_reason


async def test_annotations_reach_terminal_sagas(sagas: Sagas) -> None:
    await sagas.create()
    await sagas.stub.CancelSaga(saga_pb2.CancelSagaRequest(saga_id="s1"), timeout=WAIT_S)
    note = await sagas.stub.AnnotateSaga(
        saga_pb2.AnnotateSagaRequest(saga_id="s1", text="checked", attributes={"by": "ops"}),
        timeout=WAIT_S,
    )
    assert note.annotation.text == "checked"
    saga = await sagas.get()
    assert [a.text for a in saga.annotations][-1] == "checked"
    assert saga.revision == note.revision


async def test_list_filters_and_pages(sagas: Sagas) -> None:
    for i in range(5):
        await sagas.create(f"a{i}", kind="alpha", labels={"team": "x" if i % 2 else "y"})
    await sagas.create("b0", kind="beta")
    await sagas.claim("a0")
    seen: list[str] = []
    token = ""
    while True:
        page = await sagas.stub.ListSagas(
            saga_pb2.ListSagasRequest(kind="alpha", page_size=2, page_token=token), timeout=WAIT_S
        )
        seen += [s.saga_id for s in page.sagas]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"a{i}" for i in range(5)]
    labelled = await sagas.stub.ListSagas(
        saga_pb2.ListSagasRequest(labels={"team": "x"}), timeout=WAIT_S
    )
    assert [s.saga_id for s in labelled.sagas] == ["a1", "a3"]
    running = await sagas.stub.ListSagas(
        saga_pb2.ListSagasRequest(states=[RUNNING]), timeout=WAIT_S
    )
    assert [s.saga_id for s in running.sagas] == ["a0"]
    await expect_error(
        sagas.stub.ListSagas(
            saga_pb2.ListSagasRequest(kind="beta", page_token=token or "x"), timeout=WAIT_S
        ),
        IA,
        "INVALID_PAGE_TOKEN",
    )


async def test_watch_streams_saga_events(sagas: Sagas) -> None:
    stream = sagas.stub.WatchSagas(saga_pb2.WatchSagasRequest(kind="build"), timeout=WAIT_S)
    header = await stream.read()
    await sagas.create()
    await sagas.create("other", kind="deploy")
    fence = (await sagas.claim("s1")).fence
    await sagas.step(fence, 0, "plan")
    types: list[int] = []
    while len(types) < 3:
        response = await stream.read()
        for event in response.events:
            assert event.saga.saga_id == "s1"
            assert event.revision > header.header_revision
            types.append(event.type)
            if event.type == saga_pb2.SAGA_EVENT_TYPE_STEP_RECORDED:
                assert event.step.name == "plan"
    assert types == [
        saga_pb2.SAGA_EVENT_TYPE_CREATED,
        saga_pb2.SAGA_EVENT_TYPE_CLAIMED,
        saga_pb2.SAGA_EVENT_TYPE_STEP_RECORDED,
    ]
    stream.cancel()


async def test_a_long_poll_claim_wakes_on_create(sagas: Sagas, tether: Harness) -> None:
    waiting = asyncio.ensure_future(sagas.claim(kind="build", wait=dur(60)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await sagas.create()
    claimed = await asyncio.wait_for(waiting, WAIT_S)
    assert claimed.saga.saga_id == "s1"


async def test_claim_under_an_existing_lease(sagas: Sagas, tether: Harness) -> None:
    lease = await tether.acquire("workers/w1", "w1", ttl_s=30)
    await sagas.create()
    fence = common_pb2.Fence(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
    claimed = await sagas.claim("s1", existing_lease=fence)
    assert claimed.fence == fence
    beat = await sagas.stub.HeartbeatSaga(
        saga_pb2.HeartbeatSagaRequest(saga_id="s1", fence=fence, progress=b"half"),
        timeout=WAIT_S,
    )
    assert beat.state == RUNNING
    assert (await sagas.get()).progress == b"half"
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w1"
        ),
        timeout=WAIT_S,
    )
    await expect_error(sagas.step(fence, 0, "a"), FP, "LEASE_RELEASED")
    assert (await sagas.get()).stale


async def test_saga_gauges_count_states_stale_and_overdue(sagas: Sagas, tether: Harness) -> None:
    now = tether.clock.now_us()
    await sagas.create("a")
    await sagas.create("b", deadline=_ts(now + 1_000_000))
    await sagas.create("c")
    await sagas.claim("c", ttl_s=5)
    tether.clock.advance(6)
    await tether.server.runner.run_once("saga-counts")
    text = tether.server.metrics.scrape().decode()
    assert 'tether_sagas{state="PLANNED"} 2.0' in text
    assert 'tether_sagas{state="RUNNING"} 1.0' in text
    assert 'tether_sagas{state="COMPLETED"} 0.0' in text
    assert "tether_sagas_stale 1.0" in text
    assert "tether_sagas_overdue 1.0" in text


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)
