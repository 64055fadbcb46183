"""The transport: the one path every call of the client takes.

It owns the channels (:class:`~tether_client.connection.Connection`: targets, TLS, the
bearer token, fail-over), the retry policy and the rule of which calls may be repeated
(:mod:`tether_client.retry`), the injected clock, and the defaults (namespace, holder).
The area clients (``client.leases``, ``client.sagas``, ``client.objects``,
``client.sweeps``), the lease keeper and the saga helpers are built on a ``Transport`` and
know nothing of ``TetherClient``.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
)
from typing import Generic, Protocol, TypeVar

import grpc

from tether_client.clock import Clock
from tether_client.connection import Connection, Endpoint
from tether_client.convert import Seconds, seconds
from tether_client.errors import RevisionCompacted, TetherError, from_rpc_error
from tether_client.retry import Attempt, RetryPolicy, invoke, is_transient

R = TypeVar("R")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
E = TypeVar("E", bound="Revisioned")
E_co = TypeVar("E_co", bound="Revisioned", covariant=True)
Item = TypeVar("Item")
Enum = TypeVar("Enum", bound=int)

# Picks a unary RPC off an endpoint's stubs, e.g. ``lambda e: e.lease.Renew``.
Unary = Callable[[Endpoint], "grpc.aio.UnaryUnaryMultiCallable[Req, Resp]"]
Metadata = tuple[tuple[str, str], ...]


class PagedRequestLike(Protocol):
    page_token: str


class PagedAnswerLike(Protocol):
    @property
    def next_page_token(self) -> str: ...


PagedRequest = TypeVar("PagedRequest", bound=PagedRequestLike)
PagedAnswer = TypeVar("PagedAnswer", bound=PagedAnswerLike)


class Revisioned(Protocol):
    @property
    def revision(self) -> int: ...


class WatchAnswer(Protocol[E_co]):
    """What every Watch RPC streams: a header revision and events."""

    @property
    def header_revision(self) -> int: ...

    @property
    def events(self) -> Iterable[E_co]: ...


class Transport:
    def __init__(
        self,
        connection: Connection,
        *,
        clock: Clock,
        retry: RetryPolicy,
        namespace: str,
        holder: str,
    ) -> None:
        self.connection = connection
        self.clock = clock
        self.retry = retry
        self.namespace = namespace
        self.holder = holder

    def ns(self, namespace: str | None) -> str:
        """The namespace a call goes to: the client's unless one is given."""
        return self.namespace if namespace is None else namespace

    @staticmethod
    def request_id(given: str | None) -> str:
        """A request id that makes a retried create a repeat, not a second create."""
        return given or uuid.uuid4().hex

    @property
    def stubs(self) -> Endpoint:
        """The generated stubs on the current target (the escape hatch for rare needs)."""
        return self.connection.current

    # --- unary calls ------------------------------------------------------------------

    async def call(
        self,
        attempt: Attempt[R],
        *,
        safe: bool,
        timeout: Seconds | None,
        attempt_timeout: float | None = None,
    ) -> R:
        """One RPC under the retry policy: retried on ``Unavailable`` only when ``safe``."""
        return await invoke(
            self.connection,
            self.clock,
            attempt,
            safe=safe,
            timeout=None if timeout is None else seconds(timeout),
            policy=self.retry,
            attempt_timeout=attempt_timeout,
        )

    async def unary(
        self,
        method: Unary[Req, Resp],
        request: Req,
        *,
        safe: bool,
        timeout: Seconds | None,
        attempt_timeout: float | None = None,
    ) -> Resp:
        """Send ``request`` with the unary RPC ``method(endpoint)``."""
        response, _ = await self.unary_timed(
            method, request, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout
        )
        return response

    async def unary_timed(
        self,
        method: Unary[Req, Resp],
        request: Req,
        *,
        safe: bool,
        timeout: Seconds | None,
        attempt_timeout: float | None = None,
    ) -> tuple[Resp, float]:
        """:meth:`unary`, and when (on the clock) the attempt that got the answer was sent.
        The server acted after that send, whatever earlier attempts did."""
        sent_at = 0.0  # set by the attempt that answers (call() returns only through one)

        async def attempt(
            endpoint: Endpoint, left: float, metadata: tuple[tuple[str, str], ...]
        ) -> Resp:
            nonlocal sent_at
            sent_at = self.clock.monotonic()  # attempts run one after another
            return await method(endpoint)(request, timeout=left, metadata=metadata)

        response = await self.call(
            attempt, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout
        )
        return response, sent_at

    async def waiting(
        self,
        method: Unary[Req, Resp],
        request: Req,
        *,
        wait: float,
        safe: bool,
        timeout: Seconds | None,
    ) -> tuple[Resp, float]:
        """A call the server may hold for ``wait`` s (Acquire, ClaimSaga): that wait counts
        against neither the default deadline nor an attempt's bound."""
        call_timeout, attempt_timeout = self.retry.waiting(
            wait, None if timeout is None else seconds(timeout)
        )
        return await self.unary_timed(
            method, request, safe=safe, timeout=call_timeout, attempt_timeout=attempt_timeout
        )

    # --- lists and watches ---------------------------------------------------------------

    async def pages(
        self,
        method: Unary[PagedRequest, PagedAnswer],
        request: PagedRequest,
        items: Callable[[PagedAnswer], Iterable[Item]],
        *,
        timeout: Seconds | None,
    ) -> AsyncIterator[Item]:
        """Every item of a paged List: ``request`` is sent again with each next page token
        (``timeout`` bounds each page) until a page comes without one."""
        token = ""
        while True:
            request.page_token = token
            page = await self.unary(method, request, safe=True, timeout=timeout)
            for item in items(page):
                yield item
            token = page.next_page_token
            if not token:
                return

    async def stream(
        self, open_stream: Callable[[Endpoint, Metadata], AsyncIterable[Resp]]
    ) -> AsyncGenerator[Resp, None]:
        """The answers of one server stream, as sent; a failure raises its typed error (an
        ``Unavailable`` moves later calls to the next target). For a caller that needs the
        stream's headers; :meth:`watch` is what everything else uses."""
        endpoint = self.connection.current
        call = open_stream(endpoint, self.connection.metadata())
        error = None
        try:
            async for answer in call:
                yield answer
            return
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
        if is_transient(error):
            self.connection.fail_over(endpoint)
        raise error

    async def watch(
        self,
        open_stream: Callable[[Endpoint, int, Metadata], AsyncIterable[WatchAnswer[E]]],
        *,
        start_revision: int,
        on_start: Callable[[int], object] | None = None,
    ) -> AsyncIterator[E]:
        """The events of a Watch, in revision order, from ``start_revision`` on.

        ``open_stream(endpoint, revision, metadata)`` opens the RPC from a revision. A
        stream broken by a transient failure is opened again (after a backoff, on the next
        target) from the revision after the last event delivered, so no event is lost or
        repeated; answers without events are not passed on. ``RevisionCompacted`` when that
        revision has been purged; any other refusal as its typed error. A watch "from now"
        (0) calls ``on_start(revision)`` once the server confirms where it started: what
        came before that is for the caller to list.
        """
        next_revision = start_revision
        failures = 0
        while True:
            answers = self.stream(functools.partial(_from_revision, open_stream, next_revision))
            try:
                async for answer in answers:
                    failures = 0
                    if next_revision == 0:
                        # A watch "from now" resumes after the revision it started at.
                        next_revision = answer.header_revision + 1
                        if on_start is not None:
                            on_start(answer.header_revision)
                    for event in answer.events:
                        next_revision = event.revision + 1
                        yield event
                return
            except TetherError as error:
                if isinstance(error, RevisionCompacted) or not is_transient(error):
                    raise
            finally:
                await answers.aclose()
            failures += 1
            await self.clock.sleep(self.retry.delay(failures))


