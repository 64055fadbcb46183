"""Runs one scenario in load-generator worker processes and merges what they report.

Workers are spawned (each with its own event loop and channels) so the Python client is
not the limit; the parent only coordinates. Two barriers bracket the measurement window,
and at each the parent samples CPU of the server processes, the workers and the machine
(/proc), and the servers' memory in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tests.bench.procstat import CpuSnapshot, RssSampler, cpu_report
from tests.bench.scenarios import Config, scenario_for


async def _barrier(barrier: Any, timeout: float) -> None:
    await asyncio.to_thread(barrier.wait, timeout)


async def _worker(cfg: Config, wid: int, barrier: Any, results: Any) -> None:
    scenario = scenario_for(cfg, wid)
    try:
        async with asyncio.timeout(cfg["hard_limit_s"]):
            await scenario.setup()
            await _barrier(barrier, cfg["setup_timeout"] + 60)
            elapsed = await scenario.measure()
            await _barrier(barrier, cfg["measure_timeout"] + 60)
            await scenario.stop()
            result = scenario.result()
        result.update(wid=wid, pid=os.getpid(), elapsed=elapsed)
        results.put(result)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put(
            {
                "wid": wid,
                "fatal": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-3000:],
            }
        )
    finally:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(scenario.close(), 30)


def worker_main(cfg: Config, wid: int, barrier: Any, results: Any) -> None:
    asyncio.run(_worker(cfg, wid, barrier, results))


def run_workers(
    cfg: Config,
    server_pids: Sequence[int],
    store: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` in ``cfg['procs']`` workers; merged figures, CPU and RSS of the servers."""
    procs = cfg["procs"]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=worker_main, args=(cfg, wid, barrier, results), daemon=True)
        for wid in range(procs)
    ]
    out: dict[str, Any] = {}
    rss = RssSampler(server_pids)
    started = time.monotonic()
    for worker in workers:
        worker.start()
    worker_pids = [w.pid for w in workers if w.pid is not None]
    spawned = CpuSnapshot.take(server_pids, worker_pids, store)
    reports: list[dict[str, Any]] = []
    try:
        try:
            barrier.wait(timeout=cfg["setup_timeout"] + 90)
            rss.sample()
            out["rss_at_start_mb"] = round((rss.samples[-1] if rss.samples else 0) / 2**20, 1)
            a = CpuSnapshot.take(server_pids, worker_pids, store)
            out["setup_cpu"] = cpu_report(spawned, a)
            rss.start()
            barrier.wait(timeout=cfg["measure_timeout"] + 90)
            b = CpuSnapshot.take(server_pids, worker_pids, store)
            out["cpu"] = cpu_report(a, b)
        except threading.BrokenBarrierError:
            pass
        finally:
            out.update(rss.stop())
        deadline = time.monotonic() + cfg["drain_timeout"] + 90
        while len(reports) < procs and time.monotonic() < deadline:
            try:
                reports.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue_mod.Empty:
                break
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()  # our own child
                worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
    out["wall_s"] = round(time.monotonic() - started, 2)
    fatal = [r for r in reports if "fatal" in r]
    if fatal or len(reports) != procs:
        out["error"] = [f"worker {r['wid']}: {r['fatal']}" for r in fatal] or (
            f"only {len(reports)}/{procs} workers reported"
        )
        out["trace"] = fatal[0]["trace"] if fatal else None
        return out
    return merge(out, reports)


def merge(out: dict[str, Any], reports: list[dict[str, Any]]) -> dict[str, Any]:
    lat = array("d")
    errors: Counter[str] = Counter()
    for report in reports:
        lat.frombytes(report.pop("lat"))
        errors.update(report.pop("errors"))
    out["elapsed_s"] = max(r["elapsed"] for r in reports)
    out["ok"] = sum(r["ok"] for r in reports)
    out["lat"] = lat
    out["errors"] = dict(errors)
    out["workers"] = reports
    return out


def sum_field(run: dict[str, Any], name: str) -> Any:
    return sum(r.get(name) or 0 for r in run.get("workers", []))


def max_field(run: dict[str, Any], name: str) -> Any:
    values = [r[name] for r in run.get("workers", []) if r.get(name) is not None]
    return max(values) if values else None


def min_field(run: dict[str, Any], name: str) -> Any:
    values = [r[name] for r in run.get("workers", []) if r.get(name) is not None]
    return min(values) if values else None
