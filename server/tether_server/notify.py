"""Targeted wake-ups after changes commit.

Waiters register for what they wait on: a waiting Acquire for its key, a Watch for its
namespace and key prefix. A committed batch wakes only the waiters whose key or prefix it
changed, never all of them. On PostgreSQL the committing batch also sends
``NOTIFY tether_changes`` with the changed keys (delivered at commit, in the same
transaction), and every replica's ``ChangeListener`` wakes its own waiters from it; the
services' poll interval stays only as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

Change = tuple[str, str, str]  # (area, namespace, key)


class ChangeHub:
    def __init__(self) -> None:
        self._keys: dict[Change, set[asyncio.Event]] = {}
        self._prefixes: dict[tuple[str, str], set[tuple[str, asyncio.Event]]] = {}

    @contextlib.contextmanager
    def watch_key(self, area: str, namespace: str, key: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``key`` changes. Clear it before each read of the store and
        wait on it after: a change committed in between is never missed."""
        event = asyncio.Event()
        waiting = self._keys.setdefault((area, namespace, key), set())
        waiting.add(event)
        try:
            yield event
        finally:
            waiting.discard(event)
            if not waiting:
                self._keys.pop((area, namespace, key), None)

    @contextlib.contextmanager
    def watch_prefix(self, area: str, namespace: str, prefix: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        entry = (prefix, event)
        watching = self._prefixes.setdefault((area, namespace), set())
        watching.add(entry)
        try:
            yield event
        finally:
            watching.discard(entry)
            if not watching:
                self._prefixes.pop((area, namespace), None)

    def publish(self, changes: Iterable[Change]) -> None:
        for area, namespace, key in changes:
            for event in self._keys.get((area, namespace, key), ()):
                event.set()
            for prefix, event in self._prefixes.get((area, namespace), ()):
                if key.startswith(prefix):
                    event.set()

    def publish_all(self) -> None:
        """Changes are unknown (a notification too large, a listener reconnecting)."""
        for waiting in self._keys.values():
            for event in waiting:
                event.set()
        for watching in self._prefixes.values():
            for _, event in watching:
                event.set()


class ChangeListener:
    """Feeds other replicas' NOTIFY payloads into a ChangeHub (PostgreSQL only)."""

    def __init__(self, hub: ChangeHub, connect: Any, channel: str, instance_id: str) -> None:
        self._hub = hub
        self._connect = connect
        self._channel = channel
        self._instance_id = instance_id
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    async def start(self) -> None:
        await self._listen()
        self._task = asyncio.create_task(self._keep_listening(), name="tether-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()

    async def _listen(self) -> None:
        self._lost.clear()
        conn = await self._connect()
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(self._channel, self._on_notify)
        self._conn = conn

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("change listener lost its connection; reconnecting")
            while True:
                try:
                    await self._listen()
                    break
                except Exception as exc:
                    log.warning("change listener cannot reconnect: %s", exc)
                    await asyncio.sleep(1.0)
            # Whatever changed meanwhile was not heard: every waiter looks again.
            self._hub.publish_all()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            self._hub.publish_all()
            return
        if message.get("from") == self._instance_id:
            return  # this process already woke its waiters at commit
        if message.get("all"):
            self._hub.publish_all()
            return
        self._hub.publish(tuple(change) for change in message.get("keys", ()))
