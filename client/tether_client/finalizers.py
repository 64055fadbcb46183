"""Finalizers from Python: a worker that lets the objects of a kind go once it cleaned up.

::

    async def remove_worktree(obj: owner_ref_pb2.Object) -> None:
        path = from_struct(obj.spec)["path"]
        if has_uncommitted_changes(path):
            raise RefuseFinalization(f"uncommitted changes in {path}")
        shutil.rmtree(path)

    worker = client.finalizer_worker("example.com/worktree", "Worktree", remove_worktree)
    await worker.run()

An object deleted while it carries finalizers stays, terminating (``deletion_timestamp``
set), until every finalizer is removed. ``FinalizerWorker`` finds the terminating objects
of its kind that still carry its finalizer (a ``WatchObjects`` stream, checked by a
periodic ``ListObjects`` so nothing is missed across reconnects and compactions), runs the
handler for each and removes the finalizer; the server deletes the object with its last
finalizer.

One worker at a time handles an object, across processes: it holds the lease
``finalizers/<finalizer>/<uid>`` meanwhile, taken without waiting (held elsewhere: someone
else is at it), and reads the object again under it (another worker may have finished in
between). A handler that raises :class:`RefuseFinalization` keeps the finalizer: the reason
is recorded in the object's termination status and history, and the object is tried again
after ``refusal_retry`` (doubling up to ``max_refusal_retry``), since its cause may be fixed.
Any other error is logged and retried with exponential backoff and jitter. An object that is
gone, or was recreated under a new uid, is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack

from tether_client.clock import backoff, sleep_or_wake
from tether_client.connection import Endpoint
from tether_client.convert import Seconds, seconds
from tether_client.errors import (
    LeaseUnavailable,
    ObjectNotFound,
    RevisionCompacted,
    TetherError,
    UidMismatch,
)
from tether_client.keeper import Keeper
from tether_client.objects import ObjectsClient
from tether_client.pb import owner_ref_pb2
from tether_client.threads import call_user_code
from tether_client.transport import Metadata, Transport

log = logging.getLogger("tether_client.finalizers")

# A finalizer handler: called with the terminating object; async, or sync (run in a thread,
# so the lease keeper on the event loop goes on renewing while it works).
FinalizerHandler = Callable[[owner_ref_pb2.Object], object]
# What one handling came to: the finalizer removed; refused (kept, with the reason); failed
# (to be retried); busy (another worker holds the object's lease); gone (deleted, recreated,
# or no longer carrying the finalizer).
Outcome = Literal["finalized", "refused", "failed", "busy", "gone"]

# The server takes at most 1024 bytes of a reason; leave room for its own words.
_MAX_REASON_BYTES = 1000


class RefuseFinalization(Exception):
    """Raised by a handler: the object must not go yet, for ``reason`` (recorded on it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        # An empty refusal would read as a plain removal on the wire: never send one.
        self.reason = _truncate(reason.strip()) or "refused by the finalizer's handler"


def _truncate(text: str, max_bytes: int = _MAX_REASON_BYTES) -> str:
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "..."


@dataclass
class _Pending:
    """A terminating object waiting for this worker's finalizer."""

    obj: owner_ref_pb2.Object
    # When to handle it next, on the client's clock.
    due: float
    # The resync generation that last saw it (an event counts as the current one).
    seen: int
    failures: int = 0
    refusals: int = 0


def _watch_objects(
    request: owner_ref_pb2.WatchObjectsRequest,
    endpoint: Endpoint,
    revision: int,
    metadata: Metadata,
) -> AsyncIterable[owner_ref_pb2.WatchObjectsResponse]:
    from_revision = owner_ref_pb2.WatchObjectsRequest()
    from_revision.CopyFrom(request)
    from_revision.start_revision = revision
    return endpoint.owner_ref.WatchObjects(from_revision, metadata=metadata)


class FinalizerOptions(TypedDict, total=False):
    """The options of :class:`FinalizerWorker` (``client.finalizer_worker(..., **options)``):
    ``namespace`` and ``holder`` (default: the client's), the lease ``ttl`` per object,
    ``refusal_retry`` doubling up to ``max_refusal_retry`` after a refusal, the failure
    backoff from ``initial_backoff`` to ``max_backoff``, ``resync_interval`` between
    listings, ``concurrency`` (objects handled at once), ``page_size`` of the listings and
    the ``stop`` event."""

    namespace: str | None
    holder: str | None
    ttl: Seconds
    refusal_retry: Seconds
    max_refusal_retry: Seconds
    initial_backoff: Seconds
    max_backoff: Seconds
    resync_interval: Seconds
    concurrency: int
    page_size: int
    stop: asyncio.Event | None


class FinalizerWorker:
    """Removes ``finalizer`` from terminating objects of ``kind`` once ``handler`` agrees.

    ``run()`` works until ``stop`` is set (handlings under way are finished first);
    ``run_once()`` handles every object pending now, once. ``holder`` names this worker in
    its leases (default: the client's holder, unique per client): workers on different
    clients must not share one, or each would take the other's lease for its own.
    """

    def __init__(
        self,
        transport: Transport,
        objects: ObjectsClient,
        keeper: Keeper,
        finalizer: str,
        kind: str,
        handler: FinalizerHandler,
        **options: Unpack[FinalizerOptions],
    ) -> None:
        concurrency = options.get("concurrency", 1)
        if "/" not in finalizer.strip("/"):
            raise ValueError(f"a finalizer is qualified, domain/name: not {finalizer!r}")
        if not kind:
            raise ValueError("a finalizer worker needs the kind of its objects")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._transport = transport
        self._objects = objects
        self._keeper = keeper
        self.clock = transport.clock
        self.finalizer = finalizer
        self.kind = kind
        self.handler = handler
        self.namespace = transport.ns(options.get("namespace"))
        self.holder = options.get("holder") or transport.holder
        self.ttl = seconds(options.get("ttl", 30))
        self.refusal_retry = seconds(options.get("refusal_retry", 30))
        self.max_refusal_retry = seconds(options.get("max_refusal_retry", 600))
        self.initial_backoff = seconds(options.get("initial_backoff", 1))
        self.max_backoff = seconds(options.get("max_backoff", 60))
        self.resync_interval = seconds(options.get("resync_interval", 60))
        self.concurrency = concurrency
        self.page_size = options.get("page_size", 0)
        self.stop = options.get("stop") or asyncio.Event()
        #: Every handling, in order: (uid, outcome).
        self.outcomes: list[tuple[str, Outcome]] = []
        self._pending: dict[str, _Pending] = {}
        self._running: dict[str, asyncio.Task[Outcome]] = {}
        self._generation = 0
        self._generations = itertools.count(1)
        # Set when there may be something to do sooner than the earliest due object.
        self._wake = asyncio.Event()
        self._resync_now = asyncio.Event()

    # --- the pending set ---------------------------------------------------------------------

    @property
    def pending(self) -> list[owner_ref_pb2.Object]:
        """The objects this worker knows to be waiting for it, as last seen."""
        return [entry.obj for entry in self._pending.values()]

    def _ours(self, obj: owner_ref_pb2.Object) -> bool:
        return obj.HasField("deletion_timestamp") and self.finalizer in obj.finalizers

    def _observe(self, obj: owner_ref_pb2.Object, *, deleted: bool = False) -> None:
        """Take in an object as a watch event or a listing shows it."""
        if deleted or not self._ours(obj):
            self._pending.pop(obj.uid, None)
            return
        entry = self._pending.get(obj.uid)
        if entry is None:
            now = self.clock.monotonic()
            self._pending[obj.uid] = _Pending(obj, due=now, seen=self._generation)
            self._wake.set()
        else:
            # Known already: keep its backoff, or a refusal's own event would retry it at once.
            entry.obj = obj
            entry.seen = self._generation

    async def _resync(self) -> None:
        """List the terminating objects of the kind: add what the watch missed, drop what
        is no longer there."""
        self._generation = generation = next(self._generations)
        listed: set[str] = set()
        async for obj in self._objects.list(
            kind=self.kind,
            terminating_only=True,
            page_size=self.page_size,
            namespace=self.namespace,
        ):
            self._observe(obj)
            listed.add(obj.uid)
        # Seen neither by the listing nor by an event since it began: gone meanwhile.
        for uid, entry in list(self._pending.items()):
            if uid not in listed and entry.seen < generation:
                del self._pending[uid]
        self._wake.set()

    # --- one object ----------------------------------------------------------------------------

    async def _process(self, uid: str) -> Outcome:
        """Handle one pending object and schedule what comes next for it."""
        entry = self._pending.get(uid)
        if entry is None:
            return "gone"
        outcome = await self._attempt(entry.obj)
        self.outcomes.append((uid, outcome))
        # An event may have dropped (or refreshed) it meanwhile.
        entry = self._pending.get(uid)
        if outcome in ("finalized", "gone"):
            self._pending.pop(uid, None)
        elif entry is not None:
            entry.due = self.clock.monotonic() + self._delay(entry, outcome)
        return outcome

    def _delay(self, entry: _Pending, outcome: Outcome) -> float:
        if outcome == "refused":
            entry.refusals += 1
            entry.failures = 0
            return backoff(entry.refusals, self.refusal_retry, self.max_refusal_retry)
        if outcome == "busy":
            # Someone is at it; by a ttl from now a dead holder's lease has run out too.
            return backoff(1, self.ttl, self.ttl)  # between half the ttl and the ttl
        entry.failures += 1
        return backoff(entry.failures, self.initial_backoff, self.max_backoff)

    async def _attempt(self, seen: owner_ref_pb2.Object) -> Outcome:
        key = f"finalizers/{self.finalizer}/{seen.uid}"
        held = False
        try:
            async with self._keeper.hold(
                key,
                ttl=self.ttl,
                holder=self.holder,
                namespace=self.namespace,
                cancel_on_lost=True,
            ):
                held = True
                obj = await self._current(seen)
                if obj is None:
                    return "gone"
                try:
                    await self._run_handler(obj)
                except RefuseFinalization as refusal:
                    return await self._remove(obj, refusal=refusal.reason)
                return await self._remove(obj)
        except LeaseUnavailable as exc:
            if not held:
                log.debug("%s: %s is held elsewhere: %s", self._name(seen), key, exc)
                return "busy"
            self._log_failure(seen, exc)
            return "failed"
        except Exception as exc:
            self._log_failure(seen, exc)
            return "failed"

    async def _current(self, seen: owner_ref_pb2.Object) -> owner_ref_pb2.Object | None:
        """The object as it is now, if it still waits for this finalizer."""
        try:
            obj = await self._objects.get(
                seen.kind, uid=seen.uid, namespace=seen.namespace or self.namespace
            )
        except ObjectNotFound:
            return None
        return obj if self._ours(obj) else None

    async def _run_handler(self, obj: owner_ref_pb2.Object) -> None:
        # The handler gets a copy: what it does to it must not leak into the removal.
        copy = owner_ref_pb2.Object()
        copy.CopyFrom(obj)
        await call_user_code(self.handler, copy)

    async def _remove(self, obj: owner_ref_pb2.Object, *, refusal: str = "") -> Outcome:
        try:
            response = await self._objects.remove_finalizer(
                obj.kind,
                obj.name,
                self.finalizer,
                refusal=refusal,
                # The uid precondition: never let a recreated object of the same name go.
                uid=obj.uid,
                namespace=obj.namespace or self.namespace,
            )
        except (ObjectNotFound, UidMismatch):
            return "gone"
        if refusal:
            log.info("%s: finalization refused: %s", self._name(obj), refusal)
            return "refused"
        log.info("%s: finalized%s", self._name(obj), " and deleted" if response.deleted else "")
        return "finalized"

    def _name(self, obj: owner_ref_pb2.Object) -> str:
        return f"{self.finalizer} on {obj.kind}/{obj.name} ({obj.uid})"

    def _log_failure(self, obj: owner_ref_pb2.Object, exc: Exception) -> None:
        entry = self._pending.get(obj.uid)
        attempt = entry.failures + 1 if entry is not None else 1
        # A tether error says what happened; anything else came from the handler: its
        # traceback is what its author needs.
        log.warning(
            "%s failed (attempt %d), to be retried: %s",
            self._name(obj),
            attempt,
            exc,
            exc_info=not isinstance(exc, TetherError),
        )

    # --- running ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """List the pending objects and handle each once, whatever its backoff: how many it
        finalized. Not for use while ``run()`` runs."""
        await self._resync()
        finished = 0
        for uid in list(self._pending):
            if self.stop.is_set():
                break
            if await self._process(uid) == "finalized":
                finished += 1
        return finished

    async def run(self) -> None:
        """Watch and handle objects until ``stop`` is set. Transient failures (the server
        unreachable) are waited out with backoff; they never end the loop."""
        background = [
            asyncio.create_task(self._watch_loop()),
            asyncio.create_task(self._resync_loop()),
        ]
        try:
            while not self.stop.is_set():
                self._wake.clear()
                self._start_due()
                await self._wait_for_work(background)
        finally:
            for task in background:
                task.cancel()
            if not self.stop.is_set():  # cancelled, or a bug: so are the handlings
                for handling in self._running.values():
                    handling.cancel()
            # Stopped: handlings under way finish (a half-run handler is worse than a late stop).
            await asyncio.gather(*background, *self._running.values(), return_exceptions=True)

    def _start_due(self) -> None:
        now = self.clock.monotonic()
        for uid, entry in sorted(self._pending.items(), key=lambda item: item[1].due):
            if len(self._running) >= self.concurrency or entry.due > now:
                break
            if uid in self._running:
                continue
            task = asyncio.create_task(self._process(uid))
            self._running[uid] = task
            task.add_done_callback(functools.partial(self._finished, uid))

    def _finished(self, uid: str, task: asyncio.Task[Outcome]) -> None:
        if self._running.get(uid) is task:
            del self._running[uid]

    async def _wait_for_work(self, background: list[asyncio.Task[None]]) -> None:
        """Until something may be due: a new object, a handling ended, a backoff ran out."""
        helpers: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.stop.wait()),
        ]
        waiting = [entry.due for uid, entry in self._pending.items() if uid not in self._running]
        if waiting and len(self._running) < self.concurrency:
            delay = min(waiting) - self.clock.monotonic()
            helpers.append(asyncio.ensure_future(self.clock.sleep(delay)))
        try:
            await asyncio.wait(
                [*helpers, *self._running.values(), *background],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for helper in helpers:
                helper.cancel()
        for task in background:
            if task.done():
                task.result()  # they loop until cancelled: an end is a bug, raised here

    async def _watch_loop(self) -> None:
        """Take in object events. The transport's watch resumes across broken streams; a
        watch that ends otherwise (compacted, refused, closed by the server) starts again
        "from now", and every start has the listing take in what came before it."""
        request = owner_ref_pb2.WatchObjectsRequest(namespace=self.namespace, kind=self.kind)
        failures = 0
        while True:
            try:
                async for event in self._transport.watch(
                    functools.partial(_watch_objects, request),
                    start_revision=0,
                    on_start=lambda _: self._resync_now.set(),
                ):
                    failures = 0
                    deleted = event.type == owner_ref_pb2.OBJECT_EVENT_TYPE_DELETED
                    self._observe(event.object, deleted=deleted)
                # The server ended the stream (shutting down?): open another, not in a spin.
                failures = max(failures, 1)
            except RevisionCompacted as exc:
                log.warning("finalizer worker %s: %s; listing instead", self.finalizer, exc)
                continue
            except TetherError as exc:
                failures += 1
                log.warning("finalizer worker %s: watch: %s", self.finalizer, exc)
            await self._pause(self._transport.retry.delay(failures))

    async def _resync_loop(self) -> None:
        """List at the start, when the watch asks, and every ``resync_interval``."""
        failures = 0
        while True:
            self._resync_now.clear()
            try:
                await self._resync()
            except TetherError as exc:
                failures += 1
                log.warning("finalizer worker %s: listing: %s", self.finalizer, exc)
                await self._pause(self._transport.retry.delay(failures))
                continue
            failures = 0
            await self._pause(self.resync_interval, self._resync_now)

    async def _pause(self, delay: float, *events: asyncio.Event) -> None:
        """Sleep ``delay`` on the client's clock, or less when an event is set."""
        await sleep_or_wake(self.clock, delay, *events)


__all__ = [
    "FinalizerHandler",
    "FinalizerOptions",
    "FinalizerWorker",
    "Outcome",
    "RefuseFinalization",
]
