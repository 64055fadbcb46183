"""OwnerRefService rules, one case each, on SQLite and PostgreSQL: propagation policies,
several and dangling owners, finalizers, recreate-while-deleting, preconditions, cycles,
leases as owners, termination status, force removal, watch and lists."""

from __future__ import annotations

import grpc
import pytest

from tether_client.pb import common_pb2, lease_pb2, owner_ref_pb2, saga_pb2, saga_pb2_grpc
from tether_server.store.objects import collector

from .conftest import WAIT_S, Harness, dur, expect_error
from .object_support import FIN, FOREGROUND, ORPHAN, ObjApi, ref

FP = grpc.StatusCode.FAILED_PRECONDITION
LEASE_KIND = "tether.v1/Lease"


@pytest.fixture
async def api(tether: Harness) -> ObjApi:
    # Tests decide when the collector runs (``converge``), so they can see what comes
    # before it.
    await tether.server.runner.stop()
    return ObjApi.on(tether.channel, tether.server)


def owner_uids(obj: owner_ref_pb2.Object) -> list[str]:
    return [r.uid for r in obj.owner_references]


# ---- background ---------------------------------------------------------------------------


async def test_background_collects_the_subtree_once_the_owner_is_gone(api: ObjApi) -> None:
    root = await api.create("root")
    child = await api.create("child", owners=[ref(root)])
    await api.create("grandchild", owners=[ref(child)])
    await api.create("bystander")
    response = await api.delete("root")
    assert response.deleted
    assert not response.HasField("object")
    assert await api.names() == {"child", "grandchild", "bystander"}
    await api.converge()
    assert await api.names() == {"bystander"}


async def test_a_dependent_with_another_owner_stays_and_loses_the_gone_reference(
    api: ObjApi,
) -> None:
    first = await api.create("first")
    second = await api.create("second")
    shared = await api.create("shared", owners=[ref(first), ref(second)])
    await api.delete("first")
    await api.converge()
    kept = await api.get("shared")
    assert kept is not None
    assert owner_uids(kept) == [second.uid]
    assert kept.resource_version > shared.resource_version
    await api.delete("second")
    await api.converge()
    assert await api.get("shared") is None


async def test_dangling_references_count_as_deleted_owners(api: ObjApi) -> None:
    first = await api.create("first")
    second = await api.create("second")
    await api.create("both", owners=[ref(first), ref(second)])
    await api.delete("first")
    await api.delete("second")
    await api.converge()
    assert await api.names() == set()


async def test_an_owner_recreated_under_the_same_name_is_another_owner(api: ObjApi) -> None:
    owner = await api.create("owner")
    await api.create("dependent", owners=[ref(owner)])
    await api.delete("owner")
    await api.create("owner")
    await api.converge()
    assert await api.names() == {"owner"}


async def test_finalizers_on_the_owner_keep_it_and_its_dependents(api: ObjApi) -> None:
    owner = await api.create("owner", finalizers=[FIN])
    await api.create("dependent", owners=[ref(owner)])
    response = await api.delete("owner")
    assert not response.deleted
    assert response.object.HasField("deletion_timestamp")
    await api.converge()
    assert await api.names() == {"owner", "dependent"}
    removed = await api.remove_finalizer("owner")
    assert removed.deleted
    await api.converge()
    assert await api.names() == set()


async def test_finalizers_on_dependents_keep_them_terminating(api: ObjApi) -> None:
    owner = await api.create("owner")
    await api.create("kept", owners=[ref(owner)], finalizers=[FIN])
    await api.create("plain", owners=[ref(owner)])
    await api.delete("owner")
    await api.converge()
    kept = await api.get("kept")
    assert kept is not None
    assert kept.HasField("deletion_timestamp")
    assert list(kept.termination.pending_finalizers) == [FIN]
    assert await api.names() == {"kept"}
    await api.remove_finalizer("kept")
    assert await api.names() == set()


# ---- foreground ---------------------------------------------------------------------------


