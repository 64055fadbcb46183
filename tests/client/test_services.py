"""Saga, owner-reference and sweep clients: one method per RPC, defaults filled on a copy,
retried exactly where the module's rule says, and typed errors from the real server."""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tests.client.conftest import ClientFactory, InProcessServer
from tether_client import RetryPolicy, TetherClient, TetherClientSync
from tether_client.errors import (
    BY_REASON,
    TetherError,
    Unavailable,
)
from tether_client.pb import (
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    sweep_pb2,
    sweep_pb2_grpc,
)

grpc_max_workers = 8

# (descriptor, attribute on TetherClient, servicer base, add-to-server function)
SERVICES: list[tuple[ServiceDescriptor, str, type, Callable[[Any, grpc.Server], None]]] = [
    (
        saga_pb2.DESCRIPTOR.services_by_name["SagaService"],
        "sagas",
        saga_pb2_grpc.SagaServiceServicer,
        saga_pb2_grpc.add_SagaServiceServicer_to_server,
    ),
    (
        owner_ref_pb2.DESCRIPTOR.services_by_name["OwnerRefService"],
        "objects",
        owner_ref_pb2_grpc.OwnerRefServiceServicer,
        owner_ref_pb2_grpc.add_OwnerRefServiceServicer_to_server,
    ),
    (
        sweep_pb2.DESCRIPTOR.services_by_name["SweepService"],
        "sweeps",
        sweep_pb2_grpc.SweepServiceServicer,
        sweep_pb2_grpc.add_SweepServiceServicer_to_server,
    ),
]


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class Rpc:
    attribute: str
    descriptor: MethodDescriptor

    @property
    def name(self) -> str:
        return snake(self.descriptor.name)

    @property
    def streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)

    def request(self, **fields: Any) -> Message:
        return message_factory.GetMessageClass(self.descriptor.input_type)(**fields)

    def has(self, field_name: str) -> bool:
        return field_name in self.descriptor.input_type.fields_by_name

    async def call(self, client: TetherClient, request: Message, **kwargs: Any) -> Any:
        method = getattr(getattr(client, self.attribute), self.name)
        if self.streaming:
            return [response async for response in method(request, **kwargs)]
        return await method(request, **kwargs)


RPCS = [Rpc(attr, method) for service, attr, _, _ in SERVICES for method in service.methods]
UNARY = [rpc for rpc in RPCS if not rpc.streaming]


def ids(rpc: Rpc) -> str:
    return rpc.name


def test_every_rpc_has_its_method() -> None:
    assert len(RPCS) == 15 + 11 + 3
    client = TetherClient("127.0.0.1:1")
    for rpc in RPCS:
        assert callable(getattr(getattr(client, rpc.attribute), rpc.name, None)), rpc.name
    with TetherClientSync("127.0.0.1:1") as sync:
        for rpc in RPCS:
            assert callable(getattr(getattr(sync, rpc.attribute), rpc.name, None)), rpc.name


# --- against the real server (sweeps: tests/client/test_sweep_client.py) ---


@pytest.mark.parametrize(
    "rpc", [rpc for rpc in UNARY if rpc.attribute in ("sagas", "objects")], ids=ids
)
async def test_saga_and_object_calls_get_typed_answers_from_the_real_server(
    rpc: Rpc, tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target, namespace="team-a")
    if rpc.attribute == "sagas":
        names = {"saga_id": "nope"}
    else:
        names = {"kind": "Thing", "name": "nope", "owner_uid": "nope"}
    request = rpc.request(**{key: value for key, value in names.items() if rpc.has(key)})
    before = request.SerializeToString(deterministic=True)
    if rpc.name in ("list_sagas", "list_objects", "list_dependents"):
        response = await rpc.call(client, request, timeout=10)
        assert response.ByteSize() == 0, response
    else:
        with pytest.raises(TetherError) as caught:
            await rpc.call(client, request, timeout=10)
        # A refusal the client knows by its reason (a missing field, no such saga, …).
        assert type(caught.value) is BY_REASON.get(caught.value.reason), caught.value
    assert request.SerializeToString(deterministic=True) == before


