"""``tether object ...`` as a subprocess against a real server, on both backends.

The objects are set up with the Python client in the test process: a project owning a
job, which owns a worktree (with a finalizer) and a pod. The CLI then reads, deletes and
forces them.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e import ServerFactory
from tests.e2e.cli_support import Cli, fields, section
from tether_client import TetherClient
from tether_client.pb import common_pb2, owner_ref_pb2

pytestmark = pytest.mark.e2e

FINALIZER = "example.com/worktree"


tether = Cli("object")
ok = tether.ok
ok_json = tether.ok_json


def owned_by(owner: owner_ref_pb2.Object, *, block: bool = False) -> common_pb2.OwnerReference:
    return common_pb2.OwnerReference(
        kind=owner.kind,
        name=owner.name,
        uid=owner.uid,
        controller=True,
        block_owner_deletion=block,
    )


async def _setup(target: str) -> dict[str, str]:
    """Project/tether → Job/build-1 → Worktree/wt-1 (finalizer) and Pod/pod-1; name → uid."""
    async with TetherClient(target) as client:

        async def create(obj: owner_ref_pb2.Object) -> owner_ref_pb2.Object:
            return (await client.objects.create(obj=obj)).object

        project = await create(owner_ref_pb2.Object(kind="Project", name="tether"))
        job = await create(
            owner_ref_pb2.Object(
                kind="Job",
                name="build-1",
                labels={"app": "agent"},
                owner_references=[owned_by(project)],
            )
        )
        worktree = await create(
            owner_ref_pb2.Object(
                kind="Worktree",
                name="wt-1",
                labels={"app": "agent", "tier": "disk"},
                finalizers=[FINALIZER],
                owner_references=[owned_by(job, block=True)],
            )
        )
        pod = await create(
            owner_ref_pb2.Object(kind="Pod", name="pod-1", owner_references=[owned_by(job)])
        )
        return {obj.name: obj.uid for obj in (project, job, worktree, pod)}


async def _refuse(target: str, reason: str) -> None:
    async with TetherClient(target) as client:
        await client.objects.remove_finalizer("Worktree", "wt-1", FINALIZER, refusal=reason)


def test_get_list_and_tree(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    uids = asyncio.run(_setup(target))

    table = ok(target, "list").splitlines()
    assert table[0].split() == ["KIND", "NAME", "UID", "AGE", "STATE", "FINALIZERS"]
    rows = {row.split()[1]: row.split() for row in table[1:]}
    assert set(rows) == {"tether", "build-1", "wt-1", "pod-1"}
    assert rows["wt-1"][0] == "Worktree"
    assert rows["wt-1"][2] == uids["wt-1"]
    assert rows["wt-1"][4:] == ["active", FINALIZER]
    assert rows["pod-1"][4:] == ["active", "-"]

    def names(*args: str) -> list[str]:
        return sorted(obj["name"] for obj in ok_json(target, "list", *args))

    assert names("-l", "app=agent,tier!=disk") == ["build-1"]
    assert names("--kind", "Worktree", "--owner", uids["build-1"]) == ["wt-1"]

    # Deleted with a finalizer: it stays, terminating, and says why.
    deleting = fields(ok(target, "delete", "Worktree", "wt-1"))
    assert deleting["state"] == "terminating"
    asyncio.run(_refuse(target, "uncommitted changes in src/"))
    shown = ok(target, "get", "Worktree", "wt-1")
    facts = fields(shown)
    assert facts["uid"] == uids["wt-1"]
    assert facts["state"] == "terminating"
    assert facts["labels"] == "app=agent,tier=disk"
    termination = section(shown, "termination")
    assert ["pending_finalizers:", FINALIZER] in termination
    assert section(shown, "refusals")[0] == ["FINALIZER", "RECORDED", "BY", "REASON"]
    refusal = section(shown, "refusals")[1]
    assert refusal[0] == FINALIZER
    assert refusal[-4:] == ["uncommitted", "changes", "in", "src/"]
    assert any("uncommitted changes in src/" in " ".join(row) for row in section(shown, "history"))
    assert [row[:2] for row in section(shown, "owners")[1:]] == [["Job", "build-1"]]

    listed = ok(target, "list", "--terminating").splitlines()
    assert [row.split()[1] for row in listed[1:]] == ["wt-1"]
    assert listed[1].split()[4] == "terminating"

    by_uid = ok_json(target, "get", "Worktree", "--uid", uids["wt-1"])
    assert by_uid["name"] == "wt-1"
    assert by_uid["termination"]["pending_finalizers"] == [FINALIZER]
    assert by_uid["termination"]["refusals"][0]["reason"] == "uncommitted changes in src/"

    tree = ok(target, "tree", "Job", "build-1").splitlines()
    assert tree[0].lstrip().startswith("Project/tether")
    job = next(line for line in tree if "Job/build-1" in line)
    assert job.startswith("* ")
    worktree = next(line for line in tree if "Worktree/wt-1" in line)
    pod = next(line for line in tree if "Pod/pod-1" in line)

    def indent(line: str) -> int:
        return len(line[2:]) - len(line[2:].lstrip())

    assert indent(tree[0]) < indent(job) < indent(worktree) == indent(pod)
    assert "terminating" in worktree
    assert f"finalizers={FINALIZER}" in worktree
    assert "terminating" not in pod
    assert "(truncated)" not in tree
    graph = ok_json(target, "tree", "Job", "--uid", uids["build-1"])
    assert {node["ref"]["name"]: node["depth"] for node in graph["nodes"]} == {
        "tether": -1,
        "build-1": 0,
        "wt-1": 1,
        "pod-1": 1,
    }
    truncated = ok(target, "tree", "Job", "build-1", "--max-objects", "2").splitlines()
    assert truncated[-1] == "(truncated)"


def test_delete_force_and_refusals(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    uids = asyncio.run(_setup(target))

    assert ok(target, "delete", "Pod", "pod-1").strip() == "deleted Pod/pod-1"
    missing = tether(target, "get", "Pod", "pod-1")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("tether: OBJECT_NOT_FOUND: ")
    assert "Traceback" not in missing.stderr

    wrong = tether(target, "delete", "Job", "build-1", "--uid", uids["tether"])
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("tether: UID_MISMATCH: ")
    assert f"  expected_uid: {uids['tether']}" in wrong.stderr.splitlines()
    stale = tether(target, "delete", "Job", "build-1", "--resource-version", "1")
    assert stale.returncode == 1
    assert "RESOURCE_VERSION_CONFLICT" in stale.stderr

    deleting = ok_json(target, "delete", "Worktree", "wt-1")
    assert deleting["deleted"] is False
    assert deleting["object"]["finalizers"] == [FINALIZER]
    forced = ok(target, "force-remove-finalizers", "Worktree", "wt-1", "--reason", "worker is gone")
    assert forced.splitlines() == [f"removed: {FINALIZER}", "deleted Worktree/wt-1"]
    assert tether(target, "get", "Worktree", "wt-1").stderr.startswith("tether: OBJECT_NOT_FOUND: ")

    assert tether(target, "force-remove-finalizers", "Worktree", "wt-1").returncode == 2
    assert tether(target, "delete", "Job", "build-1", "--propagation", "sideways").returncode == 2
