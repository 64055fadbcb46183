"""What the server counts in process, and its Prometheus export.

Everything is recorded into plain Python attributes and small fixed-bucket histograms; a
custom collector turns them into Prometheus metric families only when the registry is
scraped. So recording costs a few hundred nanoseconds and takes no lock.

Threading rule: record only from the server's event-loop thread (updates are not atomic,
so two recording threads could lose a count). The scrape runs on the HTTP server's thread
and only reads; a scrape racing a recording may see a histogram's ``_sum`` one observation
ahead of its buckets, never a torn value.

Enabled with ``tether serve --metrics-listen HOST:PORT`` (env ``TETHER_METRICS_LISTEN``);
:func:`start_http` serves ``/metrics`` from a :class:`Metrics`'s own registry.
"""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_wsgi_server,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "EXPIRY_LAG_BUCKETS",
    "RPC_SECONDS_BUCKETS",
    "STORE_SECONDS_BUCKETS",
    "TASK_SECONDS_BUCKETS",
    "Histogram",
    "Metrics",
    "MetricsHttpServer",
    "RpcStats",
    "parse_listen",
    "start_http",
]

# Operations per committed transaction: 1, 2, 4, ..., 1024.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(11))
# How late an EXPIRED event was recorded after expires_at: 1 ms to 10 s.
EXPIRY_LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
STORE_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
TASK_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Unary calls take milliseconds; streams (KeepAlive, Watch) and waiting Acquires last long.
RPC_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 1800.0, 3600.0,
)  # fmt: skip