# --- against a scripted server: what is sent, and what is retried --------------------


@dataclass
class Recorder:
    """Answers every saga/object/sweep RPC with an empty response, after ``failures``."""

    failures: int = 0
    calls: list[tuple[str, Message]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, failures: int = 0) -> None:
        with self.lock:
            self.failures, self.calls = failures, []

    def record(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, request))
            fail = self.failures > 0
            self.failures -= fail
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")

    def received(self, method: str) -> list[Any]:
        with self.lock:
            return [request for name, request in self.calls if name == method]

    def handler(self, method: MethodDescriptor) -> Callable[..., Any]:
        response = message_factory.GetMessageClass(method.output_type)

        def unary(request: Message, context: grpc.ServicerContext) -> Message:
            self.record(method.name, request, context)
            return response()

        def stream(request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
            self.record(method.name, request, context)
            yield response()

        return stream if method.server_streaming else unary


@pytest.fixture(scope="module")
def grpc_servicer() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Callable[[Recorder, grpc.Server], None]:
    def add(recorder: Recorder, server: grpc.Server) -> None:
        for descriptor, _, base, add_servicer in SERVICES:
            servicer = base()
            for method in descriptor.methods:
                setattr(servicer, method.name, recorder.handler(method))
            add_servicer(servicer, server)

    return add


@pytest.fixture(scope="module")
def grpc_stub_cls() -> type:
    return saga_pb2_grpc.SagaServiceStub


@pytest.fixture
def recorder(grpc_servicer: Recorder, grpc_server: grpc.Server) -> Iterator[Recorder]:
    grpc_servicer.reset()
    yield grpc_servicer
    grpc_servicer.reset()


@pytest.fixture
async def scripted(grpc_addr: str, recorder: Recorder) -> AsyncIterator[TetherClient]:
    client = TetherClient(
        grpc_addr,
        namespace="team-a",
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02, default_timeout=10),
    )
    yield client
    await client.close()


@pytest.mark.parametrize("rpc", RPCS, ids=ids)
async def test_an_empty_namespace_becomes_the_clients_on_a_copy(
    rpc: Rpc, scripted: TetherClient, recorder: Recorder
) -> None:
    request = rpc.request()
    before = request.SerializeToString(deterministic=True)
    await rpc.call(scripted, request)
    (sent,) = recorder.received(rpc.descriptor.name)
    assert request.SerializeToString(deterministic=True) == before, "the caller's was changed"
    if rpc.has("namespace"):
        # RunSweep's empty namespace means every namespace: it stays empty.
        expected = "" if rpc.name == "run_sweep" else "team-a"
        assert sent.namespace == expected
    if rpc.has("request_id"):
        assert re.fullmatch(r"[0-9a-f]{32}", sent.request_id)


@pytest.mark.parametrize("rpc", [rpc for rpc in RPCS if rpc.has("namespace")], ids=ids)
async def test_a_given_namespace_is_kept(
    rpc: Rpc, scripted: TetherClient, recorder: Recorder
) -> None:
    await rpc.call(scripted, rpc.request(namespace="other"))
    (sent,) = recorder.received(rpc.descriptor.name)
    assert sent.namespace == "other"


async def test_a_given_request_id_is_kept_and_retries_repeat_it(
    scripted: TetherClient, recorder: Recorder
) -> None:
    recorder.reset(failures=2)
    request = owner_ref_pb2.CreateObjectRequest(request_id="mine")
    await scripted.objects.create_object(request)
    assert [sent.request_id for sent in recorder.received("CreateObject")] == ["mine"] * 3
    recorder.reset(failures=1)
    request = owner_ref_pb2.CreateObjectRequest()
    await scripted.objects.create_object(request)
    first, second = recorder.received("CreateObject")
    assert first.request_id
    assert first.request_id == second.request_id
    assert request.request_id == ""


