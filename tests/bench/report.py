"""Figures out of merged worker reports, JSON records, and the side-by-side table."""

from __future__ import annotations

import datetime
import json
import math
import signal
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.bench.procstat import per_op_us
from tests.bench.runner import max_field, min_field, sum_field

Record = dict[str, Any]


def emit_record(line: Record, host: Record, out: str | None, log: Callable[[str], None]) -> bool:
    """Print one result as a JSON line (and append it to ``out``), stamped with the time and
    the host; log its error if it has one. True when it records an error."""
    line = {
        "ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **line,
        "host": host,
    }
    text = json.dumps(line, default=str)
    print(text, flush=True)
    if out:
        with open(out, "a") as sink:
            sink.write(text + "\n")
    if "error" not in line:
        return False
    log(f"FAILED: {line['error']}")
    if line.get("trace"):
        log(line["trace"])
    return True


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does (its cleanup runs: seeds, servers)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def ms_summary(seconds: Sequence[float]) -> dict[str, float | int | None]:
    if not seconds:
        return {"n": 0}

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 2)

    return {
        "n": len(seconds),
        "p50": ms(percentile(seconds, 0.50)),
        "p99": ms(percentile(seconds, 0.99)),
        "max": ms(max(seconds)),
        "min": ms(min(seconds)),
    }


def _cpu(record: Record, run: dict[str, Any], ops: int) -> None:
    cpu = run.get("cpu") or {}
    record["cpu"] = cpu
    costs = per_op_us(cpu, ops)
    record.update(costs)
    if "server_us_per_op" in costs:
        # What the service spends per operation, its database processes included.
        record["service_us_per_op"] = round(
            costs["server_us_per_op"] + costs.get("store_us_per_op", 0.0), 1
        )


def shape(kind: str, run: dict[str, Any]) -> Record:
    """The JSON figures of one run (``run`` as returned by ``run_workers``)."""
    if "error" in run:
        return {"error": run["error"], "trace": run.get("trace"), "wall_s": run.get("wall_s")}
    elapsed = run["elapsed_s"] or 1e-9
    ok = run["ok"]
    lat = list(run["lat"])
    record: Record = {"elapsed_s": round(elapsed, 3), "errors": run["errors"]}
    if kind == "grant":
        record["grants"] = ok
        record["grants_per_s"] = round(ok / elapsed, 1)
        record["latency_ms"] = ms_summary(lat)
        _cpu(record, run, ok)
    elif kind == "keepalive":
        record["renewals_acked"] = ok
        record["renewals_refused"] = sum_field(run, "refused")
        record["renewals_per_s"] = round(ok / elapsed, 1)
        record["round_trips_per_s"] = round(len(lat) / elapsed, 1)
        record["round_trip_ms"] = ms_summary(lat)
        record["setup_s"] = max_field(run, "setup_s")
        _cpu(record, run, ok)
    elif kind == "expiry":
        record["leases"] = sum_field(run, "leases")
        record["detected"] = ok
        record["missing"] = sum_field(run, "missing")
        record["delay_ms"] = ms_summary(lat)
        record["early"] = sum(1 for x in lat if x < 0)
        first, last = min_field(run, "deadline_first"), max_field(run, "deadline_last")
        record["deadline_spread_s"] = round(last - first, 3) if first and last else None
        record["outside_window"] = sum_field(run, "outside_window")
        record["setup_s"] = max_field(run, "setup_s")
        record["grant_rate_used"] = min_field(run, "grant_rate_used")
        record["cpu"] = run.get("cpu") or {}
    elif kind == "scale":
        lost_setup = sum_field(run, "lost_in_setup")
        lost_window = sum_field(run, "lost_in_window")
        record["held"] = sum_field(run, "held")
        record["leases_lost"] = lost_setup + lost_window
        record["lost_in_setup"] = lost_setup
        record["lost_in_window"] = lost_window
        record["renewals_acked"] = ok
        record["renewals_per_s"] = round(ok / elapsed, 1)
        record["ack_ms"] = ms_summary(lat)
        record["min_slack_s"] = min_field(run, "min_slack_s")
        record["setup_s"] = max_field(run, "setup_s")
        setup_lat = array("d")
        for worker in run.get("workers", []):
            setup_lat.frombytes(worker.pop("setup_lat", b""))
        record["setup_ack_ms"] = ms_summary(list(setup_lat))
        # The worker that lost a lease first: when, and how many leases its client held.
        losers = [w for w in run.get("workers", []) if w.get("first_loss_s") is not None]
        first = min(losers, key=lambda w: w["first_loss_s"]) if losers else {}
        record["first_loss_s"] = first.get("first_loss_s")
        record["worker_held_at_first_loss"] = first.get("worker_held_at_first_loss")
        record["setup_cpu"] = run.get("setup_cpu")
        record["streams_opened"] = sum_field(run, "streams_opened")
        record["streams_broken"] = sum_field(run, "streams_broken")
        record["requests_sent"] = sum_field(run, "requests_sent")
        record["unary_renewals"] = sum_field(run, "unary_renewals")
        _cpu(record, run, ok)
    elif kind == "saga":
        _saga(record, run, ok, elapsed, lat)
    for key in ("rss_at_start_mb", "rss_max_mb", "rss_end_mb", "wall_s"):
        if key in run:
            record[key] = run[key]
    return record


