"""``client.objects``: OwnerRefService as keyword methods returning objects.

::

    created = await client.objects.create(
        "Worktree", "task-168", spec={"path": "/w/168"}, finalizers=["example.com/cleanup"]
    )
    obj = await client.objects.get("Worktree", "task-168")
    await client.objects.delete("Worktree", "task-168", propagation="foreground")
    async for obj in client.objects.list(kind="Worktree", label_selector="team=ci"):
        ...

To let objects go once their finalizer's work is done, use ``client.finalizer_worker()``.
A call is retried on ``Unavailable`` only when sending it twice has the effect of sending
it once: reads, ``create`` (its request id, generated when absent, makes a repeat answer
the first create), ``update`` with a ``resource_version`` (compare-and-set), ``delete``
and ``remove_finalizer`` without a refusal. ``add_finalizer``, ``remove_finalizer`` with a
refusal (each is appended to the object's history), ``force_remove_finalizers`` (each
forced removal is recorded) and an unconditional ``update`` are tried once.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import TypeAlias

from tether_client.connection import Endpoint
from tether_client.convert import Seconds
from tether_client.pb import common_pb2, owner_ref_pb2
from tether_client.results import FinalizersForced, ObjectCreated, ObjectWritten, OwnerGraph
from tether_client.transport import EnumNames, Metadata, Transport
from tether_client.values import to_struct

PropagationPolicy: TypeAlias = owner_ref_pb2.PropagationPolicy.ValueType

propagation_policies: EnumNames[PropagationPolicy] = EnumNames(
    "PROPAGATION_POLICY_", dict(owner_ref_pb2.PropagationPolicy.items()), "a propagation policy"
)


def _selector(name: str, uid: str) -> dict[str, str]:
    """The oneof that picks an object of a kind: by name or by uid."""
    if bool(name) == bool(uid):
        raise ValueError("give exactly one of name and uid")
    return {"name": name} if name else {"uid": uid}


class ObjectsClient:
    """OwnerRefService: objects, owner references, finalizers and deletion."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def create(
        self,
        kind: str | None = None,
        name: str | None = None,
        *,
        spec: Mapping[str, object] | None = None,
        status: Mapping[str, object] | None = None,
        labels: Mapping[str, str] | None = None,
        owner_references: Iterable[common_pb2.OwnerReference] = (),
        finalizers: Iterable[str] = (),
        obj: owner_ref_pb2.Object | None = None,
        request_id: str | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> ObjectCreated:
        """Create object ``kind``/``name`` (``spec``, ``status``: JSON), or ``obj`` as
        given (annotations too) instead of the fields.

        Retried: the request id (generated when absent) makes a repeat answer the first
        create (``created`` False)."""
        fields = (kind, name, spec, status, labels)
        if obj is not None:
            if any(field is not None for field in fields) or owner_references or finalizers:
                raise ValueError("give obj or the object's fields, not both")
        else:
            if not kind or not name:
                raise ValueError("an object needs a kind and a name")
            obj = owner_ref_pb2.Object(
                kind=kind,
                name=name,
                labels=dict(labels or {}),
                owner_references=owner_references,
                finalizers=finalizers,
            )
            if spec is not None:
                obj.spec.CopyFrom(to_struct(spec))
            if status is not None:
                obj.status.CopyFrom(to_struct(status))
        t = self._transport
        request = owner_ref_pb2.CreateObjectRequest(
            namespace=t.ns(namespace), object=obj, request_id=t.request_id(request_id)
        )
        response = await t.unary(
            lambda e: e.owner_ref.CreateObject, request, safe=True, timeout=timeout
        )
        return ObjectCreated(response.object, response.created)

    async def get(
        self,
        kind: str,
        name: str = "",
        *,
        uid: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> owner_ref_pb2.Object:
        """An object of ``kind`` by ``name`` or by ``uid`` (exactly one)."""
        request = owner_ref_pb2.GetObjectRequest(
            namespace=self._transport.ns(namespace), kind=kind, **_selector(name, uid)
        )
        response = await self._transport.unary(
            lambda e: e.owner_ref.GetObject, request, safe=True, timeout=timeout
        )
        return response.object

    def list(
        self,
        *,
        kind: str = "",
        owner_uid: str = "",
        label_selector: str = "",
        terminating_only: bool = False,
        page_size: int = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> AsyncIterator[owner_ref_pb2.Object]:
        """Every matching object, page after page (``label_selector``: Kubernetes syntax,
        ``"app=agent,tier!=cache"``; ``terminating_only``: what is stuck, and why;
        ``timeout`` bounds each page)."""
        request = owner_ref_pb2.ListObjectsRequest(
            namespace=self._transport.ns(namespace),
            kind=kind,
            owner_uid=owner_uid,
            label_selector=label_selector,
            terminating_only=terminating_only,
            page_size=page_size,
        )
        return self._transport.pages(
            lambda e: e.owner_ref.ListObjects, request, lambda page: page.objects, timeout=timeout
        )

    async def update(
        self,
        obj: owner_ref_pb2.Object,
        *,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> ObjectWritten:
        """Replace an object's labels, annotations, spec, status, owner references and
        finalizers. With ``obj.resource_version`` set it is a compare-and-set
        (``ResourceVersionConflict`` when the object moved on), and so retried; without,
        it overwrites and is tried once."""
        request = owner_ref_pb2.UpdateObjectRequest(
            namespace=self._transport.ns(namespace), object=obj
        )
        response = await self._transport.unary(
            lambda e: e.owner_ref.UpdateObject,
            request,
            safe=obj.resource_version != 0,
            timeout=timeout,
        )
        return ObjectWritten(response.object, response.deleted)

    async def add_finalizer(
        self,
        kind: str,
        name: str,
        finalizer: str,
        *,
        uid: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> owner_ref_pb2.Object:
        """Add ``finalizer`` (``uid``: only to that incarnation of the object); refused on a
        terminating object. Not retried."""
        request = owner_ref_pb2.AddFinalizerRequest(
            namespace=self._transport.ns(namespace),
            kind=kind,
            name=name,
            finalizer=finalizer,
            uid=uid,
        )
        response = await self._transport.unary(
            lambda e: e.owner_ref.AddFinalizer, request, safe=False, timeout=timeout
        )
        return response.object

    async def remove_finalizer(
        self,
        kind: str,
        name: str,
        finalizer: str,
        *,
        refusal: str = "",
        uid: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> ObjectWritten:
        """Remove ``finalizer``: the last one of a terminating object lets it go
        (``deleted``). With ``refusal`` the finalizer stays and the reason is recorded.
        Retried unless it records a refusal (each is appended to the history)."""
        request = owner_ref_pb2.RemoveFinalizerRequest(
            namespace=self._transport.ns(namespace),
            kind=kind,
            name=name,
            finalizer=finalizer,
            refusal=refusal,
            uid=uid,
        )
        response = await self._transport.unary(
            lambda e: e.owner_ref.RemoveFinalizer, request, safe=not refusal, timeout=timeout
        )
        return ObjectWritten(response.object, response.deleted)

    async def delete(
        self,
        kind: str,
        name: str,
        *,
        propagation: str | PropagationPolicy | None = None,
        uid: str | None = None,
        resource_version: int | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> ObjectWritten:
        """Delete with a propagation policy (``"background"`` when None, ``"foreground"``,
        ``"orphan"``) and optional preconditions. ``deleted`` when it went at once;
        otherwise ``object`` carries its deletion timestamp. Idempotent, so retried."""
        request = owner_ref_pb2.DeleteObjectRequest(
            namespace=self._transport.ns(namespace), kind=kind, name=name
        )
        if propagation is not None:
            request.propagation_policy = propagation_policies(propagation)
        if uid is not None or resource_version is not None:
            request.preconditions.CopyFrom(
                owner_ref_pb2.DeletePreconditions(
                    uid=uid or "", resource_version=resource_version or 0
                )
            )
        response = await self._transport.unary(
            lambda e: e.owner_ref.DeleteObject, request, safe=True, timeout=timeout
        )
        return ObjectWritten(response.object, response.deleted)

    def dependents(
        self,
        owner_uid: str,
        *,
        recursive: bool = False,
        page_size: int = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> AsyncIterator[owner_ref_pb2.Dependent]:
        """The dependents of an owner (``recursive``: theirs too, with their depth), page
        after page."""
        request = owner_ref_pb2.ListDependentsRequest(
            namespace=self._transport.ns(namespace),
            owner_uid=owner_uid,
            recursive=recursive,
            page_size=page_size,
        )
        return self._transport.pages(
            lambda e: e.owner_ref.ListDependents,
            request,
            lambda page: page.dependents,
            timeout=timeout,
        )

    async def owner_graph(
        self,
        kind: str,
        name: str = "",
        *,
        uid: str = "",
        max_objects: int = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> OwnerGraph:
        """An object's owners up to the roots and dependents down to the leaves, as nodes
        and edges (``truncated`` when ``max_objects`` cut it short)."""
        request = owner_ref_pb2.GetOwnerGraphRequest(
            namespace=self._transport.ns(namespace),
            kind=kind,
            max_objects=max_objects,
            **_selector(name, uid),
        )
        response = await self._transport.unary(
            lambda e: e.owner_ref.GetOwnerGraph, request, safe=True, timeout=timeout
        )
        return OwnerGraph(tuple(response.nodes), tuple(response.edges), response.truncated)

    async def force_remove_finalizers(
        self,
        kind: str,
        name: str,
        *,
        finalizers: Iterable[str] = (),
        reason: str,
        uid: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> FinalizersForced:
        """Admin: remove ``finalizers`` (all when empty) whatever their handlers say;
        ``reason`` is recorded with the caller. Not retried: each removal is recorded."""
        request = owner_ref_pb2.ForceRemoveFinalizersRequest(
            namespace=self._transport.ns(namespace),
            kind=kind,
            name=name,
            finalizers=finalizers,
            reason=reason,
            uid=uid,
        )
        response = await self._transport.unary(
            lambda e: e.owner_ref.ForceRemoveFinalizers, request, safe=False, timeout=timeout
        )
        return FinalizersForced(response.object, response.deleted, tuple(response.removed))

    def watch(
        self,
        *,
        kind: str = "",
        label_selector: str = "",
        start_revision: int = 0,
        namespace: str | None = None,
    ) -> AsyncIterator[owner_ref_pb2.ObjectEvent]:
        """Object events (of ``kind`` and ``label_selector``, or all) in revision order from
        ``start_revision`` on (0: from now), resumed after a broken stream without loss or
        repeats; ``RevisionCompacted`` once that revision is purged.

        The stream opens at the first iteration: to miss nothing, read a revision first
        and pass the one after it."""
        ns = self._transport.ns(namespace)

        def open_stream(
            endpoint: Endpoint, revision: int, metadata: Metadata
        ) -> AsyncIterable[owner_ref_pb2.WatchObjectsResponse]:
            request = owner_ref_pb2.WatchObjectsRequest(
                namespace=ns, kind=kind, label_selector=label_selector, start_revision=revision
            )
            return endpoint.owner_ref.WatchObjects(request, metadata=metadata)

        return self._transport.watch(open_stream, start_revision=start_revision)


__all__ = ["ObjectsClient", "propagation_policies"]
