"""Retention purges under load: the sweep deleting terminal sagas (and, optionally, ended
leases) while 1 000 leases keep renewing, side by side with etcd and a store-less server.

Run from the repository root (``make bench`` does, with ``BENCH_ARGS``)::

    python -m tests.bench.purge [--quick] [--rows N] [--kinds sagas,leases]
                                [--targets etcd,noop,tether-sqlite,tether-pg]
                                [--baseline S] [--etcd-keys N] [--batch-size N]
                                [--pause-ms MS] [--profile sqlite|postgres|both|none]
                                [--out results.jsonl]

The issue's aim: 1 000 000 terminal rows purged while 1 000 leases keep renewing, with the
renewals' p99 under 100 ms and no renewal failing.

Seed (not measured), once per backend: ``--rows`` (default 1 000 000; ``--quick`` 20 000)
terminal sagas, COMPLETED 30 days ago (retention keeps 7 days), each with its ended claim's
fence and one SUCCEEDED step carrying a compensation spec, built as ``Saga`` / ``Step``
values and written in the server's own column format (``store/sagas/rows.saga_values``,
``_step_values``) by bulk inserts straight into the tables (``executemany`` on SQLite,
``COPY`` on PostgreSQL; saga ids are random UUIDs, as clients choose them). With
``--kinds ...,leases`` also ``--rows`` RELEASED leases that ended 2 days ago (retention
keeps 24 h), each on its own key with a request-id record (``leases/rows.lease_values``).
The revision counter is moved past every seeded revision, as after a long life. PostgreSQL
then gets ``VACUUM ANALYZE`` (what autovacuum would have done to rows that old); SQLite is
checkpointed into one file. Every run gets its own copy of the seed
(``tests.bench.cascade.Seeds``: a file copy; ``CREATE DATABASE ... TEMPLATE`` followed by a
``CHECKPOINT`` so the copy's WAL is not written back during the run).

One run per backend: an in-process ``TetherServer`` on a free 127.0.0.1 port with the
default configuration (its sweep limits as the server sets them per backend: on SQLite
purge batches of up to ``batch_size`` rows sized to a time target, on PostgreSQL full
batches; ``--batch-size`` / ``--pause-ms`` override the limit and the pause), except that
the periodic sweep is put off (it would purge on its own 30 s after start). Before anything
is timed, ``GetSaga`` of a seeded saga must read it back COMPLETED and a dry-run
``RunSweep`` must count every seeded row. A spawned load process then acquires 1 000
leases (ttl 30 s) through the real gRPC API and renews each every 3 s, spread evenly (333
renewals/s), over 10 ``KeepAlive`` streams, one lease per message (etcd's only form), each
message timed from its send to its answer. After a warm-up
of one renewal period, the baseline window (``--baseline`` s, default 20; quick 5) has no
purge; then the purge window is one ``RunSweep`` RPC (parts PURGE_SAGAS [+ PURGE_LEASES],
every namespace, repeated while it reports a backlog) from its call to its answer. A
renewal belongs to the window it was sent in; one answered with an error, or never
answered (the load stops 1 s after the purge, then drains for 10 s), is a failure.

Figures per window: renewals sent, p50/p99/max round trip, failures, answers over 100 ms;
for the purge: seconds, rows/s, purge batches (count, rows per batch, median per tenth of
the purge: does a batch slow down as dead rows pile up?), store batches and their time
(each purge batch is one unit
in the group committer, so a renewal arriving meanwhile waits for it: the longest store
transaction bounds the renewal's extra latency), and the CPU of the server, its PostgreSQL
backends and the load process. Every SQL statement of the purge window is timed (wrapping
the store's ``Tx`` as ``tests.bench.cascade`` does; microseconds per statement of
overhead). After the purge (not timed): no seeded row left, every renewing lease still
ACTIVE, the report has no failures and counts every row.

References, in the same run and with the same load process:

- ``etcd``: single-node etcd 3.4 (``make bench-setup``), pre-filled with ``--etcd-keys``
  keys (default: ``--rows``; 300-byte values, as the cascade's), renewal load through its
  ``LeaseKeepAlive``. Its purge is etcd's retention: ``DeleteRange`` of 1 000 keys (or
  ``--batch-size``) at a time with the same pause, then one physical ``Compact`` (which is
  what reclaims them in etcd).
- ``noop``: ``tests.bench.noop_server`` (tether's LeaseService from memory), the same
  renewal load for one baseline window: the round trip of a Python gRPC server with no
  store. Its figures stand in both windows: it has nothing to purge.

The table gives the figures and the ratios tether/etcd and tether/noop.

Profile (``--profile``, default ``sqlite``; ``none`` skips it): the measured run's statement
timings, the plan of the statements that pick each batch (``EXPLAIN``), and one extra purge
(no renewal load) on a fresh copy under cProfile (the event-loop thread, and on SQLite the
store's writer thread where the purge's statements run), written to
``.bench/purge-profile-<backend>.txt`` (raw: ``.prof``). The profiled run's time is not a
figure.

Output: one JSON line per run on stdout (also appended to ``--out``, with the commit
measured and whether ``server/`` had uncommitted changes), progress on stderr, then the
table, the aim, checks and the profile summary. A window during which other processes used
more than 0.25 cores is flagged NOISY, as the other benchmarks do. Every wait is bounded
(``--timeout`` per purge), and servers, load processes, files and databases are removed
even when a run fails or the benchmark is interrupted. Options of ``tests.bench.load`` and
``tests.bench.cascade`` that share ``BENCH_ARGS`` are ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import multiprocessing as mp
import os
import pstats
import queue as queue_mod
import random
import sqlite3
import sys
import time
import traceback
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from tests.bench import etcd as etcd_mod
from tests.bench.cascade import (
    PROFILE_DIR,
    Profiler,
    Seeds,
    StatementTimer,
    _add_aux,
    _aux_cpu,
    _etcd_fill,
    _etcd_key,
    _pg_admin,
    _wait_leader,
    source_info,
    top_functions,
)
from tests.bench.procstat import CpuSnapshot, cpu_report
from tests.bench.report import emit_record, fmt, interrupt_on_sigterm, ms_summary, ratio
from tests.bench.targets import etcd_target, noop_target, pg_admin_url

Record = dict[str, Any]

NAMESPACE = "purge"
SAGA_KIND = "bench.purge.v1.Order"
KINDS = ("sagas", "leases")
TETHER_TARGETS = ("tether-sqlite", "tether-pg")
ALL_TARGETS = ("etcd", "noop", *TETHER_TARGETS)
BACKEND_OF = {"tether-sqlite": "sqlite", "tether-pg": "postgres"}
FULL_ROWS = 1_000_000
QUICK_ROWS = 20_000
DAY_US = 86_400 * 1_000_000
# Seeded rows end this long ago, spread 1 ms apart (older than either retention).
SAGAS_ENDED_AGO_US = 30 * DAY_US
LEASES_ENDED_AGO_US = 2 * DAY_US
SEED_CHUNK = 20_000
# The renewal load (the issue's): 1 000 leases, each renewed every 3 s, spread evenly.
LEASES = 1000
STREAMS = 10
TTL_S = 30
RENEW_EVERY_S = 3.0
DRAIN_S = 10.0
TAIL_S = 1.0
# The sweep's own pacing, mirrored by etcd's purge.
ETCD_BATCH = 1000
ETCD_PAUSE_S = 0.01
# The aim (issue): at 1 000 000 rows, renewal p99 under 100 ms and no failure.
AIM_ROWS = 1_000_000
AIM_P99_MS = 100.0
SLOW_MS = 100.0
# The periodic sweep would purge by itself 30 s after start; put it off for the run.
NO_PERIODIC_SWEEP_S = 7 * 86_400.0
# Repeated RunSweep calls while a backlog is reported (rows > batch_size * max_batches).
MAX_SWEEPS = 20
NOISE_CORES = 0.25
NOISE_MIN_WINDOW_S = 2.0
PROFILE_TOP = 25
PRINT_TOP = 10


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[purge {stamp}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Spec:
    """What the seed holds: ``rows`` of each kind."""

    rows: int
    kinds: tuple[str, ...]

    @property
    def scenario(self) -> str:  # the seed's name in cascade.Seeds
        return f"{'-'.join(self.kinds)}-{self.rows}"

    @property
    def total(self) -> int:
        return self.rows * len(self.kinds)


# --- seeding (not measured) -------------------------------------------------------------


def _saga_rows(start: int, count: int, now_us: int, rng: random.Random) -> Iterator[Any]:
    """(saga values, step values) of seeded sagas ``start .. start+count``, in the server's
    column format."""
    from tether_server.domain.lease import ANONYMOUS
    from tether_server.domain.saga import (
        Claim,
        CompensationSpec,
        Purpose,
        Saga,
        SagaState,
        Step,
        StepStatus,
    )
    from tether_server.store.sagas import rows

    base = now_us - SAGAS_ENDED_AGO_US
    for i in range(start, start + count):
        ended = base + i * 1000
        saga = Saga(
            namespace=NAMESPACE,
            saga_id=str(uuid.UUID(bytes=rng.randbytes(16), version=4)),
            kind=SAGA_KIND,
            state=SagaState.COMPLETED,
            created_at_us=ended - 60_000_000,
            updated_at_us=ended,
            labels={"app": "purge-bench"},
            input={"order": i, "sku": "sku-12345", "quantity": 1},
            attempt=1,
            claim=Claim(
                lease_id=rng.randbytes(16).hex(),
                fencing_token=1,
                purpose=Purpose.EXECUTE,
                holder=f"worker-{i % 16}",
                principal=ANONYMOUS,
                owns_lease=True,
                active=False,
            ),
            output={"charged": True},
            ended_at_us=ended,
            create_revision=2 * i + 1,
            mod_revision=2 * i + 2,
            fingerprint=rng.randbytes(32).hex(),
        )
        step = Step(
            index=0,
            name="charge",
            status=StepStatus.SUCCEEDED,
            attempt=1,
            output={"charge_id": f"ch_{i}"},
            compensation=CompensationSpec(name="refund", payload={"order": i}),
            started_at_us=ended - 50_000_000,
            finished_at_us=ended - 1_000_000,
        )
        yield rows.saga_values(saga), (NAMESPACE, saga.saga_id, *rows._step_values(step))


def _lease_rows(start: int, count: int, now_us: int, rng: random.Random) -> Iterator[Any]:
    """(lease values, lease_keys values, lease_requests values) of seeded ended leases."""
    from tether_server.domain.lease import ANONYMOUS, Lease, LeaseState
    from tether_server.store.leases import rows

    base = now_us - LEASES_ENDED_AGO_US - count * 1000
    for i in range(start, start + count):
        ended = base + i * 1000
        lease = Lease(
            lease_id=rng.randbytes(16).hex(),
            namespace=NAMESPACE,
            key=f"jobs/{i:08d}",
            holder=f"worker-{i % 64}",
            principal=ANONYMOUS,
            ttl_us=30_000_000,
            fencing_token=1,
            state=LeaseState.RELEASED,
            acquired_at_us=ended - 60_000_000,
            renewed_at_us=ended - 5_000_000,
            expires_at_us=ended + 25_000_000,
            ended_at_us=ended,
            labels={"app": "purge-bench"},
            request_id=f"req-{rng.randbytes(8).hex()}",
            create_revision=2 * i + 1,
            mod_revision=2 * i + 2,
        )
        yield (
            rows.lease_values(lease),
            (NAMESPACE, lease.key, 1, ended, lease.lease_id),
            (
                NAMESPACE,
                lease.request_id,
                lease.lease_id,
                rng.randbytes(32).hex(),
                ended - 60_000_000,
            ),
        )


def _tables(kind: str) -> list[tuple[str, list[str]]]:
    from tether_server.store.leases import rows as lease_rows
    from tether_server.store.sagas import rows as saga_rows

    def cols(text: str) -> list[str]:
        return [c.strip() for c in text.split(",")]

    if kind == "sagas":
        step = cols("namespace, saga_id, step_index, name, status, attempt, output, error")
        step += cols("compensation, started_at_us, finished_at_us")
        return [("sagas", cols(saga_rows.COLUMNS)), ("saga_steps", step)]
    return [
        ("leases", cols(lease_rows.COLUMNS)),
        (
            "lease_keys",
            cols("namespace, key, last_fencing_token, available_at_us, current_lease_id"),
        ),
        ("lease_requests", cols("namespace, request_id, lease_id, fingerprint, created_at_us")),
    ]


def _chunks(kind: str, rows: int, now_us: int) -> Iterator[list[list[Any]]]:
    """Per chunk, one list of rows per table of ``_tables(kind)``, transposed."""
    rng = random.Random(f"{kind}-{rows}")
    make = _saga_rows if kind == "sagas" else _lease_rows
    for start in range(0, rows, SEED_CHUNK):
        count = min(SEED_CHUNK, rows - start)
        yield [list(column) for column in zip(*make(start, count, now_us, rng), strict=True)]


async def populate(url: str, spec: Spec) -> float:
    from tether_server.clock import SystemClock
    from tether_server.store.database import Database

    started = time.perf_counter()
    db = Database(url, SystemClock())
    try:
        await db.migrate()
    finally:
        await db.dispose()
    now_us = time.time_ns() // 1000
    revision = 2 * spec.rows + 2
    if url.startswith("sqlite"):
        path = urlsplit(url).path
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA synchronous=OFF")
            for kind in spec.kinds:
                tables = _tables(kind)
                for chunk in _chunks(kind, spec.rows, now_us):
                    with conn:
                        for (table, columns), values in zip(tables, chunk, strict=True):
                            marks = ", ".join("?" * len(columns))
                            conn.executemany(
                                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                                values,
                            )
            with conn:
                conn.execute("UPDATE revisions SET current = ?1, compacted = ?1", (revision,))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return time.perf_counter() - started
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        for kind in spec.kinds:
            tables = _tables(kind)
            for chunk in _chunks(kind, spec.rows, now_us):
                async with conn.transaction():
                    for (table, columns), values in zip(tables, chunk, strict=True):
                        await conn.copy_records_to_table(table, records=values, columns=columns)
        await conn.execute(
            "UPDATE revisions SET current = $1, compacted = $1 WHERE id = 1", revision
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


class PurgeSeeds(Seeds):
    """``cascade.Seeds`` with this benchmark's seed, and a CHECKPOINT after each copy."""

    def populate(self, url: str, backend: str, graph: Any) -> float:
        spec: Spec = graph
        log(f"  seeding {spec.total} rows ({', '.join(spec.kinds)}) on {backend}")
        populate_s = asyncio.run(populate(url, spec))
        log(f"  seeded in {populate_s:.1f} s")
        return populate_s

    @contextlib.contextmanager
    def fresh(self, backend: str, graph: Any) -> Iterator[tuple[str, float, float]]:
        with super().fresh(backend, graph) as (url, populate_s, copy_s):
            if backend == "postgres" and self.admin_url is not None:
                started = time.perf_counter()
                _pg_admin(self.admin_url, "CHECKPOINT")
                copy_s += time.perf_counter() - started
            yield url, populate_s, copy_s