async def test_foreground_waits_for_blocking_dependents_over_three_levels(api: ObjApi) -> None:
    root = await api.create("root")
    blocking = await api.create("blocking", owners=[ref(root, block=True)])
    loose = await api.create("loose", owners=[ref(root)])
    await api.create("leaf", owners=[ref(blocking, block=True)], finalizers=[FIN])
    await api.create("loose-leaf", owners=[ref(loose)])
    response = await api.delete("root", FOREGROUND)
    assert not response.deleted
    assert "foregroundDeletion" in response.object.finalizers
    # The answer already says what it waits for, as a read would.
    assert response.object.termination.blocking_dependents == 1
    await api.converge()
    # The non-blocking branch went; the blocking one waits for the leaf's finalizer.
    assert await api.names() == {"root", "blocking", "leaf"}
    got_root = await api.get("root")
    assert got_root is not None
    assert got_root.termination.blocking_dependents == 1
    assert [e.name for e in got_root.termination.blocking_examples] == ["blocking"]
    got_blocking = await api.get("blocking")
    assert got_blocking is not None
    assert "foregroundDeletion" in got_blocking.finalizers
    leaf = await api.get("leaf")
    assert leaf is not None
    assert leaf.HasField("deletion_timestamp")
    await api.remove_finalizer("leaf")
    await api.converge()
    assert await api.names() == set()


async def test_foreground_without_blocking_dependents_goes_at_the_first_pass(
    api: ObjApi,
) -> None:
    root = await api.create("root")
    await api.create("child", owners=[ref(root)])
    await api.delete("root", FOREGROUND)
    await api.converge()
    assert await api.names() == set()


async def test_foreground_owner_releases_a_dependent_that_has_a_solid_owner(
    api: ObjApi,
) -> None:
    root = await api.create("root")
    other = await api.create("other")
    await api.create("shared", owners=[ref(root, block=True), ref(other)])
    await api.delete("root", FOREGROUND)
    await api.converge()
    assert await api.names() == {"other", "shared"}
    shared = await api.get("shared")
    assert shared is not None
    assert owner_uids(shared) == [other.uid]


# ---- orphan -------------------------------------------------------------------------------


async def test_orphan_removes_the_reference_then_the_owner(api: ObjApi) -> None:
    root = await api.create("root")
    other = await api.create("other")
    await api.create("only", owners=[ref(root)])
    await api.create("shared", owners=[ref(root), ref(other)])
    response = await api.delete("root", ORPHAN)
    assert not response.deleted
    assert "orphan" in response.object.finalizers
    await api.converge()
    assert await api.names() == {"other", "only", "shared"}
    only = await api.get("only")
    shared = await api.get("shared")
    assert only is not None
    assert owner_uids(only) == []
    assert shared is not None
    assert owner_uids(shared) == [other.uid]


async def test_orphan_with_a_user_finalizer_keeps_the_owner_until_it_is_removed(
    api: ObjApi,
) -> None:
    root = await api.create("root", finalizers=[FIN])
    await api.create("child", owners=[ref(root)])
    await api.delete("root", ORPHAN)
    await api.converge()
    got = await api.get("root")
    assert got is not None
    assert list(got.finalizers) == [FIN]
    await api.remove_finalizer("root")
    await api.converge()
    assert await api.names() == {"child"}


# ---- terminating objects -----------------------------------------------------------------------


async def test_a_terminating_name_stays_taken_until_the_object_is_gone(api: ObjApi) -> None:
    first = await api.create("name", finalizers=[FIN])
    await api.delete("name")
    metadata = await expect_error(
        api.create("name"), grpc.StatusCode.ALREADY_EXISTS, "OBJECT_EXISTS"
    )
    assert metadata["terminating"] == "true"
    assert metadata["uid"] == first.uid
    await api.remove_finalizer("name")
    second = await api.create("name")
    assert second.uid != first.uid


async def test_a_terminating_object_takes_no_new_finalizer_and_keeps_its_timestamp(
    api: ObjApi,
) -> None:
    await api.create("obj", finalizers=[FIN])
    deleted = await api.delete("obj")
    stamp = deleted.object.deletion_timestamp
    await expect_error(
        api.stub.AddFinalizer(
            owner_ref_pb2.AddFinalizerRequest(kind="Thing", name="obj", finalizer="x.io/other")
        ),
        FP,
        "OBJECT_TERMINATING",
    )
    again = await api.delete("obj", FOREGROUND)
    assert again.object.deletion_timestamp == stamp
    assert list(again.object.finalizers) == [FIN]
    current = again.object
    current.finalizers.append("x.io/other")
    await expect_error(
        api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=current)),
        FP,
        "OBJECT_TERMINATING",
    )
    # The update that removes the last finalizer deletes the object.
    del current.finalizers[:]
    response = await api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=current))
    assert response.deleted
    assert await api.get("obj") is None


