"""Load benchmark for LeaseService against a real ``tether serve`` process.

Run from the repository root::

    python -m tests.bench.load [--backend sqlite|postgres|both] [--duration SECONDS]

For each backend it starts its own server on a free loopback port (SQLite in a temporary
file; PostgreSQL in a fresh database ``tether_bench_<hex>`` created on the admin URL from
``TETHER_BENCH_POSTGRES_URL`` or ``TETHER_TEST_POSTGRES_URL`` and dropped afterwards), runs
three scenarios and prints one JSON line per scenario on stdout:

- ``acquire``: Acquire calls per second from 64 concurrent callers over distinct keys.
- ``keepalive``: renewals acknowledged per second, 1000 leases over 10 KeepAlive streams,
  each stream sending all its 100 leases per request as fast as acknowledgements return.
- ``expiry``: 500 leases with the minimum ttl (1 s) on the system clock; for every EXPIRED
  event on a Watch, the delay between the lease's ``expires_at`` and the event's arrival.
- ``client_keeper``: one ``TetherClient`` holds 1000 leases (ttl 3 s) through ``hold()``:
  renewals acknowledged per second, streams and requests used, leases lost (should be 0),
  and the smallest ``safe_until - now`` seen (how close any lease came to being declared lost).
- ``client_loss``: a held lease (ttl 2 s), then the server is SIGKILLed: how long before the
  server's deadline the client declared the loss (wall clock; should be at least the margin).

Everything is bounded in time and stays on 127.0.0.1; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
from google.protobuf.duration_pb2 import Duration

from tests.support.server_process import ServerProcess
from tether_client import HeldLease, TetherClient
from tether_client.pb import lease_pb2, lease_pb2_grpc

PG_ENV_VARS = ("TETHER_BENCH_POSTGRES_URL", "TETHER_TEST_POSTGRES_URL")
BENCH_DB_PREFIX = "tether_bench_"

ACQUIRE_CALLERS = 64
KEEPALIVE_LEASES = 1000
KEEPALIVE_STREAMS = 10
EXPIRY_LEASES = 500
EXPIRY_TTL_S = 1
# Concurrency used to set up leases (not measured).
SETUP_CONCURRENCY = 32
# Channels the load is spread over (one HTTP/2 connection each).
CHANNELS = 4
# How long to wait, past the last deadline, for EXPIRED events before giving up.
EXPIRY_WAIT_S = 30.0
RPC_TIMEOUT_S = 30.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ts_seconds(ts: Any) -> float:
    return float(ts.seconds) + ts.nanos / 1e9


# ---- databases ---------------------------------------------------------------------------


def pg_admin_url() -> str | None:
    for name in PG_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _with_database(admin_url: str, dbname: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit(("postgresql", parts.netloc, f"/{dbname}", parts.query, ""))


async def _pg_execute(admin_url: str, sql: str) -> None:
    import asyncpg

    parts = urlsplit(admin_url)
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, ""))
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def database(backend: str) -> AsyncIterator[str]:
    """A fresh database URL for ``backend``, removed afterwards."""
    if backend == "sqlite":
        directory = tempfile.mkdtemp(prefix="tether-bench-")
        try:
            yield f"sqlite:///{Path(directory) / 'bench.db'}"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    admin = pg_admin_url()
    if admin is None:
        raise SystemExit(f"--backend postgres needs one of {', '.join(PG_ENV_VARS)}")
    dbname = BENCH_DB_PREFIX + secrets.token_hex(6)
    await _pg_execute(admin, f'CREATE DATABASE "{dbname}"')
    try:
        yield _with_database(admin, dbname)
    finally:
        await _pg_execute(admin, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@contextlib.contextmanager
def server(db_url: str, log_dir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(db_url, extra_args=["--grace", "2s"], log_dir=log_dir, name="bench")
    process.start()
    try:
        yield process
    finally:
        try:
            process.terminate(timeout=15)
        except RuntimeError as exc:
            log(str(exc))


# ---- clients -------------------------------------------------------------------------


class Clients:
    """A few channels to one server, handed out round-robin."""

    def __init__(self, target: str, count: int = CHANNELS) -> None:
        # A local subchannel pool per channel: one TCP connection each, not one shared.
        self.channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)
        ]
        self.stubs = [lease_pb2_grpc.LeaseServiceStub(c) for c in self.channels]

    def stub(self, index: int) -> lease_pb2_grpc.LeaseServiceStub:
        return self.stubs[index % len(self.stubs)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def acquire_many(
    clients: Clients, keys: list[str], holder: str, ttl_s: int
) -> list[lease_pb2.Lease]:
    """Acquire every key (setup, not measured); returns the leases in key order."""
    results: list[lease_pb2.Lease | None] = [None] * len(keys)
    queue = iter(enumerate(keys))

    async def worker(slot: int) -> None:
        for index, key in queue:
            response = await clients.stub(slot).Acquire(
                lease_pb2.AcquireRequest(key=key, holder=holder, ttl=Duration(seconds=ttl_s)),
                timeout=RPC_TIMEOUT_S,
            )
            results[index] = response.lease

    await asyncio.gather(*(worker(slot) for slot in range(SETUP_CONCURRENCY)))
    return [lease for lease in results if lease is not None]


# ---- scenarios -----------------------------------------------------------------------


async def scenario_acquire(clients: Clients, backend: str, duration: float) -> dict[str, Any]:
    """64 callers, each acquiring fresh keys back to back for ``duration`` seconds."""
    ok = 0
    failed = 0
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    async def caller(index: int) -> None:
        nonlocal ok, failed
        stub = clients.stub(index)
        sequence = 0
        while time.monotonic() < deadline:
            sequence += 1
            request = lease_pb2.AcquireRequest(
                key=f"bench/acquire/{index}/{sequence}",
                holder=f"caller-{index}",
                ttl=Duration(seconds=3600),
            )
            sent = time.monotonic()
            try:
                await stub.Acquire(request, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                failed += 1
                continue
            latencies.append(time.monotonic() - sent)
            ok += 1

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(ACQUIRE_CALLERS)))
    elapsed = time.monotonic() - started
    return {
        "scenario": "acquire",
        "backend": backend,
        "concurrency": ACQUIRE_CALLERS,
        "duration_s": round(elapsed, 2),
        "acquired": ok,
        "errors": failed,
        "acquires_per_s": round(ok / elapsed, 1),
        "latency_p50_ms": round(percentile(latencies, 0.50) * 1000, 2) if latencies else None,
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
    }


async def scenario_keepalive(clients: Clients, backend: str, duration: float) -> dict[str, Any]:
    """1000 leases over 10 KeepAlive streams, 100 renewals per request, back to back."""
    keys = [f"bench/keepalive/{i:04d}" for i in range(KEEPALIVE_LEASES)]
    leases = await acquire_many(clients, keys, "keepalive-worker", 600)
    per_stream = KEEPALIVE_LEASES // KEEPALIVE_STREAMS
    acknowledged = 0
    refused = 0
    batches = 0
    round_trips: list[float] = []

    async def stream(index: int) -> None:
        nonlocal acknowledged, refused, batches
        mine = leases[index * per_stream : (index + 1) * per_stream]
        renewals = [
            lease_pb2.KeepAliveRenewal(lease_id=x.lease_id, fencing_token=x.fencing_token)
            for x in mine
        ]
        call = clients.stub(index).KeepAlive()
        sequence = 0
        try:
            while time.monotonic() < deadline:
                sequence += 1
                sent = time.monotonic()
                await call.write(lease_pb2.KeepAliveRequest(sequence=sequence, renewals=renewals))
                response = await asyncio.wait_for(call.read(), RPC_TIMEOUT_S)
                if response is grpc.aio.EOF:
                    raise RuntimeError(f"KeepAlive stream {index} ended: {await call.code()}")
                round_trips.append(time.monotonic() - sent)
                assert response.sequence == sequence
                batches += 1
                for result in response.results:
                    if result.HasField("error"):
                        refused += 1
                    else:
                        acknowledged += 1
            await call.done_writing()
        finally:
            call.cancel()

    started = time.monotonic()
    deadline = started + duration
    await asyncio.gather(*(stream(i) for i in range(KEEPALIVE_STREAMS)))
    elapsed = time.monotonic() - started
    return {
        "scenario": "keepalive",
        "backend": backend,
        "leases": len(leases),
        "streams": KEEPALIVE_STREAMS,
        "renewals_per_request": per_stream,
        "duration_s": round(elapsed, 2),
        "requests": batches,
        "renewals_acknowledged": acknowledged,
        "renewals_refused": refused,
        "renewals_per_s": round(acknowledged / elapsed, 1),
        "request_p50_ms": round(percentile(round_trips, 0.50) * 1000, 2) if round_trips else None,
        "request_p99_ms": round(percentile(round_trips, 0.99) * 1000, 2) if round_trips else None,
    }


async def scenario_expiry(clients: Clients, backend: str) -> dict[str, Any]:
    """500 leases with the minimum ttl; delay from expires_at to the EXPIRED event arriving."""
    prefix = "bench/expiry/"
    watch = clients.stub(0).Watch(lease_pb2.WatchRequest(key_prefix=prefix, start_revision=0))
    first = await asyncio.wait_for(watch.read(), RPC_TIMEOUT_S)
    if first is grpc.aio.EOF or first.events:
        raise RuntimeError("the Watch did not confirm")

    arrivals: dict[str, float] = {}
    all_seen = asyncio.Event()

    async def read_events() -> None:
        while True:
            response = await watch.read()
            if response is grpc.aio.EOF:
                return
            now = time.time()
            for event in response.events:
                if event.type == lease_pb2.LEASE_EVENT_TYPE_EXPIRED:
                    arrivals.setdefault(event.lease.lease_id, now)
            if len(arrivals) >= EXPIRY_LEASES:
                all_seen.set()

    reader = asyncio.create_task(read_events())
    try:
        keys = [f"{prefix}{i:04d}" for i in range(EXPIRY_LEASES)]
        setup_started = time.monotonic()
        leases = await acquire_many(clients, keys, "expiry-worker", EXPIRY_TTL_S)
        setup_s = time.monotonic() - setup_started
        deadlines = {x.lease_id: ts_seconds(x.expires_at) for x in leases}
        wait_until = max(deadlines.values()) + EXPIRY_WAIT_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), max(0.0, wait_until - time.time()))
    finally:
        watch.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader

    delays_ms = [(arrivals[i] - deadlines[i]) * 1000 for i in deadlines if i in arrivals]
    return {
        "scenario": "expiry",
        "backend": backend,
        "leases": len(leases),
        "ttl_s": EXPIRY_TTL_S,
        "setup_s": round(setup_s, 2),
        "expired_events": len(delays_ms),
        "missing_events": len(deadlines) - len(delays_ms),
        "delay_p50_ms": round(percentile(delays_ms, 0.50), 1) if delays_ms else None,
        "delay_p99_ms": round(percentile(delays_ms, 0.99), 1) if delays_ms else None,
        "delay_max_ms": round(max(delays_ms), 1) if delays_ms else None,
        "delay_min_ms": round(min(delays_ms), 1) if delays_ms else None,
    }


async def scenario_client_keeper(target: str, backend: str, duration: float) -> dict[str, Any]:
    """1000 leases held by one client's keeper for ``duration`` seconds."""
    ttl = 3.0
    async with TetherClient(target) as client, contextlib.AsyncExitStack() as stack:
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def hold(i: int) -> HeldLease:
            async with gate:
                return await stack.enter_async_context(
                    client.hold(f"bench/keeper/{i:05d}", ttl=ttl)
                )

        leases = await asyncio.gather(*(hold(i) for i in range(KEEPALIVE_LEASES)))
        stats = client.keeper.stats
        acked_before, requests_before = stats.renewals_acked, stats.requests_sent
        min_slack = ttl
        started = time.monotonic()
        while time.monotonic() - started < duration:
            now = client.clock.monotonic()
            min_slack = min(min_slack, min(lease.safe_until - now for lease in leases))
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        return {
            "scenario": "client_keeper",
            "backend": backend,
            "leases": len(leases),
            "ttl_s": ttl,
            "renewals_per_s": round((stats.renewals_acked - acked_before) / elapsed, 1),
            "requests_per_s": round((stats.requests_sent - requests_before) / elapsed, 1),
            "streams_opened": stats.streams_opened,
            "leases_lost": stats.leases_lost,
            "min_safe_slack_ms": round(min_slack * 1000, 1),
        }


