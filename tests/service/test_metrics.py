"""Prometheus metrics: /metrics of an in-process server, the recording methods, the flag."""

from __future__ import annotations

import asyncio
import dataclasses
import types
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.app import TetherServer
from tether_server.cli import build_parser, config_from_args
from tether_server.clock import FakeClock
from tether_server.config import ServerConfig
from tether_server.domain.lease import Refuse
from tether_server.domain.sweep import SweepConfig
from tether_server.metrics import Metrics, parse_listen
from tether_server.services.interceptor import RpcMetricsInterceptor
from tether_server.services.lease import LeaseServiceConfig

from .conftest import (
    KEEPALIVE_IDLE_S,
    LEASE_SERVICE,
    NO_PERIODIC_SWEEP_S,
    WAIT_S,
    Harness,
    _settle,
    dur,
    eventually,
    expect_error,
)

HEALTH_SERVICE = "grpc.health.v1.Health"


@pytest.fixture
async def served(db_url: str, fake_clock: FakeClock) -> AsyncIterator[Harness]:
    """Like conftest's ``tether``, with the metrics endpoint on a free loopback port."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        db_url=db_url,
        grace_s=0.0,
        metrics_listen="127.0.0.1:0",
        lease=dataclasses.replace(LeaseServiceConfig(), keepalive_idle_timeout_s=KEEPALIVE_IDLE_S),
        sweep=SweepConfig(start_delay_s=NO_PERIODIC_SWEEP_S),
    )
    server = TetherServer(config, fake_clock)
    port = await server.start()
    await server.expiry.stop()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(
            server=server,
            clock=fake_clock,
            port=port,
            channel=channel,
            stub=lease_pb2_grpc.LeaseServiceStub(channel),
        )
    finally:
        try:
            await server.stop(0)
        finally:
            await channel.close()
            await _settle()


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=WAIT_S) as response:
        return response.headers.get_content_type(), response.read().decode()


async def scrape(port: int) -> dict[str, Metric]:
    """GET /metrics (on a thread: the server answering it shares this loop) and parse it."""
    content_type, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert content_type == "text/plain"
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Metric, suffix: str = "") -> dict[tuple[str, ...], float]:
    """Values of the family's samples named ``<family><suffix>``, keyed by label values
    (in label-name order, ``le`` last for buckets)."""
    name = family.name + suffix
    out: dict[tuple[str, ...], float] = {}
    for sample in family.samples:
        if sample.name == name:
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            key = tuple(labels[k] for k in sorted(labels)) + ((le,) if le is not None else ())
            out[key] = sample.value
    return out


def rpc_counts(families: dict[str, Metric]) -> dict[tuple[str, ...], float]:
    # Label order (sorted names): code, method, service.
    return samples(families["tether_rpc"], "_total")


async def test_metrics_endpoint_counts_rpcs_by_code_and_exports_stream_counters(
    served: Harness,
) -> None:
    metrics = served.server.metrics
    assert served.server.metrics_port > 0
    lease = await served.acquire("jobs/a", "w1")
    await expect_error(
        served.stub.Acquire(lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_HELD",
    )
    await expect_error(
        served.stub.Acquire(lease_pb2.AcquireRequest(key="", holder="w2", ttl=dur(10))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
    )
    # A KeepAlive stream that renews twice and is refused once, then ends OK.
    call = served.stub.KeepAlive(timeout=WAIT_S)
    stale = lease_pb2.KeepAliveRenewal(lease_id=lease.lease_id, fencing_token=99)
    good = lease_pb2.KeepAliveRenewal(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
    for sequence, renewals in ((1, [good, stale]), (2, [good])):
        await call.write(lease_pb2.KeepAliveRequest(sequence=sequence, renewals=renewals))
        assert (await asyncio.wait_for(call.read(), WAIT_S)).sequence == sequence
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    # A KeepAlive stream ended by the server: undecodable bytes.
    raw = served.channel.stream_stream(
        f"/{LEASE_SERVICE}/KeepAlive",
        request_serializer=lambda data: data,
        response_deserializer=lease_pb2.KeepAliveResponse.FromString,
    )
    broken = raw(timeout=WAIT_S)
    await broken.write(b"\x1a\xff")
    assert await broken.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Another service goes through the same interceptor.
    health = health_pb2_grpc.HealthStub(served.channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
    assert checked.status == health_pb2.HealthCheckResponse.SERVING

    expected = {
        ("OK", "Acquire", LEASE_SERVICE): 1.0,
        ("FAILED_PRECONDITION", "Acquire", LEASE_SERVICE): 1.0,
        ("INVALID_ARGUMENT", "Acquire", LEASE_SERVICE): 1.0,
        ("OK", "KeepAlive", LEASE_SERVICE): 1.0,
        ("INVALID_ARGUMENT", "KeepAlive", LEASE_SERVICE): 1.0,
        ("OK", "Check", HEALTH_SERVICE): 1.0,
    }

    # A call is recorded when grpc reports it done, which may be just after its client
    # saw the status; wait for all of them, then compare exactly.
    async def all_recorded() -> dict[str, Metric] | None:
        families = await scrape(served.server.metrics_port)
        return families if sum(rpc_counts(families).values()) >= len(expected) else None

    families = await eventually(all_recorded, "every call to be recorded")
    assert rpc_counts(families) == expected

    seconds = families["tether_rpc_seconds"]
    counts = samples(seconds, "_count")
    assert counts == {
        ("Acquire", LEASE_SERVICE): 3.0,
        ("KeepAlive", LEASE_SERVICE): 2.0,
        ("Check", HEALTH_SERVICE): 1.0,
    }
    sums = samples(seconds, "_sum")
    assert all(value > 0 for value in sums.values()), sums
    buckets = samples(seconds, "_bucket")
    assert buckets[("Acquire", LEASE_SERVICE, "+Inf")] == 3.0
    acquire_buckets = [v for k, v in buckets.items() if k[:2] == ("Acquire", LEASE_SERVICE)]
    assert acquire_buckets == sorted(acquire_buckets)

    # The stream counters the services keep, as attributes and as exported.
    assert metrics.keepalive_streams_total == 2
    assert metrics.keepalive_streams_open == 0
    assert (metrics.renewals_ok, metrics.renewals_refused) == (2, 1)
    assert samples(families["tether_keepalive_streams"], "_total") == {(): 2.0}
    assert samples(families["tether_keepalive_streams_open"]) == {(): 0.0}
    assert samples(families["tether_keepalive_streams_broken"], "_total") == {
        (): float(metrics.keepalive_streams_broken)
    }
    assert metrics.keepalive_streams_broken == 1
    assert samples(families["tether_renewals"], "_total") == {("ok",): 2.0, ("refused",): 1.0}
    assert samples(families["tether_watch_streams_open"]) == {(): 0.0}
    # The gauge follows the server's leadership (the only replica, it may lead).
    assert samples(families["tether_leader"]) == {(): float(metrics.leader)}
    # prometheus_client's process collector, on this server's own registry.
    assert samples(families["process_start_time_seconds"])[()] > 0


async def test_open_streams_show_in_the_gauges(served: Harness) -> None:
    call = served.stub.KeepAlive(timeout=WAIT_S)
    await call.write(lease_pb2.KeepAliveRequest(sequence=7))
    assert (await asyncio.wait_for(call.read(), WAIT_S)).sequence == 7
    families = await scrape(served.server.metrics_port)
    assert samples(families["tether_keepalive_streams_open"]) == {(): 1.0}
    # The background count would overwrite the value this test sets.
    await served.server.runner.stop_task("active-leases")
    served.server.metrics.active_leases = 42
    served.server.metrics.leader = False
    families = await scrape(served.server.metrics_port)
    assert samples(families["tether_active_leases"]) == {(): 42.0}
    assert samples(families["tether_leader"]) == {(): 0.0}
    served.server.metrics.leader = True
    families = await scrape(served.server.metrics_port)
    assert samples(families["tether_leader"]) == {(): 1.0}
    # Still open: not counted as a finished call yet.
    assert ("OK", "KeepAlive", LEASE_SERVICE) not in rpc_counts(families)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_stop_closes_the_metrics_endpoint(db_url: str, fake_clock: FakeClock) -> None:
    server = TetherServer(
        ServerConfig(listen="127.0.0.1:0", db_url=db_url, metrics_listen="127.0.0.1:0"),
        fake_clock,
    )
    await server.start()
    port = server.metrics_port
    assert "tether_rpc_seconds" in await scrape(port)
    await server.stop(0)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")


async def test_metrics_endpoint_is_off_by_default(tether: Harness) -> None:
    assert tether.server.config.metrics_listen == ""
    assert tether.server.metrics_port == 0
    # Counting still happens in process.
    await tether.acquire("jobs/a", "w1")
    await eventually(
        lambda: (
            rpc_counts(_parse(tether.server.metrics.scrape()))
            == {("OK", "Acquire", LEASE_SERVICE): 1.0}
        ),
        "the Acquire to be recorded",
    )


async def test_cancelled_and_deadline_exceeded_calls_are_counted(tether: Harness) -> None:
    """A waiting Acquire never answers on its own here (the fake clock stands still), so
    these calls end only by the client's cancel and by the call's deadline."""

    def refusals() -> int:
        return sum(isinstance(outcome, Refuse) for outcome in tether.acquire_outcomes)

    def counts() -> dict[tuple[str, ...], float]:
        return rpc_counts(_parse(tether.server.metrics.scrape()))

    await tether.acquire("jobs/a", "w1", ttl_s=600)
    waiting = lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10), wait=dur(60))
    cancelled = asyncio.ensure_future(tether.stub.Acquire(waiting, timeout=WAIT_S))
    await eventually(lambda: refusals() == 1, "the first waiter to wait")
    cancelled.cancel()
    await eventually(
        lambda: counts().get(("CANCELLED", "Acquire", LEASE_SERVICE)) == 1.0, "the cancel"
    )
    await expect_error(
        tether.stub.Acquire(waiting, timeout=1.0), grpc.StatusCode.DEADLINE_EXCEEDED, ""
    )
    assert refusals() == 2
    await eventually(
        lambda: counts().get(("DEADLINE_EXCEEDED", "Acquire", LEASE_SERVICE)) == 1.0,
        "the deadline",
    )
    assert counts() == {
        ("OK", "Acquire", LEASE_SERVICE): 1.0,
        ("CANCELLED", "Acquire", LEASE_SERVICE): 1.0,
        ("DEADLINE_EXCEEDED", "Acquire", LEASE_SERVICE): 1.0,
    }


class FakeContext:
    """What the interceptor uses of grpc.aio's ServicerContext."""

    def __init__(self, code: grpc.StatusCode | None = None) -> None:
        self.callbacks: list[Any] = []
        self._code = code

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return None

    def end(self) -> None:
        for callback in self.callbacks:
            callback(self)


