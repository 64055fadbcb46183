"""The saga scenarios: workers running five-step sagas end to end through the client helper.

Each of ``concurrency`` workers (spread over ``procs`` processes, each process one
``TetherClient``) loops:

1. ``CreateSaga`` of a new saga of kind ``bench-saga`` (a producer's part, counted here so a
   saga's RPCs are all of its life);
2. ``client.run_saga("bench-saga", ...)``: holds a worker lease (``Acquire``) and claims the
   oldest claimable saga of the kind with it (``ClaimSaga``: the queue, shared by every
   worker of both processes);
3. five steps, each recorded ``STARTED`` with its compensation (a local handler, the
   compensation registered before the action) then ``SUCCEEDED``;
4. ``CompleteSaga`` and the lease's ``Release``.

With ``fail_every`` = N, every N-th saga a process starts fails at step 4 (index 3): the
step is recorded ``FAILED``, the saga ``FailSaga``-ed, and its four registered compensations
run inline, last step first (``RecordCompensation`` each) until it is ``COMPENSATED``.

``driver`` = ``"stubs"`` (``python -m tests.bench.saga --driver stubs`` only) runs the same
sagas with raw stubs: the claim creates its own lease (``new_lease``), no retry wrapper.

Figures: sagas finished in the window per second (completed and compensated apart), RPCs
per saga (unary calls, counted per saga through the client's single call path,
``Transport.call``; the keeper's stream messages apart), RPC/s, claim latency (the
``ClaimSaga`` call) and whole saga latency p50/p99.

On the ``noop`` target (no SagaService) the same number of callers send unary
``LeaseService.Acquire`` calls back to back: the RPC rate of a store-less Python gRPC server
at the same concurrency, the reference for "saga RPC/s ÷ noop RPC/s".

``python -m tests.bench.saga`` (see :func:`main`) runs one saga load against one fresh
server and samples it with py-spy: where the server's and the clients' time goes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import re
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench.scenarios import Scenario, _wait_tasks, err_name, now, split

KIND = "bench-saga"
STEPS = 5
FAIL_AT = 3  # "step 4"
_saga_rpcs: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "saga_rpcs", default=None
)


class StepFailed(Exception):
    pass


async def _undo(payload: Any) -> None:
    """A compensation handler: the side effect is imaginary, so is its undoing."""


class SagaScenario(Scenario):
    async def setup(self) -> None:
        cfg = self.cfg
        callers = split(cfg["concurrency"], self.procs, self.wid)
        self.claim_lat = array("d")
        self.rpcs = 0
        self.started = 0
        self.stream_msgs_before = 0
        self.extra.update(
            noop=cfg["target"] == "noop", completed=0, compensated=0, saga_rpcs=0, other_end=0
        )
        if cfg["target"] == "noop":
            api = self.open_api()
            await api.ready(cfg["setup_timeout"])
            self.tasks = [asyncio.create_task(self.noop_caller(api)) for _ in range(callers)]
        elif cfg.get("driver") == "stubs":
            await self._open_stubs()
            self.tasks = [asyncio.create_task(self.saga_loop(i)) for i in range(callers)]
        else:
            await self._open_client()
            self.tasks = [asyncio.create_task(self.saga_loop(i)) for i in range(callers)]
        await asyncio.sleep(cfg["warmup"])

    async def _open_client(self) -> None:
        from tether_client import TetherClient

        logging.getLogger("tether_client").setLevel(logging.ERROR)
        self.client = TetherClient(self.cfg["targets"], holder=f"bench-{self.wid}")
        await asyncio.wait_for(_reachable(self.client), 30)
        # Every unary call of the client (the keeper's Acquire and Release too) goes
        # through its transport's call: count them there.
        transport = self.client._transport
        original_call = transport.call
        original_claim = self.client.sagas.claim

        async def counting_call(*args: Any, **kwargs: Any) -> Any:
            counter = _saga_rpcs.get()
            if counter is not None:
                counter[0] += 1
            if self.recording:
                self.rpcs += 1
            return await original_call(*args, **kwargs)

        async def timed_claim(*args: Any, **kwargs: Any) -> Any:
            started = now()
            response = await original_claim(*args, **kwargs)
            if self.recording:
                self.claim_lat.append(now() - started)
            return response

        transport.call = counting_call  # type: ignore[method-assign]
        self.client.sagas.claim = timed_claim  # type: ignore[method-assign]

    async def _open_stubs(self) -> None:
        import grpc

        from tether_client.pb import saga_pb2_grpc

        self.channel = grpc.aio.insecure_channel(self.cfg["targets"][0])
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        self.stub = saga_pb2_grpc.SagaServiceStub(self.channel)

    async def _rpc(self, method: str, request: Any) -> Any:
        """One raw stub call, counted like the helper's."""
        counter = _saga_rpcs.get()
        if counter is not None:
            counter[0] += 1
        if self.recording:
            self.rpcs += 1
        return await getattr(self.stub, method)(request, timeout=self.cfg["rpc_timeout"])

    async def noop_caller(self, api: Any) -> None:
        while not self.stopping and self.ok < self.cfg["max_ops"]:
            started = now()
            try:
                await api.grant(600, self.prefix)
            except Exception as exc:
                if self.recording:
                    self.errors[err_name(exc)] += 1
                await asyncio.sleep(0.01)
                continue
            if self.recording:
                self.ok += 1
                self.rpcs += 1
                self.lat.append(now() - started)

    async def saga_loop(self, caller: int) -> None:
        from tether_client.pb import saga_pb2

        cfg = self.cfg
        fail_every = cfg["fail_every"]
        n = 0
        while not self.stopping and self.ok < cfg["max_ops"]:
            n += 1
            # Every fail_every-th saga this process starts, whichever worker runs it.
            self.started += 1
            failing = bool(fail_every) and self.started % fail_every == 0
            counter = [0]
            token = _saga_rpcs.set(counter)
            started = now()
            state = None
            saga_id = f"{self.prefix}{caller}-{n}"
            try:
                if cfg.get("driver") == "stubs":
                    create = saga_pb2.CreateSagaRequest(saga_id=saga_id, kind=KIND)
                    await self._rpc("CreateSaga", create)
                    state = await self.one_saga_stubs(failing, f"bench-{self.wid}-{caller}")
                else:
                    await self.client.sagas.create(saga_id, KIND)
                    state = await self.one_saga(failing)
            except Exception as exc:
                if self.recording:
                    self.errors[err_name(exc)] += 1
                await asyncio.sleep(0.01)
                continue
            finally:
                _saga_rpcs.reset(token)
            if self.recording:
                self.ok += 1
                self.lat.append(now() - started)
                self.extra["saga_rpcs"] += counter[0]
                if state == saga_pb2.SAGA_STATE_COMPLETED:
                    self.extra["completed"] += 1
                elif state == saga_pb2.SAGA_STATE_COMPENSATED:
                    self.extra["compensated"] += 1
                else:
                    self.extra["other_end"] += 1

    async def one_saga(self, failing: bool) -> int:
        run = None
        try:
            async with self.client.run_saga(KIND, ttl=60, wait=5) as run:
                for i in range(STEPS):

                    def action(i: int = i) -> dict[str, int]:
                        if failing and i == FAIL_AT:
                            raise StepFailed(f"step {i + 1} failed")
                        return {"step": i}

                    await run.step(
                        f"step-{i}", action, compensate=_undo, compensation_payload={"step": i}
                    )
        except StepFailed:
            pass
        assert run is not None
        return int(run.saga.state)

    async def one_saga_stubs(self, failing: bool, holder: str) -> int:
        """The same saga with raw stubs: the claim makes its own lease (``new_lease``), so
        no separate Acquire and Release; no retry wrapper. 13 RPCs (15 compensating)."""
        from google.protobuf import duration_pb2, struct_pb2

        from tether_client.pb import saga_pb2

        started = now()
        claimed = await self._rpc(
            "ClaimSaga",
            saga_pb2.ClaimSagaRequest(
                kind=KIND,
                purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE,
                new_lease=saga_pb2.ClaimLeaseSpec(
                    holder=holder, ttl=duration_pb2.Duration(seconds=60)
                ),
                wait=duration_pb2.Duration(seconds=5),
            ),
        )
        if self.recording:
            self.claim_lat.append(now() - started)
        saga_id, fence = claimed.saga.saga_id, claimed.fence

        def step(index: int, status: int, **fields: Any) -> saga_pb2.RecordStepRequest:
            return saga_pb2.RecordStepRequest(
                saga_id=saga_id,
                fence=fence,
                index=index,
                name=f"step-{index}",
                status=status,  # type: ignore[arg-type]
                **fields,
            )

        for i in range(STEPS):
            payload = struct_pb2.Value()
            payload.struct_value.update({"step": i})
            undo = saga_pb2.Compensation(name="_undo", payload=payload)
            await self._rpc("RecordStep", step(i, saga_pb2.STEP_STATUS_STARTED, compensation=undo))
            if failing and i == FAIL_AT:
                failed = saga_pb2.STEP_STATUS_FAILED
                await self._rpc("RecordStep", step(i, failed, error=f"step {i + 1} failed"))
                saga = (
                    await self._rpc(
                        "FailSaga",
                        saga_pb2.FailSagaRequest(
                            saga_id=saga_id, fence=fence, reason=f"step {i + 1} failed"
                        ),
                    )
                ).saga
                state = int(saga.state)
                for record in saga.compensations:  # listed last step first
                    await _undo(record.payload)
                    answer = await self._rpc(
                        "RecordCompensation",
                        saga_pb2.RecordCompensationRequest(
                            saga_id=saga_id,
                            fence=fence,
                            step_index=record.step_index,
                            status=saga_pb2.COMPENSATION_STATUS_SUCCEEDED,
                            attempt=record.attempts + 1,
                        ),
                    )
                    state = int(answer.state)
                return state
            await self._rpc("RecordStep", step(i, saga_pb2.STEP_STATUS_SUCCEEDED, output=payload))
        done = await self._rpc(
            "CompleteSaga", saga_pb2.CompleteSagaRequest(saga_id=saga_id, fence=fence)
        )
        return int(done.saga.state)

    async def measure(self) -> float:
        if hasattr(self, "client"):
            self.stream_msgs_before = int(self.client.keeper_stats.requests_sent)
        return await super().measure()

    async def stop(self) -> None:
        self.stopping = True
        self.errors.update(await _wait_tasks(self.tasks, self.cfg["rpc_timeout"] + 5))
        if hasattr(self, "client"):
            sent = int(self.client.keeper_stats.requests_sent)
            self.extra["keepalive_msgs"] = sent - self.stream_msgs_before

    async def close(self) -> None:
        if hasattr(self, "client"):
            await asyncio.wait_for(self.client.close(), 30)
        if hasattr(self, "channel"):
            await self.channel.close()
        await super().close()

    def result(self) -> dict[str, Any]:
        out = super().result()
        out["rpcs"] = self.rpcs
        out["claim_lat"] = self.claim_lat.tobytes()
        return out