async def scenario_client_loss(process: ServerProcess, backend: str) -> dict[str, Any]:
    """SIGKILL the server under a held lease; the client must let go before the deadline."""
    client = TetherClient(process.target)
    async with client, client.hold("bench/loss", ttl=2.0) as lease:
        await asyncio.sleep(1.0)  # a renewal or two go through first
        process.kill()
        killed = time.time()
        await asyncio.wait_for(lease.wait_lost(), 10)
        lost = time.time()
        deadline = lease.expires_at.timestamp()
    return {
        "scenario": "client_loss",
        "backend": backend,
        "ttl_s": 2.0,
        "lost_after_kill_ms": round((lost - killed) * 1000, 1),
        "lead_before_server_deadline_ms": round((deadline - lost) * 1000, 1),
    }


# ---- driver --------------------------------------------------------------------------


async def run_backend(backend: str, duration: float) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="tether-bench-logs-"))
    try:
        async with database(backend) as url:
            log(f"{backend}: starting tether serve")
            with server(url, log_dir) as process:
                clients = Clients(process.target)
                try:
                    log(f"{backend}: acquire ({duration:g} s, {ACQUIRE_CALLERS} callers)")
                    emit(await scenario_acquire(clients, backend, duration))
                    log(f"{backend}: keepalive ({duration:g} s, {KEEPALIVE_LEASES} leases)")
                    emit(await scenario_keepalive(clients, backend, duration))
                    log(f"{backend}: expiry ({EXPIRY_LEASES} leases, ttl {EXPIRY_TTL_S} s)")
                    emit(await scenario_expiry(clients, backend))
                    log(f"{backend}: client keeper ({duration:g} s, {KEEPALIVE_LEASES} leases)")
                    emit(await scenario_client_keeper(process.target, backend, duration))
                    log(f"{backend}: client loss (server SIGKILLed under a held lease)")
                    emit(await scenario_client_loss(process, backend))
                except BaseException:
                    log(f"{backend}: server log tail:\n{process.log_tail(30)}")
                    raise
                finally:
                    await clients.close()
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.load", description="tether LeaseService load benchmark"
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        default="both" if pg_admin_url() else "sqlite",
        help="default: both when a PostgreSQL URL is set, else sqlite",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds per throughput scenario (default 5)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 300:
        parser.error("--duration must be in (0, 300]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    # A hard bound on the whole run, whatever happens.
    budget = len(backends) * (3 * args.duration + EXPIRY_WAIT_S + 180)

    async def run() -> None:
        async with asyncio.timeout(budget):
            for backend in backends:
                await run_backend(backend, args.duration)

    try:
        asyncio.run(run())
    except TimeoutError:
        log(f"gave up after {budget:.0f} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
