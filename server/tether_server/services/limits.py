"""Server-wide resource limits and the interceptor that enforces the per-call ones.

``LimitsInterceptor`` refuses, with RESOURCE_EXHAUSTED and an ErrorInfo reason:

- a unary call of ``tether.v1`` while ``max_concurrent_rpcs`` unary calls are in flight
  (CONCURRENCY_LIMIT, with retry advice). Streams are not counted here: KeepAlive and Watch
  streams live for hours, so a thousand connected workers would otherwise starve every
  unary call; they have their own cap.
- a streaming call of ``tether.v1`` on a connection (``context.peer()``: address and
  port of the client's end) that already has ``max_streams_per_connection`` open
  (STREAM_LIMIT).

Health and reflection are never counted nor refused. A counter is decremented however a
call ends (OK, refusal, cancel, exception): a unary call from its coroutine's ``finally``
(a coroutine always runs it), a stream from the call's done callback (an async generator
cancelled while grpc sends one of its messages runs its ``finally`` only when collected).

The per-principal caps (live leases, open watches) are enforced by the services and the
store; their values live here too, so one object configures every limit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tether_server.domain import errors
from tether_server.services.handlers import abort
from tether_server.services.interceptor import Context, Handler, HandlerWrapper

__all__ = ["LimitsInterceptor", "ServerLimits"]

# Only tether's own services are limited; grpc.health.v1 and reflection stay open.
_LIMITED_PREFIX = "/tether.v1."


@dataclass(frozen=True)
class ServerLimits:
    """Every resource cap of one server; 0 turns a cap off."""

    # Unary tether.v1 calls being handled at once, server-wide.
    max_concurrent_rpcs: int = 1000
    # Streaming calls (KeepAlive, Watch*) open at once on one client connection.
    max_streams_per_connection: int = 100
    # Live (ACTIVE, before their deadline) leases one principal may hold, across replicas.
    max_leases_per_principal: int = 10_000
    # Watch, WatchSagas and WatchObjects streams one principal may have open on one server
    # process (each replica counts its own).
    max_watches_per_principal: int = 100

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_rpcs",
            "max_streams_per_connection",
            "max_leases_per_principal",
            "max_watches_per_principal",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no cap) or positive")


class LimitsInterceptor(HandlerWrapper):
    """Enforces ``max_concurrent_rpcs`` and ``max_streams_per_connection``."""

    def __init__(self, limits: ServerLimits) -> None:
        super().__init__()
        self._limits = limits
        # Unary calls in flight.
        self.calls = 0
        # peer -> its open streams; a peer leaves the table with its last stream.
        self._streams: dict[str, int] = {}

    def streams(self, peer: str | None = None) -> int:
        """Open streams of one connection, or of all of them."""
        if peer is None:
            return sum(self._streams.values())
        return self._streams.get(peer, 0)

    def wraps(self, path: str) -> bool:
        return path.startswith(_LIMITED_PREFIX)

    def wrap(self, path: str, handler: Handler, behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):
            return self._limit_stream(behavior)
        if inspect.iscoroutinefunction(behavior) and not handler.request_streaming:
            return self._limit_unary(behavior)
        # Not asyncio code (grpc would run it on a thread pool), or a client-streaming
        # call: tether has neither.
        return None

    def _limit_unary(self, behavior: Any) -> Any:
        async def unary(request: Any, context: Context) -> Any:
            cap = self._limits.max_concurrent_rpcs
            if cap and self.calls >= cap:
                await abort(
                    context,
                    errors.ConcurrencyLimit(
                        f"the server is handling {self.calls} calls, the most it takes at"
                        " once; retry shortly",
                        {"limit": str(cap)},
                    ),
                )
            self.calls += 1
            try:
                return await behavior(request, context)
            finally:
                self.calls -= 1

        return unary

    def _limit_stream(self, behavior: Any) -> Any:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            peer = context.peer()
            open_now = self._streams.get(peer, 0)
            cap = self._limits.max_streams_per_connection
            if cap and open_now >= cap:
                await abort(
                    context,
                    errors.StreamLimit(
                        f"this connection has {open_now} streams open, the most allowed;"
                        " close one or open another connection",
                        {"limit": str(cap)},
                    ),
                )
            self._streams[peer] = open_now + 1
            # The stubs want their DoneCallback class; grpc takes any callable.
            context.add_done_callback(lambda _ended: self._stream_ended(peer))  # type: ignore[arg-type]
            # aclosing: closing this generator closes the handler's at once.
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream

    def _stream_ended(self, peer: str) -> None:
        left = self._streams[peer] - 1
        if left:
            self._streams[peer] = left
        else:
            del self._streams[peer]
