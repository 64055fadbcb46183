"""The lease keeper behind ``TetherClient.hold()``.

One keeper per client renews every lease the client holds over a single multiplexed
``KeepAlive`` stream: due renewals are batched into one request per namespace, matched to
their acknowledgement by sequence number.

The rule that matters: **a lease is reported held only while the client is sure the
server still considers it live.** For each lease the keeper keeps ``safe_until``, on its
own monotonic clock: the *send* time of the last acknowledged renewal plus the ttl the
server granted, minus a safety margin. The server measured its deadline from a moment after
that send, so the server's deadline is later than ``safe_until`` by at least the margin.
When ``safe_until`` passes without a newer acknowledgement, the lease is lost: ``lost`` is
set, callbacks run, the body is cancelled if asked, and the fencing token stops working.
A lost lease is never renewed again.

When the stream breaks (server restart, replica gone, network cut) the keeper reconnects
after growing, jittered delays (``clock.backoff``), failing over between targets, and
re-sends what was in flight. A stream that stops answering (a black-holed connection) is treated as
broken once a request goes unacknowledged for ``ack_timeout``. After ``fallback_after``
failed streams in a row, due renewals go by unary ``Renew`` until a stream works again.
A renewal that failed for a transient reason is retried after growing, jittered delays
capped at min(renew_retry_max, half the smallest margin held); unary renewals share one view
of the server: after a failure, one renewal at a time probes it and the others wait for its
outcome, so an outage costs a bounded number of calls however many leases are held.

A grant's deadline counts from the send of the Acquire attempt that got it (attempts may
span an outage); a grant whose answer arrives past its safety deadline is released, never
handed out. A release the server refuses because the lease ended first (revoked, or
expired although the release went out before the safety deadline) makes the lease lost:
the work ran without it for a while, and the hold says so by raising ``LeaseLost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType

from tether_client.clock import Clock, backoff, sleep_or_wake
from tether_client.connection import Endpoint
from tether_client.convert import duration_seconds, to_datetime
from tether_client.errors import (
    DeadlineExceeded,
    LeaseExpired,
    LeaseHeld,
    LeaseLost,
    LeaseNotHeld,
    LeaseRevoked,
    TetherError,
    from_error_detail,
)
from tether_client.leases import LeasesClient
from tether_client.pb import common_pb2, lease_pb2
from tether_client.results import Acquired
from tether_client.retry import is_transient
from tether_client.transport import Transport

log = logging.getLogger("tether_client.keeper")

LostCallback = Callable[["HeldLease"], object]


@dataclass(frozen=True)
class KeeperConfig:
    # Renew once this fraction of the granted ttl has passed since the last acked send.
    renew_fraction: float = 1 / 3
    # safe_until = acked send time + granted ttl - max(min_safety_margin, fraction * ttl).
    safety_margin_fraction: float = 0.1
    min_safety_margin: float = 0.05
    # An unacknowledged request older than this breaks the stream (None: the renew
    # interval of the request's shortest lease, and ping_ack_timeout for pings).
    ack_timeout: float | None = None
    ping_ack_timeout: float = 10.0
    # The server closes a stream silent for 2 min; ping well before.
    ping_interval: float = 30.0
    reconnect_initial: float = 0.05
    reconnect_max: float = 2.0
    # Failed streams in a row before due renewals go by unary Renew.
    fallback_after: int = 2
    max_renewals_per_request: int = 500
    # When renewals go out, leases due within this fraction of their ttl go along.
    coalesce_fraction: float = 0.1
    release_timeout: float = 10.0
    # A renewal that failed transiently is retried after a growing, jittered delay from
    # this, capped at min(renew_retry_max, half the smallest margin held): once the server is back,
    # the retry still lands well before the safety deadline.
    renew_retry_initial: float = 0.05
    renew_retry_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        if not 0 <= self.safety_margin_fraction < 1 - self.renew_fraction:
            raise ValueError("safety_margin_fraction must leave room to renew before it")
        if not 0 < self.renew_retry_initial <= self.renew_retry_max:
            # Zero would retry a failed renewal at once, over and over.
            raise ValueError("renew_retry_initial must be positive and at most renew_retry_max")


@dataclass
class KeeperStats:
    """What the keeper did; for tests, benchmarks and debugging."""

    streams_opened: int = 0
    streams_broken: int = 0
    requests_sent: int = 0
    renewals_sent: int = 0
    pings_sent: int = 0
    unary_renewals: int = 0
    # Unary renewals that waited for another lease's probe instead of calling themselves.
    unary_renewals_held_back: int = 0
    renewals_acked: int = 0
    leases_lost: int = 0


class HeldLease:
    """A lease kept alive by the keeper. Read it; never cache its fencing token."""

    def __init__(
        self,
        keeper: Keeper,
        lease: lease_pb2.Lease,
        *,
        ttl: float,
        margin: float,
    ) -> None:
        self._keeper = keeper
        self.key = lease.key
        self.namespace = lease.namespace
        self.lease_id = lease.lease_id
        self.holder = lease.holder
        self.ttl = ttl
        self.acquired = lease
        self._token = lease.fencing_token
        self._margin = margin
        self._expires_at = to_datetime(lease.expires_at)
        self._safe_until = float("-inf")
        self._next_renew = float("-inf")
        self._in_flight = False
        # Transient renewal failures in a row: the retry delay grows with them.
        self._retries = 0
        self._progress: bytes | None = None
        self._lost = asyncio.Event()
        self._lost_error: LeaseLost | None = None
        self._released = False
        self._callbacks: list[LostCallback] = []
        # The body to cancel on loss (on_lost="cancel"), while it is inside its block.
        self._cancel_task: asyncio.Task[object] | None = None
        # A cancellation the body asked for itself (it read the loss): delivered at its next
        # await, or dropped if the block ends first.
        self._cancel_handle: asyncio.Handle | None = None
        self._cancel_issued = False
        self.renewals_sent = 0

    # --- what the holder reads ----------------------------------------------------------

    @property
    def fencing_token(self) -> int:
        """The token to present with every fenced write. Raises once the lease is not held."""
        self.check()
        return self._token

    @property
    def fence(self) -> common_pb2.Fence:
        """``Fence(lease_id, fencing_token)`` for saga and object calls; raises like the token."""
        return common_pb2.Fence(lease_id=self.lease_id, fencing_token=self.fencing_token)

    @property
    def expires_at(self) -> datetime:
        """The server's deadline after the last acknowledged renewal (server clock)."""
        return self._expires_at

    @property
    def safe_until(self) -> float:
        """Until when, on the client's monotonic clock, the lease is certainly live."""
        return self._safe_until

    @property
    def alive(self) -> bool:
        return not self._released and not self.lost

    @property
    def lost(self) -> bool:
        if self._lost.is_set():
            return True
        # Do not wait for the keeper's timer: the deadline is the truth.
        return not self._released and self._keeper.expire_if_overdue(self)

    @property
    def lost_error(self) -> LeaseLost | None:
        return self._lost_error

    def check(self) -> None:
        """Raise ``LeaseLost`` (or ``LeaseNotHeld`` after release) unless the lease is held."""
        if self._released:
            raise LeaseNotHeld(f"lease {self.lease_id} on {self.key!r} was released")
        if self.lost:
            # Read from another thread (the sync client), the loss may still be on its way
            # to the keeper's loop; the lease is lost all the same.
            raise self._lost_error or LeaseLost(
                f"lease {self.lease_id} on {self.key!r}: past its safety deadline"
            )

    def set_progress(self, progress: bytes) -> None:
        """Progress details to send with the next renewal (readable by a successor)."""
        self._progress = progress

    def on_lost(self, callback: LostCallback) -> None:
        """Call ``callback(lease)`` when the lease is lost (at once if it already is)."""
        if self._lost.is_set():
            self._keeper.run_callback(callback, self)
        else:
            self._callbacks.append(callback)

    async def wait_lost(self) -> LeaseLost:
        """Return once the lease is lost, with the reason."""
        clock = self._keeper.clock
        while not self._lost.is_set():
            # The timer may be late (a busy loop); the deadline still rules.
            await sleep_or_wake(clock, self._safe_until - clock.monotonic(), self._lost)
            self._keeper.expire_if_overdue(self)
        assert self._lost_error is not None
        return self._lost_error

    def __repr__(self) -> str:
        state = "lost" if self._lost.is_set() else "released" if self._released else "held"
        return (
            f"<HeldLease {self.key!r} id={self.lease_id} token={self._token} {state} "
            f"expires_at={self._expires_at.isoformat()}>"
        )

    # --- keeper side ---------------------------------------------------------------------

    def _acked(self, sent_at: float, granted_ttl: float, expires_at: datetime | None) -> None:
        self._in_flight = False
        self._retries = 0
        if self._lost.is_set():
            return
        # Assigned, not maxed: a renewal granting a shorter ttl moved the server's deadline
        # earlier. One renewal per lease is in flight at a time, so acks arrive in order.
        self._safe_until = sent_at + granted_ttl - self._margin
        self._next_renew = sent_at + granted_ttl * self._keeper.config.renew_fraction
        if expires_at is not None:
            self._expires_at = expires_at

    def _take_progress(self) -> bytes | None:
        progress, self._progress = self._progress, None
        return progress