async def test_a_refusal_keeps_the_finalizer_and_says_why(api: ObjApi) -> None:
    await api.create("worktree", finalizers=[FIN])
    await api.delete("worktree")
    response = await api.remove_finalizer("worktree", refusal="uncommitted changes")
    assert not response.deleted
    got = await api.get("worktree")
    assert got is not None
    assert list(got.finalizers) == [FIN]
    (refusal,) = got.termination.refusals
    assert (refusal.finalizer, refusal.reason) == (FIN, "uncommitted changes")
    assert "uncommitted changes" in got.history[-1].text
    listed = await api.stub.ListObjects(owner_ref_pb2.ListObjectsRequest(terminating_only=True))
    assert [o.termination.refusals[0].reason for o in listed.objects] == ["uncommitted changes"]


async def test_force_remove_finalizers_is_recorded_with_who_and_why(api: ObjApi) -> None:
    root = await api.create("stuck", finalizers=[FIN, "x.io/other"])
    await api.create("child", owners=[ref(root, block=True)], finalizers=[FIN])
    await api.delete("stuck", FOREGROUND)
    response = await api.stub.ForceRemoveFinalizers(
        owner_ref_pb2.ForceRemoveFinalizersRequest(
            kind="Thing", name="stuck", finalizers=[FIN], reason="handler is gone"
        )
    )
    assert list(response.removed) == [FIN]
    assert response.object.annotations["tether.dev/finalizers-force-removed-reason"] == (
        "handler is gone"
    )
    assert "handler is gone" in response.object.history[-1].text
    everything = await api.stub.ForceRemoveFinalizers(
        owner_ref_pb2.ForceRemoveFinalizersRequest(kind="Thing", name="stuck", reason="unstick")
    )
    assert everything.deleted
    assert set(everything.removed) == {"x.io/other", "foregroundDeletion"}
    await expect_error(
        api.stub.ForceRemoveFinalizers(
            owner_ref_pb2.ForceRemoveFinalizersRequest(kind="Thing", name="child")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
    )


# ---- preconditions and compare-and-set -------------------------------------------------------


async def test_delete_preconditions_and_stale_updates_are_refused(api: ObjApi) -> None:
    obj = await api.create("obj")
    request = owner_ref_pb2.DeleteObjectRequest(kind="Thing", name="obj")
    request.preconditions.uid = "another-uid"
    await expect_error(api.stub.DeleteObject(request), FP, "UID_MISMATCH")
    request.preconditions.uid = obj.uid
    request.preconditions.resource_version = obj.resource_version + 100
    await expect_error(
        api.stub.DeleteObject(request), grpc.StatusCode.ABORTED, "RESOURCE_VERSION_CONFLICT"
    )
    obj.labels["a"] = "b"
    updated = await api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=obj))
    assert updated.object.resource_version > obj.resource_version
    await expect_error(
        api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=obj)),
        grpc.StatusCode.ABORTED,
        "RESOURCE_VERSION_CONFLICT",
    )
    request.preconditions.resource_version = updated.object.resource_version
    assert (await api.stub.DeleteObject(request)).deleted
    # A retry (the answer was lost) of a delete naming the uid: the object is gone, as asked.
    assert (await api.stub.DeleteObject(request)).deleted
    # Without a uid, nobody knows which object was meant.
    await expect_error(api.delete("obj"), grpc.StatusCode.NOT_FOUND, "OBJECT_NOT_FOUND")


async def test_owner_cycles_are_refused_when_written(api: ObjApi) -> None:
    a = await api.create("a")
    b = await api.create("b", owners=[ref(a)])
    c = await api.create("c", owners=[ref(b)])
    a.owner_references.append(ref(c))
    await expect_error(
        api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=a)), FP, "OWNER_CYCLE"
    )
    del a.owner_references[:]
    a.owner_references.append(ref(a))
    await expect_error(
        api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=a)), FP, "OWNER_CYCLE"
    )
    # Adding an owner that is not below is fine.
    d = await api.create("d")
    del a.owner_references[:]
    a.owner_references.append(ref(d))
    updated = await api.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=a))
    assert owner_uids(updated.object) == [d.uid]


async def test_create_with_a_request_id_is_idempotent(api: ObjApi) -> None:
    request = owner_ref_pb2.CreateObjectRequest(
        object=owner_ref_pb2.Object(kind="Thing", name="once"), request_id="r-1"
    )
    first = await api.stub.CreateObject(request)
    again = await api.stub.CreateObject(request)
    assert first.created
    assert not again.created
    assert again.object.uid == first.object.uid
    request.object.labels["x"] = "y"
    await expect_error(
        api.stub.CreateObject(request), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT"
    )
    request.request_id = ""
    await expect_error(
        api.stub.CreateObject(request), grpc.StatusCode.ALREADY_EXISTS, "OBJECT_EXISTS"
    )