# --- the renewal load (a spawned process) -----------------------------------------------


def _renew_main(kind: str, target: str, cfg: Record, stop: Any, results: Any) -> None:
    try:
        report = asyncio.run(_renewals(kind, target, cfg, stop, results))
    except BaseException as exc:
        report = {"fatal": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    results.put(report)


async def _renewals(kind: str, target: str, cfg: Record, stop: Any, results: Any) -> Record:
    """Acquire the leases, say ready, renew each every ``interval`` s until ``stop``; every
    renewal's wall-clock send time, round trip and outcome (1 ok, 0 refused, -1 no answer)."""
    from tests.bench.adapters import make_api
    from tests.bench.scenarios import bounded_map, err_name

    perf = time.perf_counter
    api = make_api(kind, [target], 1, 10.0)
    errors: Counter[str] = Counter()
    sent_at = array("d")
    sent_perf = array("d")
    lat = array("d")
    outcome = array("b")
    stopping = asyncio.Event()
    lag_max = 0.0
    try:
        await api.ready(30)
        started = perf()
        prefix = f"bench/purge/{os.getpid()}/"
        granted, grant_errors = await bounded_map(
            lambda _: api.grant(cfg["ttl"], prefix), cfg["leases"], 64, perf() + 120
        )
        ids = [g.lease_id for g in granted if g is not None]
        if grant_errors or len(ids) != cfg["leases"]:
            raise RuntimeError(f"granted {len(ids)}/{cfg['leases']}: {dict(grant_errors)}")
        setup_s = perf() - started
        streams = cfg["streams"]
        rate = len(ids) / cfg["interval"]
        t0 = perf() + 0.05

        async def stream(index: int, group: list[Any]) -> None:
            nonlocal lag_max
            call = api.keepalive()
            inflight: deque[int] = deque()
            drained = asyncio.Event()

            async def receiver() -> None:
                while True:
                    outcomes = await call.recv()
                    arrived = perf()
                    if outcomes is None:
                        return
                    for _, ok in outcomes:
                        if not inflight:
                            errors["UNEXPECTED_ANSWER"] += 1
                            break
                        i = inflight.popleft()
                        lat[i] = arrived - sent_perf[i]
                        outcome[i] = 1 if ok else 0
                    if stopping.is_set() and not inflight:
                        drained.set()

            reading = asyncio.create_task(receiver())
            try:
                k = 0
                while not stopping.is_set() and not reading.done():
                    due = t0 + (k * streams + index) / rate
                    delay = due - perf()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stopping.wait(), delay)
                        if stopping.is_set():
                            break
                    lag_max = max(lag_max, perf() - due)
                    i = len(outcome)
                    sent_at.append(time.time())
                    sent_perf.append(perf())
                    lat.append(math.nan)
                    outcome.append(-1)
                    inflight.append(i)
                    await call.send([group[k % len(group)]])
                    k += 1
                if reading.done():
                    exc = reading.exception()
                    errors[f"{err_name(exc)} (stream ended)"] += 1
                    return
                if inflight:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(drained.wait(), cfg["drain"])
                with contextlib.suppress(Exception):
                    await call.done_writing()
            except Exception as exc:
                errors[err_name(exc)] += 1
            finally:
                reading.cancel()
                call.cancel()

        tasks = [
            asyncio.create_task(stream(s, ids[s::streams])) for s in range(min(streams, len(ids)))
        ]
        results.put({"ready": True, "setup_s": round(setup_s, 3), "pid": os.getpid()})
        await asyncio.to_thread(stop.wait, cfg["hard_limit_s"])
        stopping.set()
        await asyncio.wait(tasks, timeout=cfg["drain"] + 5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(api.close(), 5)
    return {
        "sent_at": sent_at.tobytes(),
        "lat": lat.tobytes(),
        "outcome": outcome.tobytes(),
        "errors": dict(errors),
        "setup_s": round(setup_s, 3),
        "schedule_lag_max_ms": round(lag_max * 1000, 2),
    }


@dataclass
class Renewals:
    sent_at: array[float]
    lat: array[float]
    outcome: array[int]
    errors: dict[str, int]
    setup_s: float
    schedule_lag_max_ms: float

    def window(self, start: float, end: float) -> Record:
        """Renewals sent in [start, end): round trips of the answered ones, failures."""
        answered: list[float] = []
        refused = unanswered = 0
        for sent, seconds, result in zip(self.sent_at, self.lat, self.outcome, strict=True):
            if not start <= sent < end:
                continue
            if result == 1:
                answered.append(seconds)
            elif result == 0:
                refused += 1
            else:
                unanswered += 1
        return {
            "window_s": round(end - start, 3),
            "sent": len(answered) + refused + unanswered,
            "answered": len(answered),
            "per_s": round(len(answered) / (end - start), 1) if end > start else None,
            "refused": refused,
            "unanswered": unanswered,
            "failures": refused + unanswered,
            "over_100ms": sum(1 for x in answered if x * 1000 > SLOW_MS),
            "round_trip_ms": ms_summary(answered),
        }


class RenewalLoad:
    """The renewal load process, driven from an event loop without blocking it."""

    def __init__(self, kind: str, target: str, hard_limit_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.results = ctx.Queue()
        cfg = {
            "leases": LEASES,
            "streams": STREAMS,
            "ttl": TTL_S,
            "interval": RENEW_EVERY_S,
            "drain": DRAIN_S,
            "hard_limit_s": hard_limit_s,
        }
        self.proc = ctx.Process(
            target=_renew_main, args=(kind, target, cfg, self.stop, self.results), daemon=True
        )
        self.pid: int | None = None
        self.setup_s: float | None = None

    async def _get(self, timeout: float) -> Record:
        try:
            got: Record = await asyncio.to_thread(self.results.get, True, timeout)
        except queue_mod.Empty:
            raise RuntimeError(f"the renewal load said nothing within {timeout:.0f} s") from None
        if "fatal" in got:
            raise RuntimeError(f"renewal load: {got['fatal']}\n{got.get('trace', '')}")
        return got

    async def start(self, timeout: float = 180.0) -> None:
        await asyncio.to_thread(self.proc.start)
        self.pid = self.proc.pid
        ready = await self._get(timeout)
        self.setup_s = ready.get("setup_s")

    async def finish(self) -> Renewals:
        self.stop.set()
        got = await self._get(DRAIN_S + 60)
        await asyncio.to_thread(self.proc.join, 10)
        lat, sent, outcome = array("d"), array("d"), array("b")
        sent.frombytes(got["sent_at"])
        lat.frombytes(got["lat"])
        outcome.frombytes(got["outcome"])
        return Renewals(
            sent, lat, outcome, got["errors"], got["setup_s"], got["schedule_lag_max_ms"]
        )

    def close(self) -> None:
        self.stop.set()
        self.proc.join(timeout=15)
        if self.proc.is_alive():
            self.proc.terminate()  # our own child
            self.proc.join(timeout=10)


def _cpu(before: CpuSnapshot, after: CpuSnapshot, in_process_server: bool) -> Record:
    cpu = cpu_report(before, after)
    if in_process_server:
        # The server runs in this process: it counts as the "coordinator" here.
        cpu["server_cores"] = cpu.pop("coordinator_cores", 0.0)
    return cpu


# --- one tether run ---------------------------------------------------------------------


@dataclass
class Batches:
    """Store transactions (group-committed batches) and the purge's own batch calls."""

    store: list[tuple[float, int, float]] = field(default_factory=list)  # (end, units, s)
    purge: list[float] = field(default_factory=list)  # seconds per purge call
    purge_rows: list[int] = field(default_factory=list)

    def store_in(self, start: float, end: float) -> Record:
        seconds = [s for at, _n, s in self.store if start <= at < end]
        return {
            "transactions": len(seconds),
            "busy_s": round(sum(seconds), 3),
            "ms": ms_summary(seconds),
        }


_PARTS_PB = {"sagas": 6, "leases": 5}  # SWEEP_PART_PURGE_SAGAS, SWEEP_PART_PURGE_LEASES


async def _explain(server: Any, kinds: Sequence[str]) -> list[str]:
    """The plans of the statements that pick each purge batch, as the server runs them."""
    from tether_server.store.leases import purge as lease_purge
    from tether_server.store.sagas import units as saga_units
    from tether_server.store.sql import Sql

    picks: list[tuple[str, Sql, int]] = []
    now_us = server.db.clock.now_us()
    if "sagas" in kinds:
        cutoff = now_us - round(server.config.sweep.retention.terminal_sagas_s * 1e6)
        picks.append(("sagas", saga_units._PICK_ENDED, cutoff))
    if "leases" in kinds:
        cutoff = now_us - round(server.config.sweep.retention.ended_leases_s * 1e6)
        picks.append(("leases", lease_purge._PICK, cutoff))
    limit = server.config.sweep.limits.batch_size

    async def unit(tx: Any) -> list[str]:
        lines = []
        for kind, statement, cutoff in picks:
            text = statement.pg if tx.is_pg else statement.sqlite
            lines.append(f"-- {kind}: {text}")
            rows = await tx.fetch(
                Sql(pg=f"EXPLAIN {text}", sqlite=f"EXPLAIN QUERY PLAN {text}", writes=False),
                "",
                cutoff,
                limit,
            )
            for row in rows:
                values = list(dict(row).values()) if hasattr(row, "keys") else list(row)
                lines.append("   " + " | ".join(str(v) for v in values))
        return lines

    explained: list[str] = await server.db.read(unit)
    return explained


async def tether_purge(
    url: str,
    spec: Spec,
    args: argparse.Namespace,
    *,
    store: tuple[str, str] | None,
    timer: StatementTimer | None = None,
    profiler: Profiler | None = None,
    load: bool = True,
) -> Record:
    """One run: seeded copy at ``url``; with ``load`` the renewal load and both windows,
    else only the purge (the profiled run)."""
    import grpc

    from tether_client.pb import saga_pb2, saga_pb2_grpc, sweep_pb2, sweep_pb2_grpc
    from tether_server.app import TetherServer
    from tether_server.config import ServerConfig
    from tether_server.domain.sweep import SweepConfig

    sweep = SweepConfig(start_delay_s=NO_PERIODIC_SWEEP_S)
    if args.batch_size is not None or args.pause_ms is not None:
        limits = sweep.limits
        sweep = replace(
            sweep,
            limits=replace(
                limits,
                batch_size=args.batch_size or limits.batch_size,
                pause_s=limits.pause_s if args.pause_ms is None else args.pause_ms / 1000,
            ),
        )
    config = ServerConfig(listen="127.0.0.1:0", db_url=url, grace_s=1.0, sweep=sweep)
    server = TetherServer(config)
    batches = Batches()
    store_batch = server.db.on_batch

    def on_batch(size: int, seconds: float) -> None:
        batches.store.append((time.time(), size, seconds))
        if store_batch is not None:
            store_batch(size, seconds)

    server.db.on_batch = on_batch
    for kind in spec.kinds:
        name = f"purge_{kind}"
        original = getattr(server.sweeps, name)

        async def timed(*a: Any, _original: Any = original) -> Any:
            started = time.perf_counter()
            result = await _original(*a)
            batches.purge.append(time.perf_counter() - started)
            batches.purge_rows.append(result if isinstance(result, int) else result.leases)
            return result

        setattr(server.sweeps, name, timed)
    # The limits the sweeper runs with (the server adjusts them per backend).
    used = server.sweeper._limits
    record: Record = {
        "limits": {
            name: getattr(used, name, None)
            for name in ("batch_size", "batch_target_s", "min_batch_size", "pause_s")
        }
    }
    target_s = record["limits"]["batch_target_s"]
    record["limits"]["batch_target_ms"] = None if target_s is None else round(target_s * 1000, 1)
    renewal: RenewalLoad | None = None
    await server.start()
    try:
        await _wait_leader(server, 30)
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            sweeps = sweep_pb2_grpc.SweepServiceStub(channel)
            parts = [_PARTS_PB[k] for k in spec.kinds]
            problems: list[str] = []
            # The seed reads back through the server, and the purge selects all of it.
            if "sagas" in spec.kinds:
                first = await _first_saga_id(server)
                got = await saga_pb2_grpc.SagaServiceStub(channel).GetSaga(
                    saga_pb2.GetSagaRequest(namespace=NAMESPACE, saga_id=first), timeout=30
                )
                if saga_pb2.SagaState.Name(got.saga.state) != "SAGA_STATE_COMPLETED":
                    problems.append(f"a seeded saga reads back as {got.saga.state}")
                record["probe_saga_id"] = first
            dry = await sweeps.RunSweep(
                sweep_pb2.RunSweepRequest(dry_run=True, parts=parts),  # type: ignore[arg-type]
                timeout=args.timeout,
            )
            selected = dict(dry.report.rows_purged)
            record["dry_run_rows"] = selected
            for kind in spec.kinds:
                if selected.get(kind, 0) != spec.rows:
                    problems.append(f"the dry run selects {selected.get(kind, 0)} {kind}")
            record["explain"] = await _explain(server, spec.kinds)
            if load:
                renewal = RenewalLoad("tether", target, args.timeout + args.baseline + 300)
                await renewal.start()
                await asyncio.sleep(RENEW_EVERY_S)  # warm-up: every lease renewed once
                record["load_setup_s"] = renewal.setup_s
            pids = [renewal.pid] if renewal is not None and renewal.pid else []
            a = CpuSnapshot.take([], pids, store)
            aux_a = _aux_cpu(store)
            base_start = time.time()
            await asyncio.sleep(args.baseline if load else 0)
            base_end = time.time()
            b = CpuSnapshot.take([], pids, store)
            aux_b = _aux_cpu(store)
            reports = []
            with timer.installed() if timer is not None else contextlib.nullcontext():
                if profiler is not None:
                    await profiler.start(server)
                try:
                    purge_start = time.time()
                    started = time.perf_counter()
                    for _ in range(MAX_SWEEPS):
                        response = await sweeps.RunSweep(
                            sweep_pb2.RunSweepRequest(parts=parts),  # type: ignore[arg-type]
                            timeout=args.timeout,
                        )
                        reports.append(response.report)
                        if response.report.backlog == 0 or response.report.failures:
                            break
                    purge_s = time.perf_counter() - started
                    purge_end = time.time()
                finally:
                    if profiler is not None:
                        await profiler.stop(server)
            c = CpuSnapshot.take([], pids, store)
            aux_c = _aux_cpu(store)
            counts = await server.db.read(lambda tx: _count_left_unit(tx, spec.kinds))
            await asyncio.sleep(TAIL_S if load else 0)
            renewals = await renewal.finish() if renewal is not None else None
    finally:
        if renewal is not None:
            await asyncio.to_thread(renewal.close)
        await server.stop(grace_s=1.0)
    purged: Counter[str] = Counter()
    failures: list[str] = []
    for report in reports:
        purged.update(dict(report.rows_purged))
        failures.extend(report.failures)
    rows = sum(purged[k] for k in spec.kinds)
    cpu_base = _cpu(a, b, True)
    _add_aux(cpu_base, aux_a, aux_b)
    cpu_purge = _cpu(b, c, True)
    _add_aux(cpu_purge, aux_b, aux_c)
    record.update(
        rows=rows,
        rows_purged=dict(purged),
        purge_s=round(purge_s, 3),
        rows_per_s=round(rows / purge_s, 1) if purge_s > 0 else None,
        sweeps=len(reports),
        backlog=reports[-1].backlog if reports else None,
        sweep_failures=failures,
        purge_batches=len(batches.purge),
        purge_batch_ms=ms_summary(batches.purge),
        purge_batch_p50_ms_by_tenth=_by_tenth(batches.purge),
        rows_per_batch=round(sum(batches.purge_rows) / max(1, len(batches.purge_rows)), 1),
        pauses_s=round(max(0, len(batches.purge) - len(reports)) * used.pause_s, 2),
        store_baseline=batches.store_in(base_start, base_end),
        store_purge=batches.store_in(purge_start, purge_end),
        cpu_baseline=cpu_base if load else None,
        cpu_purge=cpu_purge,
        left=counts,
    )
    for kind in spec.kinds:
        if purged[kind] != spec.rows:
            problems.append(f"{purged[kind]} {kind} purged, expected {spec.rows}")
    for table, left in counts.items():
        if table != "renewing_active" and left:
            problems.append(f"{left} rows left in {table}")
    if failures:
        problems.append(f"sweep failures: {failures}")
    if renewals is not None:
        if counts.get("renewing_active") != LEASES:
            problems.append(f"{counts.get('renewing_active')} of {LEASES} renewing leases ACTIVE")
        record.update(
            load_errors=renewals.errors,
            schedule_lag_max_ms=renewals.schedule_lag_max_ms,
            baseline=renewals.window(base_start, base_end),
            during_purge=renewals.window(purge_start, purge_end),
        )
    record["problems"] = problems
    return record


_FIRST_SAGA = "SELECT saga_id FROM sagas WHERE namespace = $1 ORDER BY ended_at_us LIMIT 1"


async def _first_saga_id(server: Any) -> str:
    from tether_server.store.sql import sql

    statement = sql(_FIRST_SAGA)
    saga_id: str = await server.db.read(lambda tx: tx.fetchval(statement, NAMESPACE))
    return saga_id


async def _count_left_unit(tx: Any, kinds: Sequence[str]) -> dict[str, int]:
    from tether_server.store.sql import sql

    tables = {
        "sagas": ("sagas", "saga_steps"),
        "leases": ("leases", "lease_keys", "lease_requests"),
    }
    out = {}
    for kind in kinds:
        for table in tables[kind]:
            out[table] = int(
                await tx.fetchval(
                    sql(f"SELECT count(*) FROM {table} WHERE namespace = $1"), NAMESPACE
                )
            )
    active = sql("SELECT count(*) FROM leases WHERE state = 'ACTIVE' AND key LIKE $1")
    out["renewing_active"] = int(await tx.fetchval(active, "bench/purge/%"))
    return out


def _by_tenth(seconds: Sequence[float]) -> list[float | None]:
    """The median batch of each tenth of the purge, in order: does a batch slow down as
    the purge goes on?"""
    n = len(seconds)
    if n < 10:
        return []
    tenths = [seconds[n * i // 10 : n * (i + 1) // 10] for i in range(10)]
    return [ms_summary(t).get("p50") for t in tenths]


def tether_run(
    backend: str,
    seeds: PurgeSeeds,
    spec: Spec,
    args: argparse.Namespace,
    *,
    timer: StatementTimer | None = None,
    profiler: Profiler | None = None,
    load: bool = True,
) -> Record:
    with seeds.fresh(backend, spec) as (url, populate_s, copy_s):
        store = None if backend == "sqlite" else ("postgres", urlsplit(url).path.lstrip("/"))
        record = asyncio.run(
            asyncio.wait_for(
                tether_purge(
                    url, spec, args, store=store, timer=timer, profiler=profiler, load=load
                ),
                args.timeout * 2 + args.baseline + 300,
            )
        )
    record.update(populate_s=round(populate_s, 2), copy_s=round(copy_s, 2))
    return record


# --- references -------------------------------------------------------------------------


async def _etcd_purge(
    target: str, prefix: str, keys: int, batch: int = ETCD_BATCH, pause_s: float = ETCD_PAUSE_S
) -> Record:
    """etcd's retention: DeleteRange of 1 000 keys at a time (10 ms apart), then one
    physical Compact of everything before."""
    import grpc

    rpc_pb2, rpc_pb2_grpc = etcd_mod.load_stubs()
    deletes: list[float] = []
    deleted = 0
    async with grpc.aio.insecure_channel(target) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        started = time.perf_counter()
        revision = 0
        for first in range(0, keys, batch):
            if first and pause_s:
                await asyncio.sleep(pause_s)
            t = time.perf_counter()
            response = await kv.DeleteRange(
                rpc_pb2.DeleteRangeRequest(
                    key=_etcd_key(prefix, first),
                    range_end=_etcd_key(prefix, min(first + batch, keys)),
                ),
                timeout=60,
            )
            deletes.append(time.perf_counter() - t)
            deleted += int(response.deleted)
            revision = response.header.revision
        delete_s = time.perf_counter() - started
        t = time.perf_counter()
        await kv.Compact(rpc_pb2.CompactionRequest(revision=revision, physical=True), timeout=600)
        compact_s = time.perf_counter() - t
    return {
        "rows": deleted,
        "rows_per_batch": round(deleted / max(1, len(deletes)), 1),
        "purge_batches": len(deletes),
        "purge_batch_ms": ms_summary(deletes),
        "purge_batch_p50_ms_by_tenth": _by_tenth(deletes),
        "delete_s": round(delete_s, 3),
        "compact_s": round(compact_s, 3),
    }


async def reference_windows(
    kind: str, target: str, server_pids: Sequence[int], args: argparse.Namespace, keys: int
) -> Record:
    """The renewal load against etcd or noop: a baseline window, then (etcd with keys) the
    purge window."""
    record: Record = {}
    renewal = RenewalLoad("etcd" if kind == "etcd" else "tether", target, args.timeout + 600)
    try:
        await renewal.start()
        await asyncio.sleep(RENEW_EVERY_S)
        record["load_setup_s"] = renewal.setup_s
        pids = [renewal.pid] if renewal.pid else []
        a = CpuSnapshot.take(server_pids, pids, None)
        base_start = time.time()
        await asyncio.sleep(args.baseline)
        base_end = time.time()
        b = CpuSnapshot.take(server_pids, pids, None)
        purge_start = purge_end = time.time()
        if kind == "etcd" and keys:
            started = time.perf_counter()
            pause_s = ETCD_PAUSE_S if args.pause_ms is None else args.pause_ms / 1000
            purge = await asyncio.wait_for(
                _etcd_purge(target, "purge/", keys, args.batch_size or ETCD_BATCH, pause_s),
                args.timeout,
            )
            purge_s = time.perf_counter() - started
            purge_end = time.time()
            record.update(purge)
            record.update(
                purge_s=round(purge_s, 3),
                rows_per_s=round(purge["rows"] / purge_s, 1) if purge_s > 0 else None,
            )
            if purge["rows"] != keys:
                record.setdefault("problems", []).append(
                    f"{purge['rows']} keys deleted, expected {keys}"
                )
        c = CpuSnapshot.take(server_pids, pids, None)
        await asyncio.sleep(TAIL_S)
        renewals = await renewal.finish()
    finally:
        await asyncio.to_thread(renewal.close)
    record.update(
        load_errors=renewals.errors,
        schedule_lag_max_ms=renewals.schedule_lag_max_ms,
        baseline=renewals.window(base_start, base_end),
        cpu_baseline=cpu_report(a, b),
    )
    if purge_end > purge_start:
        record.update(
            during_purge=renewals.window(purge_start, purge_end), cpu_purge=cpu_report(b, c)
        )
    record.setdefault("problems", [])
    return record


def reference_run(
    kind: str, args: argparse.Namespace, etcd_binary: str | None, keys: int
) -> Record:
    with contextlib.ExitStack() as stack:
        if kind == "etcd":
            assert etcd_binary is not None
            running = stack.enter_context(etcd_target(etcd_binary))
        else:
            running = stack.enter_context(noop_target())
        target = running.targets[0]
        fill_s = None
        if kind == "etcd" and keys:
            started = time.perf_counter()
            asyncio.run(asyncio.wait_for(_etcd_fill(target, "purge/", keys), args.timeout))
            fill_s = round(time.perf_counter() - started, 1)
            log(f"  filled {keys} etcd keys in {fill_s} s")
        record = asyncio.run(
            reference_windows(
                kind, target, running.server_pids, args, keys if kind == "etcd" else 0
            )
        )
        record.update(server=running.info, fill_s=fill_s)
        return record


# --- the run ---------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    spec: Spec
    etcd_binary: str | None
    seeds: PurgeSeeds
    host: dict[str, Any]
    unavailable: dict[str, str] = field(default_factory=dict)
    runs: dict[str, Record] = field(default_factory=dict)
    timers: dict[str, StatementTimer] = field(default_factory=dict)
    profiles: dict[str, Record] = field(default_factory=dict)
    failures: int = 0
    source_at_end: dict[str, Any] = field(default_factory=dict)

    def emit(self, line: Record) -> None:
        if emit_record(line, self.host, self.args.out, log):
            self.failures += 1

    def _params(self, target: str) -> Record:
        params: Record = {
            "leases": LEASES,
            "streams": STREAMS,
            "ttl_s": TTL_S,
            "renew_every_s": RENEW_EVERY_S,
            "baseline_s": self.args.baseline,
        }
        if target == "etcd":
            params.update(
                keys=self.args.etcd_keys,
                batch=self.args.batch_size or ETCD_BATCH,
                pause_ms=ETCD_PAUSE_S * 1000 if self.args.pause_ms is None else self.args.pause_ms,
            )
        elif target.startswith("tether"):
            params.update(
                rows=self.spec.rows,
                kinds=list(self.spec.kinds),
                batch_size=self.args.batch_size,
                pause_ms=self.args.pause_ms,
            )
        return params

    def run(self, target: str) -> None:
        log(f"{target}: starting")
        timer = StatementTimer() if target in TETHER_TARGETS else None
        try:
            if target in TETHER_TARGETS:
                record = tether_run(
                    BACKEND_OF[target], self.seeds, self.spec, self.args, timer=timer
                )
            else:
                record = reference_run(target, self.args, self.etcd_binary, self.args.etcd_keys)
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        if record.get("problems"):
            self.failures += 1
        self.runs[target] = record
        if timer is not None:
            self.timers[target] = timer
            if "purge_s" in record:
                record["statements_s"] = round(timer.total_s(), 3)
                record["statements_top"] = timer.lines(12, 150)
        self.emit({"scenario": "purge", "target": target, "params": self._params(target), **record})
        if "purge_s" in record:
            during = record.get("during_purge", {}).get("round_trip_ms", {})
            log(
                f"  {record['rows']} rows in {record['purge_s']:.2f} s; renewals during it "
                f"p99 {during.get('p99')} ms"
            )
        elif "baseline" in record:
            log(f"  renewal p99 {record['baseline']['round_trip_ms'].get('p99')} ms")

    def run_profile(self, target: str) -> None:
        backend = BACKEND_OF[target]
        log(f"profile {target}: the purge alone, under cProfile")
        profiler = Profiler()
        try:
            profiled = tether_run(
                backend, self.seeds, self.spec, self.args, profiler=profiler, load=False
            )
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            self.emit({"scenario": "profile", "target": target, **record})
            return
        self.profiles[target] = write_profile(
            target,
            self.spec,
            self.runs.get(target) or {},
            self.timers.get(target),
            profiled,
            profiler,
        )
        self.emit(
            {
                "scenario": "profile",
                "target": target,
                "profiled_purge_s": profiled.get("purge_s"),
                "file": str(self.profiles[target]["file"]),
            }
        )


def write_profile(
    target: str,
    spec: Spec,
    measured: Record,
    timer: StatementTimer | None,
    profiled: Record,
    profiler: Profiler,
) -> Record:
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    backend = BACKEND_OF[target]
    text_path = PROFILE_DIR / f"purge-profile-{backend}.txt"
    raw_path = PROFILE_DIR / f"purge-profile-{backend}.prof"
    main_stats = pstats.Stats(profiler.main)
    writer_stats = pstats.Stats(profiler.writer) if profiler.writer is not None else None
    combined = pstats.Stats(profiler.main)
    if profiler.writer is not None:
        combined.add(profiler.writer)
    combined.dump_stats(str(raw_path))
    purge_stats = writer_stats if writer_stats is not None else main_stats
    where = (
        "the SQLite writer thread (the purge's statements, driven synchronously)"
        if writer_stats is not None
        else "the event-loop thread (the sweep, the committer and asyncpg)"
    )
    store = measured.get("store_purge") or {}
    lines = [
        f"tether retention purge profile, {datetime.date.today().isoformat()}",
        f"target {target}; {spec.rows} rows of {', '.join(spec.kinds)}",
        "",
        "== measured run (renewal load on): purge vs store transactions vs SQL statements ==",
        f"purge {measured.get('purge_s')} s for {measured.get('rows')} rows, "
        f"{measured.get('purge_batches')} purge batches (ms per batch call: "
        f"{measured.get('purge_batch_ms')}), about {measured.get('pauses_s')} s of pauses",
        f"store transactions during the purge: {store.get('transactions')}, busy "
        f"{store.get('busy_s')} s, ms {store.get('ms')}",
        f"median purge batch per tenth of the purge, ms: "
        f"{measured.get('purge_batch_p50_ms_by_tenth')}",
    ]
    if timer is not None:
        lines += [
            f"SQL statements during the purge window (purge and renewals): {timer.total_s():.3f} s",
            "",
            "== SQL statements by total time, purge window (top 15) ==",
            *timer.lines(15),
        ]
    lines += ["", "== plans of the statements picking each batch ==", *measured.get("explain", [])]
    lines += [
        "",
        f"== cProfile, the purge alone: {profiled.get('purge_s')} s under the profiler "
        "(not a figure) ==",
        "",
        f"-- {where}: top {PROFILE_TOP} by cumulative time --",
        *top_functions(purge_stats, "cumulative", PROFILE_TOP),
        "",
        f"-- {where}: top {PROFILE_TOP} by own time --",
        *top_functions(purge_stats, "tottime", PROFILE_TOP),
    ]
    if writer_stats is not None:
        lines += [
            "",
            f"-- the event-loop thread (gRPC, sweeper, committer): top {PROFILE_TOP} by "
            "cumulative time --",
            *top_functions(main_stats, "cumulative", PROFILE_TOP),
        ]
    lines += ["", f"raw data (both threads): {raw_path} (python -m pstats)"]
    text_path.write_text("\n".join(lines) + "\n")
    return {
        "file": text_path,
        "where": where,
        "top": top_functions(purge_stats, "cumulative", PRINT_TOP),
        "own": top_functions(purge_stats, "tottime", PRINT_TOP),
        "statements": timer.lines(PRINT_TOP, 110) if timer is not None else [],
        "explain": measured.get("explain", []),
    }


# --- the report ---------------------------------------------------------------------------

# (label, path in the record, the noop server's path when its one window stands in)
ROWS: list[tuple[str, str, str | None]] = [
    ("rows purged (etcd: keys)", "rows", None),
    ("purge s (etcd: deletes + compact)", "purge_s", None),
    ("rows/s", "rows_per_s", None),
    ("purge batches", "purge_batches", None),
    ("rows per batch (average)", "rows_per_batch", None),
    ("batch time target ms (0: fixed size)", "limits.batch_target_ms", None),
    ("purge batch p50 ms", "purge_batch_ms.p50", None),
    ("purge batch max ms", "purge_batch_ms.max", None),
    ("baseline: renewals/s", "baseline.per_s", None),
    ("baseline: round trip p50 ms", "baseline.round_trip_ms.p50", None),
    ("baseline: round trip p99 ms", "baseline.round_trip_ms.p99", None),
    ("baseline: round trip max ms", "baseline.round_trip_ms.max", None),
    ("baseline: failed renewals", "baseline.failures", None),
    ("purge: renewals/s", "during_purge.per_s", "baseline.per_s"),
    ("purge: round trip p50 ms", "during_purge.round_trip_ms.p50", "baseline.round_trip_ms.p50"),
    ("purge: round trip p99 ms", "during_purge.round_trip_ms.p99", "baseline.round_trip_ms.p99"),
    ("purge: round trip max ms", "during_purge.round_trip_ms.max", "baseline.round_trip_ms.max"),
    ("purge: answers over 100 ms", "during_purge.over_100ms", "baseline.over_100ms"),
    ("purge: failed renewals", "during_purge.failures", "baseline.failures"),
    ("purge: store transactions busy s", "store_purge.busy_s", None),
    ("purge: of which SQL statements s", "statements_s", None),
    ("purge: longest store transaction ms", "store_purge.ms.max", None),
    ("purge: server cores", "cpu_purge.server_cores", "cpu_baseline.server_cores"),
    ("purge: store cores (pg backends)", "cpu_purge.store_cores", None),
]


def _get(record: Record | None, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _cell(bench: Bench, target: str, path: str, noop_path: str | None) -> Any:
    reason = bench.unavailable.get(target)
    if reason:
        return "n/a"
    record = bench.runs.get(target)
    if record is None:
        return None
    if "error" in record:
        return "ERR"
    if target == "noop" and noop_path is not None:
        return _get(record, noop_path)  # no store, nothing to purge: its one window
    return _get(record, path)


def print_summary(bench: Bench) -> None:
    host = bench.host
    spec = bench.spec
    print()
    print(
        f"tether retention purge under renewal load, {datetime.date.today().isoformat()}, "
        f"{host.get('cpu_model')}, {host.get('python')}, grpcio {host.get('grpcio')}"
    )
    dirty = " + uncommitted server/ changes" if host.get("server_dirty") else ""
    print(f"commit {host.get('commit')}{dirty}")
    batch = f"at most {bench.args.batch_size or 1000}, sized to the server's time target if any"
    pause = "10 (default)" if bench.args.pause_ms is None else fmt(bench.args.pause_ms)
    print(
        f"tether: {spec.rows} {' + '.join(spec.kinds)} purged by RunSweep (batches of {batch}, "
        f"{pause} ms apart); etcd: {bench.args.etcd_keys} keys by DeleteRange of "
        f"{bench.args.batch_size or ETCD_BATCH} ({pause} ms apart) + Compact; load: {LEASES} "
        f"leases (ttl {TTL_S} s) "
        f"each renewed every {RENEW_EVERY_S:.0f} s over {STREAMS} KeepAlive streams, "
        f"baseline window {bench.args.baseline:.0f} s"
    )
    for target in ALL_TARGETS:
        reason = bench.unavailable.get(target)
        if reason and reason != "not selected":
            print(f"{target.replace('tether-', 'tether ')}: unavailable ({reason})")
    header = ["metric", "etcd", "noop", "t-sqlite", "t-pg"]
    header += ["sqlite/etcd", "pg/etcd", "sqlite/noop", "pg/noop"]
    rows: list[list[str]] = []
    for label, path, noop_path in ROWS:
        values = {t: _cell(bench, t, path, noop_path) for t in ALL_TARGETS}
        noisy = {t: _noisy_path(bench.runs.get(t), path) for t in ALL_TARGETS}
        rows.append(
            [label]
            + [
                fmt(values[t]) + ("*" if noisy[t] and isinstance(values[t], int | float) else "")
                for t in ALL_TARGETS
            ]
            + [ratio(values[t], values[r]) for r in ("etcd", "noop") for t in TETHER_TARGETS]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print(
            "  ".join(
                c.ljust(widths[j]) if j < 1 else c.rjust(widths[j]) for j, c in enumerate(row)
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "ratios: tether / the reference (below 1: tether's figure is smaller); the noop server "
        "has no store and nothing to purge, so its one window stands in both; *: noisy window"
    )
    tenths = [
        f"{t.replace('tether-', 't-')} {bench.runs[t]['purge_batch_p50_ms_by_tenth']}"
        for t in ALL_TARGETS
        if (bench.runs.get(t) or {}).get("purge_batch_p50_ms_by_tenth")
    ]
    if tenths:
        print("median purge batch (ms) in each tenth of the purge: " + "; ".join(tenths))
    print_aims(bench)
    problems = checks(bench)
    keys = ("server_tree", "server_dirty")
    start = {k: host.get(k) for k in keys}
    end = {k: bench.source_at_end.get(k) for k in keys}
    if bench.source_at_end and (end != start or start["server_dirty"] or end["server_dirty"]):
        problems.append(
            f"SOURCE   server/ was not one committed tree throughout (start {start}, end {end})"
        )
    if problems:
        print("checks:")
        for problem in problems:
            print(f"  {problem}")
    for target in TETHER_TARGETS:
        record = bench.runs.get(target) or {}
        if record.get("statements_top"):
            print()
            print(
                f"{target}: SQL statements in the purge window (the purge's and the renewals') "
                f"by total time, top {PRINT_TOP}; the rest of the store's busy time is BEGIN, "
                "savepoints and COMMIT:"
            )
            for line in record["statements_top"][: PRINT_TOP + 1]:
                print(f"  {line[:150]}")
            print(f"{target}: plans of the batch picks (before the purge):")
            for line in record.get("explain", []):
                print(f"  {line}")
    for target, profile in bench.profiles.items():
        print()
        print(f"profile {target} ({profile['where']}); full: {profile['file']}")
        print(f"cProfile of the purge alone, top {PRINT_TOP} by cumulative time:")
        for line in profile["top"]:
            print(f"  {line}")


def print_aims(bench: Bench) -> None:
    judged = bench.spec.rows * len(bench.spec.kinds) >= AIM_ROWS
    print(
        f"aim (issue): {fmt(AIM_ROWS)} terminal rows purged while {LEASES} leases renew, "
        f"renewal p99 < {AIM_P99_MS:.0f} ms, no renewal failing"
        + ("" if judged else f"; this run has {fmt(bench.spec.total)} rows: not judged")
    )
    for target in TETHER_TARGETS:
        record = bench.runs.get(target)
        if record is None or "during_purge" not in record:
            continue
        during = record["during_purge"]
        p99 = during["round_trip_ms"].get("p99")
        fails = during["failures"]
        if p99 is None:
            continue
        met = p99 < AIM_P99_MS and fails == 0
        how = (
            f"p99 {p99:.1f} ms ({p99 / AIM_P99_MS:.2f} of the aim), max "
            f"{during['round_trip_ms'].get('max')} ms, {fails} failed of {during['sent']}, "
            f"{record['rows']} rows in {record['purge_s']:.1f} s"
        )
        verdict = ("MET: " if met else "MISSED: ") + how if judged else how
        print(f"  {target}: {verdict}")


def _noisy_path(record: Record | None, path: str) -> bool:
    if not record:
        return False
    window = (
        "cpu_purge"
        if path.startswith(("during_purge", "purge", "rows", "cpu_purge"))
        else ("cpu_baseline")
    )
    return bool(_noisy("", record.get(window) or {}))


def _noisy(what: str, cpu: Record) -> list[str]:
    other = cpu.get("other_cores", 0.0)
    if other <= NOISE_CORES or cpu.get("window_s", 0.0) < NOISE_MIN_WINDOW_S:
        return []
    return [f"NOISY    {what}: other processes used {other:.2f} cores during the window"]


def checks(bench: Bench) -> list[str]:
    out = []
    for target, record in bench.runs.items():
        if "error" in record:
            out.append(f"FAILED   {target}: {record['error']}")
            continue
        for problem in record.get("problems", []):
            out.append(f"WRONG    {target}: {problem}")
        for window in ("baseline", "during_purge"):
            stats = record.get(window) or {}
            if stats.get("failures"):
                out.append(
                    f"RENEWALS {target} / {window}: {stats['refused']} refused, "
                    f"{stats['unanswered']} unanswered"
                )
        if record.get("load_errors"):
            out.append(f"ERRORS   {target}: renewal load {record['load_errors']}")
        out.extend(_noisy(f"{target} / baseline", record.get("cpu_baseline") or {}))
        out.extend(_noisy(f"{target} / purge", record.get("cpu_purge") or {}))
    return out


# --- command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.purge",
        description="retention purges under renewal load, next to etcd and a store-less server",
        allow_abbrev=False,
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows (smoke test)")
    parser.add_argument("--rows", type=int, help=f"rows per kind (default {FULL_ROWS})")
    parser.add_argument(
        "--kinds", default="sagas", help="comma-separated subset of sagas,leases (default sagas)"
    )
    parser.add_argument(
        "--scenarios",
        default="purge",
        help="run only when the list names purge (shared with the other benchmarks)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"])
    parser.add_argument("--baseline", type=float, help="s of the baseline window (20, quick 5)")
    parser.add_argument("--etcd-keys", type=int, help="keys etcd purges (default: --rows)")
    parser.add_argument(
        "--batch-size", type=int, help="the sweep's rows per purge batch (default: the server's)"
    )
    parser.add_argument(
        "--pause-ms", type=float, help="the sweep's pause between batches (default: the server's)"
    )
    parser.add_argument(
        "--profile",
        choices=["sqlite", "postgres", "both", "none"],
        default="sqlite",
        help="profile the purge on this backend (default sqlite)",
    )
    parser.add_argument("--timeout", type=float, help="s per purge (default 1800, quick 300)")
    parser.add_argument("--etcd", help="etcd binary (default: etcd on PATH or /usr/bin/etcd)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        log(f"ignoring options of the other benchmarks: {' '.join(ignored)}")
    args.kind_list = tuple(k for k in KINDS if k in args.kinds.split(","))
    unknown = [k for k in args.kinds.split(",") if k and k not in KINDS]
    if unknown or not args.kind_list:
        parser.error(f"--kinds: a subset of {','.join(KINDS)}")
    args.target_list = [t for t in args.targets.split(",") if t in ALL_TARGETS]
    if args.backend:
        tether = {"sqlite": ["tether-sqlite"], "postgres": ["tether-pg"]}.get(
            args.backend, list(TETHER_TARGETS)
        )
        args.target_list = [t for t in args.target_list if not t.startswith("tether")] + tether
    args.rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    if not 1000 <= args.rows <= 5_000_000:
        parser.error("--rows must be in [1000, 5000000]")
    if args.etcd_keys is None:
        args.etcd_keys = args.rows
    if not 0 <= args.etcd_keys <= 5_000_000:
        parser.error("--etcd-keys must be in [0, 5000000]")
    if args.batch_size is not None and not 1 <= args.batch_size <= 100_000:
        parser.error("--batch-size must be in [1, 100000]")
    if args.pause_ms is not None and not 0 <= args.pause_ms <= 10_000:
        parser.error("--pause-ms must be in [0, 10000]")
    if args.baseline is None:
        args.baseline = 5.0 if args.quick else 20.0
    if not 1 <= args.baseline <= 600:
        parser.error("--baseline must be in [1, 600]")
    if args.timeout is None:
        args.timeout = 300.0 if args.quick else 1800.0
    if not 0 < args.timeout <= 7200:
        parser.error("--timeout must be in (0, 7200]")
    return args


def main(argv: list[str] | None = None) -> int:
    from tests.bench.load import host_info

    args = parse_args(argv)
    if "purge" not in args.scenarios.split(","):
        log("the purge scenario is not selected: nothing to do")
        return 0
    interrupt_on_sigterm()
    pg_url, pg_reason = pg_admin_url()
    spec = Spec(args.rows, args.kind_list)
    host = {**host_info(), **source_info()}
    bench = Bench(args, spec, etcd_mod.find_etcd(args.etcd), PurgeSeeds(pg_url), host)
    reason = etcd_mod.unavailable_reason(args.etcd)
    if reason:
        bench.unavailable["etcd"] = reason
        log(f"etcd: unavailable ({reason})")
    if pg_reason and "tether-pg" in args.target_list:
        bench.unavailable["tether-pg"] = pg_reason
        log(f"tether-pg: unavailable ({pg_reason})")
    for target in ALL_TARGETS:
        if target not in args.target_list:
            bench.unavailable.setdefault(target, "not selected")
    tether = [t for t in TETHER_TARGETS if t not in bench.unavailable]
    profiled = [
        t
        for t in tether
        if args.profile == "both" or (args.profile != "none" and BACKEND_OF[t] == args.profile)
    ]
    started = time.monotonic()
    try:
        for target in ("etcd", "noop"):
            if target not in bench.unavailable:
                bench.run(target)
        for target in tether:
            bench.run(target)
        for target in profiled:
            bench.run_profile(target)
    except KeyboardInterrupt:
        log("interrupted; servers, load processes and databases were cleaned up")
        return 130
    finally:
        bench.seeds.close()
        log(f"finished in {time.monotonic() - started:.0f} s")
    bench.source_at_end = source_info()
    print_summary(bench)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
