"""The agent pipeline as a saga, with real processes: a server process, worker processes
that create directories standing for a branch and a worktree, a worker SIGKILLed mid-run,
the next worker resuming from the step log and compensating, and the dead worker's fence
refused. Then: a server restart (SIGTERM or SIGKILL) keeps sagas, claims, step logs and
compensations; claims whose ttl passed while no server ran are fenced out after the
restart and taken over by the next workers.

Time is the server's file clock: "the claim's lease ran out" is one write to that file.
Workers report on stdout (``tests/e2e/saga_worker.py``); nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from tests.e2e import ServerFactory, error_info
from tests.support.server_process import FileClockDriver, ServerProcess
from tether_client.pb import common_pb2, saga_pb2, saga_pb2_grpc

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
KIND = "agent-pipeline"
TASK = "task-168"
CLAIM_TTL_S = 30
# Bounds on waiting for a worker's report (a loaded 2-core machine), not timing figures.
REPORT_WITHIN_S = 30.0
RPC_TIMEOUT_S = 10.0

PLANNED = saga_pb2.SAGA_STATE_PLANNED
RUNNING = saga_pb2.SAGA_STATE_RUNNING
COMPLETED = saga_pb2.SAGA_STATE_COMPLETED
COMPENSATING = saga_pb2.SAGA_STATE_COMPENSATING
COMPENSATED = saga_pb2.SAGA_STATE_COMPENSATED
STARTED = saga_pb2.STEP_STATUS_STARTED
SUCCEEDED = saga_pb2.STEP_STATUS_SUCCEEDED
STEP_FAILED = saga_pb2.STEP_STATUS_FAILED
C_PENDING = saga_pb2.COMPENSATION_STATUS_PENDING
C_OK = saga_pb2.COMPENSATION_STATUS_SUCCEEDED
EXECUTE = saga_pb2.CLAIM_PURPOSE_EXECUTE
COMPENSATE = saga_pb2.CLAIM_PURPOSE_COMPENSATE


@asynccontextmanager
async def saga_stub(target: str) -> AsyncIterator[saga_pb2_grpc.SagaServiceStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield saga_pb2_grpc.SagaServiceStub(channel)


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


async def get(stub: saga_pb2_grpc.SagaServiceStub, saga_id: str) -> saga_pb2.Saga:
    response = await stub.GetSaga(saga_pb2.GetSagaRequest(saga_id=saga_id), timeout=RPC_TIMEOUT_S)
    return response.saga


async def refused(call: Any) -> str:
    """The ErrorInfo reason of a call that must fail with FAILED_PRECONDITION."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
    return error_info(caught.value).reason


class WorkerProcess:
    """``python -m tests.e2e.saga_worker`` with its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> WorkerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.e2e.saga_worker",
            *args,
            cwd=REPO_ROOT,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def report(self, event: str) -> dict[str, Any]:
        """The next stdout line, which must be ``event`` (bounded wait)."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), REPORT_WITHIN_S)
        if not line:
            await self.proc.wait()
            assert self.proc.stderr is not None
            stderr = (await self.proc.stderr.read()).decode(errors="replace")
            raise AssertionError(
                f"worker exited ({self.proc.returncode}) before {event!r}:\n{stderr[-3000:]}"
            )
        message: dict[str, Any] = json.loads(line)
        assert message["event"] == event, message
        return message

    async def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), REPORT_WITHIN_S)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()
        await asyncio.wait_for(worker.proc.wait(), 10)


def actions(path: Path) -> list[tuple[int, str, str]]:
    """(pid, verb, what) per line the workers appended, in order."""
    out = []
    for line in path.read_text().splitlines():
        pid, verb, what = line.split(" ", 2)
        out.append((int(pid), verb, what))
    return out


