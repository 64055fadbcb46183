"""Method handlers built from the service descriptors, with one boundary for every call.

We register handlers ourselves instead of the generated ``add_*_to_server`` so that
(1) undecodable request bytes become INVALID_ARGUMENT / MALFORMED_REQUEST instead of
grpcio's INTERNAL, and oversized ones RESOURCE_EXHAUSTED / MESSAGE_TOO_LARGE with the
limit, (2) every call is admitted in one place (the server is ready, the caller is
authenticated and may call this method in this namespace) before any handler runs, and
(3) every domain error is translated in one place and anything unexpected is logged once
and answered INTERNAL (a server fault, never a client's).
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

from tether_server.auth import Authenticator, Principal, set_current_principal
from tether_server.domain import access, errors, validation
from tether_server.domain.validation import DEFAULT_NAMESPACE
from tether_server.services.errors import to_grpc_status

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# grpc's own limit sits above ours, so a request a little over ours gets our answer (with
# the limit in ErrorInfo); only one over twice our limit gets grpc's bare one.
CORE_LIMIT_FACTOR = 2


class CallGate:
    """Admits calls: the server is ready, the caller known and allowed."""

    def __init__(self, authenticator: Authenticator, max_message_bytes: int) -> None:
        self.authenticator = authenticator
        self.max_message_bytes = max_message_bytes
        # Closed until the start-up recovery is done: calls get UNAVAILABLE / SERVER_STARTING.
        self.ready = False

    def admit(self, method: Guarded, request: Any, context: Context) -> Principal:
        if not self.ready:
            raise errors.ServerStarting("the server is recovering after its start; retry shortly")
        principal = self.authenticator.authenticate(context)
        if request is not None:
            method.authorize(principal, request)
        set_current_principal(principal)
        return principal


@dataclass(frozen=True)
class Guarded:
    """One method as the gate sees it, worked out once when its handler is built."""

    path: str
    rule: access.Rule | None
    # Whether its request has a namespace field (sweep reports have none).
    namespaced: bool

    def authorize(self, principal: Principal, request: Any) -> None:
        requested = request.namespace if self.namespaced else ""
        namespace = access.call_namespace(self.rule, requested, DEFAULT_NAMESPACE)
        try:
            access.authorize(principal.name, principal.grants, self.path, self.rule, namespace)
        except errors.TetherError:
            # A refusal echoes the namespace: a malformed one (say 10 000 characters) is
            # answered as bad input instead, so the answer fits in the trailers.
            if requested:
                validation.namespace(requested)
            raise


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not decode (or were too many)."""

    method: str
    problem: str
    size: int = 0
    limit: int = 0

    def error(self) -> errors.TetherError:
        if self.limit:
            return errors.MessageTooLarge(
                f"{self.method}: the request is {self.size} bytes; this server accepts at "
                f"most {self.limit}",
                {
                    "method": self.method,
                    "limit_bytes": str(self.limit),
                    "size_bytes": str(self.size),
                },
            )
        return errors.MalformedRequest(
            f"{self.method}: request could not be decoded: {self.problem}",
            {"method": self.method},
        )


def build_generic_handler(
    service: ServiceDescriptor, servicer: object, gate: CallGate
) -> grpc.GenericRpcHandler[Any, Any]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        handlers[method.name] = _method_handler(
            f"/{service.full_name}/{method.name}", method, getattr(servicer, method.name), gate
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _method_handler(
    path: str, method: MethodDescriptor, impl: Callable[..., Any], gate: CallGate
) -> grpc.RpcMethodHandler[Any, Any]:
    request_cls = message_factory.GetMessageClass(method.input_type)
    guarded = Guarded(path, access.RULES.get(path), "namespace" in method.input_type.fields_by_name)
    response_cls = message_factory.GetMessageClass(method.output_type)
    deserialize = _tolerant_deserializer(method.full_name, request_cls, gate.max_message_bytes)
    serialize = response_cls.SerializeToString
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _bidi(guarded, impl, gate),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _server_stream(guarded, impl, gate),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    if method.client_streaming:
        raise NotImplementedError("client-streaming RPCs are not part of tether.v1")
    return grpc.unary_unary_rpc_method_handler(
        _unary(guarded, impl, gate), request_deserializer=deserialize, response_serializer=serialize
    )


def _tolerant_deserializer(name: str, cls: Any, limit: int) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return Malformed(name, "too large", len(data), limit)
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
        if isinstance(exc, _REFUSALS):
            log.info(
                "call refused",
                extra={
                    "reason": exc.reason,
                    "principal": exc.metadata.get("principal", ""),
                    "peer": context.peer(),
                    "detail": exc.message,
                },
            )
        await abort(context, exc)
    log.exception("unexpected error in %s", type(exc).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")


_REFUSALS = (
    errors.CredentialsRequired,
    errors.InvalidCredentials,
    errors.NamespaceForbidden,
    errors.RoleRequired,
    errors.AdminRequired,
    errors.NotLeaseHolder,
)


def _unary(method: Guarded, impl: Callable[..., Any], gate: CallGate) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Malformed):
                gate.admit(method, None, context)
                raise request.error()
            gate.admit(method, request, context)
            return await impl(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    return handle


def _server_stream(method: Guarded, impl: Callable[..., Any], gate: CallGate) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Malformed):
                gate.admit(method, None, context)
                raise request.error()
            gate.admit(method, request, context)
            async for response in impl(request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    return handle


def _bidi(method: Guarded, impl: Callable[..., Any], gate: CallGate) -> Callable[..., Any]:
    async def handle(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        try:
            # Who is asked once, at the stream's start; each message's namespace is judged
            # as it arrives (a stream is not refused for a namespace it never uses).
            principal = gate.admit(method, None, context)
            async for response in impl(_checked(requests, method, principal), context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _fail(context, exc)

    return handle


async def _checked(
    requests: AsyncIterator[Any], method: Guarded, principal: Principal
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise request.error()
        method.authorize(principal, request)
        yield request