class Histogram:
    """A Prometheus-style histogram without labels, locks or per-call allocation.

    ``observe`` is one C-level bisect and two additions. Buckets are upper bounds
    (``le``); values above the last fall into ``+Inf``.
    """

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum."""
        counts = self._counts.copy()
        total = self._sum
        bounds = [_format_bound(bound) for bound in self._bounds] + ["+Inf"]
        return list(zip(bounds, map(float, accumulate(counts)), strict=True)), total

    @property
    def count(self) -> int:
        return sum(self._counts)


class RpcStats:
    """Outcomes of one gRPC method: calls by final status code, and their durations."""

    __slots__ = ("codes", "seconds")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.seconds = Histogram(RPC_SECONDS_BUCKETS)

    def record(self, code: str, seconds: float) -> None:
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.seconds.observe(seconds)


@dataclass(eq=False)
class Metrics:
    """One server's metrics: plain attributes others update, and recording methods.

    The int attributes are updated directly by the services (``+= 1``) and read by tests;
    they are exported at scrape time. ``registry`` is this object's own
    ``CollectorRegistry`` (so several servers in one process never collide): it holds the
    collector for everything here plus prometheus_client's process, platform and GC
    collectors.
    """

    keepalive_streams_open: int = 0
    keepalive_streams_total: int = 0
    keepalive_streams_broken: int = 0
    renewals_ok: int = 0
    renewals_refused: int = 0
    watch_streams_open: int = 0
    # Leases currently held (not yet ended), refreshed periodically by a background task.
    active_leases: int = 0
    # Sagas by state, and how many are stale or overdue (refreshed periodically).
    sagas_by_state: dict[str, int] = field(default_factory=dict)
    sagas_stale: int = 0
    sagas_overdue: int = 0
    # Whether this replica currently leads (runs the singleton background work).
    leader: bool = False
    # The garbage collector: what it did, what failed, and what waits (queue refreshed by
    # each pass).
    gc_deleted: int = 0
    gc_orphaned: int = 0
    gc_failures: int = 0
    gc_queue_depth: int = 0
    gc_queue_failing: int = 0
    gc_oldest_item_age_s: float = 0.0
    # Sweeps (dry runs excluded): runs by trigger and result, what they did in all, and
    # the latest one's backlog, blocked objects, duration and finish time.
    sweeps: dict[tuple[str, bool], int] = field(default_factory=dict)
    sweep_actions: dict[str, int] = field(default_factory=dict)
    sweep_rows_purged: dict[str, int] = field(default_factory=dict)
    sweep_backlog: int = 0
    sweep_blocked_objects: int = 0
    sweep_last_seconds: float = 0.0
    sweep_last_finished_s: float = 0.0
    # Forward steps of the wall clock corrected by moving live deadlines (docs/clock.md).
    clock_steps: int = 0
    clock_step_seconds: float = 0.0

    registry: CollectorRegistry = field(init=False, repr=False)
    _store_batch_size: Histogram = field(init=False, repr=False)
    _store_seconds: Histogram = field(init=False, repr=False)
    _expiry_lag: Histogram = field(init=False, repr=False)
    _task_runs: dict[tuple[str, bool], int] = field(init=False, repr=False)
    _task_seconds: dict[str, Histogram] = field(init=False, repr=False)
    _rpcs: dict[tuple[str, str], RpcStats] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._store_batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self._store_seconds = Histogram(STORE_SECONDS_BUCKETS)
        self._expiry_lag = Histogram(EXPIRY_LAG_BUCKETS)
        self._task_runs = {}
        self._task_seconds = {}
        self._rpcs = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def store_batch(self, size: int, seconds: float) -> None:
        """One committed store transaction: ``size`` operations it carried, ``seconds`` it
        took (begin to commit). Feeds ``tether_store_batch_size`` and
        ``tether_store_transaction_seconds``."""
        self._store_batch_size.observe(size)
        self._store_seconds.observe(seconds)

    def expiry_lag(self, seconds: float) -> None:
        """An EXPIRED event was recorded ``seconds`` after the lease's ``expires_at``.
        Feeds ``tether_expiry_lag_seconds``."""
        self._expiry_lag.observe(seconds)

    def clock_step(self, seconds: float) -> None:
        """A forward wall-clock step of ``seconds`` was corrected. Feeds
        ``tether_clock_steps_total`` and ``tether_clock_step_seconds_total``."""
        self.clock_steps += 1
        self.clock_step_seconds += seconds

    def task_run(self, task: str, ok: bool, seconds: float) -> None:
        """One run of the background task ``task`` (a fixed, small set of names: it is a
        label) ended, successfully or not, after ``seconds``. Feeds
        ``tether_background_task_runs_total{task,result}`` and
        ``tether_background_task_seconds{task}``."""
        key = (task, ok)
        self._task_runs[key] = self._task_runs.get(key, 0) + 1
        histogram = self._task_seconds.get(task)
        if histogram is None:
            histogram = self._task_seconds[task] = Histogram(TASK_SECONDS_BUCKETS)
        histogram.observe(seconds)

    def sweep(
        self,
        trigger: str,
        ok: bool,
        actions: dict[str, int],
        purged: dict[str, int],
        *,
        backlog: int,
        blocked: int,
        seconds: float,
        finished_s: float,
    ) -> None:
        key = (trigger, ok)
        self.sweeps[key] = self.sweeps.get(key, 0) + 1
        for totals, add in ((self.sweep_actions, actions), (self.sweep_rows_purged, purged)):
            for name, count in add.items():
                totals[name] = totals.get(name, 0) + count
        self.sweep_backlog = backlog
        self.sweep_blocked_objects = blocked
        self.sweep_last_seconds = seconds
        self.sweep_last_finished_s = finished_s

    def rpc(self, service: str, method: str) -> RpcStats:
        """The stats of one gRPC method (created on first use); the interceptor records
        into them."""
        key = (service, method)
        stats = self._rpcs.get(key)
        if stats is None:
            stats = self._rpcs[key] = RpcStats()
        return stats

    def scrape(self) -> bytes:
        """The text exposition of ``registry``: what ``/metrics`` answers."""
        return generate_latest(self.registry)


class _Collector:
    """Turns a :class:`Metrics` into metric families when the registry is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield GaugeMetricFamily(
            "tether_keepalive_streams_open",
            "KeepAlive streams open now.",
            value=m.keepalive_streams_open,
        )
        yield CounterMetricFamily(
            "tether_keepalive_streams",
            "KeepAlive streams opened.",
            value=m.keepalive_streams_total,
        )
        yield CounterMetricFamily(
            "tether_keepalive_streams_broken",
            "KeepAlive streams that ended without the client half-closing (cancelled, "
            "reset, idle timeout, error).",
            value=m.keepalive_streams_broken,
        )
        renewals = CounterMetricFamily(
            "tether_renewals",
            "Lease renewals on KeepAlive streams, by result.",
            labels=["result"],
        )
        renewals.add_metric(["ok"], m.renewals_ok)
        renewals.add_metric(["refused"], m.renewals_refused)
        yield renewals
        yield GaugeMetricFamily(
            "tether_watch_streams_open", "Watch streams open now.", value=m.watch_streams_open
        )
        yield GaugeMetricFamily(
            "tether_active_leases",
            "Leases held now (refreshed periodically).",
            value=m.active_leases,
        )
        sagas = GaugeMetricFamily(
            "tether_sagas", "Sagas by state (refreshed periodically).", labels=["state"]
        )
        for state, count in sorted(m.sagas_by_state.items()):
            sagas.add_metric([state], count)
        yield sagas
        yield GaugeMetricFamily(
            "tether_sagas_stale",
            "RUNNING or COMPENSATING sagas whose claim lease has ended (refreshed periodically).",
            value=m.sagas_stale,
        )
        yield GaugeMetricFamily(
            "tether_sagas_overdue",
            "Sagas past their deadline not yet moved to compensation (refreshed periodically).",
            value=m.sagas_overdue,
        )
        yield GaugeMetricFamily(
            "tether_leader", "1 if this replica is the leader, else 0.", value=int(m.leader)
        )
        yield CounterMetricFamily(
            "tether_gc_deleted_objects",
            "Dependents the garbage collector deleted (removed or marked terminating).",
            value=m.gc_deleted,
        )
        yield CounterMetricFamily(
            "tether_gc_orphaned_references",
            "Owner references the garbage collector removed from dependents that stay.",
            value=m.gc_orphaned,
        )
        yield CounterMetricFamily(
            "tether_gc_failures",
            "Garbage collection batches that failed (each is retried with backoff).",
            value=m.gc_failures,
        )
        yield GaugeMetricFamily(
            "tether_gc_queue_depth",
            "Owners queued for the garbage collector.",
            value=m.gc_queue_depth,
        )
        yield GaugeMetricFamily(
            "tether_gc_queue_failing",
            "Queued owners whose last collection failed (waiting to retry).",
            value=m.gc_queue_failing,
        )
        yield GaugeMetricFamily(
            "tether_gc_oldest_item_age_seconds",
            "Age of the oldest queued owner: grows when the collector falls behind or stops.",
            value=m.gc_oldest_item_age_s,
        )
        yield CounterMetricFamily(
            "tether_clock_steps",
            "Forward steps of the wall clock detected and corrected (live deadlines moved).",
            value=m.clock_steps,
        )
        yield CounterMetricFamily(
            "tether_clock_step_seconds",
            "Seconds of wall-clock steps corrected, in all.",
            value=m.clock_step_seconds,
        )
        yield from _sweep_families(m)
        yield _histogram(
            "tether_store_batch_size",
            "Operations per committed store transaction.",
            m._store_batch_size,
        )
        yield _histogram(
            "tether_store_transaction_seconds",
            "Duration of committed store transactions.",
            m._store_seconds,
        )
        yield _histogram(
            "tether_expiry_lag_seconds",
            "How long after a lease's expires_at its expiry was recorded.",
            m._expiry_lag,
        )
        runs = CounterMetricFamily(
            "tether_background_task_runs",
            "Runs of background tasks, by task and result.",
            labels=["task", "result"],
        )
        for (task, ok), count in sorted(list(m._task_runs.items())):
            runs.add_metric([task, "ok" if ok else "error"], count)
        yield runs
        task_seconds = HistogramMetricFamily(
            "tether_background_task_seconds",
            "Duration of background task runs.",
            labels=["task"],
        )
        for task, histogram in sorted(list(m._task_seconds.items())):
            buckets, total = histogram.snapshot()
            task_seconds.add_metric([task], buckets, total)
        yield task_seconds
        rpc_total = CounterMetricFamily(
            "tether_rpc",
            "Finished gRPC calls, by method and final status code.",
            labels=["service", "method", "code"],
        )
        rpc_seconds = HistogramMetricFamily(
            "tether_rpc_seconds",
            "Duration of gRPC calls (for streams: the stream's lifetime).",
            labels=["service", "method"],
        )
        for (service, method), stats in sorted(list(m._rpcs.items())):
            for code, count in sorted(list(stats.codes.items())):
                rpc_total.add_metric([service, method, code], count)
            buckets, total = stats.seconds.snapshot()
            rpc_seconds.add_metric([service, method], buckets, total)
        yield rpc_total
        yield rpc_seconds