@dataclass
class _Send:
    sent_at: float
    # How long this request may go unanswered before the stream counts as stalled.
    patience: float
    leases: list[tuple[HeldLease, bytes | None]] = field(default_factory=list)


class _Stream:
    """One open KeepAlive call: a writer fed by a queue and a reader of acknowledgements."""

    def __init__(self, keeper: Keeper, endpoint: Endpoint, opened_at: float) -> None:
        self.keeper = keeper
        self.endpoint = endpoint
        # grpc-stubs lacks the asyncio form without a request iterator (writes come later).
        self.call = endpoint.lease.KeepAlive(  # type: ignore[call-arg]
            metadata=keeper.transport.connection.metadata()
        )
        self.sequence = 0
        self.pending: dict[int, _Send] = {}
        self.last_send = opened_at
        self.last_response = opened_at
        self.outbox: asyncio.Queue[lease_pb2.KeepAliveRequest] = asyncio.Queue()
        self.tasks = (
            asyncio.create_task(self._write(), name="tether-keepalive-writer"),
            asyncio.create_task(self._read(), name="tether-keepalive-reader"),
        )

    def send(self, request: lease_pb2.KeepAliveRequest, record: _Send) -> None:
        self.sequence += 1
        request.sequence = self.sequence
        self.pending[self.sequence] = record
        self.last_send = record.sent_at
        self.outbox.put_nowait(request)

    def stalled_at(self) -> float:
        """When the stream counts as stalled: the oldest unanswered request has waited its
        patience *and* nothing at all arrived meanwhile. A server that answers slowly but
        steadily (requests queue on a stream) is busy, not gone."""
        if not self.pending:
            return float("inf")
        oldest = min(self.pending.values(), key=lambda send: send.sent_at)
        return max(oldest.sent_at, self.last_response) + oldest.patience

    async def _write(self) -> None:
        try:
            while True:
                await self.call.write(await self.outbox.get())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.keeper.stream_broken(self, exc)

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if not isinstance(response, lease_pb2.KeepAliveResponse):  # grpc.aio.EOF
                    self.keeper.stream_broken(self, EOFError("the server ended the stream"))
                    return
                self.keeper.on_response(self, response)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.keeper.stream_broken(self, exc)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.call.cancel()