def _saga(record: Record, run: dict[str, Any], ok: int, elapsed: float, lat: list[float]) -> None:
    """Saga runs (tether) or the noop server's unary calls at the same concurrency."""
    rpcs = sum_field(run, "rpcs")
    record["rpcs"] = rpcs
    record["rpcs_per_s"] = round(rpcs / elapsed, 1)
    if any(w.get("noop") for w in run.get("workers", [])):
        record["latency_ms"] = ms_summary(lat)
        _cpu(record, run, rpcs)
        # Per RPC only: a noop "operation" is one RPC, not a saga.
        record["service_us_per_rpc"] = record.pop("service_us_per_op", None)
        return
    claim_lat = array("d")
    for worker in run.get("workers", []):
        claim_lat.frombytes(worker.pop("claim_lat", b""))
    record["sagas"] = ok
    record["sagas_per_s"] = round(ok / elapsed, 1)
    record["completed"] = sum_field(run, "completed")
    record["compensated"] = sum_field(run, "compensated")
    record["other_end"] = sum_field(run, "other_end")
    record["rpcs_per_saga"] = round(sum_field(run, "saga_rpcs") / ok, 2) if ok else None
    record["keepalive_msgs"] = sum_field(run, "keepalive_msgs")
    record["claim_ms"] = ms_summary(list(claim_lat))
    record["saga_ms"] = ms_summary(lat)
    _cpu(record, run, ok)
    per_rpc = per_op_us(run.get("cpu") or {}, rpcs)
    if "server_us_per_op" in per_rpc:
        record["service_us_per_rpc"] = round(
            per_rpc["server_us_per_op"] + per_rpc.get("store_us_per_op", 0.0), 1
        )


# --- the table --------------------------------------------------------------------------


def _get(record: Record | None, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True)
class Metric:
    scenario: str
    label: str
    better: str  # "high" or "low"
    path: str
    # Where the etcd / noop reference figures come from, when not the same scenario.
    ref_scenario: str | None = None
    ref_path: str | None = None


