"""Object protobuf <-> domain conversions."""

from __future__ import annotations

from tether_client.pb import common_pb2, owner_ref_pb2
from tether_server.domain.objects import EventType, Obj, OwnerRef, Policy, Termination
from tether_server.services.convert import to_timestamp
from tether_server.services.saga_convert import to_struct
from tether_server.store.objects import ObjectEventRecord, ObjectView, Written
from tether_server.store.objects.read import Graph

POLICY_FROM_PB = {
    owner_ref_pb2.PROPAGATION_POLICY_UNSPECIFIED: Policy.BACKGROUND,
    owner_ref_pb2.PROPAGATION_POLICY_BACKGROUND: Policy.BACKGROUND,
    owner_ref_pb2.PROPAGATION_POLICY_FOREGROUND: Policy.FOREGROUND,
    owner_ref_pb2.PROPAGATION_POLICY_ORPHAN: Policy.ORPHAN,
}
EVENT_TYPE_TO_PB = {
    EventType.ADDED: owner_ref_pb2.OBJECT_EVENT_TYPE_ADDED,
    EventType.MODIFIED: owner_ref_pb2.OBJECT_EVENT_TYPE_MODIFIED,
    EventType.DELETED: owner_ref_pb2.OBJECT_EVENT_TYPE_DELETED,
}


def owner_ref_from_pb(message: common_pb2.OwnerReference) -> OwnerRef:
    return OwnerRef(
        uid=message.uid,
        kind=message.kind,
        name=message.name,
        controller=message.controller,
        block_owner_deletion=message.block_owner_deletion,
    )


def owner_ref_to_pb(ref: OwnerRef) -> common_pb2.OwnerReference:
    return common_pb2.OwnerReference(
        uid=ref.uid,
        kind=ref.kind,
        name=ref.name,
        controller=ref.controller,
        block_owner_deletion=ref.block_owner_deletion,
    )


def termination_to_pb(why: Termination) -> owner_ref_pb2.TerminationStatus:
    return owner_ref_pb2.TerminationStatus(
        pending_finalizers=list(why.pending_finalizers),
        blocking_dependents=why.blocking_dependents,
        blocking_examples=[
            owner_ref_pb2.ObjectRef(kind=kind, name=name, uid=uid)
            for kind, name, uid in why.blocking_examples
        ],
        refusals=[
            owner_ref_pb2.FinalizerRefusal(
                finalizer=r.finalizer,
                reason=r.reason,
                recorded_at=to_timestamp(r.recorded_at_us),
                recorded_by=r.recorded_by,
            )
            for r in why.refusals
        ],
    )


def object_to_pb(obj: Obj, termination: Termination | None = None) -> owner_ref_pb2.Object:
    message = owner_ref_pb2.Object(
        namespace=obj.namespace,
        kind=obj.kind,
        name=obj.name,
        uid=obj.uid,
        labels=dict(obj.labels),
        annotations=dict(obj.annotations),
        spec=to_struct(obj.spec),
        status=to_struct(obj.status),
        owner_references=[owner_ref_to_pb(r) for r in obj.owner_refs],
        finalizers=list(obj.finalizers),
        resource_version=obj.mod_revision,
        created_at=to_timestamp(obj.created_at_us),
        create_revision=obj.create_revision,
        history=[
            common_pb2.Annotation(
                created_at=to_timestamp(h.created_at_us),
                author=h.author,
                text=h.text,
                attributes=dict(h.attributes),
            )
            for h in obj.history
        ],
    )
    if obj.deletion_ts_us is not None:
        message.deletion_timestamp.CopyFrom(to_timestamp(obj.deletion_ts_us))
        why = termination or Termination(obj.finalizers, 0, (), obj.refusals)
        message.termination.CopyFrom(termination_to_pb(why))
    return message


def written_to_pb(written: Written) -> owner_ref_pb2.Object:
    return object_to_pb(written.obj, written.termination)


def view_to_pb(view: ObjectView) -> owner_ref_pb2.Object:
    return object_to_pb(view.obj, view.termination)


def event_to_pb(event: ObjectEventRecord) -> owner_ref_pb2.ObjectEvent:
    return owner_ref_pb2.ObjectEvent(
        revision=event.revision,
        type=EVENT_TYPE_TO_PB[event.type],
        object=object_to_pb(event.obj),
        occurred_at=to_timestamp(event.occurred_at_us),
    )


def graph_to_pb(graph: Graph) -> owner_ref_pb2.GetOwnerGraphResponse:
    response = owner_ref_pb2.GetOwnerGraphResponse(truncated=graph.truncated)
    for node in graph.nodes:
        message = response.nodes.add(
            ref=owner_ref_pb2.ObjectRef(kind=node.kind, name=node.name, uid=node.uid),
            depth=node.depth,
            finalizers=list(node.finalizers),
        )
        if node.deletion_ts_us is not None:
            message.deletion_timestamp.CopyFrom(to_timestamp(node.deletion_ts_us))
    for edge in graph.edges:
        response.edges.add(
            owner_uid=edge.owner_uid,
            dependent_uid=edge.dependent_uid,
            controller=edge.controller,
            block_owner_deletion=edge.block_owner_deletion,
        )
    return response
