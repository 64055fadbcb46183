"""Helpers shared by the streaming and paging RPCs of every service."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message


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