class Keeper:
    def __init__(self, transport: Transport, leases: LeasesClient, config: KeeperConfig) -> None:
        self.transport = transport
        self.leases = leases
        self.config = config
        self.clock: Clock = transport.clock
        self.stats = KeeperStats()
        self._leases: dict[str, HeldLease] = {}
        # Lease ids of every hold() from acquisition to exit (a superset of _leases).
        self._claimed: set[str] = set()
        self._unary: set[asyncio.Task[None]] = set()
        self._callbacks: set[asyncio.Task[object]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stream: _Stream | None = None
        self._stream_failures = 0
        self._next_stream_attempt = float("-inf")
        # Unary renewals share one view of the server. After a transient failure only one
        # goes out at a time (a probe), not before _unary_next_at; the others wait for it.
        self._unary_failures = 0
        self._unary_next_at = float("-inf")
        self._unary_in_flight = 0
        self._closed = False
        # The loop the keeper runs on: losses seen from other threads are handed to it.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def held(self) -> list[HeldLease]:
        return list(self._leases.values())

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    # --- hold() ------------------------------------------------------------------------

    def hold(
        self,
        key: str,
        *,
        ttl: float,
        holder: str,
        namespace: str,
        wait: float = 0,
        lock_delay: float = 0,
        labels: dict[str, str] | None = None,
        progress: bytes | None = None,
        cancel_on_lost: bool = False,
        on_lost: LostCallback | None = None,
        timeout: float | None = None,
    ) -> _Hold:
        async def acquire() -> HeldLease:
            # The deadline counts from the attempt that got the grant: the first attempt
            # may lie a whole outage earlier, which would hand out a lease lost on arrival.
            response, sent_at = await self.leases._acquire_timed(
                key,
                ttl=ttl,
                holder=holder,
                namespace=namespace,
                wait=wait,
                lock_delay=lock_delay,
                labels=labels,
                timeout=timeout,
            )
            lease = HeldLease(self, response.lease, ttl=ttl, margin=self.margin(ttl))
            if lease.lease_id in self._claimed:
                # The same holder acquiring again gets its live lease back; two holds sharing
                # it would release it under each other. A hold is not re-entrant.
                raise LeaseHeld(
                    f"key {key!r} is already held by this client (lease {lease.lease_id})",
                    metadata={"holder": holder, "lease_id": lease.lease_id, "key": key},
                )
            self._claimed.add(lease.lease_id)
            try:
                await self._start_deadline(lease, response, sent_at, wait, timeout)
                if self.clock.monotonic() >= lease._safe_until:
                    # The answer took longer than the lease is surely live: lost on arrival.
                    raise LeaseLost(
                        f"lease {lease.lease_id} on {key!r}: granted, but the answer arrived "
                        "after its safety deadline; released it"
                    )
            except BaseException:
                # Acquired but not kept: give the key back rather than leave it for the ttl.
                self._claimed.discard(lease.lease_id)
                await asyncio.shield(self.release(lease, report=False))
                raise
            if progress is not None:
                lease.set_progress(progress)
            if on_lost is not None:
                lease.on_lost(on_lost)
            return lease

        return _Hold(self, acquire, cancel_on_lost)

    async def _start_deadline(
        self,
        lease: HeldLease,
        response: Acquired,
        sent_at: float,
        wait: float,
        timeout: float | None,
    ) -> None:
        if response.created and wait == 0:
            granted = response.lease.expires_at.ToMicroseconds()
            granted -= response.lease.acquired_at.ToMicroseconds()
            lease._acked(sent_at, granted / 1e6, None)
        else:
            # An existing lease handed back, or one granted at some unknown moment of a
            # wait: only a renewal from a known send time gives a sound deadline.
            renewed, sent_at = await self.leases._renew_timed(
                lease.lease_id, lease._token, namespace=lease.namespace, timeout=timeout
            )
            lease._acked(sent_at, renewed.ttl.total_seconds(), renewed.expires_at)

    def margin(self, ttl: float) -> float:
        return max(self.config.min_safety_margin, ttl * self.config.safety_margin_fraction)

    def add(self, lease: HeldLease) -> None:
        if self._closed:
            raise LeaseNotHeld("the client is closed")
        self._loop = asyncio.get_running_loop()
        self._leases[lease.lease_id] = lease
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tether-keeper")
        self._wake.set()

    def remove(self, lease: HeldLease) -> None:
        self._leases.pop(lease.lease_id, None)
        self._claimed.discard(lease.lease_id)
        self._wake.set()

    async def release(self, lease: HeldLease, *, report: bool = True) -> LeaseLost | None:
        """Release a lease this client still holds (never one it lost).

        With ``report``, a refusal because the lease ended first declares it lost and
        returns that loss: a revocation, or an expiry although the release went out before
        the safety deadline (the server's deadline came before this client's). An expiry
        found by a release sent after that deadline (retried through an outage) is only a
        late release: the work had ended while the lease was surely live.
        """
        lease._released = True
        request = lease_pb2.ReleaseRequest(
            namespace=lease.namespace,
            lease_id=lease.lease_id,
            fencing_token=lease._token,
            holder=lease.holder,
        )
        sent_at = self.clock.monotonic()

        async def attempt(
            endpoint: Endpoint, left: float, metadata: tuple[tuple[str, str], ...]
        ) -> lease_pb2.ReleaseResponse:
            nonlocal sent_at
            sent_at = self.clock.monotonic()  # of the attempt that got the last answer
            return await endpoint.lease.Release(request, timeout=left, metadata=metadata)

        try:
            await self.transport.call(attempt, safe=True, timeout=self.config.release_timeout)
        except (LeaseExpired, LeaseRevoked) as exc:
            if report and (isinstance(exc, LeaseRevoked) or sent_at < lease._safe_until):
                lease._released = False
                self.declare_lost(lease, exc, releasing=True)
                return lease._lost_error
            log.warning(
                "lease %s on %r had ended before its release arrived: %s",
                lease.lease_id,
                lease.key,
                exc,
            )
        except TetherError as exc:
            # The ttl is the grace: a release that cannot get through only delays takeover.
            log.warning("release of lease %s on %r failed: %s", lease.lease_id, lease.key, exc)
        return None

    # --- loss ----------------------------------------------------------------------------

    def expire_if_overdue(self, lease: HeldLease) -> bool:
        """Whether ``lease`` is past its safety deadline; if so, declare it lost.

        Safe from any thread: off the keeper's loop the declaration is handed to it.
        """
        if self.clock.monotonic() < lease._safe_until:
            return False
        if self._on_loop():
            self.declare_lost(lease, None)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.declare_lost, lease, None)
        return True

    def _on_loop(self) -> bool:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return self._loop is None
        return self._loop is None or running is self._loop

    def declare_lost(
        self, lease: HeldLease, cause: TetherError | None, *, releasing: bool = False
    ) -> None:
        if lease._lost.is_set() or lease._released:
            return
        if cause is None:
            message = (
                f"lease {lease.lease_id} on {lease.key!r}: no renewal acknowledged before the "
                f"safety deadline; the server may expire it at any moment"
            )
        elif releasing:
            message = (
                f"lease {lease.lease_id} on {lease.key!r}: the server refused its release, it "
                f"had ended before the holder let go ({cause}); the work ran without it for "
                "a while"
            )
        else:
            message = f"lease {lease.lease_id} on {lease.key!r}: the server refused a renewal"
            message += f" ({cause})"
        lease._lost_error = LeaseLost(message, cause=cause)
        lease._lost.set()
        self._leases.pop(lease.lease_id, None)
        self.stats.leases_lost += 1
        log.warning("%s", message)
        task = lease._cancel_task
        if task is not None and not task.done():
            if task is asyncio.current_task():
                # The body itself found the loss (it read lease.lost or the token). A cancel
                # now would stay pending past a block that ends without another await and
                # hit the caller after it; deliver it at the body's next await instead.
                lease._cancel_handle = asyncio.get_running_loop().call_soon(_cancel_body, lease)
            else:
                _cancel_body(lease)
        callbacks, lease._callbacks = lease._callbacks, []
        for callback in callbacks:
            self.run_callback(callback, lease)

    def run_callback(self, callback: LostCallback, lease: HeldLease) -> None:
        try:
            result = callback(lease)
        except Exception:
            log.exception("an on_lost callback failed")
            return
        if isinstance(result, Awaitable):
            task = asyncio.ensure_future(result)
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not silently stop every renewal; deadlines still rule.
                log.exception("the lease keeper failed a step; carrying on")
                await self._sleep(self.config.reconnect_max)

    async def _step(self) -> None:
        self._wake.clear()
        now = self.clock.monotonic()
        for lease in list(self._leases.values()):
            if now >= lease._safe_until:
                self.declare_lost(lease, None)
        if not self._leases:
            self._close_stream()
            await self._wake.wait()
            return
        stream = self._stream
        if stream is not None and stream.stalled_at() <= now:
            self.stream_broken(stream, TimeoutError("no acknowledgement in time"))
            stream = None
        if stream is None and now >= self._next_stream_attempt:
            stream = self._open_stream(now)
        if any(not x._in_flight and x._next_renew <= now for x in self._leases.values()):
            # Renew a little early whatever falls due soon: one request instead of many.
            due = [
                lease
                for lease in self._leases.values()
                if not lease._in_flight
                and lease._next_renew - lease.ttl * self.config.coalesce_fraction <= now
            ]
        else:
            due = []
        if due and stream is not None:
            self._send_renewals(stream, due, now)
        elif due and self._stream_failures >= self.config.fallback_after:
            self._renew_unary_due(due, now)
        if stream is not None and now - stream.last_send >= self.config.ping_interval:
            self._send_ping(stream, now)
        await self._sleep(self._next_wake(now) - now)

    def _next_wake(self, now: float) -> float:
        moments = [lease._safe_until for lease in self._leases.values()]
        waiting = [lease._next_renew for lease in self._leases.values() if not lease._in_flight]
        if waiting:
            # A due renewal that cannot go out yet must not spin the loop: it goes once a
            # stream or the unary probe lets it.
            moments.append(max(min(waiting), self._renew_gate(now)))
        if self._stream is not None:
            moments.append(self._stream.stalled_at())
            moments.append(self._stream.last_send + self.config.ping_interval)
        else:
            moments.append(self._next_stream_attempt)
        return max(now, min(moments))

    def _renew_gate(self, now: float) -> float:
        """The earliest moment a due renewal can be sent."""
        if self._stream is not None:
            return now
        if self._stream_failures < self.config.fallback_after:
            return self._next_stream_attempt
        if self._unary_failures == 0:
            return now
        if self._unary_in_flight:
            return float("inf")  # the probe's outcome wakes the loop
        return self._unary_next_at

    def _retry_delay(self, attempt: int) -> float:
        """Growing and jittered, capped well below the smallest margin of the leases held."""
        margin = min(
            (lease._margin for lease in self._leases.values()),
            default=self.config.min_safety_margin,
        )
        cap = min(self.config.renew_retry_max, margin / 2)
        return backoff(attempt, self.config.renew_retry_initial, cap)

    async def _sleep(self, delay: float) -> None:
        await sleep_or_wake(self.clock, delay, self._wake)

    # --- the stream ----------------------------------------------------------------------

    def _open_stream(self, now: float) -> _Stream:
        stream = _Stream(self, self.transport.connection.current, now)
        self._stream = stream
        self.stats.streams_opened += 1
        # A ping proves the stream works before anything depends on it.
        self._send_ping(stream, now)
        return stream

    def _ack_timeout(self, leases: list[HeldLease]) -> float:
        if self.config.ack_timeout is not None:
            return self.config.ack_timeout
        return min(lease.ttl for lease in leases) * self.config.renew_fraction

    def _send_renewals(self, stream: _Stream, due: list[HeldLease], now: float) -> None:
        by_namespace: dict[str, list[HeldLease]] = {}
        for lease in due:
            by_namespace.setdefault(lease.namespace, []).append(lease)
        limit = self.config.max_renewals_per_request
        for namespace, leases in by_namespace.items():
            for start in range(0, len(leases), limit):
                chunk = leases[start : start + limit]
                record = _Send(now, self._ack_timeout(chunk))
                request = lease_pb2.KeepAliveRequest(namespace=namespace)
                for lease in chunk:
                    renewal = request.renewals.add(
                        lease_id=lease.lease_id, fencing_token=lease._token
                    )
                    progress = lease._take_progress()
                    if progress is not None:
                        renewal.progress = progress
                    record.leases.append((lease, progress))
                    lease._in_flight = True
                    lease.renewals_sent += 1
                stream.send(request, record)
                self.stats.requests_sent += 1
                self.stats.renewals_sent += len(chunk)

    def _send_ping(self, stream: _Stream, now: float) -> None:
        timeout = self.config.ack_timeout or self.config.ping_ack_timeout
        stream.send(lease_pb2.KeepAliveRequest(), _Send(now, timeout))
        self.stats.pings_sent += 1

    def on_response(self, stream: _Stream, response: lease_pb2.KeepAliveResponse) -> None:
        record = stream.pending.pop(response.sequence, None)
        if record is None or stream is not self._stream:
            return
        stream.last_response = self.clock.monotonic()
        self._stream_failures = 0
        self._unary_failures = 0
        results = {result.lease_id: result for result in response.results}
        for lease, progress in record.leases:
            result = results.get(lease.lease_id)
            if result is None:
                self._retry_later(lease, progress)
            elif result.HasField("error"):
                self._refused(lease, from_error_detail(result.error), progress)
            else:
                self.stats.renewals_acked += 1
                lease._acked(
                    record.sent_at, duration_seconds(result.ttl), to_datetime(result.expires_at)
                )
        self._wake.set()

    def stream_broken(self, stream: _Stream, error: BaseException) -> None:
        if stream is not self._stream:
            return
        self._stream = None
        stream.close()
        self.stats.streams_broken += 1
        self._stream_failures += 1
        now = self.clock.monotonic()
        self._next_stream_attempt = now + backoff(
            self._stream_failures, self.config.reconnect_initial, self.config.reconnect_max
        )
        self.transport.connection.fail_over(stream.endpoint)
        for record in stream.pending.values():
            for lease, progress in record.leases:
                self._retry_later(lease, progress, at=now)
        if not self._closed:
            log.info("keep-alive stream to %s broke: %r", stream.endpoint.target, error)
        self._wake.set()

    def _retry_later(
        self, lease: HeldLease, progress: bytes | None, at: float | None = None
    ) -> None:
        """Renew ``lease`` again at ``at``, or after its own growing delay."""
        lease._in_flight = False
        if progress is not None and lease._progress is None:
            lease._progress = progress
        if at is None:
            lease._retries += 1
            at = self.clock.monotonic() + self._retry_delay(lease._retries)
        lease._next_renew = at

    def _refused(
        self,
        lease: HeldLease,
        error: TetherError,
        progress: bytes | None,
        at: float | None = None,
    ) -> bool:
        """Retry a transient failure (True), or declare the lease lost (False)."""
        # A renewal that timed out (not a server refusal) may still land: try again soon.
        timed_out = isinstance(error, DeadlineExceeded) and not error.reason
        if is_transient(error) or timed_out:
            self._retry_later(lease, progress, at)
            return True
        self.declare_lost(lease, error)
        return False

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    # --- unary fallback ------------------------------------------------------------------

    def _renew_unary_due(self, due: list[HeldLease], now: float) -> None:
        if self._unary_failures == 0:
            for lease in due:
                self._renew_unary(lease, now)
        elif not self._unary_in_flight and now >= self._unary_next_at:
            # The server did not answer lately: the most urgent lease probes it alone.
            self._renew_unary(min(due, key=lambda lease: lease._safe_until), now)
            self.stats.unary_renewals_held_back += len(due) - 1
        # Otherwise a probe is out or backing off: its outcome wakes the loop.

    def _unary_failed(self, failures_at_send: int) -> None:
        # Renewals that went out together and failed together are one failure, not many.
        self._unary_failures = max(self._unary_failures, failures_at_send + 1)
        retry_at = self.clock.monotonic() + self._retry_delay(self._unary_failures)
        self._unary_next_at = max(self._unary_next_at, retry_at)

    def _renew_unary(self, lease: HeldLease, now: float) -> None:
        lease._in_flight = True
        lease.renewals_sent += 1
        self.stats.unary_renewals += 1
        failures = self._unary_failures
        self._unary_in_flight += 1
        progress = lease._take_progress()
        timeout = max(0.05, min(self._ack_timeout([lease]), lease._safe_until - now))

        async def renew() -> None:
            try:
                # One attempt: the keeper schedules its own retries against the deadline.
                renewal, _ = await self.leases._renew_timed(
                    lease.lease_id,
                    lease._token,
                    progress=progress,
                    namespace=lease.namespace,
                    timeout=timeout,
                    safe=False,
                )
            except TetherError as error:
                # Due again at once; the keeper's probe schedule decides when it goes.
                if self._refused(lease, error, progress, at=self.clock.monotonic()):
                    self._unary_failed(failures)
                else:
                    self._unary_failures = 0  # refused, but the server answered
            else:
                self._unary_failures = 0
                self.stats.renewals_acked += 1
                lease._acked(now, renewal.ttl.total_seconds(), renewal.expires_at)
            finally:
                self._unary_in_flight -= 1
                self._wake.set()

        task = asyncio.create_task(renew(), name="tether-renew")
        self._unary.add(task)
        task.add_done_callback(self._unary.discard)

    # --- shutdown ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop renewing. Leases still held are reported lost: nobody keeps them any more."""
        self._closed = True
        for lease in list(self._leases.values()):
            self.declare_lost(lease, LeaseNotHeld("the client was closed while holding it"))
        self._close_stream()
        tasks: list[asyncio.Task[object]] = [*self._unary, *self._callbacks]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _cancel_body(lease: HeldLease) -> None:
    lease._cancel_handle = None
    task = lease._cancel_task
    if task is not None and not task.done():
        lease._cancel_issued = True
        task.cancel()


