"""An agent-pipeline saga worker, run as a real process by tests/e2e/test_saga_pipeline.py.

    python -m tests.e2e.saga_worker --target HOST:PORT --kind KIND --root DIR
        --actions FILE --holder NAME [--ttl S] [--hang-at STEP | --fail-at STEP]
        [--pause-after-claim]

The pipeline is ``plan -> create-branch -> create-worktree -> run``. ``create-branch`` and
``create-worktree`` really create a directory under ``--root`` (``branches/<task>`` and
``worktrees/<task>``) and register, with ``STARTED`` and before the directory exists, a
compensation that removes it. The worker claims the oldest claimable saga of ``--kind``
with a new lease, skips every step the step log says SUCCEEDED (using its recorded
output), and:

- ``--hang-at STEP``: records STEP started, reports ``hanging`` and blocks until killed;
- ``--fail-at STEP``: records STEP started then failed, fails the saga (not retryable),
  runs the compensations the server lists, highest step first, and reports ``done``;
- otherwise completes the saga and reports ``done``.

It reports on stdout, one JSON object a line: ``claimed`` (saga id, attempt, fence and the
step log it saw), then ``hanging`` or ``done``. With ``--pause-after-claim`` it waits for a
line on stdin after ``claimed``. Every side effect, skip and undo is appended to
``--actions`` as ``<pid> <verb> <what>`` (flushed and fsynced before the step is recorded
done), so the test can tell which process did what, in which order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2

from tether_client.pb import saga_pb2, saga_pb2_grpc

STEPS = ("plan", "create-branch", "create-worktree", "run")
RPC_TIMEOUT_S = 20.0
# Step -> (directory under --root it creates, the compensation that removes it).
AREAS = {
    "create-branch": ("branches", "remove-branch"),
    "create-worktree": ("worktrees", "remove-worktree"),
}


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Actions:
    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, verb: str, what: str) -> None:
        with self.path.open("a") as out:
            out.write(f"{os.getpid()} {verb} {what}\n")
            out.flush()
            os.fsync(out.fileno())


def to_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(data, dict):
        value.struct_value.update(data)
    else:
        value.string_value = str(data)
    return value


def value_dict(value: struct_pb2.Value) -> dict[str, Any]:
    return dict(value.struct_value) if value.HasField("struct_value") else {}


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.channel = grpc.insecure_channel(args.target)
        self.stub = saga_pb2_grpc.SagaServiceStub(self.channel)
        self.actions = Actions(Path(args.actions))
        self.root = Path(args.root)

    def call(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(request, timeout=RPC_TIMEOUT_S)

    def claim(self) -> saga_pb2.ClaimSagaResponse:
        response: saga_pb2.ClaimSagaResponse = self.call(
            "ClaimSaga",
            saga_pb2.ClaimSagaRequest(
                kind=self.args.kind,
                purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE,
                new_lease=saga_pb2.ClaimLeaseSpec(
                    holder=self.args.holder,
                    ttl=duration_pb2.Duration(seconds=self.args.ttl),
                ),
            ),
        )
        return response

    def record(
        self, index: int, name: str, status: int, **fields: Any
    ) -> saga_pb2.RecordStepResponse:
        response: saga_pb2.RecordStepResponse = self.call(
            "RecordStep",
            saga_pb2.RecordStepRequest(
                saga_id=self.saga_id,
                fence=self.fence,
                index=index,
                name=name,
                status=status,  # type: ignore[arg-type]
                **fields,
            ),
        )
        return response

    def run(self) -> int:
        claimed = self.claim()
        saga = claimed.saga
        self.saga_id = saga.saga_id
        self.fence = claimed.fence
        seen = {s.index: s for s in saga.steps}
        emit(
            "claimed",
            saga_id=saga.saga_id,
            attempt=saga.attempt,
            holder=saga.holder,
            fence={
                "lease_id": claimed.fence.lease_id,
                "fencing_token": claimed.fence.fencing_token,
            },
            steps=[
                {
                    "index": s.index,
                    "name": s.name,
                    "status": saga_pb2.StepStatus.Name(s.status),
                    "attempt": s.attempt,
                    "output": value_dict(s.output),
                }
                for s in saga.steps
            ],
        )
        if self.args.pause_after_claim:
            sys.stdin.readline()

        task = str(saga.input["task"])
        outputs: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        for index, name in enumerate(STEPS):
            done = seen.get(index)
            if done is not None and done.status == saga_pb2.STEP_STATUS_SUCCEEDED:
                assert done.name == name, (done.name, name)
                outputs[name] = value_dict(done.output)
                skipped.append(name)
                self.actions.log("skip", name)
                continue
            if name == self.args.hang_at:
                self.record(index, name, saga_pb2.STEP_STATUS_STARTED)
                self.actions.log("start", name)
                emit("hanging", step=name)
                # Mid-run: block until the test kills this process.
                while True:
                    signal.pause()
            if name == self.args.fail_at:
                self.record(index, name, saga_pb2.STEP_STATUS_STARTED)
                self.actions.log("start", name)
                self.record(index, name, saga_pb2.STEP_STATUS_FAILED, error=f"{name} crashed")
                return self.fail_and_compensate(f"{name} failed", skipped)
            outputs[name] = self.do_step(index, name, task, outputs)

        done_saga = self.call(
            "CompleteSaga",
            saga_pb2.CompleteSagaRequest(saga_id=self.saga_id, fence=self.fence),
        ).saga
        emit("done", state=saga_pb2.SagaState.Name(done_saga.state), skipped=skipped, undone=[])
        return 0

    def do_step(
        self, index: int, name: str, task: str, outputs: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        if name == "plan":
            self.record(index, name, saga_pb2.STEP_STATUS_STARTED)
            self.actions.log("do", name)
            output = {"plan": f"implement {task}"}
        else:
            area, undo = AREAS[name]
            path = self.root / area / task
            # The compensation goes with STARTED, before the directory exists.
            self.record(
                index,
                name,
                saga_pb2.STEP_STATUS_STARTED,
                compensation=saga_pb2.Compensation(
                    name=undo,
                    payload=to_value({"path": str(path)}),
                ),
            )
            path.mkdir(parents=True)
            (path / "CREATED_BY").write_text(f"{os.getpid()}\n")
            self.actions.log("do", name)
            output = {"path": str(path)}
        self.record(index, name, saga_pb2.STEP_STATUS_SUCCEEDED, output=to_value(output))
        return output

    def fail_and_compensate(self, reason: str, skipped: list[str]) -> int:
        failed = self.call(
            "FailSaga",
            saga_pb2.FailSagaRequest(saga_id=self.saga_id, fence=self.fence, reason=reason),
        ).saga
        undone: list[str] = []
        state = failed.state
        pending = [
            c for c in failed.compensations if c.status == saga_pb2.COMPENSATION_STATUS_PENDING
        ]
        # The server lists them in reverse step order; run them in that order.
        for record in pending:
            path = Path(value_dict(record.payload)["path"])
            shutil.rmtree(path)
            self.actions.log("undo", f"{record.name} {record.step_index}")
            undone.append(record.name)
            state = self.call(
                "RecordCompensation",
                saga_pb2.RecordCompensationRequest(
                    saga_id=self.saga_id,
                    fence=self.fence,
                    step_index=record.step_index,
                    status=saga_pb2.COMPENSATION_STATUS_SUCCEEDED,
                    attempt=record.attempts + 1,
                ),
            ).state
        emit(
            "done",
            state=saga_pb2.SagaState.Name(state),
            failed_state=saga_pb2.SagaState.Name(failed.state),
            compensation_order=[c.step_index for c in failed.compensations],
            skipped=skipped,
            undone=undone,
        )
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.saga_worker")
    parser.add_argument("--target", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--actions", required=True)
    parser.add_argument("--holder", required=True)
    parser.add_argument("--ttl", type=int, default=30)
    parser.add_argument("--hang-at", choices=STEPS)
    parser.add_argument("--fail-at", choices=STEPS)
    parser.add_argument("--pause-after-claim", action="store_true")
    args = parser.parse_args(argv)
    worker = Worker(args)
    try:
        return worker.run()
    finally:
        worker.channel.close()


if __name__ == "__main__":
    sys.exit(main())
