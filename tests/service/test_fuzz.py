"""Fuzz every RPC of every tether.v1 service; no input may fault the server.

Generated, mutated and raw inputs (tests/support/fuzz.py) go to every method found in the
service descriptors, as the caller ``fuzz_credentials`` names (a worker with a bearer
token). No call may end ``INTERNAL`` or ``UNKNOWN`` (a server fault), no unary call may hang
until its deadline (waiting calls are released by moving the fake clock), and the server may
log no error. A fault is minimized on the live server and reported with the method, the
request bytes (hex, original and minimized) and the server's traceback. Afterwards the health
check is SERVING, a plain Acquire and Release work, everything stored still reads back
page by page, and (SQLite) the database file passes its integrity checks.

The inputs are reproducible: hypothesis draws from ``TETHER_FUZZ_SEED`` (printed) with no
example database. The states they meet are not quite: calls of a batch still running after
``TICK_S`` of real time (an Acquire or ClaimSaga waiting) are released by moving the fake
clock, so on a slow machine a lease may expire mid-batch. Hypothesis does not shrink
(each attempt would replay a whole batch against a server whose state has moved on;
``minimize`` shrinks the one faulting request instead).
``TETHER_FUZZ_INPUTS`` sets the number of inputs per backend (CI: a few thousand;
``TETHER_FUZZ_INPUTS=100000`` for a long local run). The tally (inputs per method, by family,
by answer and by refusal reason) is printed, kept as the ``fuzz_inputs`` / ``fuzz_report``
properties, and written as JSON to ``TETHER_FUZZ_REPORT`` (default
``.pytest_cache/d/fuzz-report/<backend>.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.support.fuzz import (
    NO_ERROR_INFO,
    Fuzzer,
    FuzzInput,
    Metadata,
    Outcome,
    Tally,
    discover_rpcs,
    minimize,
)
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
from tether_server.app import TetherServer
from tether_server.clock import FakeClock
from tether_server.config import ServerConfig

from .conftest import WAIT_S, _settle, dur, make_test_config

FUZZ_INPUTS = int(os.environ.get("TETHER_FUZZ_INPUTS", "2500"))
FUZZ_SEED = int(os.environ.get("TETHER_FUZZ_SEED", "1111"))
# A stream is read until it has been idle this long (a Watch that stays open is fine)...
STREAM_IDLE_S = 0.05
# ... and cancelled after this long at most.
STREAM_S = 2.0
# While a batch has calls left after this much real time, they are waiting on the fake
# clock (Acquire or ClaimSaga with ``wait``): move it on by CLOCK_STEP_S.
TICK_S = 0.05
CLOCK_STEP_S = 20.0
# Fake time between batches, so leases expire, lock delays end and deadlines pass.
ADVANCES = [0.0] * 8 + [1.0, 11.0, 61.0, 3601.0, 8 * 86_400.0]

FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Refusals a caller may legitimately get from a store check (an invalid harvested
# namespace, or a role that may not list).

pytestmark = pytest.mark.timeout(180 + FUZZ_INPUTS // 40)


# ---- who calls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """The caller the fuzzer acts as: how the server is configured for it and what each
    call carries."""

    principal: str
    metadata: Metadata
    configure: Callable[[ServerConfig], ServerConfig]


WORKER_TOKEN = "fuzz-worker-token-0001"
# The read-back after the run is an admin's: a worker may not list sweep reports, and a
# refused read would check nothing.
READER_TOKEN = "fuzz-reader-token-0001"
READER_METADATA = (("authorization", f"Bearer {READER_TOKEN}"),)


@pytest.fixture
def fuzz_credentials(tmp_path: Path) -> Credentials:
    """A worker of every namespace, authenticated by a bearer token (the issue's caller:
    the one anyone with a token is). To fuzz as someone else, change only this."""
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"token:{WORKER_TOKEN} fuzzer worker *\ntoken:{READER_TOKEN} fuzz-reader admin *\n"
    )
    return Credentials(
        "fuzzer (worker of *)",
        (("authorization", f"Bearer {WORKER_TOKEN}"),),
        lambda config: dataclasses.replace(
            config, auth=dataclasses.replace(config.auth, tokens_file=str(tokens))
        ),
    )


# ---- the server ---------------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Every ERROR the process logs while the fuzzer runs (a server fault, with its
    traceback, even when no RPC answered INTERNAL: a background task, the committer).

    One kind is set apart (``orphaned``), counted and shown but tolerated: asyncio's "Future
    exception was never retrieved" for a ConnectionError of a PostgreSQL connection dropped
    under a cancelled query (asyncpg's own future). The caller has gone, so nothing is
    answered wrong. (SQLite's shielded reads collect their outcome when the caller hangs
    up, so a domain error there is a fault again.)"""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.orphaned: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if (
            record.name == "asyncio"
            and "exception was never retrieved" in record.getMessage()
            and isinstance(error, ConnectionError)
        ):
            self.orphaned.append(f"{type(error).__name__}: {error}")
            return
        self.records.append(self.format(record))