class _Hold:
    """``async with keeper.hold(...) as lease``; cancels the body on loss when asked.

    A lease lost while the block ran ends the block with ``LeaseLost``, whatever the body
    did (returned, raised, or swallowed the cancellation), chained from the body's own
    error if it raised one. Like ``asyncio.timeout``, the cancellation this context caused
    never leaves it; any other cancellation passes through untouched.
    """

    def __init__(
        self, keeper: Keeper, acquire: Callable[[], Awaitable[HeldLease]], cancel: bool
    ) -> None:
        self._keeper = keeper
        self._acquire = acquire
        self._cancel = cancel
        self._lease: HeldLease | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> HeldLease:
        lease = await self._acquire()
        if self._cancel:
            self._task = asyncio.current_task()
            if self._task is not None:
                self._cancelling = self._task.cancelling()
                lease._cancel_task = self._task
        self._lease = lease
        self._keeper.add(lease)
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        assert lease is not None
        lease._cancel_task = None
        if lease._cancel_handle is not None:
            lease._cancel_handle.cancel()  # the body is out: a deferred cancel must not follow
            lease._cancel_handle = None
        self._keeper.remove(lease)
        if not lease.lost:
            ended = await self._keeper.release(lease)
            if ended is not None:
                # The lease ended under the body: the caller must not take the work as done
                # under it. A body that failed anyway keeps its own error, with the news.
                if exc is None:
                    raise ended
                exc.add_note(f"tether: {ended.message}")
            return
        others_cancelled = False
        if lease._cancel_issued and self._task is not None:
            # Take back the cancellation this context caused; one from elsewhere remains.
            others_cancelled = self._task.uncancel() > self._cancelling
        if isinstance(exc, asyncio.CancelledError) and (
            others_cancelled or not lease._cancel_issued
        ):
            return  # somebody else's cancellation: it goes on
        lost = lease._lost_error
        assert lost is not None
        if exc is lost:
            return
        raise lost from exc
