"""``TetherClientSync``: the client for scripts and threads that do not run asyncio.

It owns a private event loop in a daemon thread and an async :class:`TetherClient` built
on it; every method submits the async call to that loop and blocks for its result::

    with TetherClientSync("127.0.0.1:50051") as client:
        with client.hold("tasks/168", ttl=15) as lease:
            ...  # renewed in the background; check lease.lost, fence with lease.fencing_token

Methods have the async client's signatures and raise the same typed errors.
``iter_leases`` and ``watch`` are generators (closing ``watch`` cancels the stream);
``client.sagas``, ``client.objects`` and ``client.sweeps`` wrap the service clients the
same way. ``hold`` is a plain context manager yielding the same :class:`HeldLease`; the
keeper renews it from the loop thread. ``on_lost`` callbacks run there, also when another
thread is the first to find the lease overdue: keep them short, and never call this client
from one. Once :meth:`close` ran, every method raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import grpc

from tether_client.client import TetherClient
from tether_client.clock import Clock
from tether_client.connection import TokenSource
from tether_client.convert import Seconds
from tether_client.keeper import HeldLease, Keeper, KeeperConfig, LostCallback
from tether_client.retry import RetryPolicy

A = TypeVar("A")
P = ParamSpec("P")
T = TypeVar("T")


class _Loop:
    """An event loop running in its own daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="tether-client-sync", daemon=True
        )
        self.thread.start()
        self.closed = False

    def check(self) -> None:
        if self.closed:
            raise RuntimeError("the TetherClientSync is closed")
        self.check_thread()

    def check_thread(self) -> None:
        if threading.current_thread() is self.thread:
            # Blocking the loop thread on work for the loop thread would hang forever.
            raise RuntimeError("TetherClientSync cannot be called from its own loop thread")

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the call too
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Generator[T, None, None]:
        try:
            while True:
                try:
                    item = self.run(_next(iterator))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self.closed:
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


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


async def _aclose(iterator: AsyncIterator[object]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


class _Facade(Generic[A]):
    """A blocking view of the async object ``A`` living on ``_loop``."""

    _loop: _Loop
    _target: A


def _blocking(
    method: Callable[Concatenate[A, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_Facade[A], P], T]:
    @functools.wraps(method)
    def call(self: _Facade[A], /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._loop.check()
        return self._loop.run(method(self._target, *args, **kwargs))

    return call


def _blocking_iter(
    method: Callable[Concatenate[A, P], AsyncIterator[T]],
) -> Callable[Concatenate[_Facade[A], P], Generator[T, None, None]]:
    @functools.wraps(method)
    def call(self: _Facade[A], /, *args: P.args, **kwargs: P.kwargs) -> Generator[T, None, None]:
        self._loop.check()
        return self._loop.iterate(method(self._target, *args, **kwargs))

    return call


class TetherClientSync(_Facade[TetherClient]):
    """A blocking client; use as ``with TetherClientSync("host:50051") as client:``.

    Takes the arguments of :class:`TetherClient`; ``clock`` must be one the loop thread
    can use (the default :class:`SystemClock` is).
    """

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

    @property
    def client(self) -> TetherClient:
        """The async client underneath (use it only on its loop, e.g. via run_coroutine)."""
        return self._target

    @property
    def namespace(self) -> str:
        return self._target.namespace

    @property
    def holder(self) -> str:
        return self._target.holder

    @property
    def keeper(self) -> Keeper:
        return self._target.keeper

    @property
    def closed(self) -> bool:
        return self._loop.closed

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


    @contextlib.contextmanager
    def hold(
        self,
        key: str,
        *,
        ttl: Seconds,
        holder: str | None = None,
        namespace: str | None = None,
        wait: Seconds = 0,
        lock_delay: Seconds = 0,
        labels: Mapping[str, str] | None = None,
        progress: bytes | None = None,
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
    ) -> Iterator[HeldLease]:
        """Acquire ``key`` and keep it renewed until the block exits, then release it.

        Check ``lease.lost`` (or read ``lease.fencing_token``, which raises ``LeaseLost``)
        before each step; ``on_lost`` is called with the lease when it is lost. Unlike the
        async client, a blocking body cannot be cancelled: ``on_lost="cancel"`` is refused.
        As there, a block that ended normally raises ``LeaseLost`` when the release finds
        the lease was revoked (or expired) first: the work did not run under it throughout.
        """
        if on_lost is not None and not callable(on_lost):
            raise ValueError(
                "on_lost takes a callback in sync code; a blocking body cannot be cancelled"
            )
        self._loop.check()
        manager = self._target.hold(
            key,
            ttl=ttl,
            holder=holder,
            namespace=namespace,
            wait=wait,
            lock_delay=lock_delay,
            labels=labels,
            progress=progress,
            on_lost=on_lost,
            timeout=timeout,
        )
        lease = self._loop.run(manager.__aenter__())
        try:
            yield lease
        except BaseException as exc:
            if self._loop.closed:
                raise
            if not self._loop.run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            if not self._loop.closed:
                self._loop.run(manager.__aexit__(None, None, None))


__all__ = ["ObjectsClientSync", "SagasClientSync", "SweepsClientSync", "TetherClientSync"]
