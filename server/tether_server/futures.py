"""Small helpers for asyncio futures shared by the store and the services."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["discard_outcome"]


def discard_outcome(future: asyncio.Future[Any]) -> None:
    """Marks a future's outcome as seen (a done callback for work nobody awaits any more),
    so asyncio never logs its exception as "never retrieved"."""
    if not future.cancelled():
        future.exception()
