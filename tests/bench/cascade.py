"""Garbage-collector cascades of the OwnerRefService, side by side with etcd and a store-less
server doing one call per object (the Kubernetes garbage collector's way), in one run.

Run from the repository root (``make bench`` does, with ``BENCH_ARGS``)::

    python -m tests.bench.cascade [--quick] [--scenarios flat,tree]
                                  [--policies background,foreground,orphan]
                                  [--targets etcd,noop,tether-sqlite,tether-pg]
                                  [--dependents N] [--profile sqlite|postgres|both|none]
                                  [--uids server|uuid4] [--out results.jsonl]

What one cascade measures: the wall time from the ``DeleteObject`` call on the owner until
the collector has converged, i.e. its queue (``gc_queue``) is empty and

- background / foreground: no object of the graph is left (foreground: the owner too);
- orphan: the owner is gone and no dependent names it any more (they all stay).

Each cascade runs on fresh data. The graph is written once per backend and scenario into
a seed database, straight through the store layer (bulk INSERTs of ``objects`` /
``object_owners`` rows in the server's own column format and one ADDED event per object,
in transactions of 5 000 objects; PostgreSQL then gets ``ANALYZE``, as autovacuum would
do); every cascade gets its own copy of the seed (a file copy of the SQLite database in a
temporary directory; ``CREATE DATABASE tether_bench_<hex> TEMPLATE <seed>`` on
PostgreSQL, as the tests make theirs), removed afterwards with the seeds. Populating and
copying are not measured. PostgreSQL's admin URL is found as for ``tests.bench.load``:
``TETHER_BENCH_POSTGRES_URL`` / ``TETHER_TEST_POSTGRES_URL``, else the local
``postgresql://postgres@127.0.0.1:5432/postgres`` when it answers.

The server is an in-process ``TetherServer`` on a free 127.0.0.1 port with the default
configuration (``gc_batch_size`` 1000, the leader-only runner task ``garbage-collector``
woken after commits). The delete is the real ``DeleteObject`` RPC over gRPC; convergence is
polled every 20 ms through the server's own store (one snapshot read: the queue's
``depth`` / ``failing`` as ``objects.collector_state()`` reads them, plus an existence
probe), so the figure is at most one poll late. A queued owner whose collection failed
ends the run as an error. After convergence (not timed) the result is verified: counts of
what is left, no dependent still naming the owner, ``GetObject`` of the owner NOT_FOUND.

Scenarios (``--dependents`` N, default 100 000; ``--quick`` 2 000):

- ``flat``: one owner with N dependents.
- ``tree``: a 3-level tree of exactly N dependents: 1 root -> f children -> f grandchildren
  each -> the rest spread evenly as great-grandchildren (N = 100 000: f = 46, 2 116
  grandchildren, 46-47 great-grandchildren each).

Every reference is ``controller=true, block_owner_deletion=true``, so a foreground delete
waits level by level. Each scenario runs once per policy (background, foreground, orphan).
Uids come from the server's own ``new_uid`` (time-ordered UUID version 7); ``--uids uuid4``
gives random version-4 ones instead, as objects created before time-ordered uids have, to
see what the order of the uids costs: the collector takes dependents in uid order, so with
uuid4 every batch lands on pages all over each index.

References, 20 workers (2 spawned processes x 10 concurrent calls, one channel each), a
fresh server each, the same number of calls as objects the collector writes (``touched``:
N, or the f direct children of the tree's root for orphan):

- ``etcd``: single-node etcd 3.4 (``make bench-setup``), pre-filled with the keys, then one
  ``DeleteRange`` per key: the storage cost of the Kubernetes garbage collector, which
  deletes (or, orphaning, patches) one object per API call with 20 workers.
- ``noop``: ``tests.bench.noop_server`` (tether's LeaseService from memory), one unary
  ``Acquire`` per object: the same cascade as one RPC per object to a Python gRPC server
  with no store at all.

The table gives the cascade times and the ratios tether/etcd and tether/noop (below 1:
tether's cascade takes less time than the reference's calls). The issue's aim is judged on
the full size: 100 000 dependents converge on SQLite in under 5 s with background and under
10 s with foreground propagation.

Profile (``--profile``, default ``sqlite``; ``none`` skips it): for the flat scenario on the
chosen backend(s), one extra run per selected policy with every SQL statement timed (count,
rows, seconds; by wrapping the store's ``Tx`` methods in this process, no server change),
and one extra background run under cProfile (on SQLite the collector's units run in the
store's writer thread, which gets its own profiler; the event-loop thread has another).
Both go to ``.bench/cascade-profile-<backend>.txt`` (top 25 functions by cumulative time,
top 25 by own time, the statements), the raw cProfile data to
``.bench/cascade-profile-<backend>.prof`` (``-uuid4-uids`` added to both names with
``--uids uuid4``); the top 10 are printed. The profiled run's time is not a figure:
cProfile slows Python down several times.

Output: one JSON line per run on stdout (also appended to ``--out``; each names the commit
measured and whether ``server/`` had uncommitted changes, and the CPU used meanwhile by
role from /proc: the server process, its PostgreSQL backends and PostgreSQL's checkpointer
and WAL writers, the rest of the machine),
progress on stderr, then the table, the aim, checks and the profile summary. A run of 2 s
or more during which other processes used more than 0.25 cores is flagged NOISY (as
``tests.bench.load`` does): on these shared 2-core machines figures move by tens of
percent between runs.
Every wait is bounded (``--timeout`` per cascade), and servers, temporary files and
databases are removed even when a run fails or the benchmark is interrupted. Options meant
for ``tests.bench.load`` that share ``BENCH_ARGS`` (``--duration``, ``--scale-*``) are
ignored; scenario and target names of that module are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import cProfile
import datetime
import multiprocessing as mp
import pstats
import queue as queue_mod
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from tests.bench import etcd as etcd_mod
from tests.bench.procstat import CpuSnapshot, cpu_report, cpu_seconds, pids_named
from tests.bench.report import emit_record, fmt, interrupt_on_sigterm, ratio
from tests.bench.targets import (
    BENCH_DB_PREFIX,
    REPO_ROOT,
    etcd_target,
    noop_target,
    pg_admin_url,
)
from tether_server.domain.objects import EventType, Obj, OwnerRef

if TYPE_CHECKING:
    from tether_server.store.sql import Sql
    from tether_server.store.tx import Tx

Record = dict[str, Any]

NAMESPACE = "cascade"
ROOT_KIND = "bench.v1.Owner"
DEPENDENT_KIND = "bench.v1.Dependent"
SCENARIOS = ("flat", "tree")
POLICIES = ("background", "foreground", "orphan")
TETHER_TARGETS = ("tether-sqlite", "tether-pg")
ALL_TARGETS = ("etcd", "noop", *TETHER_TARGETS)
BACKEND_OF = {"tether-sqlite": "sqlite", "tether-pg": "postgres"}
FULL_DEPENDENTS = 100_000
QUICK_DEPENDENTS = 2_000
# The Kubernetes garbage collector's concurrency, and how the reference load is spread.
WORKERS = 20
REF_PROCS = 2
POLL_S = 0.02
PROGRESS_S = 10.0
INSERT_CHUNK = 5_000
# The aim, for SQLite at 100 000 dependents.
AIM_DEPENDENTS = 100_000
AIMS = {("flat", "background"): 5.0, ("flat", "foreground"): 10.0}
PROFILE_DIR = REPO_ROOT / ".bench"
# Cores used by processes outside the benchmark above which a run is flagged as noisy
# (tests.bench.load's threshold).
NOISE_CORES = 0.25
NOISE_MIN_WINDOW_S = 2.0
PROFILE_TOP = 25
PRINT_TOP = 10


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[cascade {stamp}] {message}", file=sys.stderr, flush=True)


# --- the graph ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    scenario: str
    # levels[0] is [root]; every object of level i+1 is owned by one of level i.
    levels: list[list[Obj]]

    @property
    def root(self) -> Obj:
        return self.levels[0][0]

    @property
    def dependents(self) -> int:
        return sum(len(level) for level in self.levels[1:])

    @property
    def shape(self) -> str:
        return " -> ".join(f"{len(level)}" for level in self.levels)

    def touched(self, policy: str) -> int:
        """Objects the collector writes: every dependent, or, orphaning, the direct ones."""
        return len(self.levels[1]) if policy == "orphan" else self.dependents


class Uids:
    """``server``: the server's own ``new_uid`` (time-ordered UUID version 7), the clock read
    as the graph is built, parents before their dependents as a client creates them.
    ``uuid4``: random version-4 uids, as the server made them before: objects created
    before that change keep them, and a batch of dependents taken in uid order then lies
    on pages all over every index."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self) -> str:
        if self.kind == "uuid4":
            return str(uuid.uuid4())
        from tether_server.domain.object_validation import new_uid

        return new_uid(time.time_ns() // 1_000_000)


def _obj(name: str, kind: str, owner: Obj | None, index: int, uids: Uids) -> Obj:
    refs: tuple[OwnerRef, ...] = ()
    if owner is not None:
        refs = (OwnerRef(owner.uid, owner.kind, owner.name, True, True),)
    return Obj(
        namespace=NAMESPACE,
        kind=kind,
        name=name,
        uid=uids(),
        labels={"app": "cascade-bench"},
        spec={"index": index, "image": "registry.example/agent:1.2.3", "replicas": 1},
        owner_refs=refs,
    )


def build_graph(scenario: str, n: int, uid_kind: str = "server") -> Graph:
    uids = Uids(uid_kind)
    root = _obj("root", ROOT_KIND, None, 0, uids)
    if scenario == "flat":
        return Graph(
            scenario,
            [[root], [_obj(f"d{i:07d}", DEPENDENT_KIND, root, i, uids) for i in range(n)]],
        )
    fanout = max(1, int(n ** (1 / 3) + 1e-9))
    while fanout > 1 and fanout + fanout * fanout >= n:
        fanout -= 1
    first = [_obj(f"a{i:07d}", DEPENDENT_KIND, root, i, uids) for i in range(fanout)]
    second = [
        _obj(f"b{i:07d}", DEPENDENT_KIND, first[i // fanout], i, uids)
        for i in range(fanout * fanout)
    ]
    rest = n - len(first) - len(second)
    # Spread evenly: leaf j under second[j % len(second)].
    third = [
        _obj(f"c{j:07d}", DEPENDENT_KIND, second[j % len(second)], j, uids) for j in range(rest)
    ]
    return Graph(scenario, [[root], first, second, third])


# --- SQL of this benchmark (tether_server.store is imported on first use: the spawned
# reference workers import this module and need none of it) ------------------------------


@dataclass(frozen=True)
class Statements:
    insert_object: Sql
    insert_owner: Sql
    any_left: Sql
    root_left: Sql
    named: Sql
    references: Sql
    count: Sql
    owner_rows: Sql
    still_naming: Sql
    terminating: Sql


@cache
def statements() -> Statements:
    from tether_server.store.objects import rows
    from tether_server.store.sql import sql

    columns = [c.strip() for c in rows.COLUMNS.split(",")]
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return Statements(
        insert_object=sql(f"INSERT INTO objects ({rows.COLUMNS}) VALUES ({placeholders})"),
        insert_owner=sql(
            "INSERT INTO object_owners (dependent_uid, owner_uid, namespace, owner_kind,"
            " block_owner_deletion) VALUES ($1, $2, $3, $4, $5)"
        ),
        any_left=sql("SELECT 1 FROM objects WHERE namespace = $1 LIMIT 1"),
        root_left=sql("SELECT 1 FROM objects WHERE namespace = $1 AND uid = $2"),
        named=sql("SELECT 1 FROM object_owners WHERE owner_uid = $1 LIMIT 1"),
        references=sql("SELECT count(*) FROM object_owners WHERE owner_uid = $1"),
        count=sql("SELECT count(*) FROM objects WHERE namespace = $1"),
        owner_rows=sql("SELECT count(*) FROM object_owners WHERE namespace = $1"),
        still_naming=sql(
            "SELECT count(*) FROM objects WHERE namespace = $1 AND owner_refs LIKE $2"
        ),
        terminating=sql(
            "SELECT count(*) FROM objects WHERE namespace = $1 AND deletion_ts_us IS NOT NULL"
        ),
    )


# --- populating (not measured) ------------------------------------------------------------


async def _insert(tx: Tx, objs: Sequence[Obj]) -> int:
    """Rows exactly as ``rows.insert`` writes them, in two statements per chunk."""
    from tether_server.store.objects import rows

    q = statements()
    values: list[list[Any]] = []
    owners: list[tuple[Any, ...]] = []
    for obj in objs:
        revision = await tx.next_revision()
        stored = replace(
            obj, created_at_us=tx.now_us, create_revision=revision, mod_revision=revision
        )
        values.append(rows._columns(stored))
        owners.extend(
            (stored.uid, r.uid, stored.namespace, r.kind, int(r.block_owner_deletion))
            for r in stored.owner_refs
        )
        rows.record(tx, revision, EventType.ADDED, stored)
    await tx.executemany(q.insert_object, values)
    await tx.executemany(q.insert_owner, owners)
    return len(values)


async def populate(url: str, graph: Graph) -> float:
    from tether_server.clock import SystemClock
    from tether_server.store.database import Database

    started = time.perf_counter()
    db = Database(url, SystemClock())
    try:
        await db.migrate()
        objs = [o for level in graph.levels for o in level]
        for i in range(0, len(objs), INSERT_CHUNK):
            await db.write(partial(_insert, objs=objs[i : i + INSERT_CHUNK]))
    finally:
        await db.dispose()
    if url.startswith("postgres"):
        import asyncpg

        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute("ANALYZE objects, object_owners, gc_queue, events")
        finally:
            await conn.close()
    return time.perf_counter() - started


def _pg_dsn(admin_url: str, dbname: str) -> str:
    return urlunsplit(("postgresql", urlsplit(admin_url).netloc, f"/{dbname}", "", ""))


def _pg_admin(admin_url: str, statement: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(_pg_dsn(admin_url, urlsplit(admin_url).path.lstrip("/")))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


class Seeds:
    """One populated database per (backend, scenario), written once; every run gets a fresh
    copy of it (a file copy on SQLite; ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL, as
    the tests make theirs). ``close()`` removes the seeds."""

    def __init__(self, admin_url: str | None) -> None:
        self.admin_url = admin_url
        self.dir = Path(tempfile.mkdtemp(prefix="tether-bench-cascade-"))
        self.token = secrets.token_hex(4)
        # (backend, scenario) -> (SQLite path or PostgreSQL database name, populate seconds)
        self.seeds: dict[tuple[str, str], tuple[str, float]] = {}

    def populate(self, url: str, backend: str, graph: Any) -> float:
        """Write the seed (a subclass seeds its own benchmark's data); seconds taken."""
        populate_s = asyncio.run(populate(url, graph))
        log(f"  seeded {graph.dependents + 1} objects ({backend}) in {populate_s:.1f} s")
        return populate_s

    def _seed(self, backend: str, graph: Any) -> tuple[str, float]:
        key = (backend, graph.scenario)
        if key not in self.seeds:
            if backend == "sqlite":
                name = str(self.dir / f"seed-{graph.scenario}.db")
                url = f"sqlite:///{name}"
            else:
                assert self.admin_url is not None
                name = f"{BENCH_DB_PREFIX}{self.token}_seed_{graph.scenario.replace('-', '_')}"
                _pg_admin(self.admin_url, f'CREATE DATABASE "{name}"')
                url = _pg_dsn(self.admin_url, name)
            self.seeds[key] = (name, 0.0)  # dropped by close() even if populating fails
            self.seeds[key] = (name, self.populate(url, backend, graph))
        return self.seeds[key]

    @contextlib.contextmanager
    def fresh(self, backend: str, graph: Graph) -> Iterator[tuple[str, float, float]]:
        """(URL of a fresh copy of the seed, s the seed took to populate, s to copy it)."""
        seed, populate_s = self._seed(backend, graph)
        started = time.perf_counter()
        if backend == "sqlite":
            directory = Path(tempfile.mkdtemp(prefix="run-", dir=self.dir))
            try:
                for suffix in ("", "-wal"):
                    if Path(seed + suffix).exists():
                        shutil.copyfile(seed + suffix, directory / f"cascade.db{suffix}")
                copy_s = time.perf_counter() - started
                yield f"sqlite:///{directory / 'cascade.db'}", populate_s, copy_s
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            return
        assert self.admin_url is not None
        name = f"{BENCH_DB_PREFIX}{secrets.token_hex(6)}"
        _pg_admin(self.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{seed}"')
        try:
            yield _pg_dsn(self.admin_url, name), populate_s, time.perf_counter() - started
        finally:
            _pg_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        try:
            for (backend, _scenario), (name, _s) in self.seeds.items():
                if backend == "postgres" and self.admin_url is not None:
                    with contextlib.suppress(Exception):
                        _pg_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- convergence -------------------------------------------------------------------------

# Set while this benchmark's own reads run, so the statement timer leaves them out.
_POLLING: contextvars.ContextVar[bool] = contextvars.ContextVar("cascade_polling", default=False)


@dataclass(frozen=True)
class Probe:
    depth: int
    failing: int
    left: bool
    # Progress only: objects left (background, foreground) or references to the owner left.
    remaining: int | None = None

    @property
    def done(self) -> bool:
        return self.depth == 0 and not self.left


async def _probe(tx: Tx, root_uid: str, orphan: bool, count: bool) -> Probe:
    from tether_server.store.objects import collector

    q = statements()
    token = _POLLING.set(True)
    try:
        stats = await collector.queue_stats(tx)
        if orphan:
            left = (
                await tx.fetchrow(q.root_left, NAMESPACE, root_uid) is not None
                or await tx.fetchrow(q.named, root_uid) is not None
            )
        else:
            left = await tx.fetchrow(q.any_left, NAMESPACE) is not None
        remaining = None
        if count:
            remaining = int(
                await tx.fetchval(q.references, root_uid)
                if orphan
                else await tx.fetchval(q.count, NAMESPACE)
            )
        return Probe(stats.depth, stats.failing, left, remaining)
    finally:
        _POLLING.reset(token)


async def _final_counts(tx: Tx, root_uid: str) -> dict[str, int]:
    q = statements()
    token = _POLLING.set(True)
    try:
        return {
            "objects_left": int(await tx.fetchval(q.count, NAMESPACE)),
            "owner_rows_left": int(await tx.fetchval(q.owner_rows, NAMESPACE)),
            "naming_owner": int(await tx.fetchval(q.still_naming, NAMESPACE, f"%{root_uid}%")),
            "terminating": int(await tx.fetchval(q.terminating, NAMESPACE)),
        }
    finally:
        _POLLING.reset(token)


class CascadeFailed(RuntimeError):
    pass


# --- instrumentation ----------------------------------------------------------------------


@dataclass
class Counters:
    passes: int = 0
    batches: int = 0
    batch_s: float = 0.0

    def reset(self) -> None:
        self.passes = self.batches = 0
        self.batch_s = 0.0


class StatementTimer:
    """Per SQL statement: calls, rows (executemany), seconds. Wraps the store's Tx classes
    in this process while installed; the benchmark's own reads are left out."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, text: str, seconds: float, rows: int) -> None:
        with self._lock:
            entry = self.stats.setdefault(text, [0, 0, 0.0])
            entry[0] += 1
            entry[1] += rows
            entry[2] += seconds

    def _wrap(self, original: Callable[..., Awaitable[Any]], name: str) -> Any:
        timer = self

        async def timed(tx: Any, *args: Any) -> Any:
            if _POLLING.get():
                return await original(tx, *args)
            if name == "flush":
                text, rows = "(PostgreSQL flush: events INSERT + revision + NOTIFY)", 1
            else:
                text = args[0].pg
                rows = len(args[1]) if name == "executemany" else 1
            started = time.perf_counter()
            try:
                return await original(tx, *args)
            finally:
                timer.add(text, time.perf_counter() - started, rows)

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[StatementTimer]:
        from tether_server.store.pg_backend import PgTx
        from tether_server.store.sqlite_backend import SqliteTx

        saved: list[tuple[type, str, Any]] = []
        wrapped: list[tuple[type, str]] = [
            (SqliteTx, "fetch"),
            (SqliteTx, "execute"),
            (SqliteTx, "executemany"),
            (PgTx, "fetch"),
            (PgTx, "execute"),
            (PgTx, "executemany"),
            # SQLite's flush goes through executemany/execute; PostgreSQL's is one call.
            (PgTx, "flush"),
        ]
        try:
            for cls, name in wrapped:
                original = cls.__dict__[name]
                saved.append((cls, name, original))
                setattr(cls, name, self._wrap(original, name))
            yield self
        finally:
            for cls, name, original in saved:
                setattr(cls, name, original)

    def total_s(self) -> float:
        return sum(entry[2] for entry in self.stats.values())

    def lines(self, limit: int, width: int = 150) -> list[str]:
        ranked = sorted(self.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
        out = [f"{'seconds':>8} {'calls':>8} {'rows':>9} {'ms/call':>8}  statement"]
        for text, (calls, count, seconds) in ranked:
            shown = text if len(text) <= width else text[: width - 3] + "..."
            per_call = 1000 * seconds / calls if calls else 0.0
            out.append(f"{seconds:8.3f} {int(calls):8d} {int(count):9d} {per_call:8.3f}  {shown}")
        return out


class Profiler:
    """cProfile of the event-loop thread and, on SQLite, of the store's writer thread (where
    the collector's units run: the SQLite Tx never suspends)."""

    def __init__(self) -> None:
        self.main = cProfile.Profile()
        self.writer: cProfile.Profile | None = None

    async def start(self, server: Any) -> None:
        from tether_server.store.sqlite_backend import SqliteBackend

        backend = server.db.backend_impl
        if isinstance(backend, SqliteBackend):
            self.writer = cProfile.Profile()
            # The single writer thread: enable() there profiles that thread only.
            await asyncio.get_running_loop().run_in_executor(backend._writer, self.writer.enable)
        self.main.enable()

    async def stop(self, server: Any) -> None:
        from tether_server.store.sqlite_backend import SqliteBackend

        self.main.disable()
        backend = server.db.backend_impl
        if self.writer is not None and isinstance(backend, SqliteBackend):
            await asyncio.get_running_loop().run_in_executor(backend._writer, self.writer.disable)


def _where(file: str, line: int, func: str) -> str:
    if file == "~":
        return func
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{func} ({short}:{line})"


def top_functions(stats: pstats.Stats, key: str, limit: int) -> list[str]:
    column = 3 if key == "cumulative" else 2
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    ranked = sorted(entries.items(), key=lambda kv: kv[1][column], reverse=True)[:limit]
    out = [f"{'cum s':>8} {'own s':>8} {'calls':>9}  function"]
    for (file, line, func), (_cc, calls, own, cumulative, _callers) in ranked:
        out.append(f"{cumulative:8.3f} {own:8.3f} {calls:9d}  {_where(file, line, func)}")
    return out


# --- one cascade --------------------------------------------------------------------------

POLICY_PB = {"background": 1, "foreground": 2, "orphan": 3}


# PostgreSQL's own writers: they work for whichever database writes, here this run's.
_PG_AUX = ("checkpointer", "background writer", "walwriter")


def _aux_cpu(store: tuple[str, str] | None) -> dict[int, float | None]:
    if store is None:
        return {}
    pids = {pid for name in _PG_AUX for pid in pids_named(store[0], name)}
    return {pid: cpu_seconds(pid) for pid in pids}


def _add_aux(
    cpu: dict[str, Any], before: dict[int, float | None], after: dict[int, float | None]
) -> None:
    """Count PostgreSQL's checkpointer and WAL writers as the store, not as noise."""
    window = cpu.get("window_s") or 0.0
    spent = sum((end - (before.get(pid) or 0.0)) for pid, end in after.items() if end is not None)
    if not after or window <= 0:
        return
    cores = spent / window
    cpu["store_aux_cores"] = round(cores, 3)
    if "other_cores" in cpu:
        cpu["other_cores"] = round(max(0.0, cpu["other_cores"] - cores), 3)


async def _wait_leader(server: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not server.leadership.is_leader:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not take leadership within {timeout} s")
        await asyncio.sleep(0.05)


async def _converge(
    server: Any, graph: Graph, policy: str, started: float, timeout: float
) -> tuple[float, int, Probe]:
    orphan = policy == "orphan"
    what = "references to the owner" if orphan else "objects"
    polls = 0
    next_progress = started + PROGRESS_S
    while True:
        now = time.perf_counter()
        count = now >= next_progress
        probe = await server.db.read(
            partial(_probe, root_uid=graph.root.uid, orphan=orphan, count=count)
        )
        polls += 1
        seen = time.perf_counter()
        if probe.failing:
            state = await server.objects.collector_state()
            errors = [f"{f.uid}: {f.last_error[:300]}" for f in state.failing[:3]]
            raise CascadeFailed(f"{probe.failing} queued owner(s) failing: {errors}")
        if probe.done:
            return seen - started, polls, probe
        if seen - started > timeout:
            raise CascadeFailed(f"not converged after {timeout:.0f} s (last probe {probe})")
        if count:
            next_progress = seen + PROGRESS_S
            log(
                f"  ... {seen - started:.0f} s: queue depth {probe.depth}, "
                f"{probe.remaining} {what} left"
            )
        await asyncio.sleep(POLL_S)


async def cascade(
    url: str,
    graph: Graph,
    policy: str,
    timeout: float,
    *,
    store: tuple[str, str] | None = None,
    profiler: Profiler | None = None,
    timer: StatementTimer | None = None,
) -> Record:
    """One cascade; ``store``: (command, command-line part) of the PostgreSQL backends
    serving the database, for the CPU accounting."""
    import grpc

    from tether_client.pb import owner_ref_pb2, owner_ref_pb2_grpc
    from tether_server.app import TetherServer
    from tether_server.config import ServerConfig

    server = TetherServer(ServerConfig(listen="127.0.0.1:0", db_url=url, grace_s=1.0))
    counters = Counters()
    store_batch = server.db.on_batch

    def on_batch(size: int, seconds: float) -> None:
        counters.batches += 1
        counters.batch_s += seconds
        if store_batch is not None:
            store_batch(size, seconds)

    server.db.on_batch = on_batch
    collect = server.objects.collect

    async def counted_collect() -> Any:
        counters.passes += 1
        return await collect()

    server.objects.collect = counted_collect  # type: ignore[method-assign]
    root = graph.root
    record: Record = {}
    await server.start()
    try:
        await _wait_leader(server, 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
            get_root = owner_ref_pb2.GetObjectRequest(
                namespace=NAMESPACE, kind=root.kind, name=root.name
            )
            await stub.GetObject(get_root, timeout=30)  # connected, handlers warm
            revision_before = (await server.db.current_revision())[0]
            metrics = server.metrics
            before = (metrics.gc_deleted, metrics.gc_orphaned, metrics.gc_failures)
            counters.reset()
            request = owner_ref_pb2.DeleteObjectRequest(
                namespace=NAMESPACE,
                kind=root.kind,
                name=root.name,
                propagation_policy=POLICY_PB[policy],  # type: ignore[arg-type]
            )
            with timer.installed() if timer is not None else contextlib.nullcontext():
                if profiler is not None:
                    await profiler.start(server)
                try:
                    # This process is the server: it counts as the "coordinator" here.
                    aux_before = _aux_cpu(store)
                    cpu_before = CpuSnapshot.take([], [], store)
                    started = time.perf_counter()
                    response = await stub.DeleteObject(request, timeout=60)
                    rpc_s = time.perf_counter() - started
                    elapsed, polls, _probe_last = await _converge(
                        server, graph, policy, started, timeout
                    )
                    cpu = cpu_report(cpu_before, CpuSnapshot.take([], [], store))
                    cpu["server_cores"] = cpu.pop("coordinator_cores", 0.0)
                    _add_aux(cpu, aux_before, _aux_cpu(store))
                finally:
                    if profiler is not None:
                        await profiler.stop(server)
            record.update(
                cascade_s=round(elapsed, 3),
                delete_rpc_ms=round(rpc_s * 1000, 2),
                delete_answer="deleted" if response.deleted else "terminating",
                polls=polls,
                poll_s=POLL_S,
                gc_passes=counters.passes,
                store_batches=counters.batches,
                store_batch_s=round(counters.batch_s, 3),
                gc_deleted=metrics.gc_deleted - before[0],
                gc_orphaned=metrics.gc_orphaned - before[1],
                gc_failures=metrics.gc_failures - before[2],
                revisions=(await server.db.current_revision())[0] - revision_before,
                cpu=cpu,
            )
            counts = await server.db.read(partial(_final_counts, root_uid=root.uid))
            record.update(counts)
            record["problems"] = await _verify(stub, owner_ref_pb2, graph, policy, counts)
    finally:
        await server.stop(grace_s=1.0)
    return record


async def _verify(
    stub: Any, pb: Any, graph: Graph, policy: str, counts: dict[str, int]
) -> list[str]:
    """What must hold once converged, whatever the time."""
    import grpc

    problems = []
    root = graph.root
    if policy == "orphan":
        expect_objects = graph.dependents
        expect_rows = sum(len(o.owner_refs) for level in graph.levels[2:] for o in level)
    else:
        expect_objects = expect_rows = 0
    if counts["objects_left"] != expect_objects:
        problems.append(f"{counts['objects_left']} objects left, expected {expect_objects}")
    if counts["owner_rows_left"] != expect_rows:
        problems.append(
            f"{counts['owner_rows_left']} owner-index rows left, expected {expect_rows}"
        )
    if counts["naming_owner"]:
        problems.append(f"{counts['naming_owner']} objects still name the deleted owner")
    if counts["terminating"]:
        problems.append(f"{counts['terminating']} objects left terminating")
    try:
        await stub.GetObject(
            pb.GetObjectRequest(namespace=NAMESPACE, kind=root.kind, name=root.name), timeout=30
        )
        problems.append("GetObject still finds the owner")
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            problems.append(f"GetObject of the owner: {exc.code().name}")
    if policy == "orphan":
        listed = await stub.ListObjects(
            pb.ListObjectsRequest(namespace=NAMESPACE, kind=DEPENDENT_KIND, page_size=100),
            timeout=30,
        )
        if len(listed.objects) != min(100, graph.dependents):
            problems.append(f"ListObjects returned {len(listed.objects)} dependents")
        if any(r.uid == root.uid for o in listed.objects for r in o.owner_references):
            problems.append("a listed dependent still has the owner reference")
    return problems


def tether_run(
    backend: str,
    seeds: Seeds,
    graph: Graph,
    policy: str,
    timeout: float,
    *,
    profiler: Profiler | None = None,
    timer: StatementTimer | None = None,
) -> Record:
    with seeds.fresh(backend, graph) as (url, populate_s, copy_s):
        store = None if backend == "sqlite" else ("postgres", urlsplit(url).path.lstrip("/"))
        record = asyncio.run(
            asyncio.wait_for(
                cascade(url, graph, policy, timeout, store=store, profiler=profiler, timer=timer),
                timeout + 120,
            )
        )
    record.update(populate_s=round(populate_s, 2), copy_s=round(copy_s, 2))
    return record


# --- references: one call per object, 20 workers ---------------------------------------------


def _ref_main(
    kind: str,
    target: str,
    prefix: str,
    wid: int,
    procs: int,
    calls: int,
    concurrency: int,
    barrier: Any,
    results: Any,
) -> None:
    try:
        report = asyncio.run(
            _ref_worker(kind, target, prefix, wid, procs, calls, concurrency, barrier)
        )
    except BaseException as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        report = {
            "wid": wid,
            "fatal": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc()[-2000:],
        }
    results.put(report)


async def _ref_worker(
    kind: str,
    target: str,
    prefix: str,
    wid: int,
    procs: int,
    calls: int,
    concurrency: int,
    barrier: Any,
) -> Record:
    import grpc
    from google.protobuf.duration_pb2 import Duration

    errors: dict[str, int] = {}
    ok = 0
    indices = iter(range(wid, calls, procs))
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call: Callable[[int], Awaitable[bool]]
        if kind == "etcd":
            rpc_pb2, rpc_pb2_grpc = etcd_mod.load_stubs()
            kv = rpc_pb2_grpc.KVStub(channel)

            async def call(i: int) -> bool:
                response = await kv.DeleteRange(
                    rpc_pb2.DeleteRangeRequest(key=_etcd_key(prefix, i)), timeout=30
                )
                return int(response.deleted) == 1

            await kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"warm-up"), timeout=30)
        else:
            from tether_client.pb import lease_pb2, lease_pb2_grpc

            lease = lease_pb2_grpc.LeaseServiceStub(channel)
            ttl = Duration(seconds=600)

            async def call(i: int) -> bool:
                await lease.Acquire(
                    lease_pb2.AcquireRequest(key=f"{prefix}{i}", holder="cascade", ttl=ttl),
                    timeout=30,
                )
                return True

            await lease.Acquire(
                lease_pb2.AcquireRequest(key=f"{prefix}warm-up/{wid}", holder="cascade", ttl=ttl),
                timeout=30,
            )

        async def loop() -> None:
            nonlocal ok
            for i in indices:
                try:
                    if await call(i):
                        ok += 1
                    else:
                        errors["not deleted"] = errors.get("not deleted", 0) + 1
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        await asyncio.to_thread(barrier.wait, 120)
        started = time.time()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        ended = time.time()
    return {"wid": wid, "ok": ok, "errors": errors, "started": started, "ended": ended}


def _etcd_key(prefix: str, i: int) -> bytes:
    return b"%s%07d" % (prefix.encode(), i)


async def _etcd_fill(target: str, prefix: str, calls: int) -> None:
    """The keys to delete, 128 puts per Txn (etcd's default --max-txn-ops)."""
    import grpc

    rpc_pb2, rpc_pb2_grpc = etcd_mod.load_stubs()
    value = b"x" * 300  # about a stored object's row
    async with grpc.aio.insecure_channel(target) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        starts = list(range(0, calls, 128))

        async def txn(first: int) -> None:
            ops = [
                rpc_pb2.RequestOp(
                    request_put=rpc_pb2.PutRequest(key=_etcd_key(prefix, i), value=value)
                )
                for i in range(first, min(first + 128, calls))
            ]
            await kv.Txn(rpc_pb2.TxnRequest(success=ops), timeout=60)

        for i in range(0, len(starts), 8):
            await asyncio.gather(*(txn(s) for s in starts[i : i + 8]))


def _ref_workers(
    kind: str, target: str, prefix: str, calls: int, timeout: float, server_pids: Sequence[int]
) -> Record:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(REF_PROCS + 1)
    results = ctx.Queue()
    per_proc = WORKERS // REF_PROCS
    workers = [
        ctx.Process(
            target=_ref_main,
            args=(kind, target, prefix, wid, REF_PROCS, calls, per_proc, barrier, results),
            daemon=True,
        )
        for wid in range(REF_PROCS)
    ]
    reports: list[Record] = []
    cpu: dict[str, Any] = {}
    try:
        for worker in workers:
            worker.start()
        worker_pids = [w.pid for w in workers if w.pid is not None]
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=120)
        cpu_before = CpuSnapshot.take(server_pids, worker_pids, None)
        deadline = time.monotonic() + timeout
        while len(reports) < REF_PROCS and time.monotonic() < deadline:
            try:
                reports.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue_mod.Empty:
                break
        cpu = cpu_report(cpu_before, CpuSnapshot.take(server_pids, worker_pids, None))
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()  # our own child
                worker.join(timeout=10)
    fatal = [r for r in reports if "fatal" in r]
    if fatal or len(reports) != REF_PROCS:
        return {
            "error": [r["fatal"] for r in fatal] or f"only {len(reports)}/{REF_PROCS} reported",
            "trace": fatal[0]["trace"] if fatal else None,
        }
    errors: dict[str, int] = {}
    for report in reports:
        for name, n in report["errors"].items():
            errors[name] = errors.get(name, 0) + n
    elapsed = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    ok = sum(r["ok"] for r in reports)
    return {
        "calls": calls,
        "ok": ok,
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "calls_per_s": round(ok / elapsed, 1) if elapsed > 0 else None,
        "workers": WORKERS,
        "procs": REF_PROCS,
        "cpu": cpu,
    }


def reference_runs(
    kind: str, etcd_binary: str | None, counts: Sequence[int], timeout: float
) -> Iterator[tuple[int, Record]]:
    """One server for every count; each count's calls on keys of their own."""
    with contextlib.ExitStack() as stack:
        if kind == "etcd":
            assert etcd_binary is not None
            running = stack.enter_context(etcd_target(etcd_binary))
            call = "DeleteRange (one key)"
        else:
            running = stack.enter_context(noop_target())
            call = "LeaseService.Acquire (unary)"
        target = running.targets[0]
        for calls in counts:
            prefix = f"cascade/{calls}/"
            if kind == "etcd":
                started = time.perf_counter()
                asyncio.run(asyncio.wait_for(_etcd_fill(target, prefix, calls), timeout))
                log(f"  filled {calls} etcd keys in {time.perf_counter() - started:.1f} s")
            record = _ref_workers(kind, target, prefix, calls, timeout, running.server_pids)
            record.update(call=call, server=running.info)
            yield calls, record


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    dependents: int
    etcd_binary: str | None
    seeds: Seeds
    host: dict[str, Any]
    unavailable: dict[str, str] = field(default_factory=dict)
    graphs: dict[str, Graph] = field(default_factory=dict)
    # (scenario, policy, target) -> record
    runs: dict[tuple[str, str, str], Record] = field(default_factory=dict)
    # (target, calls) -> record
    refs: dict[tuple[str, int], Record] = field(default_factory=dict)
    profiles: dict[str, Record] = field(default_factory=dict)
    failures: int = 0
    source_at_end: dict[str, Any] = field(default_factory=dict)

    def emit(self, line: Record) -> None:
        if emit_record(line, self.host, self.args.out, log):
            self.failures += 1

    def graph(self, scenario: str) -> Graph:
        if scenario not in self.graphs:
            self.graphs[scenario] = build_graph(scenario, self.dependents, self.args.uids)
        return self.graphs[scenario]

    def run_references(self, kind: str, counts: Sequence[int]) -> None:
        log(f"reference {kind}: {', '.join(map(str, counts))} calls, {WORKERS} workers")
        try:
            for calls, record in reference_runs(kind, self.etcd_binary, counts, self.args.timeout):
                self.refs[(kind, calls)] = record
                self.emit({"scenario": "reference", "target": kind, **record})
                if "elapsed_s" in record:
                    log(f"  {kind}: {calls} calls in {record['elapsed_s']:.2f} s")
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            for calls in counts:
                self.refs.setdefault((kind, calls), record)
            self.emit({"scenario": "reference", "target": kind, **record})

    def run_tether(self, scenario: str, policy: str, target: str) -> None:
        graph = self.graph(scenario)
        log(f"{scenario} / {policy} / {target}: {graph.shape}")
        try:
            record = tether_run(BACKEND_OF[target], self.seeds, graph, policy, self.args.timeout)
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        if record.get("problems"):
            self.failures += 1
        self.runs[(scenario, policy, target)] = record
        self.emit(
            {
                "scenario": scenario,
                "policy": policy,
                "target": target,
                "dependents": graph.dependents,
                "uids": self.args.uids,
                "shape": graph.shape,
                "touched": graph.touched(policy),
                **record,
            }
        )
        if "cascade_s" in record:
            log(f"  converged in {record['cascade_s']:.3f} s")

    def run_profile(self, target: str, policies: Sequence[str]) -> None:
        backend = BACKEND_OF[target]
        graph = self.graph("flat")
        timings: dict[str, Record] = {}
        try:
            for policy in policies:
                log(f"profile {target}: flat / {policy}, every statement timed")
                timer = StatementTimer()
                record = tether_run(
                    backend, self.seeds, graph, policy, self.args.timeout, timer=timer
                )
                timings[policy] = {"record": record, "timer": timer}
            log(f"profile {target}: flat / background under cProfile")
            profiler = Profiler()
            profiled = tether_run(
                backend, self.seeds, graph, "background", self.args.timeout, profiler=profiler
            )
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            self.emit({"scenario": "profile", "target": target, **record})
            return
        self.profiles[target] = write_profile(
            target,
            graph,
            timings,
            profiled,
            profiler,
            self.runs.get(("flat", "background", target)),
            self.args.uids,
        )
        self.emit(
            {
                "scenario": "profile",
                "target": target,
                "profiled_cascade_s": profiled.get("cascade_s"),
                "timed": {
                    p: {
                        "cascade_s": t["record"].get("cascade_s"),
                        "statements_s": round(t["timer"].total_s(), 3),
                        "store_batch_s": t["record"].get("store_batch_s"),
                    }
                    for p, t in timings.items()
                },
                "file": str(self.profiles[target]["file"]),
            }
        )


def write_profile(
    target: str,
    graph: Graph,
    timings: dict[str, Record],
    profiled: Record,
    profiler: Profiler,
    measured: Record | None,
    uids: str,
) -> Record:
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    backend = BACKEND_OF[target]
    suffix = "" if uids == "server" else f"-{uids}-uids"
    text_path = PROFILE_DIR / f"cascade-profile-{backend}{suffix}.txt"
    raw_path = PROFILE_DIR / f"cascade-profile-{backend}{suffix}.prof"
    main_stats = pstats.Stats(profiler.main)
    writer_stats = pstats.Stats(profiler.writer) if profiler.writer is not None else None
    combined = pstats.Stats(profiler.main)
    if profiler.writer is not None:
        combined.add(profiler.writer)
    combined.dump_stats(str(raw_path))
    # Where the collector's units run: the writer thread on SQLite, the loop on PostgreSQL.
    collector_stats = writer_stats if writer_stats is not None else main_stats
    collector_where = (
        "the SQLite writer thread (the collector's units, driven synchronously)"
        if writer_stats is not None
        else "the event-loop thread (the collector's units and asyncpg)"
    )
    lines = [
        f"tether garbage-collector cascade profile, {datetime.date.today().isoformat()}",
        f"target {target}; flat: 1 owner -> {graph.dependents} dependents; {uids} uids",
        "",
        "== cascade wall time vs. store transactions vs. SQL statements (runs without cProfile) ==",
    ]
    if measured and "cascade_s" in measured:
        lines.append(f"measured run (table figure), background: {measured['cascade_s']:.3f} s")
    for policy, entry in timings.items():
        record, timer = entry["record"], entry["timer"]
        lines.append(
            f"{policy:>10}: cascade {record.get('cascade_s', float('nan')):.3f} s, "
            f"{record.get('gc_passes')} collector passes, {record.get('store_batches')} store "
            f"transactions taking {record.get('store_batch_s', float('nan')):.3f} s, SQL "
            f"statements {timer.total_s():.3f} s"
        )
    for policy, entry in timings.items():
        lines += ["", f"== SQL statements by total time, flat {policy} (top 15) =="]
        lines += entry["timer"].lines(15)
    lines += [
        "",
        f"== cProfile, flat background: cascade {profiled.get('cascade_s', float('nan')):.3f} s "
        "under the profiler (not a figure) ==",
        "",
        f"-- {collector_where}: top {PROFILE_TOP} by cumulative time --",
        *top_functions(collector_stats, "cumulative", PROFILE_TOP),
        "",
        f"-- {collector_where}: top {PROFILE_TOP} by own time --",
        *top_functions(collector_stats, "tottime", PROFILE_TOP),
    ]
    if writer_stats is not None:
        lines += [
            "",
            f"-- the event-loop thread (gRPC, runner, committer): top {PROFILE_TOP} by "
            "cumulative time --",
            *top_functions(main_stats, "cumulative", PROFILE_TOP),
        ]
    lines += [
        "",
        f"-- both threads combined: top {PROFILE_TOP} by cumulative time --",
        *top_functions(combined, "cumulative", PROFILE_TOP),
        "",
        f"raw data (both threads): {raw_path} (python -m pstats)",
    ]
    text_path.write_text("\n".join(lines) + "\n")
    background = timings.get("background")
    return {
        "file": text_path,
        "raw": raw_path,
        "where": collector_where,
        "top": top_functions(collector_stats, "cumulative", PRINT_TOP),
        "own": top_functions(collector_stats, "tottime", PRINT_TOP),
        "statements": background["timer"].lines(PRINT_TOP, 110) if background else [],
    }


# --- the report ------------------------------------------------------------------------------


def print_summary(bench: Bench, scenarios: Sequence[str], policies: Sequence[str]) -> None:
    host = bench.host
    print()
    print(
        f"tether garbage-collector cascades, {datetime.date.today().isoformat()}, "
        f"{host.get('cpu_model')}, {host.get('python')}, grpcio {host.get('grpcio')}"
        + ("" if bench.args.uids == "server" else f", {bench.args.uids} uids")
    )
    dirty = " + uncommitted server/ changes" if host.get("server_dirty") else ""
    print(f"commit {host.get('commit')}{dirty}")
    for target in ALL_TARGETS:
        reason = bench.unavailable.get(target)
        if reason and reason != "not selected":
            print(f"{target.replace('tether-', 'tether ')}: unavailable ({reason})")
    for (kind, calls), record in sorted(bench.refs.items()):
        if "elapsed_s" in record:
            print(
                f"reference {kind}: {fmt(calls)} x {record['call']}, {WORKERS} workers "
                f"({REF_PROCS} processes): {record['elapsed_s']:.3f} s "
                f"({fmt(record['calls_per_s'])}/s)"
            )
    header = [
        "scenario",
        "policy",
        "touched",
        "t-sqlite s",
        "t-pg s",
        "etcd s",
        "noop s",
        "sqlite/etcd",
        "pg/etcd",
        "sqlite/noop",
        "pg/noop",
    ]
    rows: list[list[str]] = []
    for scenario in scenarios:
        graph = bench.graphs.get(scenario)
        if graph is None:
            continue
        for policy in policies:
            touched = graph.touched(policy)
            values: dict[str, Any] = {}
            for target in TETHER_TARGETS:
                run = bench.runs.get((scenario, policy, target))
                if target in bench.unavailable:
                    values[target] = "n/a"
                elif run is None:
                    values[target] = None
                elif "error" in run:
                    values[target] = "ERR"
                else:
                    values[target] = run.get("cascade_s")
            for kind in ("etcd", "noop"):
                ref = bench.refs.get((kind, touched))
                if kind in bench.unavailable:
                    values[kind] = "n/a"
                elif ref is None:
                    values[kind] = None
                else:
                    values[kind] = "ERR" if "error" in ref else ref.get("elapsed_s")
            noisy = {
                t: bool(_noisy("", bench.runs.get((scenario, policy, t)) or {}))
                for t in TETHER_TARGETS
            }
            noisy.update(
                {k: bool(_noisy("", bench.refs.get((k, touched)) or {})) for k in ("etcd", "noop")}
            )
            rows.append(
                [f"{scenario} {graph.shape}", policy, fmt(touched)]
                + [
                    fmt(values[t]) + ("*" if noisy[t] else "")
                    for t in (*TETHER_TARGETS, "etcd", "noop")
                ]
                + [ratio(values[t], values[r]) for r in ("etcd", "noop") for t in TETHER_TARGETS]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print(
            "  ".join(
                c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(row)
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "ratios: tether's cascade time / the reference's time for one call per touched object "
        "(below 1: tether is faster); *: noisy, other processes used more than "
        f"{NOISE_CORES} cores meanwhile (see checks)"
    )
    print_aims(bench)
    problems = checks(bench)
    keys = ("server_tree", "server_dirty")
    start = {k: host.get(k) for k in keys}
    end = {k: bench.source_at_end.get(k) for k in keys}
    if bench.source_at_end and (end != start or start["server_dirty"] or end["server_dirty"]):
        problems.append(
            f"SOURCE   server/ was not one committed tree throughout (start {start}, end "
            f"{end}): the server modules were imported when the first cascade ran, so the "
            "figures may belong to neither"
        )
    if problems:
        print("checks:")
        for problem in problems:
            print(f"  {problem}")
    for target, profile in bench.profiles.items():
        print()
        print(f"profile {target}, flat background ({profile['where']}); full: {profile['file']}")
        print(f"top {PRINT_TOP} by cumulative time:")
        for line in profile["top"]:
            print(f"  {line}")
        print(f"top {PRINT_TOP} by own time:")
        for line in profile["own"]:
            print(f"  {line}")
        if profile["statements"]:
            print(f"SQL statements by total time (run without cProfile), top {PRINT_TOP}:")
            for line in profile["statements"]:
                print(f"  {line}")


def print_aims(bench: Bench) -> None:
    judged = bench.dependents == AIM_DEPENDENTS
    print(
        f"aim (issue): {fmt(AIM_DEPENDENTS)} dependents converge on SQLite in < 5 s "
        "(background), < 10 s (foreground)"
        + ("" if judged else f"; this run has {fmt(bench.dependents)}: not judged")
    )
    for (scenario, policy), aim in AIMS.items():
        record = bench.runs.get((scenario, policy, "tether-sqlite"))
        if record is None or "cascade_s" not in record:
            continue
        got = record["cascade_s"]
        if not judged:
            verdict = f"{got:.3f} s (aim {aim:.0f} s at {fmt(AIM_DEPENDENTS)})"
        elif got <= aim:
            verdict = f"{got:.2f} s: MET, {aim - got:.2f} s to spare ({got / aim:.2f} of the aim)"
        else:
            verdict = f"{got:.2f} s: MISSED by {got - aim:.2f} s ({got / aim:.2f}x the aim)"
        print(f"  {scenario} {policy}, sqlite: {verdict}")


def checks(bench: Bench) -> list[str]:
    out = []
    for (scenario, policy, target), record in bench.runs.items():
        if "error" in record:
            out.append(f"FAILED   {scenario} / {policy} / {target}: {record['error']}")
            continue
        for problem in record.get("problems", []):
            out.append(f"WRONG    {scenario} / {policy} / {target}: {problem}")
        if record.get("gc_failures"):
            out.append(
                f"RETRIED  {scenario} / {policy} / {target}: {record['gc_failures']} failed "
                "collector batches"
            )
        out.extend(_noisy(f"{scenario} / {policy} / {target}", record))
    for (kind, calls), record in bench.refs.items():
        if "error" in record:
            out.append(f"FAILED   reference {kind} ({calls} calls): {record['error']}")
            continue
        if record.get("errors"):
            out.append(f"ERRORS   reference {kind} ({calls} calls): {record['errors']}")
        out.extend(_noisy(f"reference {kind} ({calls} calls)", record))
    return out


def _noisy(what: str, record: Record) -> list[str]:
    cpu = record.get("cpu") or {}
    other = cpu.get("other_cores", 0.0)
    # Shorter windows are all jitter (kernel threads flushing our own writes, exits).
    if other <= NOISE_CORES or cpu.get("window_s", 0.0) < NOISE_MIN_WINDOW_S:
        return []
    return [f"NOISY    {what}: other processes used {other:.2f} cores during the run"]


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.cascade",
        description="garbage-collector cascades next to etcd and a store-less server",
        allow_abbrev=False,
    )
    parser.add_argument("--quick", action="store_true", help="2 000 dependents (smoke test)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (other names are skipped)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated subset of {','.join(POLICIES)}",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"])
    parser.add_argument(
        "--dependents", type=int, help=f"per owner (default {FULL_DEPENDENTS}, quick 2000)"
    )
    parser.add_argument(
        "--profile",
        choices=["sqlite", "postgres", "both", "none"],
        default="sqlite",
        help="profile the flat cascades on this backend (default sqlite)",
    )
    parser.add_argument(
        "--uids",
        choices=["server", "uuid4"],
        default="server",
        help="object uids: the server's own (time-ordered, default), or random uuid4 as "
        "objects created before them have: what the uid order costs a cascade",
    )
    parser.add_argument("--timeout", type=float, help="s per cascade (default 900, quick 120)")
    parser.add_argument("--etcd", help="etcd binary (default: etcd on PATH or /usr/bin/etcd)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        log(f"ignoring options for tests.bench.load: {' '.join(ignored)}")
    args.scenario_list = [s for s in args.scenarios.split(",") if s in SCENARIOS]
    args.policy_list = [p for p in args.policies.split(",") if p]
    args.target_list = [t for t in args.targets.split(",") if t in ALL_TARGETS]
    if args.backend:
        tether = {"sqlite": ["tether-sqlite"], "postgres": ["tether-pg"]}.get(
            args.backend, list(TETHER_TARGETS)
        )
        args.target_list = [t for t in args.target_list if not t.startswith("tether")] + tether
    for name in args.policy_list:
        if name not in POLICIES:
            parser.error(f"unknown policy {name!r}")
    if args.dependents is not None and not 10 <= args.dependents <= 1_000_000:
        parser.error("--dependents must be in [10, 1000000]")
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 900.0
    if not 0 < args.timeout <= 7200:
        parser.error("--timeout must be in (0, 7200]")
    return args


def source_info() -> dict[str, Any]:
    """The commit measured, and whether server/ differs from it (others may be editing)."""

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "server")
    return {
        "commit": git("rev-parse", "--short=12", "HEAD"),
        # The committed server/ tree: commits that touch only tests leave it as it is.
        "server_tree": git("rev-parse", "--short=12", "HEAD:server"),
        "server_dirty": None if status is None else bool(status),
    }


def main(argv: list[str] | None = None) -> int:
    from tests.bench.load import host_info

    args = parse_args(argv)
    if not args.scenario_list:
        log("no cascade scenario selected (flat, tree): nothing to do")
        return 0
    interrupt_on_sigterm()
    dependents = args.dependents or (QUICK_DEPENDENTS if args.quick else FULL_DEPENDENTS)
    pg_url, pg_reason = pg_admin_url()
    host = {**host_info(), **source_info()}
    bench = Bench(args, dependents, etcd_mod.find_etcd(args.etcd), Seeds(pg_url), host)
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
    calls = sorted(
        {bench.graph(s).touched(p) for s in args.scenario_list for p in args.policy_list}
    )
    started = time.monotonic()
    try:
        for kind in ("etcd", "noop"):
            if kind not in bench.unavailable:
                bench.run_references(kind, calls)
        for target in tether:
            for scenario in args.scenario_list:
                for policy in args.policy_list:
                    bench.run_tether(scenario, policy, target)
        for target in profiled:
            bench.run_profile(target, args.policy_list)
    except KeyboardInterrupt:
        log("interrupted; servers and databases were cleaned up")
        return 130
    finally:
        bench.seeds.close()
        log(f"finished in {time.monotonic() - started:.0f} s")
    bench.source_at_end = source_info()
    print_summary(bench, args.scenario_list, args.policy_list)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
