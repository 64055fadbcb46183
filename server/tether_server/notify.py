"""In-process wake-ups after events commit. Other replicas' changes are seen by polling."""

from __future__ import annotations

import asyncio


class ChangeFeed:
    """A broadcast pulse. Take ``current()`` before reading the store, then wait on it, so a
    change committed between the read and the wait is never missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def publish(self) -> None:
        self._event.set()
        self._event = asyncio.Event()
