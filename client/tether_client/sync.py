"""``TetherClientSync``: the client for scripts and threads that do not run asyncio.

It owns a private event loop in a daemon thread and an async :class:`TetherClient` built
on it; every call is submitted to that loop and blocks for its result::

    with TetherClientSync("127.0.0.1:50051") as client:
        acquired = client.leases.acquire("tasks/168", ttl=30)
        for lease in client.leases.list(key_prefix="tasks/"):
            ...
        with client.hold("tasks/168", ttl=15) as lease:
            ...  # renewed in the background; check lease.lost, fence with lease.fencing_token
        with client.run_saga("open-pr", "task-168", {"repo": "tether"}) as saga:
            branch = saga.step("branch", make_branch, compensate=delete_branch)

Nothing here is written method by method: the blocking classes are generated from the
async ones when this module is imported, so a method added to an async class is there in
its blocking twin too, with the same parameters. For each public member of the async class:

- a coroutine method (or one returning an ``Awaitable``) blocks and returns the result;
- a method returning an ``AsyncIterator`` (``list``, ``watch``, ``dependents``,
  ``reports``) returns a generator: its stream opens at the first ``next()``, and closing
  the generator (or dropping it) closes the stream before ``close()`` returns;
- a method returning an async context manager (``run_saga``) returns a plain one;
- any other method runs on the loop thread; properties and attributes read through;
- a result of a class that has a blocking twin (``SagaRun``, the workers) comes wrapped in
  it: ``with client.run_saga(...) as saga`` gives a ``SagaRunSync`` whose ``step`` blocks.

Signatures are the async ones with the return type made blocking (``T`` for a coroutine
of ``T``, ``Iterator[T]`` for ``AsyncIterator[T]``, ``AbstractContextManager[T]`` for an
async one); tests/client/test_sync_surface.py compares the two surfaces. The differences
are deliberate: ``stubs`` (async stubs) is left out; ``hold`` refuses ``on_lost="cancel"``
(a blocking body cannot be cancelled); the workers have a ``stop()`` callable from any
thread; ``client``, ``closed`` and ``run_coroutine`` exist only here. Calls raise the same
typed errors as the async client's. Once :meth:`TetherClientSync.close` ran, every call
raises ``RuntimeError``.

``on_lost`` callbacks, and sync saga steps, compensations and finalizer handlers, run on
threads of the client (the loop thread for callbacks, a thread of their own for the
others). A callback must not call this client: that would block the loop it waits for
(it raises ``RuntimeError`` instead). Steps and handlers may.

Typing: mypy does not see generated members. ``TetherClientSync`` declares the types of
its own (checked against the generated ones by the surface test); the area clients, the
saga run and the workers answer any attribute as ``Any``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import operator
import threading
import types
import typing
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import grpc

from tether_client.client import TetherClient
from tether_client.clock import Clock
from tether_client.connection import TokenSource
from tether_client.finalizers import FinalizerWorker
from tether_client.keeper import HeldLease, KeeperConfig, KeeperStats, LostCallback
from tether_client.leases import LeasesClient
from tether_client.objects import ObjectsClient
from tether_client.retry import RetryPolicy
from tether_client.saga_run import CompensationWorker, SagaRun
from tether_client.sagas import SagasClient
from tether_client.sweeps import SweepsClient

A = TypeVar("A")
T = TypeVar("T")


# --- the loop thread -----------------------------------------------------------------------


class _Loop:
    """An event loop running in its own daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="tether-client-sync", daemon=True
        )
        self.thread.start()
        self.closed = False
        # Streams of generators dropped on the loop thread, being closed there.
        self._closing: set[asyncio.Task[None]] = set()

    def check(self) -> None:
        if self.closed:
            raise RuntimeError("the TetherClientSync is closed")
        self.check_thread()

    def check_thread(self) -> None:
        if threading.current_thread() is self.thread:
            # Blocking the loop thread on work for the loop thread would hang forever.
            raise RuntimeError("TetherClientSync cannot be called from its own loop thread")

    def run(self, awaitable: Awaitable[T]) -> T:
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the call too
            raise

    def iterate(
        self, iterator: AsyncIterator[Any], wrap: Callable[[Any], T]
    ) -> Generator[T, None, None]:
        try:
            while True:
                try:
                    # anext() is called on the loop: the loop's async generator hooks see
                    # the stream, so closing the loop closes it too.
                    item = self.run(_next(iterator))
                except StopAsyncIteration:
                    return
                yield wrap(item)
        finally:
            if self.closed:
                pass  # stop() closed every stream still open
            elif threading.current_thread() is self.thread:
                # Dropped on the loop thread (in a callback): close it there, without waiting.
                task = self.loop.create_task(_aclose(iterator))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                # Ends the stream (the async generator cancels its call). A step that was
                # interrupted may still be unwinding; its cancellation ends the stream then.
                with contextlib.suppress(Exception):
                    self.run(_aclose(iterator))

    def stop(self) -> None:
        if not self.closed:
            # Generators the caller never closed still hold streams open: close them.
            with contextlib.suppress(Exception):
                self.run(self.loop.shutdown_asyncgens())
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


