"""Server reflection, v1 and v1alpha, against a real ``tether serve``.

The v1 client's messages are compiled here from grpc-proto's own
``grpc/reflection/v1/reflection.proto`` (tests/e2e/protos), so it is a v1-only client that
shares nothing with the server's code; the v1alpha client uses grpcio-reflection's messages.
Both versions must give byte-identical answers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.duration_pb2 import Duration
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_tools import protoc

from tests.e2e import DbFactory, ServerFactory
from tests.e2e.test_grpcurl import GRPCURL, grpcurl, ok
from tests.support.server_process import ServerProcess
from tether_client.pb import lease_pb2

pytestmark = pytest.mark.e2e

PROTOS = Path(__file__).parent / "protos"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
LISTED = {
    "tether.v1.LeaseService",
    "tether.v1.SagaService",
    "tether.v1.OwnerRefService",
    "tether.v1.SweepService",
    "grpc.health.v1.Health",
    V1_SERVICE,
    V1ALPHA_SERVICE,
}


@dataclass(frozen=True)
class Version:
    """One reflection protocol version, as a client of only that version sees it."""

    service: str
    request: Any
    response: Any

    def call(self, target: str, *requests: Any) -> list[Any]:
        """One ServerReflectionInfo stream: every request, then every response."""
        with grpc.insecure_channel(target) as channel:
            method = channel.stream_stream(
                f"/{self.service}/ServerReflectionInfo",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=self.response.FromString,
            )
            return list(method(iter(requests), timeout=10))


def official_v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc-proto's reflection v1 file, compiled by protoc."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reflection_v1.pb"
        args = ["protoc", f"-I{PROTOS}", f"--descriptor_set_out={out}", V1_FILE]
        assert protoc.main(args) == 0, "protoc failed"
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert [f.name for f in files] == [V1_FILE]
    return files[0]


@pytest.fixture(scope="module")
def v1() -> Version:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(official_v1_file())

    def cls(name: str) -> Any:
        return message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}")
        )

    return Version(V1_SERVICE, cls("ServerReflectionRequest"), cls("ServerReflectionResponse"))


V1ALPHA = Version(
    V1ALPHA_SERVICE, v1alpha_pb2.ServerReflectionRequest, v1alpha_pb2.ServerReflectionResponse
)


@pytest.fixture
def server(db_factory: DbFactory, server_factory: ServerFactory) -> ServerProcess:
    # Reflection reads only the process's descriptors; the backend plays no part.
    return server_factory(db_factory("sqlite"))


def pool_from(files: Sequence[bytes]) -> descriptor_pool.DescriptorPool:
    """A fresh pool built from a FileDescriptorResponse (dependencies in any order)."""
    pending = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in files]
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while pending:
        ready = [f for f in pending if set(f.dependency) <= added]
        assert ready, f"unresolvable dependencies: {[f.name for f in pending]}"
        for f in ready:
            pool.Add(f)
            added.add(f.name)
        pending = [f for f in pending if f.name not in added]
    return pool


def test_list_services_over_both_versions(server: ServerProcess, v1: Version) -> None:
    answers = {}
    for version in (v1, V1ALPHA):
        [response] = version.call(server.target, version.request(list_services=""))
        assert response.WhichOneof("message_response") == "list_services_response", response
        names = [s.name for s in response.list_services_response.service]
        assert set(names) == LISTED
        assert len(names) == len(LISTED)
        answers[version.service] = response.SerializeToString(deterministic=True)
    assert answers[V1_SERVICE] == answers[V1ALPHA_SERVICE]


def test_file_for_tether_symbol_builds_a_usable_descriptor(
    server: ServerProcess, v1: Version
) -> None:
    answers = {}
    for version in (v1, V1ALPHA):
        response, by_method = version.call(
            server.target,
            version.request(file_containing_symbol="tether.v1.LeaseService"),
            version.request(file_containing_symbol="tether.v1.LeaseService.Acquire"),
        )
        files = list(response.file_descriptor_response.file_descriptor_proto)
        assert list(by_method.file_descriptor_response.file_descriptor_proto) == files
        pool = pool_from(files)
        lease_service = pool.FindServiceByName("tether.v1.LeaseService")
        acquire = lease_service.methods_by_name["Acquire"]
        assert acquire.input_type.full_name == "tether.v1.AcquireRequest"
        keep_alive = lease_service.methods_by_name["KeepAlive"]
        assert keep_alive.client_streaming
        assert keep_alive.server_streaming
        # The reflected AcquireRequest reads what the generated client writes, and back.
        dynamic = message_factory.GetMessageClass(acquire.input_type)
        sent = lease_pb2.AcquireRequest(key="tasks/1", holder="a", ttl=Duration(seconds=30))
        got = dynamic.FromString(sent.SerializeToString())
        assert got.key == "tasks/1"
        assert got.holder == "a"
        assert got.ttl.seconds == 30
        assert lease_pb2.AcquireRequest.FromString(got.SerializeToString()) == sent
        answers[version.service] = sorted(files)
    assert answers[V1_SERVICE] == answers[V1ALPHA_SERVICE]


def test_v1_describes_itself_as_grpc_proto_publishes_it(server: ServerProcess, v1: Version) -> None:
    by_symbol, by_name, missing = v1.call(
        server.target,
        v1.request(file_containing_symbol=V1_SERVICE),
        v1.request(file_by_filename=V1_FILE),
        v1.request(file_containing_symbol="tether.v1.NoSuchService"),
    )
    for response in (by_symbol, by_name):
        [served] = response.file_descriptor_response.file_descriptor_proto
        expected = official_v1_file()
        assert _comparable(descriptor_pb2.FileDescriptorProto.FromString(served)) == _comparable(
            expected
        )
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.original_request.file_containing_symbol == "tether.v1.NoSuchService"
    # And v1alpha still describes v1alpha, deprecated as published.
    [alpha] = V1ALPHA.call(server.target, V1ALPHA.request(file_containing_symbol=V1ALPHA_SERVICE))
    [alpha_file] = alpha.file_descriptor_response.file_descriptor_proto
    alpha_proto = descriptor_pb2.FileDescriptorProto.FromString(alpha_file)
    assert alpha_proto.package == "grpc.reflection.v1alpha"
    assert alpha_proto.options.deprecated


def test_grpcurl_lists_and_describes_everything(server: ServerProcess) -> None:
    if not GRPCURL.exists():
        pytest.fail(f"grpcurl is not installed at {GRPCURL} (dev dependency)")
    services = ok(grpcurl(server.target, "list")).split()
    assert set(services) == LISTED
    for service in services:
        description = ok(grpcurl(server.target, "describe", service))
        assert f"{service} is a service" in description
    # Methods too: the server finds the file of "<service>.<method>" symbols.
    acquire = ok(grpcurl(server.target, "describe", "tether.v1.LeaseService.Acquire"))
    assert "tether.v1.LeaseService.Acquire is a method" in acquire
    check = ok(grpcurl(server.target, "describe", "grpc.health.v1.Health.Check"))
    assert "grpc.health.v1.Health.Check is a method" in check
    v1_info = ok(grpcurl(server.target, "describe", f"{V1_SERVICE}.ServerReflectionInfo"))
    assert (
        "( stream .grpc.reflection.v1.ServerReflectionRequest ) returns "
        "( stream .grpc.reflection.v1.ServerReflectionResponse )"
    ) in v1_info


def _comparable(proto: descriptor_pb2.FileDescriptorProto) -> bytes:
    """The file without what compilers fill in differently (comments, JSON names)."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(proto.SerializeToString())
    proto.ClearField("source_code_info")
    for message in proto.message_type:
        for field in message.field:
            field.ClearField("json_name")
    return proto.SerializeToString(deterministic=True)
