"""grpc.health.v1, server reflection, and what every service answers to an empty request."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether_client.pb import (
    lease_pb2,
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    sweep_pb2,
)
from tether_server.domain.lease import Refuse

from .conftest import WAIT_S, Harness, dur, error_info, eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "service",
    [
        "",
        "tether.v1.LeaseService",
        "tether.v1.SagaService",
        "tether.v1.OwnerRefService",
        "tether.v1.SweepService",
    ],
)
async def test_health_check_reports_serving(tether: Harness, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(tether.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
    assert response.status == SERVING


async def test_health_check_of_an_unknown_service_is_not_found(tether: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(tether.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(
            health_pb2.HealthCheckRequest(service="tether.v1.NoSuchService"), timeout=WAIT_S
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_reports_not_serving_once_stop_begins(tether: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(tether.channel)
    watches = {
        service: stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
        for service in ("", "tether.v1.LeaseService")
    }
    for watch in watches.values():
        first = await asyncio.wait_for(watch.read(), WAIT_S)
        assert first.status == SERVING
    # A grace long enough for the NOT_SERVING updates to reach us before the server stops;
    # cancelling the watches lets stop() finish long before it.
    stopping = asyncio.ensure_future(tether.server.stop(WAIT_S))
    try:
        for watch in watches.values():
            update = await asyncio.wait_for(watch.read(), WAIT_S)
            assert update.status == NOT_SERVING
    finally:
        for watch in watches.values():
            watch.cancel()
        await asyncio.wait_for(stopping, WAIT_S * 2)


async def test_reflection_lists_every_service(tether: Harness) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(tether.channel)
    call = stub.ServerReflectionInfo(timeout=WAIT_S)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await asyncio.wait_for(call.read(), WAIT_S)
    await call.done_writing()
    names = {service.name for service in response.list_services_response.service}
    assert {
        "tether.v1.LeaseService",
        "tether.v1.SagaService",
        "tether.v1.OwnerRefService",
        "tether.v1.SweepService",
        "grpc.health.v1.Health",
    } <= names


async def _call(tether: Harness, method: MethodDescriptor) -> grpc.aio.AioRpcError | None:
    """Call ``method`` with an empty request; the error it answers, or None."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    assert not method.client_streaming, "no client-streaming RPCs in tether.v1"
    options = {
        "request_serializer": request_cls.SerializeToString,
        "response_deserializer": response_cls.FromString,
    }
    try:
        if method.server_streaming:
            stream = tether.channel.unary_stream(path, **options)(request_cls(), timeout=WAIT_S)
            async for _ in stream:
                raise AssertionError(f"{path} yielded a message")
        else:
            await tether.channel.unary_unary(path, **options)(request_cls(), timeout=WAIT_S)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def test_every_sweep_rpc_answers_an_empty_request_precisely(tether: Harness) -> None:
    """An empty RunSweep sweeps everything and an empty list lists; only GetSweepReport
    needs a field. Never UNIMPLEMENTED, INTERNAL or UNKNOWN."""
    answers: dict[str, tuple[object, str]] = {}
    for method in sweep_pb2.DESCRIPTOR.services_by_name["SweepService"].methods:
        error = await _call(tether, method)
        code, reason, _ = error_info(error) if error is not None else (None, "", {})
        answers[method.name] = (code, reason)
    assert answers == {
        "RunSweep": (None, ""),
        "ListSweepReports": (None, ""),
        "GetSweepReport": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
    }


async def test_every_saga_rpc_refuses_an_empty_request_as_invalid(tether: Harness) -> None:
    """SagaService is built: an empty request names its missing field, never INTERNAL."""
    wrong: list[str] = []
    for method in saga_pb2.DESCRIPTOR.services_by_name["SagaService"].methods:
        if method.name in ("ListSagas", "WatchSagas"):
            continue  # an empty filter is a valid query
        error = await _call(tether, method)
        code, reason, _ = error_info(error) if error is not None else (None, "", {})
        if (code, reason) != (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"):
            wrong.append(f"{method.name}: {code} {reason}")
    assert wrong == []


async def test_stop_ends_streams_and_waiters_with_server_draining(tether: Harness) -> None:
    """Streams and waiting calls end at once with UNAVAILABLE / SERVER_DRAINING, so clients
    reconnect elsewhere instead of hanging until the end of the grace period."""
    await tether.acquire("jobs/a", "w1", ttl_s=600)
    keepalive = tether.stub.KeepAlive(timeout=WAIT_S * 3)
    await keepalive.write(lease_pb2.KeepAliveRequest(sequence=1))
    assert (await asyncio.wait_for(keepalive.read(), WAIT_S)).sequence == 1
    watch = tether.stub.Watch(lease_pb2.WatchRequest(), timeout=WAIT_S * 3)
    assert list((await asyncio.wait_for(watch.read(), WAIT_S)).events) == []
    saga_watch = saga_pb2_grpc.SagaServiceStub(tether.channel).WatchSagas(
        saga_pb2.WatchSagasRequest(), timeout=WAIT_S * 3
    )
    assert list((await asyncio.wait_for(saga_watch.read(), WAIT_S)).events) == []
    object_watch = owner_ref_pb2_grpc.OwnerRefServiceStub(tether.channel).WatchObjects(
        owner_ref_pb2.WatchObjectsRequest(), timeout=WAIT_S * 3
    )
    assert list((await asyncio.wait_for(object_watch.read(), WAIT_S)).events) == []
    waiter = asyncio.ensure_future(
        tether.stub.Acquire(
            lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10), wait=dur(60)),
            timeout=WAIT_S * 3,
        )
    )
    await eventually(
        lambda: any(isinstance(o, Refuse) for o in tether.acquire_outcomes), "waiter refused"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    # A grace far longer than this test may take: draining must not wait for it.
    stopping = asyncio.ensure_future(tether.server.stop(WAIT_S * 3))
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            keepalive.read(),
            watch.read(),
            saga_watch.read(),
            object_watch.read(),
            waiter,
            return_exceptions=True,
        ),
        WAIT_S,
    )
    names = ("KeepAlive", "Watch", "WatchSagas", "WatchObjects", "Acquire")
    for name, outcome in zip(names, outcomes, strict=True):
        assert isinstance(outcome, grpc.aio.AioRpcError), f"{name}: {outcome!r}"
        code, reason, metadata = error_info(outcome)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_DRAINING"), name
        # Every service names the same draining process.
        assert metadata["instance_id"] == tether.server.instance_id, name
    await asyncio.wait_for(stopping, WAIT_S)
    assert loop.time() - started < WAIT_S
