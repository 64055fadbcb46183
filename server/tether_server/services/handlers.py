"""Method handlers built from the service descriptors, with one error boundary.

We register handlers ourselves instead of the generated ``add_*_to_server`` so that
(1) undecodable request bytes become INVALID_ARGUMENT / MALFORMED_REQUEST instead of
grpcio's INTERNAL, and (2) every domain error is translated in one place and anything
unexpected is logged once and answered INTERNAL (a server fault, never a client's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from tether_server.domain import errors
from tether_server.services.errors import to_grpc_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not decode."""

    method: str
    problem: str

    def error(self) -> errors.MalformedRequest:
        return errors.MalformedRequest(
            f"{self.method}: request could not be decoded: {self.problem}",
            {"method": self.method},
        )


def build_generic_handler(
    service: ServiceDescriptor, servicer: object
) -> grpc.GenericRpcHandler[Any, Any]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        handlers[method.name] = _method_handler(method, getattr(servicer, method.name))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _method_handler(
    method: MethodDescriptor, impl: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    deserialize = _tolerant_deserializer(method.full_name, request_cls)
    serialize = response_cls.SerializeToString
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _bidi(impl), request_deserializer=deserialize, response_serializer=serialize
        )
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _server_stream(impl), request_deserializer=deserialize, response_serializer=serialize
        )
    if method.client_streaming:
        raise NotImplementedError("client-streaming RPCs are not part of tether.v1")
    return grpc.unary_unary_rpc_method_handler(
        _unary(impl), request_deserializer=deserialize, response_serializer=serialize
    )


def _tolerant_deserializer(name: str, cls: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except message.DecodeError as exc:
            return Malformed(name, str(exc) or "invalid protobuf")

    return deserialize


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.TetherError) -> None:
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    if isinstance(exc, errors.TetherError):
        await abort(context, exc)
    log.exception("unexpected error in %s", type(exc).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")


def _unary(impl: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Malformed):
                raise request.error()
            return await impl(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    return handle


def _server_stream(impl: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Malformed):
                raise request.error()
            async for response in impl(request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    return handle


def _bidi(impl: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        try:
            async for response in impl(_checked(requests), context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    return handle


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise request.error()
        yield request