async def _intercept(interceptor: RpcMetricsInterceptor, handler: Any, method: str) -> Any:
    async def continuation(details: Any) -> Any:
        return handler

    details: Any = types.SimpleNamespace(method=f"/test.Service/{method}", invocation_metadata=())
    return await interceptor.intercept_service(continuation, details)


async def test_interceptor_passes_results_and_exceptions_through_unchanged() -> None:
    metrics = Metrics()
    interceptor = RpcMetricsInterceptor(metrics)
    failure = RuntimeError("unexpected")

    async def unary(request: bytes, context: Any) -> bytes:
        if request == b"fail":
            raise failure
        return request + b"!"

    async def streaming(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request * 2

    def serialize(data: bytes) -> bytes:
        return data

    unary_handler = grpc.unary_unary_rpc_method_handler(unary, serialize, serialize)
    stream_handler = grpc.stream_stream_rpc_method_handler(streaming, serialize, serialize)
    wrapped_unary = await _intercept(interceptor, unary_handler, "Unary")
    # Built once per method and handler.
    assert await _intercept(interceptor, unary_handler, "Unary") is wrapped_unary
    assert wrapped_unary.request_deserializer is serialize
    assert wrapped_unary.response_serializer is serialize

    context = FakeContext()
    assert await wrapped_unary.unary_unary(b"hi", context) == b"hi!"
    context.end()
    context = FakeContext()
    with pytest.raises(RuntimeError) as caught:
        await wrapped_unary.unary_unary(b"fail", context)
    assert caught.value is failure
    context.end()

    async def requests() -> AsyncIterator[bytes]:
        for request in (b"a", b"b"):
            yield request

    wrapped_stream = await _intercept(interceptor, stream_handler, "Stream")
    context = FakeContext(grpc.StatusCode.NOT_FOUND)
    responses = [r async for r in wrapped_stream.stream_stream(requests(), context)]
    assert responses == [b"aa", b"bb"]
    # Recorded only when grpc reports the call done, with the code it ended with.
    assert rpc_counts(_parse(metrics.scrape())).get(("NOT_FOUND", "Stream", "test.Service")) is None
    context.end()
    assert rpc_counts(_parse(metrics.scrape())) == {
        ("OK", "Unary", "test.Service"): 1.0,
        ("UNKNOWN", "Unary", "test.Service"): 1.0,
        ("NOT_FOUND", "Stream", "test.Service"): 1.0,
    }


async def test_interceptor_leaves_thread_pool_handlers_and_unknown_methods_alone() -> None:
    interceptor = RpcMetricsInterceptor(Metrics())

    def sync(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(sync)
    assert await _intercept(interceptor, handler, "Sync") is handler
    assert await _intercept(interceptor, None, "Missing") is None


def _parse(text: bytes) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def test_store_batch_expiry_lag_and_task_run_histograms() -> None:
    metrics = Metrics()
    metrics.store_batch(3, 0.004)
    metrics.store_batch(1, 0.0002)
    metrics.store_batch(2000, 2.0)
    metrics.expiry_lag(0.0005)
    metrics.expiry_lag(0.02)
    metrics.expiry_lag(30.0)
    metrics.task_run("expiry", True, 0.01)
    metrics.task_run("expiry", True, 0.02)
    metrics.task_run("expiry", False, 0.2)
    metrics.task_run("reaper", True, 0.001)
    families = _parse(metrics.scrape())

    batch = families["tether_store_batch_size"]
    buckets = samples(batch, "_bucket")
    assert list(buckets) == [(f"{float(2**i)}",) for i in range(11)] + [("+Inf",)]
    assert buckets[("1.0",)] == 1.0
    assert buckets[("2.0",)] == 1.0
    assert buckets[("4.0",)] == 2.0
    assert buckets[("1024.0",)] == 2.0
    assert buckets[("+Inf",)] == 3.0
    assert samples(batch, "_sum") == {(): 2004.0}
    assert samples(batch, "_count") == {(): 3.0}

    tx = families["tether_store_transaction_seconds"]
    assert samples(tx, "_bucket")[("0.0005",)] == 1.0
    assert samples(tx, "_bucket")[("0.005",)] == 2.0
    assert samples(tx, "_count") == {(): 3.0}
    assert samples(tx, "_sum")[()] == pytest.approx(2.0042)

    lag = samples(families["tether_expiry_lag_seconds"], "_bucket")
    assert next(iter(lag)) == ("0.001",)
    assert list(lag)[-2] == ("10.0",)
    assert lag[("0.001",)] == 1.0
    assert lag[("0.025",)] == 2.0
    assert lag[("10.0",)] == 2.0
    assert lag[("+Inf",)] == 3.0

    runs = samples(families["tether_background_task_runs"], "_total")
    # Label order (sorted names): result, task.
    assert runs == {("ok", "expiry"): 2.0, ("error", "expiry"): 1.0, ("ok", "reaper"): 1.0}
    task_seconds = families["tether_background_task_seconds"]
    assert samples(task_seconds, "_count") == {("expiry",): 3.0, ("reaper",): 1.0}
    assert samples(task_seconds, "_bucket")[("expiry", "0.01")] == 1.0
    assert samples(task_seconds, "_bucket")[("expiry", "0.025")] == 2.0
    assert samples(task_seconds, "_sum")[("expiry",)] == pytest.approx(0.23)


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.renewals_ok = 5
    first.store_batch(1, 0.001)
    assert first.registry is not second.registry
    exported = _parse(second.scrape())
    assert samples(exported["tether_renewals"], "_total")[("ok",)] == 0.0
    assert samples(exported["tether_store_batch_size"], "_count") == {(): 0.0}
    assert samples(_parse(first.scrape())["tether_renewals"], "_total")[("ok",)] == 5.0


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", "host:", "host:http", "host:65536"])
def test_parse_listen_rejects_malformed_addresses(listen: str) -> None:
    with pytest.raises(ValueError, match="--metrics-listen"):
        parse_listen(listen)


def _serve_config(*argv: str) -> Any:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_cli_metrics_listen_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_METRICS_LISTEN", raising=False)
    assert _serve_config().metrics_listen == ""
    assert _serve_config("--metrics-listen", "0.0.0.0:9464").metrics_listen == "0.0.0.0:9464"
    monkeypatch.setenv("TETHER_METRICS_LISTEN", "127.0.0.1:9100")
    assert _serve_config().metrics_listen == "127.0.0.1:9100"
    assert _serve_config("--metrics-listen", "").metrics_listen == ""