async def _reachable(client: Any) -> None:
    """One small read: the server answers (the first page of the kind's sagas)."""
    async for _ in client.sagas.list(kind=KIND, page_size=1):
        break


# --- profiling one run -------------------------------------------------------------------


_PROCESS = re.compile(r'process (\d+):"[^"]*";?')


def _layer(group: str, frames: list[str]) -> str:
    """Where a sample's time goes, by the innermost frame that says so."""
    leaf = frames[-1]
    if group == "server":
        if leaf.startswith(("SqliteTx.", "SqliteBackend._batch")) or "(asyncpg/" in leaf:
            return "database driver (sqlite3 calls, asyncpg)"
        for frame in reversed(frames):
            if "(tether_server/store/" in frame:
                return "store (units, rows, committer; Python)"
            if "(tether_server/services/" in frame or "(tether_server/domain/" in frame:
                return "service (handlers, validation, protobuf conversion)"
        return "gRPC + asyncio (no tether frame: grpc's Cython/C core, the event loop)"
    if any("(<frozen importlib" in f for f in frames):
        return "imports (start-up)"
    if "(grpc/" in leaf or "(aio/" in leaf:
        return "gRPC calls (grpc.aio)"
    if any("(tenacity/" in f for f in frames):
        return "retry wrapper (tenacity)"
    for frame in reversed(frames):
        if "(tether_client/" in frame:
            return "tether_client (run_saga, area clients, transport)"
    return "asyncio, the bench harness"