def retried(rpc: Rpc) -> bool:
    """The module's rule, spelled out per RPC for the default (empty) request."""
    reads = rpc.name.startswith(("get_", "list_"))
    # RecordCompensation is retried only with its attempt named; the empty request has none.
    idempotent = {"heartbeat_saga", "record_step", "complete_saga", "fail_saga"}
    objects = {"create_object", "delete_object", "remove_finalizer"}
    return reads or rpc.name in idempotent | objects


@pytest.mark.parametrize("rpc", UNARY, ids=ids)
async def test_only_safe_calls_are_retried(
    rpc: Rpc, scripted: TetherClient, recorder: Recorder
) -> None:
    recorder.reset(failures=1)
    if retried(rpc):
        await rpc.call(scripted, rpc.request())
        assert len(recorder.received(rpc.descriptor.name)) == 2
    else:
        with pytest.raises(Unavailable):
            await rpc.call(scripted, rpc.request())
        assert len(recorder.received(rpc.descriptor.name)) == 1


@pytest.mark.parametrize(
    ("method", "request_", "safe"),
    [
        ("create_saga", saga_pb2.CreateSagaRequest(saga_id="s1"), True),
        ("create_saga", saga_pb2.CreateSagaRequest(), False),
        ("record_compensation", saga_pb2.RecordCompensationRequest(attempt=2), True),
        ("record_compensation", saga_pb2.RecordCompensationRequest(), False),
        ("update_object", owner_ref_pb2.UpdateObjectRequest(), False),
        (
            "update_object",
            owner_ref_pb2.UpdateObjectRequest(object=owner_ref_pb2.Object(resource_version=4)),
            True,
        ),
        ("remove_finalizer", owner_ref_pb2.RemoveFinalizerRequest(), True),
        ("remove_finalizer", owner_ref_pb2.RemoveFinalizerRequest(refusal="busy"), False),
        ("run_sweep", sweep_pb2.RunSweepRequest(), False),
        ("run_sweep", sweep_pb2.RunSweepRequest(dry_run=True), True),
    ],
)
async def test_conditional_safety(
    method: str, request_: Message, safe: bool, scripted: TetherClient, recorder: Recorder
) -> None:
    (rpc,) = [rpc for rpc in UNARY if rpc.name == method]
    recorder.reset(failures=1)
    if safe:
        await rpc.call(scripted, request_)
    else:
        with pytest.raises(Unavailable):
            await rpc.call(scripted, request_)
    assert len(recorder.received(rpc.descriptor.name)) == (2 if safe else 1)


@pytest.mark.parametrize("rpc", [rpc for rpc in RPCS if rpc.streaming], ids=ids)
async def test_a_broken_watch_raises_and_fails_over(
    rpc: Rpc, grpc_addr: str, recorder: Recorder
) -> None:
    # Two targets that are the same server: a failover is visible as the index moving.
    client = TetherClient([grpc_addr, grpc_addr.replace("localhost", "127.0.0.1")])
    try:
        recorder.reset(failures=1)
        with pytest.raises(Unavailable):
            await rpc.call(client, rpc.request())
        assert len(recorder.received(rpc.descriptor.name)) == 1
        assert client.connection.fail_overs == 1
        assert len(await rpc.call(client, rpc.request())) == 1
    finally:
        await client.close()


async def test_claim_saga_waits_beyond_the_default_timeout(
    scripted: TetherClient, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float | None] = []
    attempt_bounds: list[float | None] = []
    original = scripted.call

    async def spy(
        attempt: Any, *, safe: bool, timeout: float | None, attempt_timeout: float | None = None
    ) -> Any:
        seen.append(timeout)
        attempt_bounds.append(attempt_timeout)
        return await original(attempt, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout)

    monkeypatch.setattr(scripted, "call", spy)
    request = saga_pb2.ClaimSagaRequest(kind="build")
    request.wait.FromSeconds(60)
    await scripted.sagas.claim_saga(request)
    await scripted.sagas.claim_saga(request, timeout=3)
    assert seen == [60 + scripted.retry_policy.default_timeout, 3]
    # One attempt may long-poll for the whole wait.
    assert attempt_bounds == [60 + scripted.retry_policy.attempt_timeout] * 2
