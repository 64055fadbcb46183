"""Helpers shared by the streaming and paging RPCs of every service."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from tether_server.domain import errors

R = TypeVar("R", bound=Message)
Context = Any  # grpc.aio.ServicerContext


class Drains:
    """What every service does when the server starts shutting down: end each stream and
    wait now with UNAVAILABLE / SERVER_DRAINING, so clients reconnect to another replica at
    once instead of at the end of the grace period."""

    def __init__(self, instance_id: str = "") -> None:
        self._draining = asyncio.Event()
        # This server process (see store/replicas.py): the refusal names who is draining.
        self._instance_id = instance_id or secrets.token_hex(8)

    def drain(self) -> None:
        self._draining.set()

    def _check_draining(self) -> None:
        if self._draining.is_set():
            raise self._drain_error()

    def _drain_error(self) -> errors.TetherError:
        return errors.ServerDraining(
            "the server is shutting down; reconnect (to another replica)",
            {"instance_id": self._instance_id},
        )


class WatchSlots:
    """Open watch streams (Watch, WatchSagas, WatchObjects) per principal in this server
    process, one instance shared by every service; ``limit`` 0 means no cap.

    A slot is given back from the call's done callback, which grpc runs however the call
    ends. A generator's ``finally`` would not do: a stream cancelled while grpc sends one of
    its messages is closed only when the generator is garbage-collected."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def count(self, principal: str) -> int:
        return self._open.get(principal, 0)

    def take(self, principal: str, context: Context) -> None:
        """Count one more watch of ``principal`` until ``context``'s call ends; WatchLimit
        when it already has ``limit`` open."""
        open_now = self._open.get(principal, 0)
        if self.limit and open_now >= self.limit:
            raise errors.WatchLimit(
                f"{principal!r} has {open_now} watches open on this server, the most allowed;"
                " close one first",
                {"principal": principal, "limit": str(self.limit)},
            )
        self._open[principal] = open_now + 1
        context.add_done_callback(lambda _ended: self._give_back(principal))

    def _give_back(self, principal: str) -> None:
        left = self._open[principal] - 1
        if left:
            self._open[principal] = left
        else:
            # No entry per principal that ever watched.
            del self._open[principal]


class EventPage(Protocol):
    """What a store's ``*_events_since`` read returns."""

    @property
    def events(self) -> Sequence[Any]: ...
    @property
    def header_revision(self) -> int: ...
    @property
    def compact_revision(self) -> int: ...


@dataclass(frozen=True)
class Follow(Generic[R]):
    """How a Watch RPC follows its area of the event log."""

    # (start revision, limit) -> the events from there, oldest first.
    read: Callable[[int, int], Awaitable[EventPage]]
    # Converts one event of a page to its protobuf message.
    convert: Callable[[Any], Message]
    # (header revision, compact revision, events) -> one response message.
    respond: Callable[[int, int, list[Any]], R]
    # Set by a change in the watched area; cleared before each read of the store.
    changed: asyncio.Event
    draining: asyncio.Event
    check_draining: Callable[[], None]
    batch_size: int
    poll_interval_s: float
    max_response_bytes: int
    # Which events of the area to send (a label selector); all when None.
    keep: Callable[[Any], bool] | None = None


async def follow_events(f: Follow[R], start: int) -> AsyncIterator[R]:
    """Every event from ``start`` on, in revision order, forever (until draining)."""
    next_revision = start
    while True:
        f.changed.clear()
        page = await f.read(next_revision, f.batch_size)
        if page.events:
            next_revision = page.events[-1].revision + 1
        events = [f.convert(e) for e in page.events if f.keep is None or f.keep(e)]
        # Split so no message outgrows what clients accept (events carry progress details
        # and outputs, up to 64 KiB each).
        while events:
            fits = count_fitting(events, f.max_response_bytes)
            yield f.respond(page.header_revision, page.compact_revision, events[:fits])
            events = events[fits:]
        if len(page.events) == f.batch_size:
            continue
        # Every event up to the header revision was visible to this read (revisions
        # commit in order), so nothing below it can still appear.
        next_revision = max(next_revision, page.header_revision + 1)
        await first_of(f.changed.wait(), f.draining.wait(), asyncio.sleep(f.poll_interval_s))
        f.check_draining()


def count_fitting(messages: Sequence[Message], max_bytes: int) -> int:
    """How many leading messages fit in ``max_bytes`` of a response; at least one."""
    total = 0
    for count, item in enumerate(messages):
        # Field tag and length prefix: a few bytes per repeated element.
        total += item.ByteSize() + 8
        if total > max_bytes and count > 0:
            return count
    return len(messages)


async def first_of(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