async def _aclose(iterator: AsyncIterator[object]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def _call(target: object, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return getattr(target, name)(*args, **kwargs)


async def _await_call(
    target: object, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return await getattr(target, name)(*args, **kwargs)


class _BlockingContext(AbstractContextManager[T]):
    """An async context manager of the loop, entered and exited from the caller's thread."""

    def __init__(self, loop: _Loop, manager: AbstractAsyncContextManager[Any]) -> None:
        self._loop = loop
        self._manager = manager

    def __enter__(self) -> T:
        self._loop.check()
        entered = self._loop.run(self._manager.__aenter__())
        result: T = _wrap(self._loop, entered)
        return result

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._loop.closed:
            # The client was closed inside the block: what the exit would do, close did
            # (a held lease was reported lost and runs out on the server).
            return False
        self._loop.check_thread()
        return bool(self._loop.run(self._manager.__aexit__(exc_type, exc, tb)))


# --- generating a blocking class from an async one ---------------------------------------

# The async classes whose results come wrapped, and the view wrapping them.
_VIEWS: dict[type[Any], type[_View[Any]]] = {}

_AWAITABLES = (Awaitable, Coroutine)
_ASYNC_ITERATORS = (AsyncIterator, AsyncIterable, AsyncGenerator)


def _view_of(cls: type[Any]) -> type[_View[Any]] | None:
    for base in cls.__mro__:
        view = _VIEWS.get(base)
        if view is not None:
            return view
    return None


def _wrap(loop: _Loop, value: Any) -> Any:
    """``value``, or its blocking view when its class has one."""
    view = _view_of(type(value))
    return value if view is None else view(loop, value)


def _sync_type(annotation: Any) -> Any:
    """The type a blocking call gives where the async one gives ``annotation``: the view
    of a class that has one (also inside a union), anything else as it is."""
    if isinstance(annotation, type):
        view = _view_of(annotation)
        return annotation if view is None else view
    if isinstance(annotation, types.UnionType):
        return functools.reduce(operator.or_, map(_sync_type, typing.get_args(annotation)))
    return annotation


def _blocking_kind(function: Callable[..., Any], returns: Any) -> str:
    """How a blocking call runs ``function``: ``await`` it, ``iterate`` the async iterator
    it returns, ``enter`` the async context manager it returns, or ``call`` it."""
    if inspect.isasyncgenfunction(function):
        return "iterate"
    if inspect.iscoroutinefunction(function):
        return "await"
    origin = typing.get_origin(returns) or returns
    if origin in _AWAITABLES:
        return "await"
    if origin in _ASYNC_ITERATORS:
        return "iterate"
    if isinstance(origin, type) and issubclass(origin, AbstractAsyncContextManager):
        return "enter"
    return "call"


def _blocking_return(function: Callable[..., Any], returns: Any) -> Any:
    """The return annotation of the blocking form of ``function`` (declared ``returns``)."""
    if isinstance(returns, str) or returns is inspect.Signature.empty:
        return returns  # unresolvable: passed on as written
    kind = _blocking_kind(function, returns)
    args = typing.get_args(returns)
    if kind == "await" and not inspect.iscoroutinefunction(function):
        return _sync_type(args[-1]) if args else Any
    if kind == "iterate":
        return Iterator[_sync_type(args[0]) if args else Any]  # type: ignore[misc]
    if kind == "enter":
        return AbstractContextManager[_sync_type(args[0]) if args else Any]  # type: ignore[misc]
    return _sync_type(returns)


def _resolved(annotation: Any, namespace: dict[str, Any]) -> Any:
    """An annotation written as a string (``from __future__ import annotations``),
    evaluated where it was written (again while it names a string alias); left as the
    string when that fails."""
    for _ in range(8):
        if not isinstance(annotation, str):
            break
        try:
            annotation = eval(annotation, namespace)
        except Exception:
            break
    return annotation


def _describe(
    method: Callable[..., Any], like: Callable[..., Any], qualname: str, returns: Any
) -> None:
    """Give the generated ``method`` the name, docs and signature of ``like``, with the
    annotations resolved and the return annotation ``returns``."""
    functools.update_wrapper(method, like)
    namespace: dict[str, Any] = getattr(like, "__globals__", {})
    signature = inspect.signature(like)
    parameters = [
        parameter.replace(annotation=_resolved(parameter.annotation, namespace))
        for parameter in signature.parameters.values()
    ]
    signature = signature.replace(parameters=parameters, return_annotation=returns)
    annotations = {
        p.name: p.annotation for p in parameters if p.annotation is not inspect.Parameter.empty
    }
    if returns is not inspect.Signature.empty:
        annotations["return"] = returns
    method.__qualname__ = qualname
    method.__module__ = __name__
    method.__annotations__ = annotations
    vars(method)["__signature__"] = signature


def _blocking_method(owner: str, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """The blocking form of the async class's method ``name`` (``function``)."""
    namespace: dict[str, Any] = getattr(function, "__globals__", {})
    returns = _resolved(inspect.signature(function).return_annotation, namespace)
    kind = _blocking_kind(function, returns)

    def method(self: _Generated[Any], /, *args: Any, **kwargs: Any) -> Any:
        loop = self._loop
        loop.check()
        if kind == "await":
            return _wrap(loop, loop.run(_await_call(self._target, name, args, kwargs)))
        result = loop.run(_call(self._target, name, args, kwargs))
        if kind == "iterate":
            return loop.iterate(result, functools.partial(_wrap, loop))
        if kind == "enter":
            return _BlockingContext[Any](loop, result)
        return _wrap(loop, result)

    _describe(method, function, f"{owner}.{name}", _blocking_return(function, returns))
    return method


def _read_through(owner: str, name: str, prop: property) -> property:
    """A property reading the async object's ``name`` (a view where it has one)."""

    def read(self: _Generated[Any]) -> Any:
        return _wrap(self._loop, getattr(self._target, name))

    if prop.fget is not None:
        namespace: dict[str, Any] = getattr(prop.fget, "__globals__", {})
        returns = _resolved(inspect.signature(prop.fget).return_annotation, namespace)
        _describe(read, prop.fget, f"{owner}.{name}", _sync_type(returns))
    return property(read, doc=prop.__doc__)


def _generate(cls: type[_Generated[Any]], of: type[Any], left_out: frozenset[str]) -> None:
    """Add to ``cls`` the blocking form of every public member of ``of`` that ``cls`` (or a
    base view) does not define itself."""
    own = {
        name
        for base in cls.__mro__
        if issubclass(base, _Generated) and base is not _Generated
        for name in vars(base)
    }
    for name in dir(of):
        if name.startswith("_") or name in left_out or name in own:
            continue
        member = inspect.getattr_static(of, name)
        if isinstance(member, property):
            setattr(cls, name, _read_through(cls.__name__, name, member))
        elif inspect.isfunction(member):
            setattr(cls, name, _blocking_method(cls.__name__, name, member))
        elif not isinstance(member, staticmethod | classmethod):
            setattr(cls, name, member)  # a constant
        # A static or class method has no blocking form yet: the surface test says so.


class _Generated(Generic[A]):
    """A blocking view of an async object living on ``_loop``.

    ``class XSync(_View[X], of=X)`` generates the blocking form of every public member of
    ``X`` that the class does not define itself; ``left_out`` names members it must not
    have."""

    _loop: _Loop
    _target: A
    # The async class the members were generated from, and what was left out.
    _async_class: ClassVar[type[Any]]
    _left_out: ClassVar[frozenset[str]] = frozenset()
    # Whether results of the async class come wrapped in this view (``XSync(loop, x)``).
    _wraps_results: ClassVar[bool] = False

    def __init_subclass__(
        cls, *, of: type[Any] | None = None, left_out: Iterable[str] = (), **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if of is None:
            return
        cls._async_class = of
        cls._left_out = frozenset(left_out)
        if cls._wraps_results:
            _VIEWS[of] = cls  # type: ignore[assignment]
        _generate(cls, of, cls._left_out)


class _View(_Generated[A]):
    _wraps_results = True

    def __init__(self, loop: _Loop, target: A) -> None:
        self._loop = loop
        self._target = target

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._target!r}>"

    if TYPE_CHECKING:
        # Generated members are invisible to mypy: it takes them as Any.
        def __getattr__(self, name: str) -> Any: ...


class _ObjectView(_View[A]):
    """A view that also reads the async object's instance attributes
    (``saga.steps``, ``worker.handled``)."""

    def __getattr__(self, name: str) -> Any:
        attributes = getattr(self.__dict__.get("_target"), "__dict__", {})
        if not name.startswith("_") and name in attributes:
            return _wrap(self._loop, attributes[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class _Stoppable(Protocol):
    stop: asyncio.Event


W = TypeVar("W", bound=_Stoppable)


class _WorkerView(_ObjectView[W]):
    def stop(self) -> None:
        """Make ``run()`` return (what it is handling is finished first); call it from
        any thread. ``run()`` called after it returns at once."""
        if self._loop.closed:
            return
        with contextlib.suppress(RuntimeError):  # closed meanwhile: run() has ended
            self._loop.loop.call_soon_threadsafe(self._target.stop.set)


# --- the blocking classes --------------------------------------------------------------


class LeasesClientSync(_View[LeasesClient], of=LeasesClient):
    """``client.leases`` of :class:`TetherClientSync`: :class:`LeasesClient`, blocking."""


class SagasClientSync(_View[SagasClient], of=SagasClient):
    """``client.sagas`` of :class:`TetherClientSync`: :class:`SagasClient`, blocking."""


class ObjectsClientSync(_View[ObjectsClient], of=ObjectsClient):
    """``client.objects`` of :class:`TetherClientSync`: :class:`ObjectsClient`, blocking."""


class SweepsClientSync(_View[SweepsClient], of=SweepsClient):
    """``client.sweeps`` of :class:`TetherClientSync`: :class:`SweepsClient`, blocking."""


class SagaRunSync(_ObjectView[SagaRun], of=SagaRun):
    """A claimed saga in ``with client.run_saga(...) as saga``: :class:`SagaRun`, blocking.

    ``saga.step(name, action, ...)`` blocks while the step is recorded and ``action`` runs
    (a sync action in a thread of its own, so it may call the client). Unlike the async
    block, a blocking one is not cancelled when the claim's lease is lost: the next step
    (or reading ``saga.fence``) raises ``LeaseLost``, and so does the end of the block.
    """


class CompensationWorkerSync(_WorkerView[CompensationWorker], of=CompensationWorker):
    """:class:`CompensationWorker`, blocking: ``run_once()`` compensates at most one saga;
    ``run()`` compensates sagas until another thread calls ``stop()``."""


class FinalizerWorkerSync(_WorkerView[FinalizerWorker], of=FinalizerWorker):
    """:class:`FinalizerWorker`, blocking: ``run_once()`` handles every object pending now;
    ``run()`` works until another thread calls ``stop()``."""


_HOLD_DOC = """Acquire ``key`` and keep it renewed until the block exits, then release it.

Check ``lease.lost`` (or read ``lease.fencing_token``, which raises ``LeaseLost``) before
each step; ``on_lost`` is called with the lease when it is lost. Unlike the async client,
a blocking body cannot be cancelled: ``on_lost="cancel"`` is refused. As there, a block
during which the lease was lost ends with ``LeaseLost`` (chained from the body's own
error, if it raised one), and a block that ended normally raises ``LeaseLost`` when the
release finds the lease was revoked (or expired) first: the work did not run under it
throughout.
"""


def _callbacks_only(
    hold: Callable[..., Any], doc: str
) -> Callable[..., AbstractContextManager[HeldLease]]:
    """The generated blocking ``hold``, refusing ``on_lost="cancel"``."""
    signature: inspect.Signature = vars(hold)["__signature__"]

    @functools.wraps(hold)
    def blocking_hold(
        self: TetherClientSync, /, *args: Any, **kwargs: Any
    ) -> AbstractContextManager[HeldLease]:
        on_lost = signature.bind(self, *args, **kwargs).arguments.get("on_lost")
        if on_lost is not None and not callable(on_lost):
            raise ValueError(
                "on_lost takes a callback in sync code; a blocking body cannot be cancelled"
            )
        manager: AbstractContextManager[HeldLease] = hold(self, *args, **kwargs)
        return manager

    parameters = [
        p.replace(annotation=LostCallback | None) if p.name == "on_lost" else p
        for p in signature.parameters.values()
    ]
    signature = signature.replace(parameters=parameters)
    blocking_hold.__doc__ = doc
    blocking_hold.__annotations__ = {**hold.__annotations__, "on_lost": LostCallback | None}
    vars(blocking_hold)["__signature__"] = signature
    return blocking_hold


class TetherClientSync(_Generated[TetherClient], of=TetherClient, left_out=("stubs",)):
    """A blocking client; use as ``with TetherClientSync("host:50051") as client:``.

    Takes the arguments of :class:`TetherClient`; ``clock`` must be one the loop thread
    can use (the default :class:`SystemClock` is; a :class:`ManualClock` is advanced on
    that loop: ``client.run_coroutine(advance())`` with ``async def advance():
    clock.advance(5)``). ``stubs`` is not here: the generated stubs are async
    (``client.client.stubs``, called on the client's loop through ``run_coroutine``).
    """

    # The area clients, blocking: made in __init__ from the async client's.
    leases: LeasesClientSync
    sagas: SagasClientSync
    objects: ObjectsClientSync
    sweeps: SweepsClientSync
    # Generated from TetherClient; these lines tell mypy their types (the surface test
    # checks them against what was generated).
    namespace: str
    holder: str
    keeper_stats: KeeperStats
    run_saga: Callable[..., AbstractContextManager[SagaRunSync]]
    compensation_worker: Callable[..., CompensationWorkerSync]
    finalizer_worker: Callable[..., FinalizerWorkerSync]

    hold = _callbacks_only(
        _blocking_method("TetherClientSync", "hold", TetherClient.hold), _HOLD_DOC
    )

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        namespace: str = "",
        holder: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: TokenSource | None = None,
        insecure_token: bool = False,
        channel_options: Sequence[tuple[str, int | str]] = (),
        retry: RetryPolicy | None = None,
        keeper: KeeperConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._loop = _Loop()

        async def build() -> TetherClient:
            # Built on its loop: everything asyncio inside belongs to that thread.
            return TetherClient(
                targets,
                namespace=namespace,
                holder=holder,
                credentials=credentials,
                token=token,
                insecure_token=insecure_token,
                channel_options=channel_options,
                retry=retry,
                keeper=keeper,
                clock=clock,
            )

        try:
            self._target = self._loop.run(build())
        except BaseException:
            self._loop.stop()
            raise
        # The async client's public attributes (its area clients), as their blocking views.
        for name, value in vars(self._target).items():
            if not name.startswith("_"):
                setattr(self, name, _wrap(self._loop, value))

    @property
    def client(self) -> TetherClient:
        """The async client underneath: use it only on its loop (see :meth:`run_coroutine`)."""
        return self._target

    @property
    def closed(self) -> bool:
        return self._loop.closed

    def run_coroutine(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and block for its result: for async code that
        must share the loop of :attr:`client` (``client.run_coroutine(f(client.client))``)."""
        try:
            self._loop.check()
        except RuntimeError:
            coro.close()  # never run: no "never awaited" warning
            raise
        return self._loop.run(coro)

    def close(self) -> None:
        """Stop renewing (held leases are reported lost), close channels, end the thread."""
        if self._loop.closed:
            return
        self._loop.check_thread()
        try:
            self._loop.run(self._target.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> TetherClientSync:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._loop.closed else "open"
        return f"<TetherClientSync {state} namespace={self._target.namespace!r}>"


__all__ = [
    "CompensationWorkerSync",
    "FinalizerWorkerSync",
    "LeasesClientSync",
    "ObjectsClientSync",
    "SagaRunSync",
    "SagasClientSync",
    "SweepsClientSync",
    "TetherClientSync",
]
