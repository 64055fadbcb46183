"""The blocking client has the async client's surface: same members, same parameters,
blocking return types. Nothing is listed by hand on either side: the async classes are
found from ``TetherClient`` (its attributes and the return types of its members), their
twins by name (``XSync`` in ``tether_client.sync``), and every difference is one of the
documented exceptions below. A member added to an async class without its blocking form
fails here (and the generator adds that form on its own: see the last tests).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
)
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, cast

import pytest

from tether_client import sync
from tether_client.client import TetherClient
from tether_client.keeper import HeldLease
from tether_client.leases import LeasesClient
from tether_client.pb import lease_pb2
from tether_client.sync import (
    CompensationWorkerSync,
    FinalizerWorkerSync,
    LeasesClientSync,
    TetherClientSync,
    _Loop,
    _View,
)

# Members of the async surface the blocking one leaves out, and why.
LEFT_OUT: dict[type, dict[str, str]] = {
    TetherClient: {"stubs": "the generated stubs are async: client.client.stubs, on its loop"},
}
# Members only the blocking one has, and why.
SYNC_ONLY: dict[type, dict[str, str]] = {
    TetherClientSync: {
        "client": "the async client underneath",
        "closed": "whether close() ran (calls raise RuntimeError then)",
        "run_coroutine": "runs async code on the client's loop",
    },
    CompensationWorkerSync: {"stop": "the async worker's stop is an asyncio.Event"},
    FinalizerWorkerSync: {"stop": "the async worker's stop is an asyncio.Event"},
}
# Parameters whose annotation differs, and why.
PARAMETER_ANNOTATIONS: dict[tuple[type, str, str], str] = {
    (TetherClient, "hold", "on_lost"): 'a blocking body cannot be cancelled: no "cancel"',
}
# Classes of the async surface handed to sync code as they are, and why.
PASSED_THROUGH: dict[type, str] = {
    HeldLease: "read from any thread; its one coroutine, wait_lost, is for async code",
}

_AWAITABLES = (Awaitable, Coroutine)
_ASYNC_ITERATORS = (AsyncIterator, AsyncIterable, AsyncGenerator)


# --- reading a surface ---------------------------------------------------------------------


def resolved(annotation: Any, function: Callable[..., Any]) -> Any:
    """An annotation evaluated where it was written (again while it names a string
    alias); the string when that fails."""
    for _ in range(8):
        if not isinstance(annotation, str):
            break
        try:
            annotation = eval(annotation, inspect.unwrap(function).__globals__)
        except Exception:
            break
    return annotation


def public(cls: type) -> dict[str, Any]:
    return {
        name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")
    }


def returns_of(function: Callable[..., Any]) -> Any:
    return resolved(inspect.signature(function).return_annotation, function)


def is_async(function: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        return True
    origin = typing.get_origin(returns_of(function))
    return origin in (*_AWAITABLES, *_ASYNC_ITERATORS, AbstractAsyncContextManager)


def classes_in(annotation: Any) -> set[type]:
    if isinstance(annotation, type):
        return {annotation}
    return {cls for arg in typing.get_args(annotation) for cls in classes_in(arg)}


def reachable_async_classes() -> set[type]:
    """TetherClient, its area clients, and every class of the package with async members
    that a member of one of those returns."""
    with TetherClientSync("127.0.0.1:1") as client:
        found = {TetherClient} | {
            type(value) for name, value in vars(client.client).items() if name[0] != "_"
        }
    queue = list(found)
    while queue:
        for member in public(queue.pop()).values():
            getter = member.fget if isinstance(member, property) else member
            if not inspect.isfunction(getter):
                continue
            for cls in classes_in(returns_of(getter)):
                has_async = any(inspect.isfunction(m) and is_async(m) for m in public(cls).values())
                if cls.__module__.startswith("tether_client") and has_async and cls not in found:
                    found.add(cls)
                    if cls not in PASSED_THROUGH:
                        queue.append(cls)
    return found


def twin_of(cls: type) -> type | None:
    twin = getattr(sync, f"{cls.__name__}Sync", None)
    return twin if isinstance(twin, type) else None


def blocking(annotation: Any, twins: dict[type, type]) -> Any:
    """The type sync code gets where async code gets ``annotation``."""
    if isinstance(annotation, type):
        return twins.get(annotation, annotation)
    if typing.get_origin(annotation) is not None and isinstance(annotation, type(int | str)):
        args = [blocking(arg, twins) for arg in typing.get_args(annotation)]
        union = args[0]
        for arg in args[1:]:
            union = union | arg
        return union
    return annotation


def expected_return(function: Callable[..., Any], twins: dict[type, type]) -> Any:
    """The return annotation the blocking form of ``function`` must have."""
    returns = returns_of(function)
    if isinstance(returns, str):
        return returns  # not resolvable at runtime: passed on as written
    if inspect.iscoroutinefunction(function):
        return blocking(returns, twins)
    origin, args = typing.get_origin(returns), typing.get_args(returns)
    if origin in _AWAITABLES:
        return blocking(args[-1], twins)
    if origin in _ASYNC_ITERATORS:
        return Iterator[blocking(args[0], twins)]  # type: ignore[misc]
    if origin is AbstractAsyncContextManager:
        return AbstractContextManager[blocking(args[0], twins)]  # type: ignore[misc]
    return blocking(returns, twins)


def signature_mismatches(
    where: str,
    async_fn: Callable[..., Any],
    sync_fn: Callable[..., Any],
    twins: dict[type, type],
    annotations_differ: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[str]:
    found = []
    async_parameters = list(inspect.signature(async_fn).parameters.values())
    sync_parameters = list(inspect.signature(sync_fn).parameters.values())
    if [p.name for p in async_parameters] != [p.name for p in sync_parameters]:
        found.append(
            f"{where}: parameters {[p.name for p in sync_parameters]}, "
            f"not {[p.name for p in async_parameters]}"
        )
        return found
    for a, s in zip(async_parameters, sync_parameters, strict=True):
        if a.kind != s.kind:
            found.append(f"{where}({a.name}): {s.kind.description}, not {a.kind.description}")
        if a.default != s.default:
            found.append(f"{where}({a.name}): default {s.default!r}, not {a.default!r}")
        a_type, s_type = resolved(a.annotation, async_fn), resolved(s.annotation, sync_fn)
        if a.name not in annotations_differ and a_type != s_type:
            found.append(f"{where}({a.name}): annotated {s_type!r}, not {a_type!r}")
    want, got = expected_return(async_fn, twins), returns_of(sync_fn)
    if want != got:
        found.append(f"{where}: returns {got!r}, not {want!r}")
    return found


def surface_mismatches(
    async_cls: type, sync_cls: type, twins: dict[type, type] | None = None
) -> list[str]:
    """What differs between the public members of ``async_cls`` and ``sync_cls`` beyond
    the documented exceptions; empty when the blocking surface matches."""
    twins = twins or {}
    left_out = LEFT_OUT.get(async_cls, {}).keys()
    sync_only = SYNC_ONLY.get(sync_cls, {}).keys()
    async_members, sync_members = public(async_cls), public(sync_cls)
    found = [f"{name}: missing" for name in async_members.keys() - sync_members.keys() - left_out]
    found += [
        f"{name}: not in the async surface"
        for name in sync_members.keys() - async_members.keys() - sync_only
    ]
    found += [f"{name}: left out, yet present" for name in left_out & sync_members.keys()]
    for name in sorted(async_members.keys() & sync_members.keys()):
        a, s = async_members[name], sync_members[name]
        where = f"{sync_cls.__name__}.{name}"
        if isinstance(a, property):
            if not isinstance(s, property):
                found.append(f"{where}: not a property")
            elif a.fget is not None and s.fget is not None:
                want, got = blocking(returns_of(a.fget), twins), returns_of(s.fget)
                if want != got:
                    found.append(f"{where}: returns {got!r}, not {want!r}")
        elif inspect.isfunction(a):
            if not inspect.isfunction(s):
                found.append(f"{where}: not a method")
                continue
            differ = {p for (c, m, p) in PARAMETER_ANNOTATIONS if c is async_cls and m == name}
            found += signature_mismatches(where, a, s, twins, differ)
        elif a != s:
            found.append(f"{where}: {s!r}, not {a!r}")
    return found


@pytest.fixture(scope="module")
def twins() -> dict[type, type]:
    pairs = {}
    for cls in reachable_async_classes():
        if cls in PASSED_THROUGH:
            continue
        twin = twin_of(cls)
        assert twin is not None, f"{cls.__name__} has no blocking twin {cls.__name__}Sync"
        pairs[cls] = twin
    return pairs


# --- the surfaces ---------------------------------------------------------------------------


def test_every_async_class_of_the_surface_has_a_blocking_twin(twins: dict[type, type]) -> None:
    names = {cls.__name__ for cls in twins}
    # Found, not listed: the list only shows what the discovery is expected to reach.
    assert names >= {
        "TetherClient",
        "LeasesClient",
        "SagasClient",
        "ObjectsClient",
        "SweepsClient",
        "SagaRun",
        "CompensationWorker",
        "FinalizerWorker",
    }
    for cls, twin in twins.items():
        if cls is not TetherClient:
            # Results of the async class come wrapped in its twin.
            assert sync._VIEWS[cls] is twin
            assert twin._async_class is cls


def test_the_surfaces_match(twins: dict[type, type]) -> None:
    mismatches = {
        twin.__name__: surface_mismatches(cls, twin, twins) for cls, twin in twins.items()
    }
    assert {name: found for name, found in mismatches.items() if found} == {}


def test_the_constructors_and_context_managers_match() -> None:
    assert (
        signature_mismatches(
            "TetherClientSync.__init__",
            TetherClient.__init__,
            TetherClientSync.__init__,
            {},
        )
        == []
    )
    assert inspect.signature(TetherClientSync.__exit__).parameters.keys() == (
        inspect.signature(TetherClient.__aexit__).parameters.keys()
    )
    assert returns_of(TetherClientSync.__enter__) is TetherClientSync


def test_the_area_clients_are_twins_of_the_async_ones(twins: dict[type, type]) -> None:
    with TetherClientSync("127.0.0.1:1") as client:
        async_areas = {n: v for n, v in vars(client.client).items() if not n.startswith("_")}
        sync_areas = {n: v for n, v in vars(client).items() if not n.startswith("_")}
        assert sync_areas.keys() == async_areas.keys()
        assert async_areas.keys() >= {"leases", "sagas", "objects", "sweeps"}
        for name, area in sync_areas.items():
            assert type(area) is twins[type(async_areas[name])], name
            assert cast(_View[Any], area)._target is async_areas[name]


def test_the_declared_types_of_tether_client_sync_match_the_generated_members() -> None:
    """mypy sees TetherClientSync's generated members through its annotations: every one
    is declared, with the type it has."""
    declared = {
        name: hint
        for name, hint in typing.get_type_hints(TetherClientSync).items()
        if not name.startswith("_")
    }
    for name, member in public(TetherClientSync).items():
        function = _function(member)
        if not hasattr(function, "__wrapped__"):
            continue  # written in sync.py, with its own annotations
        got = returns_of(function)
        if not isinstance(member, property):
            got = Callable[..., got]
        if name == "hold":  # assigned in the class body: typed by what made it
            want = typing.get_type_hints(sync._callbacks_only)["return"]
        else:
            assert name in declared, f"TetherClientSync.{name} is generated but not declared"
            want = declared[name]
        assert want == got, name
    with TetherClientSync("127.0.0.1:1") as client:
        for name, value in vars(client).items():
            if not name.startswith("_"):
                assert declared.get(name) is type(value), name
        for name in declared:
            assert hasattr(client, name), f"{name} is declared but does not exist"


def _function(member: Any) -> Callable[..., Any]:
    if isinstance(member, property):
        assert member.fget is not None
        return member.fget
    return cast(Callable[..., Any], member)


# --- the surfaces cannot drift ----------------------------------------------------------


async def _count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


class ExtendedLeases(LeasesClient):
    """An async area client that grew members."""

    async def frobnicate(self, key: str, *, times: int = 1) -> list[str]:
        return [key] * times

    def frobs(self, *, n: int = 2) -> AsyncIterator[int]:
        return _count(n)

    @property
    def flavour(self) -> str:
        return "plain"


class ExtendedLeasesSync(_View[ExtendedLeases], of=ExtendedLeases):
    """Its twin: a class statement and nothing else, like LeasesClientSync's."""


