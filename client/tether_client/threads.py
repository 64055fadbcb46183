"""Running the caller's code (saga steps, compensations, finalizer handlers) without
stopping the event loop.

A sync callable runs in a thread of its own, with the caller's ``contextvars`` context, so
the lease keeper on the loop goes on renewing while a step runs git, a subprocess or an
agent for minutes; an async one is awaited on the loop. A thread per call, not a shared
pool: a pool of a few threads would make the tenth long step wait for the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, cast


async def call_user_code(fn: Callable[..., object], *args: object) -> Any:
    """``fn(*args)``: awaited when async, in its own thread when sync.

    If the awaiting task is cancelled (its lease lost), a sync call cannot be stopped: its
    thread runs to the end and its result is dropped.
    """
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    ):
        return await cast(Awaitable[Any], fn(*args))
    result = await in_thread(fn, *args)
    if inspect.isawaitable(result):
        return await result
    return result


async def in_thread(fn: Callable[..., object], *args: object) -> object:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: object, error: BaseException | None) -> None:
        if future.done():
            return  # the caller stopped waiting
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def run() -> None:
        error: BaseException | None = None
        outcome: object = None
        try:
            outcome = context.run(fn, *args)
        except BaseException as exc:  # handed to the awaiting task, re-raised there
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome, error)

    name = f"tether-call-{getattr(fn, '__name__', 'callable')}"
    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


__all__ = ["call_user_code", "in_thread"]
