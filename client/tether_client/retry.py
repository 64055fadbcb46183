"""When and how the client repeats a failed call.

Only calls that are safe to repeat are retried: reads, idempotent writes (Renew, Release,
Revoke), and creates that carry a request id the client generated. Only transient failures
(``UNAVAILABLE``: server gone or draining, network cut, store unreachable) are retried, with
growing, jittered delays (:func:`tether_client.clock.backoff`), and never past the caller's
deadline. Deadline and delays are measured on the client's clock, so a test with a
``ManualClock`` decides when a retry happens. Every attempt is bounded by
``min(time left, attempt_timeout)``; an attempt whose own bound runs out counts as
``Unavailable`` and the next one goes to the next target.

A refusal that is not retried is raised as one typed error: the gRPC error it came from is
kept as ``error.rpc_error``, not chained, so a traceback shows the caller's frames only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from tether_client.clock import Clock, backoff
from tether_client.connection import Connection, Endpoint
from tether_client.errors import DeadlineExceeded, TetherError, Unavailable, from_rpc_error

R = TypeVar("R")
Metadata = tuple[tuple[str, str], ...]
# One attempt: the endpoint to call, the seconds it may take, and the call metadata.
Attempt = Callable[[Endpoint, float, Metadata], Awaitable[R]]


@dataclass(frozen=True)
class RetryPolicy:
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    # Bounds a call whose caller gave no deadline, retries included.
    default_timeout: float = 30.0
    # Bounds one attempt: a target that swallows packets without refusing them must not
    # eat the whole deadline; the next attempt goes to the next target.
    attempt_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("initial_backoff must be positive and at most max_backoff")
        if self.default_timeout <= 0 or self.attempt_timeout <= 0:
            raise ValueError("timeouts must be positive")

    def waiting(self, wait: float, timeout: float | None) -> tuple[float, float]:
        """(call timeout, attempt bound) for a call that may block ``wait`` s on the server:
        the server's wait must not count against either."""
        call_timeout = wait + self.default_timeout if timeout is None else timeout
        return call_timeout, wait + self.attempt_timeout

    def delay(self, attempt: int) -> float:
        """The backoff before retry ``attempt`` (1 = first retry)."""
        return backoff(attempt, self.initial_backoff, self.max_backoff)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, Unavailable)


async def invoke(
    connection: Connection,
    clock: Clock,
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
    deadline = clock.monotonic() + budget
    cap = policy.attempt_timeout if attempt_timeout is None else attempt_timeout
    failures = 0
    while True:
        left = deadline - clock.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the call's deadline ({budget:.3g} s) passed")
        endpoint = connection.current
        allowed = min(left, cap)
        error: TetherError
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
                error.rpc_error = exc
        if isinstance(error, Unavailable):
            connection.fail_over(endpoint)
        failures += 1
        delay = policy.delay(failures)
        if not (safe and is_transient(error)) or clock.monotonic() + delay >= deadline:
            # Raised outside the except block: no "during handling" chain of attempts.
            raise error
        await clock.sleep(delay)


__all__ = ["Attempt", "RetryPolicy", "invoke", "is_transient"]