# ---- leases as owners -------------------------------------------------------------------------


async def _lease(tether: Harness, key: str) -> lease_pb2.Lease:
    response = await tether.stub.Acquire(
        lease_pb2.AcquireRequest(key=key, holder="worker", ttl=dur(30)), timeout=WAIT_S
    )
    return response.lease


def lease_ref(lease: lease_pb2.Lease) -> common_pb2.OwnerReference:
    return common_pb2.OwnerReference(kind=LEASE_KIND, name=lease.key, uid=lease.lease_id)


async def test_objects_owned_by_a_lease_go_when_it_is_released_or_expires(
    tether: Harness, api: ObjApi
) -> None:
    released = await _lease(tether, "task-1")
    expiring = await _lease(tether, "task-2")
    await api.create("worktree-1", owners=[lease_ref(released)])
    await api.create("branch-1", owners=[lease_ref(released)])
    await api.create("worktree-2", owners=[lease_ref(expiring)])
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=released.lease_id, fencing_token=released.fencing_token, holder="worker"
        )
    )
    await api.converge()
    assert await api.names() == {"worktree-2"}
    tether.clock.advance(31)
    await tether.server.expiry.run_once()
    await api.converge()
    assert await api.names() == set()
    await expect_error(api.create("late", owners=[lease_ref(expiring)]), FP, "OWNER_NOT_FOUND")


async def test_a_refusing_worktree_handler_keeps_its_object_after_the_lease_ends(
    tether: Harness, api: ObjApi
) -> None:
    lease = await _lease(tether, "task")
    await api.create("worktree", kind="Worktree", owners=[lease_ref(lease)], finalizers=[FIN])
    await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id))
    await api.converge()
    got = await api.get("worktree", kind="Worktree")
    assert got is not None
    assert got.HasField("deletion_timestamp")
    await api.remove_finalizer("worktree", kind="Worktree", refusal="3 files uncommitted")
    await api.converge()
    got = await api.get("worktree", kind="Worktree")
    assert got is not None
    assert got.termination.refusals[0].reason == "3 files uncommitted"


# ---- the collector never silently stops -----------------------------------------------------