def test_a_member_added_to_an_async_class_is_generated_blocking() -> None:
    assert surface_mismatches(ExtendedLeases, ExtendedLeasesSync) == []
    frobnicate = inspect.signature(vars(ExtendedLeasesSync)["frobnicate"])
    assert str(frobnicate) == "(self, key: str, *, times: int = 1) -> list[str]"
    frobs = inspect.signature(vars(ExtendedLeasesSync)["frobs"])
    assert frobs.return_annotation == Iterator[int]
    loop = _Loop()
    try:
        view = ExtendedLeasesSync(loop, ExtendedLeases(cast(Any, None)))
        assert view.frobnicate("k", times=2) == ["k", "k"]
        assert list(view.frobs(n=3)) == [0, 1, 2]
        assert view.flavour == "plain"
    finally:
        loop.stop()


def test_the_comparison_flags_a_blocking_class_that_drifted() -> None:
    # The twin of the plain LeasesClient lacks the added members.
    assert sorted(surface_mismatches(ExtendedLeases, LeasesClientSync)) == [
        "flavour: missing",
        "frobnicate: missing",
        "frobs: missing",
    ]

    class Drifted(LeasesClientSync):
        """Written by hand, and wrong."""

        def get(  # timeout dropped
            self, key: str | None = None, *, lease_id: str | None = None, namespace: str = ""
        ) -> lease_pb2.Lease:
            raise NotImplementedError

        def watch(  # not an iterator
            self, *, key_prefix: str = "", start_revision: int = 0, namespace: str | None = None
        ) -> list[lease_pb2.LeaseEvent]:
            raise NotImplementedError

        def extra(self) -> None:
            raise NotImplementedError

    assert sorted(surface_mismatches(LeasesClient, Drifted)) == [
        "Drifted.get: parameters ['self', 'key', 'lease_id', 'namespace'], "
        "not ['self', 'key', 'lease_id', 'namespace', 'timeout']",
        "Drifted.watch: returns list[tether.v1.lease_pb2.LeaseEvent], "
        "not collections.abc.Iterator[tether.v1.lease_pb2.LeaseEvent]",
        "extra: not in the async surface",
    ]

    class WrongDefault(LeasesClientSync):
        def revoke(
            self,
            lease_id: str,
            *,
            reason: str = "admin",
            namespace: str | None = None,
            timeout: float | None = None,
        ) -> lease_pb2.Lease:
            raise NotImplementedError

    assert surface_mismatches(LeasesClient, WrongDefault) == [
        "WrongDefault.revoke(reason): default 'admin', not ''",
        "WrongDefault.revoke(timeout): annotated float | None, "
        "not datetime.timedelta | float | int | None",
    ]