def _summarize(raw: Path, server_pid: int, top: int) -> str:
    """Collapsed py-spy stacks -> per process group: samples, layers, top frames."""
    groups: dict[str, Counter[str]] = {"server": Counter(), "client": Counter()}
    inclusive: dict[str, Counter[str]] = {"server": Counter(), "client": Counter()}
    layers: dict[str, Counter[str]] = {"server": Counter(), "client": Counter()}
    totals: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Nested 'process PID:"cmd"' frames (parent first; a command may hold ";"): the
        # last one is the sampled process.
        pids = [int(pid) for pid in _PROCESS.findall(stack)]
        if not pids or pids[-1] == os.getpid():
            continue  # this driver: it only waits
        group = "server" if pids[-1] == server_pid else "client"
        frames = [
            f for f in _PROCESS.sub("", stack).split(";") if f and not f.startswith("thread ")
        ]
        if not frames:
            continue
        totals[group] += count
        layers[group][_layer(group, frames)] += count
        groups[group][_frame(frames[-1])] += count
        for name in {_frame(f) for f in frames}:
            inclusive[group][name] += count
    lines = []
    all_samples = sum(totals.values()) or 1
    for group in ("server", "client"):
        n = totals[group] or 1
        lines.append(
            f"{group}: {totals[group]} samples ({100 * totals[group] / all_samples:.0f} % of all)"
        )
        lines.append("  by layer:")
        for name, count in layers[group].most_common():
            lines.append(f"    {100 * count / n:5.1f} %  {name}")
        lines.append("  self:")
        for name, count in groups[group].most_common(top):
            lines.append(f"    {100 * count / n:5.1f} %  {name}")
        lines.append("  inclusive:")
        for name, count in inclusive[group].most_common(top):
            lines.append(f"    {100 * count / n:5.1f} %  {name}")
    return "\n".join(lines)


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if match is None:
        return frame
    name, path = match.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.bench.saga``: one saga run against one target, sampled with py-spy
    (the server process and the load generator apart), top functions printed."""
    import argparse
    import json
    import shutil
    import signal
    import subprocess
    import tempfile

    from tests.bench.load import BASE
    from tests.bench.report import shape
    from tests.bench.runner import run_workers
    from tests.bench.targets import pg_admin_url, tether_target

    parser = argparse.ArgumentParser(prog="python -m tests.bench.saga", description=main.__doc__)
    parser.add_argument("--target", choices=["tether-sqlite", "tether-pg"], default="tether-sqlite")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=16, help="workers (16)")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes (2)")
    parser.add_argument(
        "--driver",
        choices=["helper", "stubs"],
        default="helper",
        help="client.run_saga (as make bench does) or raw stubs with a new_lease claim",
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw-out", help="keep py-spy's collapsed stacks here")
    parser.add_argument(
        "--gil", action="store_true", help="sample only threads holding the GIL (CPU, not waits)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120]")
    if not 0 < args.procs <= 8 or not args.procs <= args.concurrency <= 256:
        parser.error("need 0 < --procs <= 8 and --procs <= --concurrency <= 256")
    pg_url = None
    if args.target == "tether-pg":
        pg_url, reason = pg_admin_url()
        if pg_url is None:
            parser.error(f"PostgreSQL unavailable: {reason}")
    backend = "sqlite" if args.target == "tether-sqlite" else "postgres"
    directory = Path(tempfile.mkdtemp(prefix="tether-bench-profile-"))
    raw = Path(args.raw_out) if args.raw_out else directory / "stacks.txt"
    try:
        with tether_target(backend, pg_url) as running:
            cfg: dict[str, Any] = {
                **BASE,
                "scenario": "saga",
                "kind": "saga",
                "api": running.api,
                "targets": running.targets,
                "target": running.name,
                "duration": args.duration,
                "warmup": 1.0,
                "procs": args.procs,
                "concurrency": args.concurrency,
                "fail_every": args.fail_every,
                "driver": args.driver,
            }
            cfg["measure_timeout"] = cfg["duration"] + 30
            cfg["hard_limit_s"] = cfg["setup_timeout"] + cfg["measure_timeout"] + 120
            spy = None
            if args.py_spy:
                # This process's children: the server and the spawned load generators.
                spy = subprocess.Popen(
                    [args.py_spy, "record", "--pid", str(os.getpid()), "--subprocesses"]
                    + ["--format", "raw", "--rate", str(args.rate), "--nonblocking"]
                    + ["--output", str(raw)]
                    + (["--gil"] if args.gil else []),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            try:
                record = shape("saga", run_workers(cfg, running.server_pids, running.store))
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
            record.pop("trace", None)
            print(json.dumps(record, default=str))
            if spy is not None and raw.exists():
                print(_summarize(raw, running.server_pids[0], args.top))
            elif spy is None:
                print("py-spy not found: no profile (pip install py-spy, or --py-spy PATH)")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