METRICS: list[Metric] = [
    Metric("grant", "grants/s", "high", "grants_per_s"),
    Metric("grant", "cpu us/grant", "low", "service_us_per_op"),
    Metric("grant", "latency p50 ms", "low", "latency_ms.p50"),
    Metric("grant", "latency p99 ms", "low", "latency_ms.p99"),
    Metric("keepalive_single", "renewals/s", "high", "renewals_per_s"),
    Metric("keepalive_single", "cpu us/renewal", "low", "service_us_per_op"),
    Metric("keepalive_single", "round trip p99 ms", "low", "round_trip_ms.p99"),
    Metric("keepalive_batched", "renewals/s", "high", "renewals_per_s"),
    Metric("keepalive_batched", "cpu us/renewal", "low", "service_us_per_op"),
    Metric("keepalive_batched", "batch round trip p99 ms", "low", "round_trip_ms.p99"),
    Metric("expiry_small", "delay p50 ms", "low", "delay_ms.p50"),
    Metric("expiry_small", "delay p99 ms", "low", "delay_ms.p99"),
    Metric("expiry_small", "delay max ms", "low", "delay_ms.max"),
    Metric("expiry_small", "not reported", "low", "missing"),
    Metric("expiry_large", "delay p50 ms", "low", "delay_ms.p50"),
    Metric("expiry_large", "delay p99 ms", "low", "delay_ms.p99"),
    Metric("expiry_large", "delay max ms", "low", "delay_ms.max"),
    Metric("expiry_large", "not reported", "low", "missing"),
    Metric(
        "replicas", "grants/s, 1 of 2 replicas", "high", "one.grants_per_s", "grant", "grants_per_s"
    ),
    Metric(
        "replicas", "grants/s, both replicas", "high", "both.grants_per_s", "grant", "grants_per_s"
    ),
    Metric("replicas", "both / one", "high", "both_over_one"),
    Metric("scale", "leases lost", "low", "leases_lost"),
    Metric("scale", "setup s (acquire all)", "low", "setup_s"),
    Metric("scale", "renewals/s", "high", "renewals_per_s"),
    Metric("scale", "ack p99 ms", "low", "ack_ms.p99"),
    Metric("scale", "server RSS max MB", "low", "rss_max_mb"),
    Metric("scale", "cpu us/renewal", "low", "service_us_per_op"),
    # Sagas: etcd has none; the noop column is its unary RPC rate at the same concurrency.
    Metric("saga", "sagas/s", "high", "sagas_per_s"),
    Metric("saga", "RPCs per saga", "low", "rpcs_per_saga"),
    Metric("saga", "RPC/s (noop: unary RPC/s)", "high", "rpcs_per_s"),
    Metric("saga", "cpu us/RPC", "low", "service_us_per_rpc"),
    Metric("saga", "cpu us/saga", "low", "service_us_per_op"),
    Metric("saga", "claim p50 ms", "low", "claim_ms.p50"),
    Metric("saga", "claim p99 ms", "low", "claim_ms.p99"),
    Metric("saga", "saga p50 ms", "low", "saga_ms.p50"),
    Metric("saga", "saga p99 ms", "low", "saga_ms.p99"),
    Metric("saga_failing", "sagas/s", "high", "sagas_per_s"),
    Metric("saga_failing", "of which compensated", "-", "compensated"),
    Metric("saga_failing", "RPCs per saga", "low", "rpcs_per_saga"),
    Metric("saga_failing", "RPC/s (noop: unary RPC/s)", "high", "rpcs_per_s"),
    Metric("saga_failing", "cpu us/RPC", "low", "service_us_per_rpc"),
    Metric("saga_failing", "claim p50 ms", "low", "claim_ms.p50"),
    Metric("saga_failing", "claim p99 ms", "low", "claim_ms.p99"),
    Metric("saga_failing", "saga p50 ms", "low", "saga_ms.p50"),
    Metric("saga_failing", "saga p99 ms", "low", "saga_ms.p99"),
]

TETHER = ("tether-sqlite", "tether-pg")
REFS = ("etcd", "noop")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}".replace(",", " ")
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    return str(value)


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return "-"
    value = a / b
    if abs(value) >= 100:
        return f"{value:.0f}x"
    if abs(value) >= 10:
        return f"{value:.1f}x"
    if abs(value) >= 0.1 or value == 0:
        return f"{value:.2f}x"
    return f"{value:.2g}x"


def table(
    records: dict[tuple[str, str], Record],
    titles: dict[str, str],
    unavailable: dict[str, str],
    scenarios: Sequence[str],
) -> str:
    """Rows of metrics; columns etcd, noop, tether-sqlite, tether-pg, then the ratios."""

    def cell(scenario: str, target: str, path: str) -> Any:
        if target in unavailable:
            return "n/a"
        record = records.get((scenario, target))
        if record is None:
            return None
        if "error" in record:
            return "ERR"
        return _get(record, path)

    header = [
        "scenario",
        "metric",
        "better",
        "etcd",
        "noop",
        "t-sqlite",
        "t-pg",
        "sqlite/etcd",
        "pg/etcd",
        "sqlite/noop",
        "pg/noop",
    ]
    rows: list[list[str]] = []
    for metric in METRICS:
        if metric.scenario not in scenarios:
            continue
        values: dict[str, Any] = {}
        for target in REFS:
            if metric.ref_scenario is not None:
                values[target] = cell(metric.ref_scenario, target, metric.ref_path or "")
            else:
                values[target] = cell(metric.scenario, target, metric.path)
        for target in TETHER:
            values[target] = cell(metric.scenario, target, metric.path)
        if metric.scenario == "replicas":
            values["tether-sqlite"] = None  # replicas share a PostgreSQL database
        ratios = [ratio(values[t], values[r]) for r in REFS for t in TETHER]
        rows.append(
            [titles.get(metric.scenario, metric.scenario), metric.label, metric.better]
            + [fmt(values[t]) for t in (*REFS, *TETHER)]
            + ratios
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    previous = None
    for i, row in enumerate([header, *rows]):
        shown = list(row)
        if i > 0 and row[0] == previous:
            shown[0] = ""
        previous = row[0]
        lines.append(
            "  ".join(
                c.ljust(widths[j]) if j < 3 else c.rjust(widths[j]) for j, c in enumerate(shown)
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
