"""Server reflection over both protocol versions, ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection serves only ``grpc.reflection.v1alpha.ServerReflection``; newer clients
(grpcurl, grpcui, Postman) ask ``grpc.reflection.v1`` first. The two ``reflection.proto``
files declare the same messages with the same fields and numbers; only the package and the
language options differ, so their messages are the same bytes on the wire.

We therefore derive the v1 file at import from grpcio-reflection's own v1alpha descriptor
(new file name, package, type references and options, exactly as grpc-proto publishes
``grpc/reflection/v1/reflection.proto``), add it to the default descriptor pool so
reflection describes itself, and serve the v1 method with grpcio-reflection's servicer and
its v1alpha (de)serializers. This needs no vendored proto nor generated code to keep fresh,
and both versions answer from one servicer, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["V1ALPHA_SERVICE", "V1_FILE", "V1_SERVICE", "enable_reflection", "v1_file_proto"]

V1ALPHA_SERVICE: str = reflection.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"
_METHOD = "ServerReflectionInfo"


def v1_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """grpc-proto's ``grpc/reflection/v1/reflection.proto``, built from the v1alpha file."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = _V1_PACKAGE
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    options = proto.options
    options.ClearField("deprecated")  # only v1alpha is deprecated
    options.java_package = "io.grpc.reflection.v1"
    options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return proto


def _register_v1_file() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)  # another library may have added it first
    except KeyError:
        pool.AddSerializedFile(v1_file_proto().SerializeToString())


_register_v1_file()


class _MethodAwarePool:
    """The default pool, whose ``FindFileContainingSymbol`` also finds methods.

    Clients ask for ``<package>.<service>.<method>`` (``grpcurl describe`` of a method);
    protobuf's upb pool answers only types and services. Everything else is delegated."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            return self._pool.FindMethodByName(name).containing_service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``; both list ``service_names`` and
    themselves, and describe every file in the default descriptor pool (by file name, or
    by the name of a type, service or method in it)."""
    names = [*service_names, V1_SERVICE, V1ALPHA_SERVICE]
    # reflection.aio is the public asyncio servicer; the module does not declare it.
    servicer = reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
        names, pool=_MethodAwarePool(descriptor_pool.Default())
    )
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {_METHOD: handler}),)
        )