@dataclass
class Target:
    server: TetherServer
    clock: FakeClock
    channel: grpc.aio.Channel
    metadata: Metadata
    errors: ErrorLog


@pytest.fixture
async def target(
    db_url: str, fake_clock: FakeClock, fuzz_credentials: Credentials
) -> AsyncIterator[Target]:
    server = TetherServer(fuzz_credentials.configure(make_test_config(db_url)), fake_clock)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        yield Target(server, fake_clock, channel, fuzz_credentials.metadata, errors)
    finally:
        logging.getLogger().removeHandler(errors)
        try:
            await server.stop(0)
        finally:
            await channel.close(None)
            await _settle()


# ---- the test ---------------------------------------------------------------------------------


async def test_fuzz_every_rpc(
    target: Target,
    fuzz_credentials: Credentials,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    fuzzer = Fuzzer(discover_rpcs(), now_s=lambda: target.clock.now_us() / 1e6)
    assert {rpc.method.containing_service.name for rpc in fuzzer.rpcs} >= {
        "LeaseService",
        "SagaService",
        "OwnerRefService",
        "SweepService",
    }
    await seed_state(target, fuzzer)
    tally = Tally()
    loop = asyncio.get_running_loop()
    # One hypothesis example is a batch of one input per RPC, sent at once.
    batch_size = len(fuzzer.rpcs)
    examples = max(1, -(-FUZZ_INPUTS // batch_size))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @seed(FUZZ_SEED)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        started = time.perf_counter()
        batch = data.draw(fuzzer.batches(), "batch")
        advance = data.draw(st.sampled_from(ADVANCES), "advance_s")
        drawn = time.perf_counter()
        running = asyncio.run_coroutine_threadsafe(send_batch(target, fuzzer, batch), loop)
        outcomes = running.result(timeout=WAIT_S * 6)
        tally.seconds["draw"] += drawn - started
        tally.seconds["send"] += time.perf_counter() - drawn
        seen_errors = len(target.errors.records)
        for outcome in outcomes:
            tally.add(outcome)
        for outcome in outcomes:
            if is_fault(outcome):
                shrinking = minimize_fault(target, fuzzer, outcome)
                smaller = asyncio.run_coroutine_threadsafe(shrinking, loop).result()
                raise AssertionError(fault_report(outcome, smaller, target.errors.records))
        assert seen_errors == 0, "the server logged errors:\n" + "\n".join(target.errors.records)
        loop.call_soon_threadsafe(target.clock.advance, advance)

    backend = target.server.db.backend
    print(f"\nfuzz ({backend}): seed {FUZZ_SEED}, {examples} batches of {batch_size} inputs")
    try:
        await asyncio.to_thread(fuzz)
    finally:
        tally.notes["orphaned_read_errors"] = len(target.errors.orphaned)
        report(tally, backend, fuzz_credentials.principal, request, record_property)

    await check_still_healthy(target, fuzzer)


def is_fault(outcome: Outcome) -> bool:
    """INTERNAL or UNKNOWN from the server, or a unary call that hung until its deadline."""
    if outcome.client_side:
        return False
    rpc = outcome.input.rpc
    # Our own deadline ran out (no ErrorInfo); the server's "gave up waiting" answer to an
    # Acquire with ``wait`` is DEADLINE_EXCEEDED too, with its reason.
    hung = (
        outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
        and not (rpc.server_streaming or rpc.bidi)
        and outcome.reason == NO_ERROR_INFO
    )
    # A refusal too large for the client's trailer limit loses its status: a fault too.
    return outcome.code in FAULTS or hung or outcome.oversized_trailers


async def minimize_fault(target: Target, fuzzer: Fuzzer, outcome: Outcome) -> bytes | None:
    """The smallest request (to the same method, on the same server) that still faults;
    None for a stream of several messages."""
    if len(outcome.input.payloads) != 1:
        return None
    rpc = outcome.input.rpc

    async def still_fails(data: bytes) -> bool:
        again = await fuzzer.send(
            target.channel,
            FuzzInput(rpc, "minimized", (data,)),
            metadata=target.metadata,
            unary_timeout=WAIT_S,
            stream_timeout=STREAM_S,
            stream_idle=STREAM_IDLE_S,
        )
        return is_fault(again)

    return await minimize(rpc, outcome.input.payloads[0], still_fails)


def fault_report(outcome: Outcome, smaller: bytes | None, errors: list[str]) -> str:
    lines = [outcome.describe()]
    if smaller is not None:
        lines.append(f"  minimized (hex): {smaller.hex()}")
        try:
            decoded = outcome.input.rpc.request_class().FromString(smaller)
            lines.append(f"  minimized, decoded: {decoded!r}")
        except Exception:  # the bytes need not decode
            lines.append("  minimized: does not decode")
    lines.append("server log:")
    lines.extend(errors or ["(nothing logged)"])
    return "\n".join(lines)


async def send_batch(target: Target, fuzzer: Fuzzer, batch: list[FuzzInput]) -> list[Outcome]:
    tasks = [
        asyncio.ensure_future(
            fuzzer.send(
                target.channel,
                item,
                metadata=target.metadata,
                unary_timeout=WAIT_S,
                stream_timeout=STREAM_S,
                stream_idle=STREAM_IDLE_S,
            )
        )
        for item in batch
    ]
    pending: set[asyncio.Future[Outcome]] = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=TICK_S)
        if pending:
            target.clock.advance(CLOCK_STEP_S)
    return [task.result() for task in tasks]


def report(
    tally: Tally,
    backend: str,
    principal: str,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    body = {"backend": backend, "seed": FUZZ_SEED, "caller": principal, **tally.as_dict()}
    configured = os.environ.get("TETHER_FUZZ_REPORT")
    if configured:
        path = Path(configured)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
        if cache is not None:
            path = cache.mkdir("fuzz-report") / f"{backend}.json"
        else:  # no cache directory to write in: the system's temporary one
            path = Path(tempfile.gettempdir()) / f"tether-fuzz-report-{backend}.json"
    path.write_text(json.dumps(body, indent=2) + "\n")
    record_property("fuzz_inputs", tally.total)
    record_property("fuzz_report", str(path))
    print(f"fuzz ({backend}, as {principal}, seed {FUZZ_SEED}): {tally.summary()}\nreport: {path}")


# ---- before: something to find ------------------------------------------------------------------


async def seed_state(target: Target, fuzzer: Fuzzer) -> None:
    """Leases, sagas (one claimed, with a step), objects with an owner and a finalizer and
    a sweep report: what plausible fuzz values are drawn from at first. A refusal (a worker
    may not run a sweep) only leaves that part out."""
    channel, md = target.channel, target.metadata
    leases = lease_pb2_grpc.LeaseServiceStub(channel)
    sagas = saga_pb2_grpc.SagaServiceStub(channel)
    objects = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
    sweeps = sweep_pb2_grpc.SweepServiceStub(channel)

    async def call(name: str, method: Any, request: Any) -> Any:
        try:
            response = await method(request, metadata=md, timeout=WAIT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FAULTS:
                raise AssertionError(f"set-up {name}: {exc}") from exc
            return None
        fuzzer.seed(name, request, response)
        return response

    for namespace, key, holder in [
        ("", "jobs/a", "w1"),
        ("", "jobs/b", "w2"),
        ("team-a", "c", "w1"),
    ]:
        acquired = await call(
            "LeaseService/Acquire",
            leases.Acquire,
            lease_pb2.AcquireRequest(
                namespace=namespace, key=key, holder=holder, ttl=dur(600), labels={"team": "a"}
            ),
        )
    if acquired is not None:
        lease = acquired.lease
        await call(
            "LeaseService/Renew",
            leases.Renew,
            lease_pb2.RenewRequest(
                namespace=lease.namespace,
                lease_id=lease.lease_id,
                fencing_token=lease.fencing_token,
            ),
        )
    await call(
        "LeaseService/ListLeases", leases.ListLeases, lease_pb2.ListLeasesRequest(page_size=1)
    )

    saga_input = struct_pb2.Struct()
    saga_input.update({"repo": "x", "n": 1})
    for saga_id in ("s1", "s2"):
        await call(
            "SagaService/CreateSaga",
            sagas.CreateSaga,
            saga_pb2.CreateSagaRequest(saga_id=saga_id, kind="build", input=saga_input),
        )
    claimed = await call(
        "SagaService/ClaimSaga",
        sagas.ClaimSaga,
        saga_pb2.ClaimSagaRequest(
            saga_id="s1", new_lease=saga_pb2.ClaimLeaseSpec(holder="w1", ttl=dur(600))
        ),
    )
    if claimed is not None:
        await call(
            "SagaService/RecordStep",
            sagas.RecordStep,
            saga_pb2.RecordStepRequest(
                saga_id="s1",
                fence=claimed.fence,
                index=0,
                name="checkout",
                status=saga_pb2.STEP_STATUS_SUCCEEDED,
                compensation=saga_pb2.Compensation(name="undo-checkout"),
            ),
        )
    await call("SagaService/ListSagas", sagas.ListSagas, saga_pb2.ListSagasRequest(page_size=1))

    owner = await call(
        "OwnerRefService/CreateObject",
        objects.CreateObject,
        owner_ref_pb2.CreateObjectRequest(
            object=owner_ref_pb2.Object(
                kind="Thing", name="a", finalizers=["example.com/cleanup"], labels={"team": "a"}
            )
        ),
    )
    if owner is not None:
        await call(
            "OwnerRefService/CreateObject",
            objects.CreateObject,
            owner_ref_pb2.CreateObjectRequest(
                object=owner_ref_pb2.Object(
                    kind="Thing",
                    name="b",
                    owner_references=[
                        common_pb2.OwnerReference(
                            kind="Thing", name="a", uid=owner.object.uid, block_owner_deletion=True
                        )
                    ],
                )
            ),
        )
    await call(
        "OwnerRefService/ListObjects",
        objects.ListObjects,
        owner_ref_pb2.ListObjectsRequest(page_size=1),
    )
    await call("SweepService/RunSweep", sweeps.RunSweep, sweep_pb2.RunSweepRequest(dry_run=True))
    await call("SweepService/RunSweep", sweeps.RunSweep, sweep_pb2.RunSweepRequest(dry_run=True))
    await call(
        "SweepService/ListSweepReports",
        sweeps.ListSweepReports,
        sweep_pb2.ListSweepReportsRequest(page_size=1),
    )


# ---- after: still healthy, still consistent -----------------------------------------------------


async def check_still_healthy(target: Target, fuzzer: Fuzzer) -> None:
    channel, md = target.channel, target.metadata
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", *sorted({rpc.method.containing_service.full_name for rpc in fuzzer.rpcs})]:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service

    leases = lease_pb2_grpc.LeaseServiceStub(channel)
    acquired = await leases.Acquire(
        lease_pb2.AcquireRequest(key="fuzz/after", holder="after", ttl=dur(10)),
        metadata=md,
        timeout=WAIT_S,
    )
    lease = acquired.lease
    await leases.Release(
        lease_pb2.ReleaseRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="after"
        ),
        metadata=md,
        timeout=WAIT_S,
    )
    released = await leases.GetLease(
        lease_pb2.GetLeaseRequest(lease_id=lease.lease_id), metadata=md, timeout=WAIT_S
    )
    assert released.lease.state == lease_pb2.LEASE_STATE_RELEASED

    await check_everything_reads_back(target, fuzzer)
    if target.server.db.backend == "sqlite":
        check_sqlite_file(target.server.config.db_url)
    assert target.errors.records == [], "\n".join(target.errors.records)


async def check_everything_reads_back(target: Target, fuzzer: Fuzzer) -> None:
    """Whatever the fuzzer got stored, every list of every namespace it used walks to its
    last page: nothing stored breaks a read. Read as an admin, so no list is refused (only
    a namespace the fuzzer made up and the server rejects is skipped)."""
    channel, md = target.channel, READER_METADATA
    leases = lease_pb2_grpc.LeaseServiceStub(channel)
    sagas = saga_pb2_grpc.SagaServiceStub(channel)
    objects = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
    sweeps = sweep_pb2_grpc.SweepServiceStub(channel)
    namespaces = sorted({"", *(n for n in fuzzer.pool.values("namespace") if isinstance(n, str))})

    async def walk(what: str, method: Any, request_cls: Any, **fields: str) -> None:
        token = ""
        for _ in range(10_000):
            request = request_cls(page_size=500, page_token=token, **fields)
            try:
                page = await method(request, metadata=md, timeout=WAIT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise AssertionError(f"{what}: {exc.code().name} {exc.details()}") from exc
                return
            token = page.next_page_token
            if not token:
                return
        raise AssertionError(f"{what} never reached its last page")

    for ns in namespaces:
        await walk(
            f"ListLeases({ns!r})", leases.ListLeases, lease_pb2.ListLeasesRequest, namespace=ns
        )
        await walk(f"ListSagas({ns!r})", sagas.ListSagas, saga_pb2.ListSagasRequest, namespace=ns)
        await walk(
            f"ListObjects({ns!r})",
            objects.ListObjects,
            owner_ref_pb2.ListObjectsRequest,
            namespace=ns,
        )
    await walk("ListSweepReports", sweeps.ListSweepReports, sweep_pb2.ListSweepReportsRequest)


def check_sqlite_file(db_url: str) -> None:
    path = db_url.split("///", 1)[1].split("?", 1)[0]
    with contextlib.closing(sqlite3.connect(path, timeout=WAIT_S)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