async def test_worker_killed_mid_run_then_next_worker_resumes_and_compensates(
    db_url: str,
    server_factory: ServerFactory,
    file_clock: FileClockDriver,
    tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    server = server_factory(db_url, env=file_clock.env)
    root = tmp_path / "repo"
    log = tmp_path / "actions.log"
    branch, worktree = root / "branches" / TASK, root / "worktrees" / TASK
    common = ["--target", server.target, "--kind", KIND, "--root", str(root)]
    common += ["--actions", str(log), "--ttl", str(CLAIM_TTL_S)]

    async with saga_stub(server.target) as stub:
        created = await stub.CreateSaga(
            saga_pb2.CreateSagaRequest(
                saga_id=f"agent/{TASK}", kind=KIND, input=struct({"task": TASK})
            ),
            timeout=RPC_TIMEOUT_S,
        )
        saga_id = created.saga.saga_id
        assert created.created
        assert created.saga.state == PLANNED

        # Worker 1 plans, creates the branch and the worktree, starts "run" and hangs there.
        first = await WorkerProcess.start(*common, "--holder", "worker-1", "--hang-at", "run")
        workers.append(first)
        claimed_1 = await first.report("claimed")
        assert claimed_1["saga_id"] == saga_id
        assert claimed_1["attempt"] == 1
        assert claimed_1["steps"] == []
        await first.report("hanging")
        old = common_pb2.Fence(**claimed_1["fence"])
        assert branch.is_dir()
        assert worktree.is_dir()

        mid_run = await get(stub, saga_id)
        assert mid_run.state == RUNNING
        assert mid_run.holder == "worker-1"
        assert not mid_run.stale
        assert [(s.index, s.name, s.status, s.attempt) for s in mid_run.steps] == [
            (0, "plan", SUCCEEDED, 1),
            (1, "create-branch", SUCCEEDED, 1),
            (2, "create-worktree", SUCCEEDED, 1),
            (3, "run", STARTED, 1),
        ]
        assert [s.compensation.name for s in mid_run.steps] == [
            "",
            "remove-branch",
            "remove-worktree",
            "",
        ]
        assert mid_run.steps[1].compensation.payload.struct_value["path"] == str(branch)

        # SIGKILL mid-run, then the claim's lease runs out on the server's clock.
        first.kill()
        assert await first.exit_code() == -signal.SIGKILL
        file_clock.advance(CLAIM_TTL_S + 1)
        stale = await get(stub, saga_id)
        assert stale.state == RUNNING
        assert stale.stale

        # A late call of worker 1 (its old fence) is refused, and changes nothing.
        reason = await refused(
            stub.RecordStep(
                saga_pb2.RecordStepRequest(
                    saga_id=saga_id, fence=old, index=3, name="run", status=SUCCEEDED
                ),
                timeout=RPC_TIMEOUT_S,
            )
        )
        assert reason == "LEASE_EXPIRED"
        assert (await get(stub, saga_id)).revision == stale.revision

        # Worker 2 claims by kind and sees the step log; it waits for us after the claim.
        second = await WorkerProcess.start(
            *common, "--holder", "worker-2", "--fail-at", "run", "--pause-after-claim"
        )
        workers.append(second)
        claimed_2 = await second.report("claimed")
        assert claimed_2["saga_id"] == saga_id
        assert claimed_2["attempt"] == 2
        assert claimed_2["holder"] == "worker-2"
        assert [(s["name"], s["status"], s["attempt"]) for s in claimed_2["steps"]] == [
            ("plan", "STEP_STATUS_SUCCEEDED", 1),
            ("create-branch", "STEP_STATUS_SUCCEEDED", 1),
            ("create-worktree", "STEP_STATUS_SUCCEEDED", 1),
            ("run", "STEP_STATUS_STARTED", 1),
        ]
        assert claimed_2["steps"][2]["output"] == {"path": str(worktree)}
        new = common_pb2.Fence(**claimed_2["fence"])
        assert (new.lease_id, new.fencing_token) != (old.lease_id, old.fencing_token)

        # While worker 2 holds the claim, worker 1's fence is not the saga's claim.
        held = await get(stub, saga_id)
        reason = await refused(
            stub.CompleteSaga(
                saga_pb2.CompleteSagaRequest(saga_id=saga_id, fence=old), timeout=RPC_TIMEOUT_S
            )
        )
        assert reason == "STALE_FENCING_TOKEN"
        assert (await get(stub, saga_id)).revision == held.revision

        await second.go_on()
        done = await second.report("done")
        assert await second.exit_code() == 0
        assert done["failed_state"] == "SAGA_STATE_COMPENSATING"
        assert done["compensation_order"] == [2, 1]
        assert done["skipped"] == ["plan", "create-branch", "create-worktree"]
        assert done["undone"] == ["remove-worktree", "remove-branch"]
        assert done["state"] == "SAGA_STATE_COMPENSATED"

        # On disk: both directories are gone; the log says who did what, in order.
        assert not branch.exists()
        assert not worktree.exists()
        assert (root / "branches").is_dir()
        assert (root / "worktrees").is_dir()
        p1, p2 = first.proc.pid, second.proc.pid
        assert actions(log) == [
            (p1, "do", "plan"),
            (p1, "do", "create-branch"),
            (p1, "do", "create-worktree"),
            (p1, "start", "run"),
            (p2, "skip", "plan"),
            (p2, "skip", "create-branch"),
            (p2, "skip", "create-worktree"),
            (p2, "start", "run"),
            (p2, "undo", "remove-worktree 2"),
            (p2, "undo", "remove-branch 1"),
        ]

        final = await get(stub, saga_id)
        assert final.state == COMPENSATED
        assert final.attempt == 2
        assert final.failure_reason == "run failed"
        assert [(s.index, s.name, s.status, s.attempt) for s in final.steps] == [
            (0, "plan", SUCCEEDED, 1),
            (1, "create-branch", SUCCEEDED, 1),
            (2, "create-worktree", SUCCEEDED, 1),
            (3, "run", STEP_FAILED, 2),
        ]
        assert final.steps[3].error == "run crashed"
        assert [(c.step_index, c.name, c.status, c.attempts) for c in final.compensations] == [
            (2, "remove-worktree", C_OK, 1),
            (1, "remove-branch", C_OK, 1),
        ]
        assert [c.payload.struct_value["path"] for c in final.compensations] == [
            str(worktree),
            str(branch),
        ]

        # Worker 1 comes back once more: refused, nothing changes. The saga is terminal
        # now, and the contract checks that before the fence (SAGA_TERMINAL).
        late_calls = [
            stub.CompleteSaga(
                saga_pb2.CompleteSagaRequest(saga_id=saga_id, fence=old), timeout=RPC_TIMEOUT_S
            ),
            stub.RecordStep(
                saga_pb2.RecordStepRequest(
                    saga_id=saga_id, fence=old, index=3, name="run", status=SUCCEEDED
                ),
                timeout=RPC_TIMEOUT_S,
            ),
            stub.RecordCompensation(
                saga_pb2.RecordCompensationRequest(
                    saga_id=saga_id, fence=old, step_index=1, status=C_OK
                ),
                timeout=RPC_TIMEOUT_S,
            ),
        ]
        for call in late_calls:
            assert await refused(call) in ("STALE_FENCING_TOKEN", "LEASE_EXPIRED", "SAGA_TERMINAL")
        assert await get(stub, saga_id) == final


# --- restart ------------------------------------------------------------------------------


async def claim(
    stub: saga_pb2_grpc.SagaServiceStub, saga_id: str, holder: str, purpose: int = EXECUTE
) -> saga_pb2.ClaimSagaResponse:
    response: saga_pb2.ClaimSagaResponse = await stub.ClaimSaga(
        saga_pb2.ClaimSagaRequest(
            saga_id=saga_id,
            purpose=purpose,  # type: ignore[arg-type]
            new_lease=saga_pb2.ClaimLeaseSpec(
                holder=holder, ttl=duration_pb2.Duration(seconds=CLAIM_TTL_S)
            ),
        ),
        timeout=RPC_TIMEOUT_S,
    )
    return response


async def step(
    stub: saga_pb2_grpc.SagaServiceStub,
    saga_id: str,
    fence: common_pb2.Fence,
    index: int,
    name: str,
    status: int,
    undo: str = "",
) -> None:
    request = saga_pb2.RecordStepRequest(
        saga_id=saga_id,
        fence=fence,
        index=index,
        name=name,
        status=status,  # type: ignore[arg-type]
    )
    if undo:
        request.compensation.CopyFrom(
            saga_pb2.Compensation(name=undo, payload=struct_pb2.Value(string_value=f"{name}-x"))
        )
    await stub.RecordStep(request, timeout=RPC_TIMEOUT_S)


async def compensate(
    stub: saga_pb2_grpc.SagaServiceStub, saga_id: str, fence: common_pb2.Fence, index: int
) -> saga_pb2.RecordCompensationResponse:
    response: saga_pb2.RecordCompensationResponse = await stub.RecordCompensation(
        saga_pb2.RecordCompensationRequest(
            saga_id=saga_id, fence=fence, step_index=index, status=C_OK
        ),
        timeout=RPC_TIMEOUT_S,
    )
    return response


async def run_three_steps(
    stub: saga_pb2_grpc.SagaServiceStub, saga_id: str, fence: common_pb2.Fence
) -> None:
    for index, name in enumerate(("plan", "create-branch", "create-worktree")):
        await step(stub, saga_id, fence, index, name, STARTED, undo=f"undo-{name}")
        await step(stub, saga_id, fence, index, name, SUCCEEDED)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_restart_keeps_sagas_claims_step_logs_and_compensations(
    db_url: str, server_factory: ServerFactory, file_clock: FileClockDriver, stop: str
) -> None:
    server: ServerProcess = server_factory(db_url, env=file_clock.env)
    ids = ["planned", "running", "compensating", "completed"]
    async with saga_stub(server.target) as stub:
        for saga_id in ids:
            await stub.CreateSaga(
                saga_pb2.CreateSagaRequest(
                    saga_id=saga_id, kind=KIND, input=struct({"task": saga_id})
                ),
                timeout=RPC_TIMEOUT_S,
            )
        # RUNNING, mid-way: three steps done, the fourth started.
        running = (await claim(stub, "running", "worker-r")).fence
        await run_three_steps(stub, "running", running)
        await step(stub, "running", running, 3, "run", STARTED)
        # COMPENSATING, claim kept: one of three compensations done.
        comp = (await claim(stub, "compensating", "worker-c")).fence
        await run_three_steps(stub, "compensating", comp)
        failed = await stub.FailSaga(
            saga_pb2.FailSagaRequest(saga_id="compensating", fence=comp, reason="run failed"),
            timeout=RPC_TIMEOUT_S,
        )
        assert failed.saga.state == COMPENSATING
        assert (await compensate(stub, "compensating", comp, 2)).state == COMPENSATING
        await stub.AnnotateSaga(
            saga_pb2.AnnotateSagaRequest(saga_id="compensating", text="looked at it"),
            timeout=RPC_TIMEOUT_S,
        )
        # COMPLETED.
        done = (await claim(stub, "completed", "worker-d")).fence
        await run_three_steps(stub, "completed", done)
        await stub.CompleteSaga(
            saga_pb2.CompleteSagaRequest(
                saga_id="completed", fence=done, output=struct({"pr": 168})
            ),
            timeout=RPC_TIMEOUT_S,
        )
        before = {saga_id: await get(stub, saga_id) for saga_id in ids}

    assert [before[i].state for i in ids] == [PLANNED, RUNNING, COMPENSATING, COMPLETED]
    if stop == "sigkill":
        assert server.kill() == -9
    else:
        assert await asyncio.to_thread(server.terminate) == 0
    file_clock.advance(1)  # well within the claims' ttl
    await asyncio.to_thread(server.start)

    async with saga_stub(server.target) as stub:
        after = {saga_id: await get(stub, saga_id) for saga_id in ids}
        # Everything that was written is read back as it was: state, claim, holder,
        # attempt, revisions, timestamps, step log, compensations, annotations.
        for saga_id in ids:
            assert after[saga_id] == before[saga_id], saga_id
        assert after["running"].claim == running
        assert not after["running"].stale
        assert [c.status for c in after["compensating"].compensations] == [
            C_OK,
            C_PENDING,
            C_PENDING,
        ]

        # The claims are still the holders': nobody else takes them ...
        for saga_id, purpose in (("running", EXECUTE), ("compensating", COMPENSATE)):
            reason = await refused(claim(stub, saga_id, "thief", purpose))
            assert reason == "SAGA_CLAIMED"
        # ... and the holders carry on with the same fences.
        await step(stub, "running", running, 3, "run", SUCCEEDED)
        completed = await stub.CompleteSaga(
            saga_pb2.CompleteSagaRequest(saga_id="running", fence=running),
            timeout=RPC_TIMEOUT_S,
        )
        assert completed.saga.state == COMPLETED
        assert (await compensate(stub, "compensating", comp, 1)).state == COMPENSATING
        assert (await compensate(stub, "compensating", comp, 0)).state == COMPENSATED
        # The planned saga is claimable as before, as attempt 1.
        planned = await claim(stub, "planned", "worker-p")
        assert planned.saga.attempt == 1
        assert planned.saga.state == RUNNING
        # Revisions go on from where they were.
        newest = max(s.revision for s in before.values())
        assert (await get(stub, "planned")).revision > newest


async def test_claims_that_ran_out_while_the_server_was_down_are_taken_over(
    db_url: str, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    """SIGKILL, the claims' ttl passes with no server running, restart: the recovery sweep
    has already ended the stale claims (policy REQUEUE), the old fences are refused, and
    the next workers take over from the step log and the compensations."""
    server: ServerProcess = server_factory(db_url, env=file_clock.env)
    async with saga_stub(server.target) as stub:
        for saga_id in ("running", "compensating"):
            await stub.CreateSaga(
                saga_pb2.CreateSagaRequest(
                    saga_id=saga_id, kind=KIND, input=struct({"task": saga_id})
                ),
                timeout=RPC_TIMEOUT_S,
            )
        running = (await claim(stub, "running", "worker-r")).fence
        await run_three_steps(stub, "running", running)
        comp = (await claim(stub, "compensating", "worker-c")).fence
        await run_three_steps(stub, "compensating", comp)
        await stub.FailSaga(
            saga_pb2.FailSagaRequest(saga_id="compensating", fence=comp, reason="run failed"),
            timeout=RPC_TIMEOUT_S,
        )
        await compensate(stub, "compensating", comp, 2)

    assert server.kill() == -9
    file_clock.advance(CLAIM_TTL_S + 5)
    await asyncio.to_thread(server.start)

    async with saga_stub(server.target) as stub:
        for saga_id in ("running", "compensating"):
            requeued = await get(stub, saga_id)
            assert not requeued.stale, saga_id
            assert not requeued.HasField("claim"), saga_id
        late = stub.RecordStep(
            saga_pb2.RecordStepRequest(
                saga_id="running", fence=running, index=3, name="run", status=STARTED
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert await refused(late) == "LEASE_EXPIRED"
        late_comp = stub.RecordCompensation(
            saga_pb2.RecordCompensationRequest(
                saga_id="compensating", fence=comp, step_index=1, status=C_OK
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert await refused(late_comp) == "LEASE_EXPIRED"

        # The next worker resumes the running saga by kind, with its step log.
        resumed = await stub.ClaimSaga(
            saga_pb2.ClaimSagaRequest(
                kind=KIND,
                purpose=EXECUTE,
                new_lease=saga_pb2.ClaimLeaseSpec(
                    holder="worker-r2", ttl=duration_pb2.Duration(seconds=CLAIM_TTL_S)
                ),
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert resumed.saga.saga_id == "running"
        assert resumed.saga.attempt == 2
        assert [(s.name, s.status) for s in resumed.saga.steps] == [
            ("plan", SUCCEEDED),
            ("create-branch", SUCCEEDED),
            ("create-worktree", SUCCEEDED),
        ]
        reason = await refused(
            stub.RecordStep(
                saga_pb2.RecordStepRequest(
                    saga_id="running", fence=running, index=3, name="run", status=STARTED
                ),
                timeout=RPC_TIMEOUT_S,
            )
        )
        assert reason == "STALE_FENCING_TOKEN"

        # A compensation worker finishes what the dead one left, last step first.
        taken = await claim(stub, "compensating", "compensator", COMPENSATE)
        assert [(c.step_index, c.status) for c in taken.saga.compensations] == [
            (2, C_OK),
            (1, C_PENDING),
            (0, C_PENDING),
        ]
        assert (await compensate(stub, "compensating", taken.fence, 1)).state == COMPENSATING
        assert (await compensate(stub, "compensating", taken.fence, 0)).state == COMPENSATED
