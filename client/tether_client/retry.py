"""When and how the client repeats a failed call.

Only calls that are safe to repeat are retried: reads, idempotent writes (Renew, Release,
Revoke), and creates that carry a request id the client generated. Only transient failures
(``UNAVAILABLE``: server gone or draining, network cut, store unreachable) are retried, with
exponential backoff and full jitter, and never past the caller's deadline. Every attempt
is bounded by ``min(time left, attempt_timeout)``; an attempt whose own bound runs out
counts as ``Unavailable`` and the next one goes to the next target.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    wait_random_exponential,
)

from tether_client.connection import Connection, Endpoint
from tether_client.errors import DeadlineExceeded, Unavailable, from_rpc_error

R = TypeVar("R")
Metadata = tuple[tuple[str, str], ...]
# One attempt: the endpoint to call, the seconds it may take, and the call metadata.
Attempt = Callable[[Endpoint, float, Metadata], Awaitable[R]]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
# Picks a unary RPC off an endpoint's stubs, e.g. ``lambda e: e.lease.Renew``.
Unary = Callable[[Endpoint], "grpc.aio.UnaryUnaryMultiCallable[Req, Resp]"]


@dataclass(frozen=True)
class RetryPolicy:
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    # Bounds a call whose caller gave no deadline, retries included.
    default_timeout: float = 30.0
    # Bounds one attempt: a target that swallows packets without refusing them must not
    # eat the whole deadline; the next attempt goes to the next target.
    attempt_timeout: float = 10.0

    def backoff(self) -> wait_random_exponential:
        return wait_random_exponential(multiplier=self.initial_backoff, max=self.max_backoff)

    def waiting(self, wait: float, timeout: float | None) -> tuple[float, float]:
        """(call timeout, attempt bound) for a call that may block ``wait`` s on the server:
        the server's wait must not count against either."""
        call_timeout = wait + self.default_timeout if timeout is None else timeout
        return call_timeout, wait + self.attempt_timeout

    def delay(self, attempt_number: int) -> float:
        """The backoff before retry ``attempt_number`` (1 = first retry), jittered."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt_number
        return float(self.backoff()(state))


def growing_delay(attempt: int, initial: float, cap: float) -> float:
    """The delay before retry ``attempt`` (1 = first): ``initial * 2**(attempt-1)``, capped
    at ``cap``, half of it fixed and half random ("equal jitter"). The random half keeps
    clients from retrying in step; the fixed half bounds how often anyone retries, so an
    outage of a given length sees a bounded number of attempts."""
    high = min(cap, initial * 2.0 ** min(attempt - 1, 60))
    return high / 2 + random.uniform(0, high / 2)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, Unavailable)


async def invoke(
    connection: Connection,
    attempt: Attempt[R],
    *,
    safe: bool,
    timeout: float | None,
    policy: RetryPolicy,
    attempt_timeout: float | None = None,
) -> R:
    """Run ``attempt`` against the current endpoint, retrying where that is safe.

    Raises the last attempt's typed error (retries stop before a backoff would pass the
    deadline); ``DeadlineExceeded`` only when no time was left to start an attempt.
    """
    budget = policy.default_timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    cap = policy.attempt_timeout if attempt_timeout is None else attempt_timeout

    async def once() -> R:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the call's deadline ({budget:.3g} s) passed")
        endpoint = connection.current
        allowed = min(left, cap)
        try:
            return await attempt(endpoint, allowed, connection.metadata())
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if (
                exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                and not error.reason
                and allowed < left
            ):
                # Our per-attempt bound ran out, not the caller's deadline: that target does
                # not answer. As transient as a refused connection.
                error = Unavailable(
                    f"{endpoint.target} did not answer within {allowed:.3g} s",
                    metadata={"target": endpoint.target},
                )
            if isinstance(error, Unavailable):
                connection.fail_over(endpoint)
            raise error from exc

    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: safe and is_transient(exc)),
        wait=policy.backoff(),
        stop=stop_before_delay(budget),
        reraise=True,
    )
    result: R
    async for attempt_state in retrying:
        with attempt_state:
            result = await once()
    return result


__all__ = ["Attempt", "RetryPolicy", "Unary", "growing_delay", "invoke", "is_transient"]
