"""tether.v1.OwnerRefService: protobuf in, object store calls, protobuf out. No decisions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tether_client.pb import owner_ref_pb2
from tether_server.auth import current_principal
from tether_server.domain import errors, paging, validation
from tether_server.domain import label_selector as selectors
from tether_server.domain import object_validation as ov
from tether_server.domain.object_validation import ObjectLimits
from tether_server.domain.objects import Desired
from tether_server.domain.validation import Limits
from tether_server.notify import ChangeHub
from tether_server.services import objects_convert as conv
from tether_server.services.limits import ServerLimits
from tether_server.services.saga_convert import enum_value, struct_to_dict
from tether_server.services.streaming import (
    Drains,
    Follow,
    WatchSlots,
    count_fitting,
    follow_events,
)
from tether_server.store.objects import (
    CreateParams,
    DeleteParams,
    ForceParams,
    ListParams,
    ObjectEventRecord,
    ObjectStore,
    RemoveFinalizerParams,
    UpdateParams,
)
from tether_server.store.objects.rows import AREA

Context = Any  # grpc.aio.ServicerContext

# Fields a client cannot set on create: the server owns them.
_SERVER_FIELDS = (
    "uid",
    "resource_version",
    "deletion_timestamp",
    "created_at",
    "history",
    "termination",
    "create_revision",
)


@dataclass(frozen=True)
class ObjectServiceConfig:
    limits: Limits = field(default_factory=Limits)
    object_limits: ObjectLimits = field(default_factory=ObjectLimits)
    poll_interval_s: float = 1.0
    watch_batch_size: int = 500
    max_response_bytes: int = 1 << 20


class ObjectService(Drains):
    def __init__(
        self,
        store: ObjectStore,
        changes: ChangeHub,
        config: ObjectServiceConfig | None = None,
        watches: WatchSlots | None = None,
        instance_id: str = "",
    ) -> None:
        self._store = store
        self._changes = changes
        self._config = config or ObjectServiceConfig()
        # Shared with the other services of the server: the watch cap counts them together.
        self._watches = watches or WatchSlots(ServerLimits().max_watches_per_principal)
        super().__init__(instance_id)

    @property
    def _ol(self) -> ObjectLimits:
        return self._config.object_limits

    def _desired(self, obj: owner_ref_pb2.Object) -> Desired:
        ol = self._ol
        return Desired(
            labels=validation.labels(obj.labels, self._config.limits),
            annotations=ov.annotation_map(obj.annotations, ol),
            spec=struct_to_dict(obj.spec, "object.spec", ol.max_spec_bytes),
            status=struct_to_dict(obj.status, "object.status", ol.max_status_bytes),
            owner_refs=ov.owner_refs([conv.owner_ref_from_pb(r) for r in obj.owner_references], ol),
            finalizers=ov.finalizers(obj.finalizers, ol, system_ok=True),
        )

    # ---- writes -----------------------------------------------------------------------

    async def CreateObject(
        self, request: owner_ref_pb2.CreateObjectRequest, context: Context
    ) -> owner_ref_pb2.CreateObjectResponse:
        obj = request.object
        for name in _SERVER_FIELDS:
            if _is_set(obj, name):
                raise errors.InvalidField(f"object.{name}", "is set by the server")
        for index, finalizer in enumerate(obj.finalizers):
            ov.finalizer(finalizer, f"object.finalizers[{index}]")
        desired = self._desired(obj)
        params = CreateParams(
            namespace=validation.namespace(request.namespace),
            kind=ov.kind(obj.kind, "object.kind"),
            name=ov.name(obj.name, "object.name"),
            labels=desired.labels,
            annotations=desired.annotations,
            spec=desired.spec,
            status=desired.status,
            owner_refs=desired.owner_refs,
            finalizers=desired.finalizers,
            request_id=validation.request_id(request.request_id, self._config.limits),
        )
        created = await self._store.create(params)
        return owner_ref_pb2.CreateObjectResponse(
            object=conv.object_to_pb(created.obj), created=created.created
        )

    async def UpdateObject(
        self, request: owner_ref_pb2.UpdateObjectRequest, context: Context
    ) -> owner_ref_pb2.UpdateObjectResponse:
        obj = request.object
        if obj.resource_version <= 0:
            raise errors.InvalidField(
                "object.resource_version", "is required: every update is a compare-and-set"
            )
        params = UpdateParams(
            namespace=validation.namespace(request.namespace),
            kind=ov.kind(obj.kind, "object.kind"),
            name=ov.name(obj.name, "object.name"),
            uid=ov.uid(obj.uid, "object.uid"),
            resource_version=obj.resource_version,
            desired=self._desired(obj),
        )
        written = await self._store.update(params)
        if written.deleted:
            return owner_ref_pb2.UpdateObjectResponse(deleted=True)
        return owner_ref_pb2.UpdateObjectResponse(object=conv.written_to_pb(written))

    async def AddFinalizer(
        self, request: owner_ref_pb2.AddFinalizerRequest, context: Context
    ) -> owner_ref_pb2.AddFinalizerResponse:
        written = await self._store.add_finalizer(
            validation.namespace(request.namespace),
            ov.kind(request.kind),
            ov.name(request.name),
            ov.finalizer(request.finalizer),
            ov.uid(request.uid),
        )
        return owner_ref_pb2.AddFinalizerResponse(object=conv.written_to_pb(written))

    async def RemoveFinalizer(
        self, request: owner_ref_pb2.RemoveFinalizerRequest, context: Context
    ) -> owner_ref_pb2.RemoveFinalizerResponse:
        params = RemoveFinalizerParams(
            namespace=validation.namespace(request.namespace),
            kind=ov.kind(request.kind),
            name=ov.name(request.name),
            finalizer=ov.finalizer(request.finalizer),
            uid=ov.uid(request.uid),
            refusal=ov.refusal(request.refusal, self._ol),
            principal=current_principal().name,
        )
        written = await self._store.remove_finalizer(params)
        if written is None or written.deleted:
            return owner_ref_pb2.RemoveFinalizerResponse(deleted=True)
        return owner_ref_pb2.RemoveFinalizerResponse(object=conv.written_to_pb(written))

    async def ForceRemoveFinalizers(
        self, request: owner_ref_pb2.ForceRemoveFinalizersRequest, context: Context
    ) -> owner_ref_pb2.ForceRemoveFinalizersResponse:
        # Only admins get here: the RPC boundary checks roles (domain/access.py).
        who = current_principal()
        reason = validation.reason(request.reason, self._config.limits)
        if not reason:
            raise errors.InvalidField("reason", "must say why the finalizers are removed")
        params = ForceParams(
            namespace=validation.namespace(request.namespace),
            kind=ov.kind(request.kind),
            name=ov.name(request.name),
            finalizers=ov.finalizers(request.finalizers, self._ol, system_ok=True),
            reason=reason,
            principal=who.name,
            uid=ov.uid(request.uid),
        )
        forced = await self._store.force_remove_finalizers(params)
        response = owner_ref_pb2.ForceRemoveFinalizersResponse(
            deleted=forced.written.deleted, removed=list(forced.removed)
        )
        if not forced.written.deleted:
            response.object.CopyFrom(conv.written_to_pb(forced.written))
        return response

    async def DeleteObject(
        self, request: owner_ref_pb2.DeleteObjectRequest, context: Context
    ) -> owner_ref_pb2.DeleteObjectResponse:
        policy = enum_value(
            conv.POLICY_FROM_PB,
            request.propagation_policy,
            "propagation_policy",
            "propagation policy (BACKGROUND, FOREGROUND, ORPHAN)",
        )
        preconditions = request.preconditions
        if preconditions.resource_version < 0:
            raise errors.InvalidField("preconditions.resource_version", "must not be negative")
        params = DeleteParams(
            namespace=validation.namespace(request.namespace),
            kind=ov.kind(request.kind),
            name=ov.name(request.name),
            policy=policy,
            uid=ov.uid(preconditions.uid, "preconditions.uid"),
            resource_version=preconditions.resource_version,
        )
        written = await self._store.delete(params)
        if written is None or written.deleted:
            return owner_ref_pb2.DeleteObjectResponse(deleted=True)
        return owner_ref_pb2.DeleteObjectResponse(object=conv.written_to_pb(written))

    # ---- reads ------------------------------------------------------------------------

    def _selector(self, request: Any) -> tuple[str, str, str]:
        """(kind, name, uid) of a Get-style request with a name|uid oneof."""
        which = request.WhichOneof("selector")
        if which is None:
            raise errors.InvalidField("name", "name or uid is required")
        if which == "name":
            return ov.kind(request.kind), ov.name(request.name), ""
        return ov.kind(request.kind, required=False), "", ov.uid(request.uid, required=True)

    async def GetObject(
        self, request: owner_ref_pb2.GetObjectRequest, context: Context
    ) -> owner_ref_pb2.GetObjectResponse:
        kind, name, uid = self._selector(request)
        view = await self._store.get(validation.namespace(request.namespace), kind, name, uid)
        return owner_ref_pb2.GetObjectResponse(object=conv.view_to_pb(view))

    async def ListObjects(
        self, request: owner_ref_pb2.ListObjectsRequest, context: Context
    ) -> owner_ref_pb2.ListObjectsResponse:
        namespace = validation.namespace(request.namespace)
        kind = ov.kind(request.kind, required=False)
        owner_uid = ov.uid(request.owner_uid, "owner_uid")
        selector = selectors.parse(request.label_selector)
        size = validation.page_size(request.page_size, self._config.limits)
        digest = paging.query_digest(
            "objects", namespace, kind, owner_uid, request.label_selector, request.terminating_only
        )
        position = paging.decode(request.page_token, digest)
        after = None
        if position is not None:
            # Checked like the request fields they stand for: tokens are client input.
            match position:
                case [str(kind_part), str(name_part)]:
                    after = (paging.checked(kind_part, ov.kind), paging.checked(name_part, ov.name))
                case _:
                    raise errors.InvalidPageToken()
        page = await self._store.list_objects(
            ListParams(
                namespace=namespace,
                kind=kind,
                owner_uid=owner_uid,
                selector=selector,
                terminating_only=request.terminating_only,
                limit=size + 1,
                after=after,
            )
        )
        messages = [conv.view_to_pb(v) for v in page[:size]]
        fits = count_fitting(messages, self._config.max_response_bytes)
        response = owner_ref_pb2.ListObjectsResponse(objects=messages[:fits])
        if fits < len(page):
            last = page[fits - 1].obj
            response.next_page_token = paging.encode([last.kind, last.name], digest)
        return response

    async def ListDependents(
        self, request: owner_ref_pb2.ListDependentsRequest, context: Context
    ) -> owner_ref_pb2.ListDependentsResponse:
        namespace = validation.namespace(request.namespace)
        owner_uid = ov.uid(request.owner_uid, "owner_uid", required=True)
        size = validation.page_size(request.page_size, self._config.limits)
        digest = paging.query_digest("dependents", namespace, owner_uid, request.recursive)
        # A depth (an int4 in the query), then a dependent's uid.
        after = paging.int_and_id(
            paging.decode(request.page_token, digest),
            lambda uid: ov.uid(uid, required=True),
            low=1,
            high=2**31 - 1,
        )
        found = await self._store.dependents(
            namespace, owner_uid, request.recursive, size + 1, after
        )
        messages = [
            owner_ref_pb2.Dependent(object=conv.view_to_pb(d.view), depth=d.depth, owner_uid=d.via)
            for d in found[:size]
        ]
        fits = count_fitting(messages, self._config.max_response_bytes)
        response = owner_ref_pb2.ListDependentsResponse(dependents=messages[:fits])
        if fits < len(found):
            last = found[fits - 1]
            response.next_page_token = paging.encode([last.depth, last.view.obj.uid], digest)
        return response

    async def GetOwnerGraph(
        self, request: owner_ref_pb2.GetOwnerGraphRequest, context: Context
    ) -> owner_ref_pb2.GetOwnerGraphResponse:
        kind, name, uid = self._selector(request)
        _, graph = await self._store.graph(
            validation.namespace(request.namespace),
            kind,
            name,
            uid,
            ov.max_objects(request.max_objects, self._ol),
        )
        return conv.graph_to_pb(graph)

    async def WatchObjects(
        self, request: owner_ref_pb2.WatchObjectsRequest, context: Context
    ) -> AsyncIterator[owner_ref_pb2.WatchObjectsResponse]:
        namespace = validation.namespace(request.namespace)
        kind = ov.kind(request.kind, required=False)
        selector = selectors.parse(request.label_selector)
        start = validation.revision(request.start_revision)
        self._watches.take(current_principal().name, context)
        if start == 0:
            current, _ = await self._store.db.current_revision()
            start = current + 1
        page = await self._store.events_since(namespace, kind, start, limit=0)
        yield owner_ref_pb2.WatchObjectsResponse(
            header_revision=page.header_revision, compact_revision=page.compact_revision
        )

        def keep(event: ObjectEventRecord) -> bool:
            return selector.matches(event.obj.labels)

        prefix = f"{kind}/" if kind else ""
        with self._changes.watch_prefix(AREA, namespace, prefix) as changed:
            follow = Follow(
                read=lambda rev, limit: self._store.events_since(namespace, kind, rev, limit),
                convert=conv.event_to_pb,
                respond=lambda head, compact, events: owner_ref_pb2.WatchObjectsResponse(
                    header_revision=head, compact_revision=compact, events=events
                ),
                changed=changed,
                draining=self._draining,
                check_draining=self._check_draining,
                batch_size=self._config.watch_batch_size,
                poll_interval_s=self._config.poll_interval_s,
                max_response_bytes=self._config.max_response_bytes,
                keep=keep if selector else None,
            )
            async for response in follow_events(follow, start):
                yield response


def _is_set(message: owner_ref_pb2.Object, field_name: str) -> bool:
    if field_name in ("deletion_timestamp", "created_at", "termination"):
        return message.HasField(field_name)  # type: ignore[arg-type]
    return bool(getattr(message, field_name))
