"""tether.v1.LeaseService: protobuf in, domain calls, protobuf out. No decisions here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tether_client.pb import lease_pb2
from tether_server.auth import current_principal
from tether_server.clock import MICROS, Clock
from tether_server.domain import errors, paging, validation
from tether_server.domain.lease import LeaseState, Refuse
from tether_server.domain.validation import Limits
from tether_server.futures import discard_outcome
from tether_server.metrics import Metrics
from tether_server.notify import ChangeHub
from tether_server.services.convert import (
    EVENT_TYPE_TO_PB,
    duration_us,
    lease_states,
    lease_to_pb,
    to_duration,
    to_timestamp,
)
from tether_server.services.errors import to_error_detail
from tether_server.services.limits import ServerLimits
from tether_server.services.streaming import (
    Drains,
    Follow,
    WatchSlots,
    count_fitting,
    first_of,
    follow_events,
)
from tether_server.store.leases import (
    AcquireParams,
    AcquireResult,
    LeaseEventRecord,
    LeaseStore,
    ListLeasesParams,
    ReleaseParams,
    Renewal,
    RevokeParams,
)
from tether_server.store.leases.acquire import Held
from tether_server.store.leases.rows import AREA
from tether_server.store.replicas import stream_id_for

log = logging.getLogger(__name__)
Context = Any  # grpc.aio.ServicerContext


@dataclass(frozen=True)
class LeaseServiceConfig:
    limits: Limits = field(default_factory=Limits)
    # How often a waiting Acquire or a Watch looks at the store when nothing in this
    # process woke it: bounds the delay for changes made through other replicas.
    poll_interval_s: float = 1.0
    # A KeepAlive stream that sends nothing, not even a ping, for this long is closed.
    keepalive_idle_timeout_s: float = 120.0
    # Messages of one KeepAlive stream in flight at once (read ahead of their answers).
    keepalive_pipeline: int = 64
    watch_batch_size: int = 500
    # gRPC clients refuse messages over 4 MiB by default; stay well below.
    max_response_bytes: int = 1 << 20


class LeaseService(Drains):
    def __init__(
        self,
        store: LeaseStore,
        clock: Clock,
        changes: ChangeHub,
        metrics: Metrics,
        config: LeaseServiceConfig | None = None,
        instance_id: str = "",
        limits: ServerLimits | None = None,
        watches: WatchSlots | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._changes = changes
        self._metrics = metrics
        self._config = config or LeaseServiceConfig()
        limits = limits or ServerLimits()
        self._max_leases = limits.max_leases_per_principal
        # One instance for every service of a server: the watch cap counts them together.
        self._watches = watches or WatchSlots(limits.max_watches_per_principal)
        # Stream ids start with this process's instance id (see store/replicas.py).
        super().__init__(instance_id)
        # The open KeepAlive and Watch streams of this process: each one's handler task,
        # then (KeepAlive) its cleanup, so a stopping server can wait for them. An entry
        # leaves from the call's done callback or the cleanup's end, never only from a
        # generator's ``finally`` (see WatchSlots).
        self._open_streams: dict[object, asyncio.Future[Any]] = {}

    @property
    def open_stream_count(self) -> int:
        return len(self._open_streams)

    @property
    def _limits(self) -> Limits:
        return self._config.limits

    async def Acquire(
        self, request: lease_pb2.AcquireRequest, context: Context
    ) -> lease_pb2.AcquireResponse:
        limits = self._limits
        principal = current_principal()
        params = AcquireParams(
            namespace=validation.namespace(request.namespace),
            key=validation.key(request.key, limits),
            holder=validation.holder(request.holder, limits),
            principal=principal.name,
            ttl_us=validation.ttl(duration_us(request.ttl, "ttl"), limits),
            lock_delay_us=validation.lock_delay(
                duration_us(request.lock_delay, "lock_delay"), limits
            ),
            labels=validation.labels(request.labels, limits),
            request_id=validation.request_id(request.request_id, limits),
            max_live_leases=self._max_leases,
        )
        wait_us = validation.wait(duration_us(request.wait, "wait"), limits)
        wait_until = self._clock.now_us() + wait_us
        with self._changes.watch_key(AREA, params.namespace, params.key) as changed:
            while True:
                changed.clear()
                outcome = await self._store.lease_acquire(params)
                if isinstance(outcome, AcquireResult):
                    return lease_pb2.AcquireResponse(
                        lease=lease_to_pb(outcome.lease), created=outcome.created
                    )
                # Wake when the key changes (here or, through NOTIFY, on another replica),
                # when the holder's deadline (or the lock-delay) passes, or at the poll
                # interval as a fallback; never try the write again before one of those.
                if not await self._wait_for_key(outcome, wait_until, changed, params):
                    raise _give_up(outcome, waited=wait_us > 0, caller=principal.name)

    async def _wait_for_key(
        self, refusal: Refuse, wait_until: int, changed: asyncio.Event, params: AcquireParams
    ) -> bool:
        """Wait until the key may be free; False once the caller's wait is over."""
        retry_at = min(wait_until, refusal.retry_at_us or wait_until)
        while True:
            now = self._clock.now_us()
            if now >= wait_until:
                return False
            # The floor keeps a refusal that outlives its retry time (the database clock
            # behind ours) from spinning.
            sleep_s = min(self._config.poll_interval_s, max(0.01, (retry_at - now) / MICROS))
            await first_of(changed.wait(), self._clock.sleep(sleep_s), self._draining.wait())
            self._check_draining()
            if changed.is_set() or self._clock.now_us() >= retry_at:
                return True
            # The poll fallback: a read, not a write, to see whether the key moved.
            if await self._key_moved(params, refusal):
                return True

    async def _key_moved(self, params: AcquireParams, refusal: Refuse) -> bool:
        holder_lease = refusal.error.metadata.get("lease_id")
        if holder_lease is None:
            return False  # a lock-delay: its end is the retry time
        try:
            current = await self._store.lease_get_by_key(params.namespace, params.key)
        except errors.LeaseNotFound:
            return True
        return current.lease_id != holder_lease or current.state is not LeaseState.ACTIVE

    async def Renew(
        self, request: lease_pb2.RenewRequest, context: Context
    ) -> lease_pb2.RenewResponse:
        namespace = validation.namespace(request.namespace)
        renewal = Renewal(
            principal=current_principal().name,
            lease_id=validation.lease_id(request.lease_id),
            fencing_token=validation.fencing_token(request.fencing_token),
            progress=(
                validation.progress(request.progress, self._limits)
                if request.HasField("progress")
                else None
            ),
        )
        renewed = await self._store.lease_renew(namespace, renewal)
        return lease_pb2.RenewResponse(
            lease_id=renewed.lease_id,
            fencing_token=renewed.fencing_token,
            expires_at=to_timestamp(renewed.expires_at_us),
            ttl=to_duration(renewed.ttl_us),
        )

    async def KeepAlive(
        self, requests: AsyncIterator[lease_pb2.KeepAliveRequest], context: Context
    ) -> AsyncIterator[lease_pb2.KeepAliveResponse]:
        stream_id = stream_id_for(self._instance_id, secrets.token_hex(8))
        principal = current_principal().name
        metrics = self._metrics
        metrics.keepalive_streams_open += 1
        metrics.keepalive_streams_total += 1
        half_closed = False

        def count_end(ended: Context) -> None:
            # Only when the call has ended is it known how: a client's cancel can end the
            # request iterator before it cancels this handler.
            metrics.keepalive_streams_open -= 1
            if ended.cancelled() or not half_closed:
                metrics.keepalive_streams_broken += 1

        context.add_done_callback(count_end)
        handler = asyncio.current_task()
        assert handler is not None
        self._open_streams[stream_id] = handler
        guard = _StreamGuard(self._clock, self._config.keepalive_idle_timeout_s, self._draining)
        # Messages are pipelined: the next one is read and its renewals queued for the store
        # while earlier ones commit, so one stream's messages share group-committed batches
        # instead of waiting one commit each. Answers go out in request order.
        answers: asyncio.Queue[asyncio.Future[lease_pb2.KeepAliveResponse] | None] = asyncio.Queue(
            maxsize=self._config.keepalive_pipeline
        )
        reader = asyncio.ensure_future(
            self._read_keepalives(aiter(requests), guard, answers, stream_id, principal)
        )
        cleanup: asyncio.Future[Any] | None = None

        def close() -> asyncio.Future[Any]:
            """Stop the stream's tasks and detach its leases; once, from whichever comes
            first: the generator's ``finally`` or the call's end."""
            nonlocal cleanup
            if cleanup is None:
                reader.cancel()
                guard.close()
                while not answers.empty():
                    left = answers.get_nowait()
                    if left is not None:
                        left.cancel()
                        # Retrieved, so asyncio never logs an answer nobody will send as lost.
                        left.add_done_callback(discard_outcome)
                # The stream is gone whatever ended it; say so without waiting for the ttl.
                cleanup = asyncio.ensure_future(self._store.lease_detach_stream(stream_id))
                self._open_streams[stream_id] = cleanup
                cleanup.add_done_callback(lambda done: self._stream_closed(stream_id, done))
            return cleanup

        # A stream cancelled while grpc sends its answer never resumes this generator, and
        # a second cancel can interrupt the ``finally`` below: the call's end closes it then.
        context.add_done_callback(lambda _ended: close())
        try:
            while True:
                answer = await answers.get()
                if answer is None:
                    half_closed = True
                    return
                yield await answer
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(close())

    async def _read_keepalives(
        self,
        iterator: AsyncIterator[lease_pb2.KeepAliveRequest],
        guard: _StreamGuard,
        answers: asyncio.Queue[asyncio.Future[lease_pb2.KeepAliveResponse] | None],
        stream_id: str,
        principal: str,
    ) -> None:
        """Read messages and start each one's renewals; an error ends the stream after the
        answers to the messages before it."""
        reader = asyncio.current_task()
        while True:
            try:
                request = await guard.next(iterator, reader, self._drain_error)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed: asyncio.Future[lease_pb2.KeepAliveResponse] = (
                    asyncio.get_running_loop().create_future()
                )
                failed.set_exception(exc)
                await answers.put(failed)
                return
            if request is None:
                await answers.put(None)
                return
            await answers.put(
                asyncio.ensure_future(self._keepalive_batch(request, stream_id, principal))
            )

    def _stream_closed(self, stream_id: str, cleanup: asyncio.Future[Any]) -> None:
        if self._open_streams.get(stream_id) is cleanup:
            del self._open_streams[stream_id]
        discard_outcome(cleanup)

    async def wait_streams_closed(self, timeout_s: float) -> None:
        """After the server stopped: let cancelled stream handlers finish their cleanup
        before the store closes under them."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            # Lets the done callbacks of calls that just ended start their cleanup.
            await asyncio.sleep(0)
            pending = {f for f in self._open_streams.values() if not f.done()}
            left_s = give_up - loop.time()
            if not pending or left_s <= 0:
                return
            await asyncio.wait(pending, timeout=left_s)

    async def _keepalive_batch(
        self, request: lease_pb2.KeepAliveRequest, stream_id: str, principal: str
    ) -> lease_pb2.KeepAliveResponse:
        limits = self._limits
        namespace = validation.namespace(request.namespace)
        if len(request.renewals) > limits.max_renewals_per_request:
            raise errors.InvalidField(
                "renewals",
                f"has {len(request.renewals)} entries; at most {limits.max_renewals_per_request}",
            )
        refusals: dict[int, errors.TetherError] = {}
        valid: list[Renewal] = []
        for index, item in enumerate(request.renewals):
            try:
                valid.append(_renewal(item, principal, limits))
            except errors.InvalidField:
                # One bad entry fails alone; the stream and the other leases go on. The
                # field is named in full only now: the common case builds no names.
                try:
                    _renewal(item, principal, limits, f"renewals[{index}].")
                except errors.InvalidField as named:
                    refusals[index] = named
        outcomes = iter(await self._store.lease_renew_many(namespace, valid, stream_id))
        response = lease_pb2.KeepAliveResponse(sequence=request.sequence)
        renewed = 0
        for index, item in enumerate(request.renewals):
            entry = response.results.add()
            outcome = refusals[index] if index in refusals else next(outcomes)
            if isinstance(outcome, errors.TetherError):
                entry.lease_id = item.lease_id
                entry.fencing_token = item.fencing_token
                entry.error.CopyFrom(to_error_detail(outcome))
                continue
            renewed += 1
            entry.lease_id = outcome.lease_id
            entry.fencing_token = outcome.fencing_token
            # Set in place: no Timestamp or Duration objects per renewal.
            seconds, micros = divmod(outcome.expires_at_us, MICROS)
            entry.expires_at.seconds = seconds
            entry.expires_at.nanos = micros * 1000
            seconds, micros = divmod(outcome.ttl_us, MICROS)
            entry.ttl.seconds = seconds
            entry.ttl.nanos = micros * 1000
        self._metrics.renewals_ok += renewed
        self._metrics.renewals_refused += len(request.renewals) - renewed
        return response

    async def Release(
        self, request: lease_pb2.ReleaseRequest, context: Context
    ) -> lease_pb2.ReleaseResponse:
        lease = await self._store.lease_release(
            ReleaseParams(
                namespace=validation.namespace(request.namespace),
                lease_id=validation.lease_id(request.lease_id),
                fencing_token=validation.fencing_token(request.fencing_token),
                holder=validation.holder(request.holder, self._limits),
                principal=current_principal().name,
            )
        )
        return lease_pb2.ReleaseResponse(lease=lease_to_pb(lease))

    async def Revoke(
        self, request: lease_pb2.RevokeRequest, context: Context
    ) -> lease_pb2.RevokeResponse:
        principal = current_principal()
        namespace = validation.namespace(request.namespace)
        lease_id = validation.lease_id(request.lease_id)
        reason = validation.reason(request.reason, self._limits)
        # Only admins get here: the RPC boundary checks roles (domain/access.py).
        lease = await self._store.lease_revoke(RevokeParams(namespace, lease_id))
        log.info(
            "lease revoked",
            extra={"lease_id": lease.lease_id, "by": principal.name, "reason": reason},
        )
        return lease_pb2.RevokeResponse(lease=lease_to_pb(lease))

    async def GetLease(
        self, request: lease_pb2.GetLeaseRequest, context: Context
    ) -> lease_pb2.GetLeaseResponse:
        namespace = validation.namespace(request.namespace)
        selector = request.WhichOneof("selector")
        if selector == "lease_id":
            lease = await self._store.lease_get(namespace, validation.lease_id(request.lease_id))
        elif selector == "key":
            lease = await self._store.lease_get_by_key(
                namespace, validation.key(request.key, self._limits)
            )
        else:
            raise errors.InvalidField("selector", "set lease_id or key")
        return lease_pb2.GetLeaseResponse(lease=lease_to_pb(lease))

    async def ListLeases(
        self, request: lease_pb2.ListLeasesRequest, context: Context
    ) -> lease_pb2.ListLeasesResponse:
        limits = self._limits
        namespace = validation.namespace(request.namespace)
        prefix = validation.key_prefix(request.key_prefix, limits)
        holder = validation.optional_holder(request.holder, limits)
        states = lease_states(list(request.states))
        size = validation.page_size(request.page_size, limits)
        digest = paging.query_digest(
            "leases", namespace, prefix, holder, sorted(s.value for s in states)
        )
        position = paging.decode(request.page_token, digest)
        after = _lease_position(position, limits)
        page = await self._store.lease_list(
            ListLeasesParams(namespace, prefix, holder, states, limit=size + 1, after=after)
        )
        messages = [lease_to_pb(x) for x in page[:size]]
        # A page also ends before it outgrows what clients accept in one message.
        fits = count_fitting(messages, self._config.max_response_bytes)
        response = lease_pb2.ListLeasesResponse(leases=messages[:fits])
        if fits < len(page):
            last = page[fits - 1]
            response.next_page_token = paging.encode([last.key, last.fencing_token], digest)
        return response

    async def Watch(
        self, request: lease_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[lease_pb2.WatchResponse]:
        namespace = validation.namespace(request.namespace)
        prefix = validation.key_prefix(request.key_prefix, self._limits)
        start = validation.revision(request.start_revision)
        self._watches.take(current_principal().name, context)
        if start == 0:
            current, _ = await self._store.db.current_revision()
            start = current + 1
        # Checks compaction before the stream confirms anything.
        page = await self._store.lease_events_since(namespace, prefix, start, limit=0)
        yield lease_pb2.WatchResponse(
            header_revision=page.header_revision, compact_revision=page.compact_revision
        )
        self._metrics.watch_streams_open += 1
        handler = asyncio.current_task()
        assert handler is not None
        token = object()
        self._open_streams[token] = handler
        context.add_done_callback(lambda _ended: self._watch_ended(token))
        with self._changes.watch_prefix(AREA, namespace, prefix) as changed:
            follow = Follow(
                read=lambda rev, limit: self._store.lease_events_since(
                    namespace, prefix, rev, limit
                ),
                convert=_lease_event_to_pb,
                respond=lambda head, compact, events: lease_pb2.WatchResponse(
                    header_revision=head, compact_revision=compact, events=events
                ),
                changed=changed,
                draining=self._draining,
                check_draining=self._check_draining,
                batch_size=self._config.watch_batch_size,
                poll_interval_s=self._config.poll_interval_s,
                max_response_bytes=self._config.max_response_bytes,
            )
            async for response in follow_events(follow, start):
                yield response

    def _watch_ended(self, token: object) -> None:
        self._metrics.watch_streams_open -= 1
        del self._open_streams[token]


def _lease_event_to_pb(event: LeaseEventRecord) -> lease_pb2.LeaseEvent:
    return lease_pb2.LeaseEvent(
        revision=event.revision,
        type=EVENT_TYPE_TO_PB[event.type],
        lease=lease_to_pb(event.lease),
        occurred_at=to_timestamp(event.occurred_at_us),
    )


def _renewal(
    item: lease_pb2.KeepAliveRenewal, principal: str, limits: Limits, prefix: str = ""
) -> Renewal:
    """The Renewal an entry asks for; InvalidField names its field after ``prefix``."""
    return Renewal(
        principal=principal,
        lease_id=validation.lease_id(item.lease_id, prefix + "lease_id"),
        fencing_token=validation.fencing_token(item.fencing_token, prefix + "fencing_token"),
        progress=(
            validation.progress(item.progress, limits, prefix + "progress")
            if item.HasField("progress")
            else None
        ),
    )


class _StreamGuard:
    """Ends a KeepAlive stream that sends nothing (not even a ping) for ``idle_s``, or that
    is open when the server drains. One watcher task per stream; a message costs a clock
    read, not the three tasks a wait on "message, idle timer or drain" would. The watcher
    cancels the handler only while it waits for a message, and the cancellation becomes
    the reason's status (KEEPALIVE_IDLE, SERVER_DRAINING)."""

    def __init__(self, clock: Clock, idle_s: float, draining: asyncio.Event) -> None:
        self._clock = clock
        self._idle_us = round(idle_s * MICROS)
        self._idle_s = idle_s
        self._draining = draining
        self._last_us = clock.now_us()
        self._waiting: asyncio.Task[Any] | None = None
        self.reason: errors.TetherError | None = None
        self._drain_error: Any = None
        self._watcher: asyncio.Task[None] | None = None

    async def next(
        self,
        iterator: AsyncIterator[lease_pb2.KeepAliveRequest],
        handler: asyncio.Task[Any] | None,
        drain_error: Any,
    ) -> lease_pb2.KeepAliveRequest | None:
        if self._watcher is None:
            self._drain_error = drain_error
            self._watcher = asyncio.ensure_future(self._watch())
        if self.reason is not None:
            raise self.reason
        self._waiting = handler
        try:
            request = await anext(iterator)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if self.reason is not None:
                raise self.reason from None
            raise
        finally:
            self._waiting = None
        self._last_us = self._clock.now_us()
        return request

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            remaining_us = self._last_us + self._idle_us - self._clock.now_us()
            if remaining_us <= 0:
                self._end(
                    errors.KeepAliveIdle(
                        f"the keep-alive stream sent nothing for {self._idle_s:g}s; send "
                        "renewals or empty pings more often",
                        {"idle_timeout": f"{self._idle_s:g}s"},
                    )
                )
                return
            await first_of(self._clock.sleep(remaining_us / MICROS), self._draining.wait())
            if self._draining.is_set():
                self._end(self._drain_error())
                return

    def _end(self, reason: errors.TetherError) -> None:
        self.reason = reason
        if self._waiting is not None:
            self._waiting.cancel()


# What LEASE_HELD (and a wait's WAIT_TIMEOUT) tells only the principal holding the lease:
# with them, anyone else could renew, keep alive or release it.
_HOLDER_ONLY = ("lease_id", "fencing_token")


def _give_up(refusal: Refuse, *, waited: bool, caller: str) -> errors.TetherError:
    error = refusal.error
    if isinstance(refusal, Held) and refusal.principal != caller:
        hidden = {k: v for k, v in error.metadata.items() if k not in _HOLDER_ONLY}
        error = errors.LeaseHeld(error.message, hidden)
    if not waited:
        return error
    return errors.WaitTimeout(
        f"gave up waiting: {error.message}", {**error.metadata, "cause": error.reason}
    )


def _lease_position(
    position: list[str | int] | None, limits: validation.Limits
) -> tuple[str, int] | None:
    if position is None:
        return None
    match position:
        case [str(key), int(token)] if 0 < token <= validation.MAX_FENCING_TOKEN:
            # The key is checked like a request's key: tokens are client input.
            return paging.checked(key, lambda k: validation.key(k, limits)), token
    raise errors.InvalidPageToken()