def _sweep_families(m: Metrics) -> Iterator[Metric]:
    runs = CounterMetricFamily(
        "tether_sweeps",
        "Sweeps run (dry runs excluded), by trigger and result.",
        labels=["trigger", "result"],
    )
    for (trigger, ok), count in sorted(m.sweeps.items()):
        runs.add_metric([trigger, "ok" if ok else "partial"], count)
    yield runs
    actions = CounterMetricFamily(
        "tether_sweep_actions",
        "What sweeps did: leases_expired, sagas_requeued, sagas_compensating, sagas_failed,"
        " sagas_quarantined, objects_collected, objects_orphaned.",
        labels=["action"],
    )
    for action, count in sorted(m.sweep_actions.items()):
        actions.add_metric([action], count)
    yield actions
    purged = CounterMetricFamily(
        "tether_sweep_rows_purged", "Rows sweeps purged, by kind.", labels=["kind"]
    )
    for kind, count in sorted(m.sweep_rows_purged.items()):
        purged.add_metric([kind], count)
    yield purged
    yield GaugeMetricFamily(
        "tether_sweep_backlog",
        "Work the latest sweep left for the next one (high after a crash storm).",
        value=m.sweep_backlog,
    )
    yield GaugeMetricFamily(
        "tether_sweep_blocked_objects",
        "Objects the latest sweep found terminating past the threshold (stuck finalizers).",
        value=m.sweep_blocked_objects,
    )
    yield GaugeMetricFamily(
        "tether_sweep_last_duration_seconds",
        "Duration of the latest sweep.",
        value=m.sweep_last_seconds,
    )
    yield GaugeMetricFamily(
        "tether_sweep_last_finished_timestamp_seconds",
        "When the latest sweep finished (store clock, Unix seconds); 0 before the first.",
        value=m.sweep_last_finished_s,
    )


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets, total = histogram.snapshot()
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _format_bound(bound: float) -> str:
    # What prometheus_client prints for its own buckets ("1.0", "0.005", "1024.0").
    return repr(float(bound))


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6; an empty host means every interface) ->
    ``(host, port)``. Port 0 picks a free port."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"--metrics-listen: expected HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


class MetricsHttpServer:
    """prometheus_client's WSGI server answering ``/metrics`` on a daemon thread."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port

    def close_blocking(self) -> None:
        """Stop serving, join the thread, close the socket. Blocks up to about half a
        second (the server polls for shutdown twice a second)."""
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()

    async def close(self) -> None:
        """:meth:`close_blocking`, off the event loop."""
        await asyncio.to_thread(self.close_blocking)


def start_http(listen: str, registry: CollectorRegistry) -> MetricsHttpServer:
    """Serve ``registry`` on ``listen`` (``HOST:PORT``); ``.port`` is the bound port.

    Raises ValueError for a malformed address and OSError when it cannot bind.
    """
    host, port = parse_listen(listen)
    httpd, thread = start_wsgi_server(port, addr=host, registry=registry)
    thread.name = f"tether-metrics-{httpd.server_port}"
    return MetricsHttpServer(httpd, thread)