async def test_a_failing_collection_is_retried_with_backoff_and_counted(
    tether: Harness, api: ObjApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await api.create("owner")
    await api.create("dependent", owners=[ref(owner)])
    healthy = await api.create("healthy-owner")
    await api.create("healthy-dependent", owners=[ref(healthy)])
    real = collector.collect_item
    broken = True

    async def flaky(tx: object, namespace: str, uid: str, batch: int) -> object:
        if uid == owner.uid and broken:
            raise RuntimeError("disk on fire")
        return await real(tx, namespace, uid, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(collector, "collect_item", flaky)
    await api.delete("owner")
    await api.delete("healthy-owner")
    await api.converge()
    state = await tether.server.objects.collector_state()
    assert state.stats.failing == 1
    (item,) = state.failing
    assert item.uid == owner.uid
    assert "disk on fire" in item.last_error
    assert item.attempts == 1
    assert await api.names() == {"dependent"}  # the healthy owner's went
    # Repaired: the next attempt is due after the backoff, not before.
    broken = False
    await api.converge()
    assert await api.names() == {"dependent"}
    tether.clock.advance(1.5)
    await api.converge()
    assert await api.names() == set()
    assert (await tether.server.objects.collector_state()).stats.depth == 0


# ---- reads ------------------------------------------------------------------------------------


async def test_list_filters_by_label_selector_kind_owner_and_pages(api: ObjApi) -> None:
    owner = await api.create("owner", kind="Group")
    for index in range(5):
        await api.create(
            f"t{index}",
            owners=[ref(owner)] if index % 2 == 0 else [],
            labels={"app": "agent", "tier": "gpu" if index < 2 else "cpu"},
        )
    await api.create("other", labels={"app": "web"})

    async def names(**kw: object) -> list[str]:
        found: list[str] = []
        token = ""
        while True:
            response = await api.stub.ListObjects(
                owner_ref_pb2.ListObjectsRequest(page_size=2, page_token=token, **kw)  # type: ignore[arg-type]
            )
            found += [o.name for o in response.objects]
            token = response.next_page_token
            if not token:
                return found

    assert await names(label_selector="app=agent,tier!=gpu") == ["t2", "t3", "t4"]
    assert await names(label_selector="tier in (gpu),app") == ["t0", "t1"]
    assert await names(label_selector="!tier") == ["owner", "other"]
    assert await names(kind="Thing", label_selector="!tier") == ["other"]
    assert await names(owner_uid=owner.uid) == ["t0", "t2", "t4"]
    assert await names(kind="Group") == ["owner"]


async def test_dependents_and_the_owner_graph_show_the_tree(api: ObjApi) -> None:
    root = await api.create("root")
    mid = await api.create("mid", owners=[ref(root, controller=True, block=True)])
    await api.create("leaf", owners=[ref(mid)])
    direct = await api.stub.ListDependents(owner_ref_pb2.ListDependentsRequest(owner_uid=root.uid))
    assert [d.object.name for d in direct.dependents] == ["mid"]
    tree = await api.stub.ListDependents(
        owner_ref_pb2.ListDependentsRequest(owner_uid=root.uid, recursive=True)
    )
    assert [(d.object.name, d.depth) for d in tree.dependents] == [("mid", 1), ("leaf", 2)]
    graph = await api.stub.GetOwnerGraph(
        owner_ref_pb2.GetOwnerGraphRequest(kind="Thing", name="mid")
    )
    assert {(n.ref.name, n.depth) for n in graph.nodes} == {("mid", 0), ("root", -1), ("leaf", 1)}
    edges = {(e.owner_uid, e.dependent_uid, e.controller) for e in graph.edges}
    assert (root.uid, mid.uid, True) in edges
    assert len(edges) == 2
    small = await api.stub.GetOwnerGraph(
        owner_ref_pb2.GetOwnerGraphRequest(kind="Thing", name="mid", max_objects=2)
    )
    assert small.truncated
    assert len(small.nodes) == 2


async def test_watch_sends_added_modified_deleted_and_resumes(api: ObjApi) -> None:
    start, _ = await api.server.db.current_revision()
    root = await api.create("root", labels={"app": "a"})
    await api.create("child", owners=[ref(root)], labels={"app": "b"})
    await api.delete("root")
    await api.converge()
    stream = api.stub.WatchObjects(
        owner_ref_pb2.WatchObjectsRequest(start_revision=start + 1), timeout=WAIT_S
    )
    seen: list[tuple[str, int]] = []
    revisions: list[int] = []
    async for response in stream:
        for event in response.events:
            seen.append((event.object.name, event.type))
            revisions.append(event.revision)
        if len(seen) >= 4:
            break
    stream.cancel()
    added, deleted = owner_ref_pb2.OBJECT_EVENT_TYPE_ADDED, owner_ref_pb2.OBJECT_EVENT_TYPE_DELETED
    assert seen == [("root", added), ("child", added), ("root", deleted), ("child", deleted)]
    assert revisions == sorted(revisions)
    # Resume from the third event, with a selector.
    stream = api.stub.WatchObjects(
        owner_ref_pb2.WatchObjectsRequest(start_revision=revisions[2], label_selector="app=b"),
        timeout=WAIT_S,
    )
    async for response in stream:
        if response.events:
            assert [(e.object.name, e.type) for e in response.events] == [("child", deleted)]
            break
    stream.cancel()


# ---- sagas as owners ----------------------------------------------------------------------------


async def test_objects_owned_by_a_saga_go_when_it_is_purged(tether: Harness, api: ObjApi) -> None:
    sagas = saga_pb2_grpc.SagaServiceStub(tether.channel)
    await sagas.CreateSaga(saga_pb2.CreateSagaRequest(saga_id="pr-7", kind="agent"))
    owner = common_pb2.OwnerReference(kind="tether.v1/Saga", name="pr-7", uid="pr-7")
    await api.create("preview", owners=[owner])
    await api.converge()
    # A live saga is a solid owner, and only a terminal saga can be purged.
    assert not await tether.server.sagas.purge("default", "pr-7")
    await sagas.CancelSaga(saga_pb2.CancelSagaRequest(saga_id="pr-7", reason="done"))
    await api.converge()
    assert await api.names() == {"preview"}
    assert await tether.server.sagas.purge("default", "pr-7")
    await api.converge()
    assert await api.names() == set()
    await expect_error(api.create("late", owners=[owner]), FP, "OWNER_NOT_FOUND")
