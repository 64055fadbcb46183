"""Lease hot paths of tether side by side with etcd and a store-less server, in one run.

Run from the repository root (``make bench`` does, with ``BENCH_ARGS``)::

    python -m tests.bench.load [--quick] [--scenarios grant,scale] [--targets etcd,tether-pg]
                               [--duration S] [--scale-duration S] [--out results.jsonl]

Every scenario runs against each target in turn, each target started fresh for it on
127.0.0.1 and removed afterwards:

- ``etcd``: single-node etcd 3.4 (Debian's etcd-server; ``make bench-setup``). Without the
  binary or its generated stubs the run goes on and reports "etcd: unavailable".
- ``noop``: ``tests.bench.noop_server``, tether's LeaseService answered from memory: the
  ceiling for a Python gRPC server on this machine.
- ``tether-sqlite``: ``tether serve`` on a SQLite file in a temporary directory.
- ``tether-pg``: ``tether serve`` on a fresh PostgreSQL database ``tether_bench_<hex>`` (admin
  URL from ``TETHER_BENCH_POSTGRES_URL`` / ``TETHER_TEST_POSTGRES_URL``, else the local
  ``postgresql://postgres@127.0.0.1:5432/postgres`` when it answers), dropped afterwards.

Scenarios (one load generator for all targets; worker processes so the Python client is
not the limit; the server's CPU per operation from /proc, since client and server share
the machine's cores):

- ``grant``: 64 callers (2 processes) granting back to back: etcd ``LeaseGrant``, tether
  ``Acquire`` on fresh keys. grants/s, p50/p99 latency, server CPU µs per grant.
- ``keepalive_single``: 1000 leases over 10 streams, one renewal per message, 32 messages
  in flight per stream. Renewals acknowledged per second, round trip, CPU per renewal.
- ``keepalive_batched``: the same leases, each message renewing all 100 leases of its stream
  (the client's batching; etcd, which renews one lease per message, gets the 100 ids as a
  burst of messages). Per-lease renewals acknowledged per second.
- ``expiry_small`` / ``expiry_large``: 500 / 10 000 leases whose deadlines fall within one
  second, never renewed: delay from each deadline to its expiry report (tether: ``Watch``
  EXPIRED event; etcd: DELETE event of a key attached to the lease) p50/p99/max.
- ``replicas``: two tether servers sharing one PostgreSQL database: grants/s with every
  caller on one of them, then with the callers split over both.
- ``scale``: 100 000 leases (ttl 20 s) held by 10 client processes through
  ``TetherClient.hold()`` (etcd: the same renewal rule over its keep-alive stream) for
  ``--scale-duration`` seconds: leases lost (must be 0), renewals/s, renewal
  acknowledgement p99, server RSS, CPU per renewal.
- ``client_loss`` (tether only): a held lease, then the server is SIGKILLed: how long before
  the server's deadline the client declared the loss.
- ``saga`` / ``saga_failing`` (tether and noop; :mod:`tests.bench.saga`): 16 workers running
  five-step sagas end to end through ``client.run_saga`` (one compensation registered per
  step); ``saga_failing`` fails every 10th saga at step 4 and compensates it. sagas/s,
  RPCs per saga, claim latency p50/p99. noop: 16 callers of unary ``Acquire``, the RPC/s
  reference for "saga RPC/s ÷ noop RPC/s".

Output: one JSON line per scenario and target on stdout (also appended to ``--out``), then
a table with the ratios tether/etcd and tether/noop. Progress goes to stderr. Every run is
bounded in time and count, and servers, temporary files and databases are removed even
when a run fails or the benchmark is interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.bench import etcd as etcd_mod
from tests.bench.report import Record, interrupt_on_sigterm, shape, table
from tests.bench.runner import run_workers
from tests.bench.targets import Running, etcd_target, noop_target, pg_admin_url, tether_target

ALL_TARGETS = ("etcd", "noop", "tether-sqlite", "tether-pg")
ALL_SCENARIOS = (
    "grant",
    "keepalive_single",
    "keepalive_batched",
    "expiry_small",
    "expiry_large",
    "replicas",
    "scale",
    "client_loss",
    "saga",
    "saga_failing",
)
SAGA_TARGETS = ("noop", "tether-sqlite", "tether-pg")
# Cores used by processes outside the benchmark above which a run is flagged as noisy.
NOISE_CORES = 0.25
BASE: dict[str, Any] = {
    "channels": 1,
    "rpc_timeout": 10.0,
    "setup_timeout": 120.0,
    "drain_timeout": 5.0,
    "max_ops": 5_000_000,
}


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


@dataclass
class Spec:
    name: str
    kind: str
    title: str
    cfg: dict[str, Any]
    targets: tuple[str, ...] = ALL_TARGETS


def build_specs(args: argparse.Namespace) -> list[Spec]:
    quick = args.quick
    duration = args.duration if args.duration is not None else (1.0 if quick else 10.0)
    warmup = 0.3 if quick else 1.0
    throughput = {"duration": duration, "warmup": warmup, "procs": 2}
    grant = {**throughput, "concurrency": 64, "ttl": 600}
    keepalive = {
        **throughput,
        "leases": 400 if quick else 1000,
        "streams": 10,
        "ttl": 600,
    }
    expiry = {
        "procs": 1,
        "min_ttl": 2,
        "lead_s": 1.0 if quick else 1.5,
        "setup_rate_factor": 0.6,
        "expiry_timeout": 10.0 if quick else 30.0,
        "setup_timeout": 300.0,
    }
    scale_leases = args.scale_leases or (400 if quick else 100_000)
    scale = {
        "procs": args.scale_procs or (2 if quick else 10),
        "leases": scale_leases,
        "ttl": args.scale_ttl or (3 if quick else 20),
        "duration": args.scale_duration or (4.0 if quick else 120.0),
        "setup_concurrency": 16,
        "setup_timeout": 60.0 if quick else args.scale_setup_timeout,
        "renew_fraction": 1 / 3,
        "margin_fraction": 0.1,
        "coalesce_fraction": 0.1,
        # etcd's keeper: clientv3's loop (every 0.5 s, whatever is due, nothing early).
        "etcd_tick": 0.5,
        "etcd_coalesce_fraction": 0.0,
    }
    # Sagas: 16 workers (2 processes) through client.run_saga; noop: 16 unary callers.
    saga = {**throughput, "concurrency": 16, "fail_every": 0}
    small = 100 if quick else 500
    large = 500 if quick else 10_000
    k_ka = keepalive["leases"] // keepalive["streams"]
    return [
        Spec("grant", "grant", "grant (64 callers)", grant),
        Spec(
            "keepalive_single",
            "keepalive",
            f"keep-alive, 1 lease/msg ({keepalive['streams']}x{k_ka}, window 32)",
            {**keepalive, "batch": 1, "window": 32},
        ),
        Spec(
            "keepalive_batched",
            "keepalive",
            f"keep-alive, batched ({k_ka} leases/msg)",
            {**keepalive, "batch": 0, "window": 1},
        ),
        Spec(
            "expiry_small", "expiry", f"expiry, {small} leases in 1 s", {**expiry, "leases": small}
        ),
        Spec(
            "expiry_large", "expiry", f"expiry, {large} leases in 1 s", {**expiry, "leases": large}
        ),
        Spec("replicas", "grant", "2 pg replicas, grants", grant, ("tether-pg",)),
        Spec(
            "scale",
            "scale",
            f"scale: {scale['leases']} held, ttl {scale['ttl']} s",
            scale,
        ),
        Spec("client_loss", "client_loss", "client loss lead", {}, ("tether-sqlite", "tether-pg")),
        Spec("saga", "saga", "sagas, 5 steps (16 workers)", saga, SAGA_TARGETS),
        Spec(
            "saga_failing",
            "saga",
            "sagas, 10% fail at step 4",
            {**saga, "fail_every": 10},
            SAGA_TARGETS,
        ),
    ]


def run_config(spec: Spec, running: Running, targets: list[str]) -> dict[str, Any]:
    cfg = {**BASE, **spec.cfg}
    cfg.update(
        scenario=spec.name, kind=spec.kind, api=running.api, targets=targets, target=running.name
    )
    if spec.kind == "expiry":
        cfg["measure_timeout"] = cfg["setup_timeout"] + cfg["lead_s"] + 1 + cfg["expiry_timeout"]
    else:
        cfg["measure_timeout"] = cfg["duration"] + 30
    cfg["hard_limit_s"] = cfg["setup_timeout"] + cfg["measure_timeout"] + 120
    return cfg


@dataclass
class Bench:
    args: argparse.Namespace
    etcd_binary: str | None
    pg_url: str | None
    unavailable: dict[str, str] = field(default_factory=dict)
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    grant_rates: dict[str, float] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    failures: int = 0

    @contextlib.contextmanager
    def start(self, target: str, replicas: int = 1) -> Iterator[Running]:
        if target == "etcd":
            assert self.etcd_binary is not None
            with etcd_target(self.etcd_binary) as running:
                yield running
        elif target == "noop":
            with noop_target() as running:
                yield running
        else:
            backend = "sqlite" if target == "tether-sqlite" else "postgres"
            with tether_target(backend, self.pg_url, replicas) as running:
                yield running

    def emit(self, spec: Spec, target: str, running: Running | None, record: Record) -> None:
        line: Record = {
            "scenario": spec.name,
            "target": target,
            "ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **record,
        }
        params = {k: v for k, v in spec.cfg.items()}
        line["params"] = params
        if running is not None and running.info:
            line["server"] = running.info
        line["host"] = self.host
        self.records[(spec.name, target)] = line
        text = json.dumps(line, default=str)
        print(text, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as out:
                out.write(text + "\n")
        if "error" in record:
            self.failures += 1
            log(f"{spec.name} / {target}: FAILED: {record['error']}")
            if record.get("trace"):
                log(record["trace"])

    def run(self, spec: Spec, target: str) -> None:
        log(f"{spec.name} / {target}: starting")
        running: Running | None = None
        try:
            if spec.name == "replicas":
                with self.start(target, replicas=2) as running:
                    record = self.run_replicas(spec, running)
            elif spec.kind == "client_loss":
                with self.start(target) as running:
                    record = asyncio.run(client_loss(running))
            else:
                with self.start(target) as running:
                    cfg = run_config(spec, running, running.targets)
                    if spec.kind == "expiry":
                        cfg["grant_rate"] = self.grant_rates.get(target)
                    raw = run_workers(cfg, running.server_pids, running.store)
                    record = shape(spec.kind, raw)
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}"}
        if spec.name == "grant" and record.get("grants_per_s"):
            self.grant_rates[target] = record["grants_per_s"]
        self.emit(spec, target, running, record)
        log(f"{spec.name} / {target}: done")

    def run_replicas(self, spec: Spec, running: Running) -> Record:
        record: Record = {}
        for name, targets in (("one", running.targets[:1]), ("both", running.targets)):
            cfg = run_config(spec, running, targets)
            record[name] = shape("grant", run_workers(cfg, running.server_pids, running.store))
            if "error" in record[name]:
                return {"error": f"{name}: {record[name]['error']}", **record}
        one, both = record["one"]["grants_per_s"], record["both"]["grants_per_s"]
        record["both_over_one"] = round(both / one, 3) if one else None
        return record


async def client_loss(running: Running) -> Record:
    """SIGKILL the server under a held lease; the client must let go before the deadline."""
    from tether_client import LeaseLost, TetherClient

    server = running.processes[0]
    client = TetherClient(running.targets[0])
    ttl = 2.0
    lost: float | None = None
    async with asyncio.timeout(30), client:
        try:
            async with client.hold("bench/loss", ttl=ttl) as lease:
                await asyncio.sleep(1.0)  # a renewal or two go through first
                server.kill()
                killed = time.time()
                await asyncio.wait_for(lease.wait_lost(), 10)
                lost = time.time()
                deadline = lease.expires_at.timestamp()
        except LeaseLost:
            # The block of a lease lost under it ends with LeaseLost: the loss measured.
            if lost is None:
                raise
    assert lost is not None
    return {
        "ttl_s": ttl,
        "lost_after_kill_ms": round((lost - killed) * 1000, 1),
        "lead_before_server_deadline_ms": round((deadline - lost) * 1000, 1),
    }


def host_info() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import grpc

    return {
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


def checks(records: dict[tuple[str, str], Record]) -> list[str]:
    """Outcomes that are wrong whatever the speed."""
    out = []
    for (scenario, target), record in records.items():
        if "error" in record:
            out.append(f"FAILED   {scenario} / {target}: {record['error']}")
            continue
        if scenario == "scale" and record.get("leases_lost"):
            out.append(
                f"LOST     {scenario} / {target}: {record['leases_lost']} leases lost "
                f"(setup {record['lost_in_setup']}, window {record['lost_in_window']}); must be 0"
            )
        if scenario == "scale" and record.get("held") != record.get("params", {}).get("leases"):
            out.append(f"PARTIAL  {scenario} / {target}: only {record.get('held')} leases held")
        if scenario.startswith("expiry") and record.get("missing"):
            out.append(f"MISSING  {scenario} / {target}: {record['missing']} expiries not reported")
        if scenario.startswith("expiry") and record.get("outside_window"):
            out.append(
                f"SPREAD   {scenario} / {target}: {record['outside_window']} deadlines outside "
                f"the 1 s window (setup slower than estimated)"
            )
        if scenario.startswith("saga") and record.get("other_end"):
            out.append(
                f"STATE    {scenario} / {target}: {record['other_end']} sagas ended neither "
                f"COMPLETED nor COMPENSATED"
            )
        if record.get("errors"):
            out.append(f"ERRORS   {scenario} / {target}: {record['errors']}")
        other = max(
            (
                r.get("cpu", {}).get("other_cores", 0.0)
                for r in (record, *record.values())
                if isinstance(r, dict)
            ),
            default=0.0,
        )
        if other > NOISE_CORES:
            out.append(
                f"NOISY    {scenario} / {target}: other processes used {other:.2f} cores "
                f"during the window"
            )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.load",
        description="tether lease hot paths side by side with etcd and a store-less server",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorten every scenario (smoke test, < 2 min)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        help="tether targets only (older form of --targets; etcd and noop still run)",
    )
    parser.add_argument(
        "--duration", type=float, help="s per throughput window (default 10, quick 1)"
    )
    parser.add_argument(
        "--scale-duration", type=float, help="s of the scale run's window (default 120)"
    )
    parser.add_argument("--scale-leases", type=int, help="leases held in the scale run (100000)")
    parser.add_argument("--scale-procs", type=int, help="client processes in the scale run (10)")
    parser.add_argument("--scale-ttl", type=int, help="lease ttl in the scale run, s (20)")
    parser.add_argument(
        "--scale-setup-timeout",
        type=float,
        default=900.0,
        help="bound on acquiring the scale run's leases, s (default 900); past it the run "
        "goes on with the leases it holds and reports PARTIAL",
    )
    parser.add_argument("--etcd", help="etcd binary (default: etcd on PATH or /usr/bin/etcd)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.scenario_list = [s for s in args.scenarios.split(",") if s]
    args.target_list = [t for t in args.targets.split(",") if t]
    if args.backend:
        tether = {"sqlite": ["tether-sqlite"], "postgres": ["tether-pg"]}.get(
            args.backend, ["tether-sqlite", "tether-pg"]
        )
        args.target_list = [t for t in args.target_list if not t.startswith("tether")] + tether
    for name in args.scenario_list:
        if name not in ALL_SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    for name in args.target_list:
        if name not in ALL_TARGETS:
            parser.error(f"unknown target {name!r}")
    bounded: dict[str, tuple[float | None, float]] = {
        "duration": (args.duration, 600),
        "scale-duration": (args.scale_duration, 3600),
        "scale-setup-timeout": (args.scale_setup_timeout, 3600),
    }
    for option, (value, limit) in bounded.items():
        if value is not None and not 0 < value <= limit:
            parser.error(f"--{option} must be in (0, {limit}]")
    if args.scale_leases is not None and not 0 < args.scale_leases <= 1_000_000:
        parser.error("--scale-leases must be in (0, 1000000]")
    if args.scale_procs is not None and not 0 < args.scale_procs <= 32:
        parser.error("--scale-procs must be in (0, 32]")
    if args.scale_ttl is not None and not 2 <= args.scale_ttl <= 3600:
        parser.error("--scale-ttl must be in [2, 3600]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    etcd_binary = etcd_mod.find_etcd(args.etcd)
    pg_url, pg_reason = pg_admin_url()
    bench = Bench(args, etcd_binary, pg_url, host=host_info())
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
    specs = [s for s in build_specs(args) if s.name in args.scenario_list]
    started = time.monotonic()
    try:
        for spec in specs:
            for target in spec.targets:
                if target in bench.unavailable:
                    continue
                bench.run(spec, target)
    except KeyboardInterrupt:
        log("interrupted; servers and databases were cleaned up")
        return 130
    finally:
        log(f"finished in {time.monotonic() - started:.0f} s")
    print_summary(bench, specs)
    return 1 if bench.failures else 0


def print_summary(bench: Bench, specs: list[Spec]) -> None:
    titles = {s.name: s.title for s in specs}
    today = datetime.date.today().isoformat()
    print()
    print(
        f"tether lease benchmark, {today}, {bench.host.get('cpu_model')}, "
        f"{bench.host.get('python')}, grpcio {bench.host.get('grpcio')}"
    )
    for target in ALL_TARGETS:
        reason = bench.unavailable.get(target)
        if reason and reason != "not selected":
            print(f"{target.replace('tether-', 'tether ')}: unavailable ({reason})")
    print(table(bench.records, titles, bench.unavailable, [s.name for s in specs]))
    loss = [
        f"{t}: lost {r.get('lost_after_kill_ms')} ms after the kill, "
        f"{r.get('lead_before_server_deadline_ms')} ms before the server's deadline"
        for (s, t), r in bench.records.items()
        if s == "client_loss" and "error" not in r
    ]
    if loss:
        print("client loss lead (ttl 2 s): " + "; ".join(loss))
    problems = checks(bench.records)
    if problems:
        print("checks:")
        for problem in problems:
            print(f"  {problem}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
