"""OwnerRefService: bad input gets the precise status, ErrorInfo reason and field, changes
nothing, and is never a server fault (INTERNAL / UNKNOWN)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether_client.pb import owner_ref_pb2

from .conftest import Harness, error_info, expect_error
from .object_support import FIN, ObjApi, ref

IA = grpc.StatusCode.INVALID_ARGUMENT
FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
KIB = 1024
pb = owner_ref_pb2


def obj(name: str = "x", kind: str = "Thing", **fields: Any) -> owner_ref_pb2.Object:
    return pb.Object(kind=kind, name=name, **fields)


def big_struct(size: int) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update({"blob": "x" * size})
    return message


Call = Callable[[ObjApi, owner_ref_pb2.Object], Awaitable[Any]]


def create(o: owner_ref_pb2.Object, namespace: str = "") -> Call:
    async def call(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
        return await api.stub.CreateObject(pb.CreateObjectRequest(namespace=namespace, object=o))

    return call


def create_owned(**ref_fields: Any) -> Call:
    async def call(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
        owner_ref = ref(owner)
        for key, value in ref_fields.items():
            setattr(owner_ref, key, value)
        return await api.stub.CreateObject(
            pb.CreateObjectRequest(object=obj("owned", owner_references=[owner_ref]))
        )

    return call


async def two_controllers(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    other = await api.create("other")
    refs = [ref(owner, controller=True), ref(other, controller=True)]
    return await api.stub.CreateObject(
        pb.CreateObjectRequest(object=obj("owned", owner_references=refs))
    )


async def cross_namespace(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.CreateObject(
        pb.CreateObjectRequest(
            namespace="elsewhere", object=obj("owned", owner_references=[ref(owner)])
        )
    )


async def stale_update(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    stale = pb.Object()
    stale.CopyFrom(owner)
    stale.resource_version += 1000
    return await api.stub.UpdateObject(pb.UpdateObjectRequest(object=stale))


async def update_without_version(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.UpdateObject(pb.UpdateObjectRequest(object=obj("owner")))


async def add_system_finalizer(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.AddFinalizer(
        pb.AddFinalizerRequest(kind="Thing", name="owner", finalizer="foregroundDeletion")
    )


async def bad_selector(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.ListObjects(pb.ListObjectsRequest(label_selector="app in (a"))


async def bad_page_token(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.ListObjects(pb.ListObjectsRequest(page_token="garbage"))


async def bad_policy(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.DeleteObject(
        pb.DeleteObjectRequest(kind="Thing", name="owner", propagation_policy=42)  # type: ignore[arg-type]
    )


async def get_nothing(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.GetObject(pb.GetObjectRequest(kind="Thing"))


async def get_absent(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.GetObject(pb.GetObjectRequest(kind="Thing", name="absent"))


async def delete_absent(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.DeleteObject(pb.DeleteObjectRequest(kind="Thing", name="absent"))


async def remove_finalizer_wrong_uid(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.RemoveFinalizer(
        pb.RemoveFinalizerRequest(kind="Thing", name="owner", finalizer=FIN, uid="other")
    )


async def force_without_reason(api: ObjApi, owner: owner_ref_pb2.Object) -> Any:
    return await api.stub.ForceRemoveFinalizers(
        pb.ForceRemoveFinalizersRequest(kind="Thing", name="owner")
    )


CASES: dict[str, tuple[Call, grpc.StatusCode, str, str]] = {
    "no kind": (create(obj(kind="")), IA, "INVALID_FIELD", "object.kind"),
    "kind with a slash": (create(obj(kind="a/b")), IA, "INVALID_FIELD", "object.kind"),
    "bad name": (create(obj(name="-x")), IA, "INVALID_FIELD", "object.name"),
    "uid set": (create(obj(uid="mine")), IA, "INVALID_FIELD", "object.uid"),
    "resource version set": (
        create(obj(resource_version=3)),
        IA,
        "INVALID_FIELD",
        "object.resource_version",
    ),
    "bad namespace": (create(obj(), namespace="Bad_NS"), IA, "INVALID_FIELD", "namespace"),
    "unqualified finalizer": (
        create(obj(finalizers=["cleanup"])),
        IA,
        "INVALID_FIELD",
        "object.finalizers[0]",
    ),
    "system finalizer": (
        create(obj(finalizers=["orphan"])),
        IA,
        "INVALID_FIELD",
        "object.finalizers[0]",
    ),
    "oversized labels": (
        create(obj(labels={"k": "v" * 300})),
        IA,
        "INVALID_FIELD",
        "labels['k']",
    ),
    "too many labels": (
        create(obj(labels={f"k{i}": "v" for i in range(65)})),
        IA,
        "INVALID_FIELD",
        "labels",
    ),
    "oversized spec": (
        create(obj(spec=big_struct(300 * KIB))),
        IA,
        "INVALID_FIELD",
        "object.spec",
    ),
    "unknown owner kind": (
        create_owned(kind="tether.v1/Bogus"),
        IA,
        "INVALID_FIELD",
        "owner_references[0].kind",
    ),
    "unknown owner uid": (
        create_owned(uid="no-such-uid"),
        FP,
        "OWNER_NOT_FOUND",
        "",
    ),
    "owner kind and name mismatch": (
        create_owned(name="someone-else"),
        IA,
        "INVALID_FIELD",
        "owner_references[0].name",
    ),
    "unknown lease": (
        create_owned(kind="tether.v1/Lease", uid="0" * 32),
        FP,
        "OWNER_NOT_FOUND",
        "",
    ),
    "unknown saga": (
        create_owned(kind="tether.v1/Saga", uid="no-such-saga"),
        FP,
        "OWNER_NOT_FOUND",
        "",
    ),
    "two controllers": (two_controllers, IA, "INVALID_FIELD", "owner_references[1].controller"),
    "cross-namespace owner": (cross_namespace, FP, "OWNER_NOT_FOUND", ""),
    "stale resource version": (
        stale_update,
        grpc.StatusCode.ABORTED,
        "RESOURCE_VERSION_CONFLICT",
        "",
    ),
    "update without resource version": (
        update_without_version,
        IA,
        "INVALID_FIELD",
        "object.resource_version",
    ),
    "system finalizer added": (add_system_finalizer, IA, "INVALID_FIELD", "finalizer"),
    "bad label selector": (bad_selector, IA, "INVALID_FIELD", "label_selector"),
    "bad page token": (bad_page_token, IA, "INVALID_PAGE_TOKEN", "page_token"),
    "unknown propagation policy": (bad_policy, IA, "INVALID_FIELD", "propagation_policy"),
    "get without name or uid": (get_nothing, IA, "INVALID_FIELD", "name"),
    "get absent": (get_absent, NF, "OBJECT_NOT_FOUND", ""),
    "delete absent": (delete_absent, NF, "OBJECT_NOT_FOUND", ""),
    "uid precondition": (remove_finalizer_wrong_uid, FP, "UID_MISMATCH", ""),
    "force without reason": (force_without_reason, IA, "INVALID_FIELD", "reason"),
}


@pytest.fixture
async def seeded(tether: Harness) -> tuple[ObjApi, owner_ref_pb2.Object]:
    api = ObjApi.on(tether.channel, tether.server)
    owner = await api.create("owner", finalizers=[FIN])
    return api, owner


async def test_bad_input_is_refused_precisely_and_changes_nothing(
    seeded: tuple[ObjApi, owner_ref_pb2.Object],
) -> None:
    # One server for every case (each is refused, so none changes what the next sees).
    api, owner = seeded
    for case in sorted(CASES):
        call, code, reason, field_name = CASES[case]
        before = await api.names()
        metadata = await expect_error(call(api, owner), code, reason)
        if field_name:
            assert metadata.get("field") == field_name, case
        assert await api.names() - {"other"} == before - {"other"}, case
        assert await api.get("owner") == owner, case


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.text(max_size=80),
    name=st.text(max_size=300),
    finalizer=st.text(max_size=80),
    selector=st.text(max_size=60),
)
async def test_arbitrary_strings_never_fault_the_server(
    seeded: tuple[ObjApi, owner_ref_pb2.Object],
    kind: str,
    name: str,
    finalizer: str,
    selector: str,
) -> None:
    api, _ = seeded
    calls = [
        api.stub.CreateObject(
            pb.CreateObjectRequest(object=obj(name, kind=kind, finalizers=[finalizer]))
        ),
        api.stub.ListObjects(pb.ListObjectsRequest(kind=kind, label_selector=selector)),
        api.stub.AddFinalizer(pb.AddFinalizerRequest(kind=kind, name=name, finalizer=finalizer)),
        api.stub.GetOwnerGraph(pb.GetOwnerGraphRequest(kind=kind, uid=name or "u")),
        api.stub.ListDependents(pb.ListDependentsRequest(owner_uid=name or "u")),
    ]
    refusals = []
    for call in calls:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            refusals.append((*error_info(exc)[:2], exc.details()))
    for code, reason, details in refusals:
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
        assert reason, details
