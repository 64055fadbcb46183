"""Clients for SagaService, OwnerRefService and SweepService (request messages in, out).

``client.sagas``, ``client.objects`` and ``client.sweeps`` have one method per RPC, named
in snake_case (``CreateSaga`` → ``create_saga``). Each takes the request message and an
optional ``timeout`` (seconds, retries included) and returns the response message;
failures raise :class:`tether_client.errors.TetherError` subclasses. The caller's request
is never modified: the call sends a copy in which

- an empty ``namespace`` becomes the client's default namespace (except in
  ``RunSweepRequest``, where an empty namespace means "every namespace");
- an empty ``request_id`` becomes a fresh random id, so a retry is recognised as a repeat.

Which calls are retried (on ``UNAVAILABLE`` only, see :mod:`tether_client.retry`) follows
one rule: **a call is retried only when sending it twice has the effect of sending it
once.** That holds for

- reads: every ``Get*`` and ``List*``;
- creates that carry an id the client chose: ``CreateSaga`` with a ``saga_id``,
  ``CreateObject`` (its ``request_id``, generated when empty);
- compare-and-set writes: ``UpdateObject`` with a ``resource_version``;
- writes idempotent by design (per the proto and docs/sagas.md): ``HeartbeatSaga`` (a
  renewal that stores the same progress), ``RecordStep`` (idempotent on saga, step, status
  and attempt: a repeat answers the step as it is), ``RecordCompensation`` when it names
  its ``attempt`` (a report for an attempt already recorded changes nothing; with 0, "the
  next one", a repeat would count another attempt), ``CompleteSaga`` and ``FailSaga`` (a
  repeat with the claim's fence answers the saga as it is), ``DeleteObject``,
  ``RemoveFinalizer`` unless it records a refusal (each refusal is appended to the
  object's history), and ``RunSweep`` with ``dry_run``.

Everything else (``ClaimSaga``, ``CancelSaga``, ``QuarantineSaga``, ``RedriveSaga``,
``MarkStepCompensated``, ``AnnotateSaga``, ``AddFinalizer``, ``ForceRemoveFinalizers`` (each
forced removal is recorded in the object's history), real sweeps, an unconditional update)
is tried once: a repeat after a lost answer could act twice. ``WatchSagas`` and
``WatchObjects`` stream responses; a broken stream raises (moving later calls to the next
target on ``UNAVAILABLE``) and the caller re-opens it from the revision after the last
event it saw.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import Message

from tether_client.connection import Endpoint
from tether_client.convert import duration_seconds
from tether_client.errors import Unavailable, from_rpc_error
from tether_client.pb import owner_ref_pb2, saga_pb2, sweep_pb2
from tether_client.retry import Unary

if TYPE_CHECKING:
    from tether_client.client import TetherClient

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")
Streaming = Callable[[Endpoint], "grpc.aio.UnaryStreamMultiCallable[Req, Resp]"]


class _ServiceClient:
    def __init__(self, client: TetherClient) -> None:
        self._client = client

    def _prepare(self, request: Req, *, default_namespace: bool = True) -> Req:
        """A copy of ``request`` with the namespace and request id filled in."""
        copy = type(request)()
        copy.CopyFrom(request)
        fields = copy.DESCRIPTOR.fields_by_name
        defaults = {"request_id": uuid.uuid4().hex}
        if default_namespace:
            defaults["namespace"] = self._client.namespace
        for name, value in defaults.items():
            if name in fields and not getattr(copy, name):
                setattr(copy, name, value)
        return copy

    async def _unary(
        self,
        method: Unary[Req, Resp],
        request: Req,
        *,
        safe: bool,
        timeout: float | None,
        default_namespace: bool = True,
        attempt_timeout: float | None = None,
    ) -> Resp:
        prepared = self._prepare(request, default_namespace=default_namespace)
        return await self._client.unary(
            method, prepared, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout
        )

    async def _stream(
        self, method: Streaming[Req, Resp], request: Req, timeout: float | None
    ) -> AsyncIterator[Resp]:
        prepared = self._prepare(request)
        connection = self._client.connection
        endpoint = connection.current
        call = method(endpoint)(prepared, timeout=timeout, metadata=connection.metadata())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, Unavailable):
                connection.fail_over(endpoint)
            raise error from exc
        finally:
            call.cancel()


class SagasClient(_ServiceClient):
    """SagaService: sagas, their steps and compensations."""

    async def create_saga(
        self, request: saga_pb2.CreateSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.CreateSagaResponse:
        """Create a saga; retried only when it carries its ``saga_id``."""
        return await self._unary(
            lambda e: e.saga.CreateSaga, request, safe=bool(request.saga_id), timeout=timeout
        )

    async def claim_saga(
        self, request: saga_pb2.ClaimSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.ClaimSagaResponse:
        """Claim a saga under a lease (not retried). The default timeout covers ``wait``."""
        policy = self._client.retry_policy
        call_timeout, attempt_timeout = policy.waiting(duration_seconds(request.wait), timeout)
        return await self._unary(
            lambda e: e.saga.ClaimSaga,
            request,
            safe=False,
            timeout=call_timeout,
            attempt_timeout=attempt_timeout,
        )

    async def record_step(
        self, request: saga_pb2.RecordStepRequest, *, timeout: float | None = None
    ) -> saga_pb2.RecordStepResponse:
        """Record a step (idempotent per step, status and attempt, so retried)."""
        return await self._unary(lambda e: e.saga.RecordStep, request, safe=True, timeout=timeout)

    async def heartbeat_saga(
        self, request: saga_pb2.HeartbeatSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.HeartbeatSagaResponse:
        """Store progress and renew the claim's lease (retried, like ``Renew``)."""
        return await self._unary(
            lambda e: e.saga.HeartbeatSaga, request, safe=True, timeout=timeout
        )

    async def complete_saga(
        self, request: saga_pb2.CompleteSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.CompleteSagaResponse:
        """RUNNING → COMPLETED; a repeat with the same fence answers the saga (retried)."""
        return await self._unary(lambda e: e.saga.CompleteSaga, request, safe=True, timeout=timeout)

    async def fail_saga(
        self, request: saga_pb2.FailSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.FailSagaResponse:
        """Fail the claimed saga; a repeat with the same fence answers the saga (retried)."""
        return await self._unary(lambda e: e.saga.FailSaga, request, safe=True, timeout=timeout)

    async def record_compensation(
        self, request: saga_pb2.RecordCompensationRequest, *, timeout: float | None = None
    ) -> saga_pb2.RecordCompensationResponse:
        """Report one compensation attempt; retried only when it names its ``attempt``."""
        return await self._unary(
            lambda e: e.saga.RecordCompensation,
            request,
            safe=request.attempt > 0,
            timeout=timeout,
        )

    async def cancel_saga(
        self, request: saga_pb2.CancelSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.CancelSagaResponse:
        return await self._unary(lambda e: e.saga.CancelSaga, request, safe=False, timeout=timeout)

    async def quarantine_saga(
        self, request: saga_pb2.QuarantineSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.QuarantineSagaResponse:
        return await self._unary(
            lambda e: e.saga.QuarantineSaga, request, safe=False, timeout=timeout
        )

    async def redrive_saga(
        self, request: saga_pb2.RedriveSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.RedriveSagaResponse:
        """Operator: a QUARANTINED saga retries its compensations or resumes (not retried)."""
        return await self._unary(lambda e: e.saga.RedriveSaga, request, safe=False, timeout=timeout)

    async def mark_step_compensated(
        self, request: saga_pb2.MarkStepCompensatedRequest, *, timeout: float | None = None
    ) -> saga_pb2.MarkStepCompensatedResponse:
        """Operator: a step's compensation was done by hand (not retried)."""
        return await self._unary(
            lambda e: e.saga.MarkStepCompensated, request, safe=False, timeout=timeout
        )

    async def annotate_saga(
        self, request: saga_pb2.AnnotateSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.AnnotateSagaResponse:
        return await self._unary(
            lambda e: e.saga.AnnotateSaga, request, safe=False, timeout=timeout
        )

    async def get_saga(
        self, request: saga_pb2.GetSagaRequest, *, timeout: float | None = None
    ) -> saga_pb2.GetSagaResponse:
        return await self._unary(lambda e: e.saga.GetSaga, request, safe=True, timeout=timeout)

    async def list_sagas(
        self, request: saga_pb2.ListSagasRequest, *, timeout: float | None = None
    ) -> saga_pb2.ListSagasResponse:
        return await self._unary(lambda e: e.saga.ListSagas, request, safe=True, timeout=timeout)

    def watch_sagas(
        self, request: saga_pb2.WatchSagasRequest, *, timeout: float | None = None
    ) -> AsyncIterator[saga_pb2.WatchSagasResponse]:
        """Saga events as the server streams them (``timeout`` bounds the whole stream)."""
        return self._stream(lambda e: e.saga.WatchSagas, request, timeout)


class ObjectsClient(_ServiceClient):
    """OwnerRefService: objects, owner references, finalizers and deletion."""

    async def create_object(
        self, request: owner_ref_pb2.CreateObjectRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.CreateObjectResponse:
        """Create an object; retried under its ``request_id`` (generated when empty)."""
        return await self._unary(
            lambda e: e.owner_ref.CreateObject, request, safe=True, timeout=timeout
        )

    async def get_object(
        self, request: owner_ref_pb2.GetObjectRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.GetObjectResponse:
        return await self._unary(
            lambda e: e.owner_ref.GetObject, request, safe=True, timeout=timeout
        )

    async def list_objects(
        self, request: owner_ref_pb2.ListObjectsRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.ListObjectsResponse:
        return await self._unary(
            lambda e: e.owner_ref.ListObjects, request, safe=True, timeout=timeout
        )

    async def update_object(
        self, request: owner_ref_pb2.UpdateObjectRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.UpdateObjectResponse:
        """Compare-and-set on ``object.resource_version``; retried only when that is set."""
        cas = request.object.resource_version != 0
        return await self._unary(
            lambda e: e.owner_ref.UpdateObject, request, safe=cas, timeout=timeout
        )

    async def add_finalizer(
        self, request: owner_ref_pb2.AddFinalizerRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.AddFinalizerResponse:
        return await self._unary(
            lambda e: e.owner_ref.AddFinalizer, request, safe=False, timeout=timeout
        )

    async def remove_finalizer(
        self, request: owner_ref_pb2.RemoveFinalizerRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.RemoveFinalizerResponse:
        """Idempotent; retried unless it records a ``refusal`` (that appends to history)."""
        return await self._unary(
            lambda e: e.owner_ref.RemoveFinalizer,
            request,
            safe=not request.refusal,
            timeout=timeout,
        )

    async def delete_object(
        self, request: owner_ref_pb2.DeleteObjectRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.DeleteObjectResponse:
        """Delete with a propagation policy. Idempotent, so retried."""
        return await self._unary(
            lambda e: e.owner_ref.DeleteObject, request, safe=True, timeout=timeout
        )

    async def list_dependents(
        self, request: owner_ref_pb2.ListDependentsRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.ListDependentsResponse:
        return await self._unary(
            lambda e: e.owner_ref.ListDependents, request, safe=True, timeout=timeout
        )

    async def get_owner_graph(
        self, request: owner_ref_pb2.GetOwnerGraphRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.GetOwnerGraphResponse:
        """An object's owners and dependents as nodes and edges (for debugging)."""
        return await self._unary(
            lambda e: e.owner_ref.GetOwnerGraph, request, safe=True, timeout=timeout
        )

    async def force_remove_finalizers(
        self, request: owner_ref_pb2.ForceRemoveFinalizersRequest, *, timeout: float | None = None
    ) -> owner_ref_pb2.ForceRemoveFinalizersResponse:
        """Admin: remove finalizers whatever their handlers say (not retried: each removal is
        recorded with its reason in the object's history)."""
        return await self._unary(
            lambda e: e.owner_ref.ForceRemoveFinalizers, request, safe=False, timeout=timeout
        )

    def watch_objects(
        self, request: owner_ref_pb2.WatchObjectsRequest, *, timeout: float | None = None
    ) -> AsyncIterator[owner_ref_pb2.WatchObjectsResponse]:
        """Object events as the server streams them (``timeout`` bounds the whole stream)."""
        return self._stream(lambda e: e.owner_ref.WatchObjects, request, timeout)


class SweepsClient(_ServiceClient):
    """SweepService: run sweeps and read their reports."""

    async def run_sweep(
        self, request: sweep_pb2.RunSweepRequest, *, timeout: float | None = None
    ) -> sweep_pb2.RunSweepResponse:
        """Run a sweep now (admin); an empty namespace sweeps every namespace.

        Retried only with ``dry_run``, which changes nothing.
        """
        return await self._unary(
            lambda e: e.sweep.RunSweep,
            request,
            safe=request.dry_run,
            timeout=timeout,
            default_namespace=False,
        )

    async def list_sweep_reports(
        self, request: sweep_pb2.ListSweepReportsRequest, *, timeout: float | None = None
    ) -> sweep_pb2.ListSweepReportsResponse:
        return await self._unary(
            lambda e: e.sweep.ListSweepReports, request, safe=True, timeout=timeout
        )

    async def get_sweep_report(
        self, request: sweep_pb2.GetSweepReportRequest, *, timeout: float | None = None
    ) -> sweep_pb2.GetSweepReportResponse:
        return await self._unary(
            lambda e: e.sweep.GetSweepReport, request, safe=True, timeout=timeout
        )


__all__ = ["ObjectsClient", "SagasClient", "SweepsClient"]