def _from_revision(
    open_stream: Callable[[Endpoint, int, Metadata], AsyncIterable[Resp]],
    revision: int,
    endpoint: Endpoint,
    metadata: Metadata,
) -> AsyncIterable[Resp]:
    return open_stream(endpoint, revision, metadata)


class EnumNames(Generic[Enum]):
    """Short lowercase names for a proto enum's values (``"running"`` for
    ``SAGA_STATE_RUNNING``, ``"retry-compensations"`` for ``REDRIVE_MODE_RETRY_…``); the
    enum's own values pass through."""

    def __init__(self, prefix: str, values: Mapping[str, Enum], what: str) -> None:
        self.what = what
        self.by_name: dict[str, Enum] = {}
        for name, value in values.items():
            if name.endswith("_UNSPECIFIED"):
                continue
            short = name.removeprefix(prefix).lower()
            self.by_name[short] = value
            self.by_name[short.replace("_", "-")] = value
        self.names = tuple(
            name.removeprefix(prefix).lower().replace("_", "-")
            for name in values
            if not name.endswith("_UNSPECIFIED")
        )
        self._values = set(self.by_name.values())

    def __call__(self, given: str | int) -> Enum:
        if isinstance(given, int) and not isinstance(given, bool):
            if given in self._values:
                return given
        elif isinstance(given, str):
            value = self.by_name.get(given.strip().lower())
            if value is not None:
                return value
        raise ValueError(f"{self.what} is one of {', '.join(self.names)}, not {given!r}")

    def many(self, given: str | int | Iterable[str | int]) -> list[Enum]:
        if isinstance(given, str | int):
            return [self(given)]
        return [self(item) for item in given]


__all__ = ["EnumNames", "Metadata", "Transport", "Unary"]
