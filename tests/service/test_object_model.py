"""A property-based test against a small model of the Kubernetes garbage collector.

Random forests of objects (owners always created first, so no cycles), random block flags
and finalizers, then random deletes with random policies and finalizer removals (a
handler finishing). After each step the server's collector runs until nothing is due and
the model runs to its fixpoint; the live objects, which of them are terminating, and the
owners each still names must match.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether_client.pb import owner_ref_pb2

from .conftest import Harness
from .object_support import BACKGROUND, FIN, FOREGROUND, ORPHAN, ObjApi, ref

FG = "foregroundDeletion"
OR = "orphan"
_EXAMPLES = itertools.count()
POLICIES = {BACKGROUND: "background", FOREGROUND: "foreground", ORPHAN: "orphan"}


@dataclass
class MObj:
    owners: dict[str, bool]  # owner name -> block_owner_deletion
    finalizers: list[str]
    deleting: bool = False


@dataclass
class Model:
    objs: dict[str, MObj] = field(default_factory=dict)

    def dependents(self, owner: str) -> list[str]:
        return sorted(n for n, o in self.objs.items() if owner in o.owners)

    def waiting(self, name: str) -> bool:
        o = self.objs.get(name)
        return o is not None and o.deleting and FG in o.finalizers

    def solid(self, name: str) -> bool:
        return name in self.objs and not self.waiting(name)

    def delete(self, name: str, policy: str) -> None:
        o = self.objs[name]
        if o.deleting:
            return
        has_dependents = bool(self.dependents(name))
        if has_dependents and policy == "foreground":
            o.finalizers.append(FG)
        elif has_dependents and policy == "orphan":
            o.finalizers.append(OR)
        if not o.finalizers:
            del self.objs[name]
            return
        o.deleting = True

    def settle(self) -> None:
        """Kubernetes' rules until nothing changes."""
        changed = True
        while changed:
            changed = False
            for name in sorted(self.objs):
                o = self.objs.get(name)
                if o is None:
                    continue
                if o.deleting and not o.finalizers:
                    del self.objs[name]
                    changed = True
                    continue
                if o.deleting and OR in o.finalizers:
                    for d in self.dependents(name):
                        del self.objs[d].owners[name]
                    o.finalizers.remove(OR)
                    changed = True
                    continue
                # A waiting owner first has its dependents dealt with (all of them, not
                # only the blocking ones), then waits for the blocking ones to go.
                deps = self.dependents(name)
                if (
                    self.waiting(name)
                    and all(self.objs[d].deleting for d in deps)
                    and not any(self.objs[d].owners[name] for d in deps)
                ):
                    o.finalizers.remove(FG)
                    changed = True
                    continue
                if o.deleting or not o.owners:
                    continue
                if all(self.solid(owner) for owner in o.owners):
                    continue
                solid = [owner for owner in o.owners if self.solid(owner)]
                if solid:
                    o.owners = {k: v for k, v in o.owners.items() if k in solid}
                elif any(self.waiting(owner) for owner in o.owners) and self.dependents(name):
                    self.delete(name, "foreground")
                else:
                    self.delete(name, "background")
                changed = True

    def view(self) -> dict[str, tuple[bool, frozenset[str]]]:
        def named(owner: str) -> str:
            return owner if owner in self.objs else f"gone:{owner}"

        # A terminating object's remaining references depend on the order the collector
        # met its owners (in Kubernetes too); only live objects' references are compared.
        return {
            n: (o.deleting, frozenset() if o.deleting else frozenset(map(named, o.owners)))
            for n, o in self.objs.items()
        }


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, dict[str, bool], bool]], list[tuple[str, str, int]]]:
    count = draw(st.integers(min_value=2, max_value=7))
    forest = []
    for index in range(count):
        earlier = [f"o{i}" for i in range(index)]
        owners = (
            draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2)) if earlier else []
        )
        blocks = {owner: draw(st.booleans()) for owner in owners}
        forest.append((f"o{index}", blocks, draw(st.booleans())))
    names = [name for name, _, _ in forest]
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["delete", "finish"]),
                st.sampled_from(names),
                st.sampled_from(sorted(POLICIES)),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return forest, steps


@pytest.fixture
async def model_api(tether: Harness) -> ObjApi:
    await tether.server.runner.stop()
    return ObjApi.on(tether.channel, tether.server)


async def server_view(api: ObjApi) -> dict[str, tuple[bool, frozenset[str]]]:
    response = await api.stub.ListObjects(
        owner_ref_pb2.ListObjectsRequest(namespace=api.namespace, page_size=1000)
    )
    by_uid = {o.uid: o.name for o in response.objects}
    return {
        o.name: (
            o.HasField("deletion_timestamp"),
            frozenset()
            if o.HasField("deletion_timestamp")
            else frozenset(by_uid.get(r.uid, f"gone:{r.name}") for r in o.owner_references),
        )
        for o in response.objects
    }


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
async def test_collector_converges_to_the_kubernetes_model(
    model_api: ObjApi,
    scenario: tuple[list[tuple[str, dict[str, bool], bool]], list[tuple[str, str, int]]],
) -> None:
    api = model_api
    forest, steps = scenario
    # Each example starts from an empty namespace of its own.
    api.namespace = f"model-{next(_EXAMPLES)}"
    model = Model()
    created: dict[str, owner_ref_pb2.Object] = {}
    for name, owners, finalizer in forest:
        refs = [ref(created[o], block=block) for o, block in owners.items()]
        created[name] = await api.create(name, owners=refs, finalizers=[FIN] if finalizer else [])
        model.objs[name] = MObj(dict(owners), [FIN] if finalizer else [])
    for action, name, policy in steps:
        if action == "delete" and name in model.objs:
            await api.delete(name, policy)
            model.delete(name, POLICIES[policy])
        elif (
            action == "finish"
            and name in model.objs
            and model.objs[name].deleting
            and FIN in model.objs[name].finalizers
        ):
            await api.remove_finalizer(name)
            model.objs[name].finalizers.remove(FIN)
        await api.converge()
        model.settle()
        assert await server_view(api) == model.view(), (forest, steps)
