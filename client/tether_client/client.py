"""``TetherClient``: the asyncio client for every tether service.

Lease calls take keyword arguments and return the generated messages (typed by their
``.pyi`` stubs); ``hold()`` is the lease keeper. Saga, owner-reference and sweep calls live
on ``client.sagas``, ``client.objects`` and ``client.sweeps`` and take request messages;
``run_saga()`` and ``compensation_worker()`` run sagas on top of them
(:mod:`tether_client.saga`), ``finalizer_worker()`` finalizes objects
(:mod:`tether_client.objects`).
Every failure is raised as a :class:`tether_client.errors.TetherError` subclass.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import Literal, TypeVar

import grpc
from google.protobuf.message import Message

from tether_client.clock import Clock, SystemClock
from tether_client.connection import Connection, Endpoint, TokenSource
from tether_client.convert import Seconds, seconds, to_duration
from tether_client.errors import RevisionCompacted, TetherError, from_rpc_error
from tether_client.keeper import HeldLease, Keeper, KeeperConfig, LostCallback
from tether_client.objects import FinalizerHandler, FinalizerWorker
from tether_client.pb import lease_pb2
from tether_client.retry import Attempt, RetryPolicy, Unary, invoke, is_transient
from tether_client.saga import (
    CompensateMode,
    CompensationWorker,
    Handler,
    OnStale,
    SagaRun,
    run_saga,
)
from tether_client.services import ObjectsClient, SagasClient, SweepsClient

R = TypeVar("R")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")
OnLost = Literal["cancel"] | LostCallback | None


def default_holder() -> str:
    """``host/pid/random``: unique per client, readable in ``tether lease list``."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class TetherClient:
    """An asyncio client; use as ``async with TetherClient("host:50051") as client:``.

    ``targets`` is one ``host:port`` or several (a comma-separated string or a list): calls
    go to one and fail over to the next when it is unavailable. ``credentials`` are TLS
    channel credentials (:func:`tether_client.tls_credentials` builds them from PEM files);
    ``token`` a bearer token or a function returning the current one. Without credentials
    the token is refused (:class:`~tether_client.errors.TokenOverPlaintext`) unless every
    target is on this host or ``insecure_token=True`` says plaintext is acceptable.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        namespace: str = "",
        holder: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: TokenSource | None = None,
        insecure_token: bool = False,
        channel_options: Sequence[tuple[str, int | str]] = (),
        retry: RetryPolicy | None = None,
        keeper: KeeperConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.connection = Connection(
            targets,
            credentials=credentials,
            token=token,
            insecure_token=insecure_token,
            options=channel_options,
        )
        self.namespace = namespace
        self.holder = holder or default_holder()
        self.retry_policy = retry or RetryPolicy()
        self.clock: Clock = clock or SystemClock()
        self.keeper = Keeper(self, keeper or KeeperConfig(), self.clock)
        self.sagas = SagasClient(self)
        self.objects = ObjectsClient(self)
        self.sweeps = SweepsClient(self)

    async def __aenter__(self) -> TetherClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop renewing (held leases are reported lost and run out on the server) and close
        the channels; later calls raise ``ClientClosed``."""
        await self.keeper.close()
        await self.connection.close()

    # --- plumbing -------------------------------------------------------------------

    async def call(
        self,
        attempt: Attempt[R],
        *,
        safe: bool,
        timeout: float | None,
        attempt_timeout: float | None = None,
    ) -> R:
        """One RPC with this client's retry policy (see :mod:`tether_client.retry`)."""
        return await invoke(
            self.connection,
            attempt,
            safe=safe,
            timeout=timeout,
            policy=self.retry_policy,
            attempt_timeout=attempt_timeout,
        )

    async def unary(
        self,
        method: Unary[Req, Resp],
        request: Req,
        *,
        safe: bool,
        timeout: float | None,
        attempt_timeout: float | None = None,
    ) -> Resp:
        """Send ``request`` with the unary RPC ``method(endpoint)`` under :meth:`call`."""
        response, _ = await self.unary_timed(
            method, request, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout
        )
        return response

    async def unary_timed(
        self,
        method: Unary[Req, Resp],
        request: Req,
        *,
        safe: bool,
        timeout: float | None,
        attempt_timeout: float | None = None,
    ) -> tuple[Resp, float]:
        """:meth:`unary`, and when (on this client's clock) the attempt that got the answer
        was sent. The server acted after that send, whatever earlier attempts did."""
        sent_at = 0.0  # set by the attempt that answers (call() returns only through one)

        async def attempt(
            endpoint: Endpoint, left: float, metadata: tuple[tuple[str, str], ...]
        ) -> Resp:
            nonlocal sent_at
            sent_at = self.clock.monotonic()  # attempts run one after another
            return await method(endpoint)(request, timeout=left, metadata=metadata)

        response = await self.call(
            attempt, safe=safe, timeout=timeout, attempt_timeout=attempt_timeout
        )
        return response, sent_at

    def _ns(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else namespace

    # --- LeaseService -----------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        *,
        ttl: Seconds,
        holder: str | None = None,
        namespace: str | None = None,
        wait: Seconds = 0,
        lock_delay: Seconds = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> lease_pb2.AcquireResponse:
        """Acquire ``key``; with ``wait``, block up to that long for it to free up.

        Raises ``LeaseHeld`` / ``LockDelay`` (no wait) or ``WaitTimeout``. Retried on
        transient failures: the generated request id makes a repeat return the first result.
        """
        response, _ = await self.acquire_timed(
            key,
            ttl=ttl,
            holder=holder,
            namespace=namespace,
            wait=wait,
            lock_delay=lock_delay,
            labels=labels,
            request_id=request_id,
            timeout=timeout,
        )
        return response

    async def acquire_timed(
        self,
        key: str,
        *,
        ttl: Seconds,
        holder: str | None = None,
        namespace: str | None = None,
        wait: Seconds = 0,
        lock_delay: Seconds = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> tuple[lease_pb2.AcquireResponse, float]:
        """:meth:`acquire`, and when (on this client's clock) the attempt that got the answer
        was sent: a grant's deadline counts from that send, not from the first attempt's,
        which may lie a whole outage earlier."""
        request = lease_pb2.AcquireRequest(
            namespace=self._ns(namespace),
            key=key,
            holder=holder or self.holder,
            ttl=to_duration(ttl),
            wait=to_duration(wait),
            lock_delay=to_duration(lock_delay),
            labels=dict(labels or {}),
            request_id=request_id or uuid.uuid4().hex,
        )
        call_timeout, attempt_timeout = self.retry_policy.waiting(seconds(wait), timeout)
        return await self.unary_timed(
            lambda e: e.lease.Acquire,
            request,
            safe=True,
            timeout=call_timeout,
            attempt_timeout=attempt_timeout,
        )

    async def renew(
        self,
        lease_id: str,
        fencing_token: int,
        *,
        progress: bytes | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> lease_pb2.RenewResponse:
        """Extend a live lease by its ttl (repeating a renewal is harmless, so it retries)."""
        response, _ = await self.renew_timed(
            lease_id, fencing_token, progress=progress, namespace=namespace, timeout=timeout
        )
        return response

    async def renew_timed(
        self,
        lease_id: str,
        fencing_token: int,
        *,
        progress: bytes | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> tuple[lease_pb2.RenewResponse, float]:
        """:meth:`renew`, and when the attempt that got the answer was sent (the new
        deadline counts from there)."""
        request = lease_pb2.RenewRequest(
            namespace=self._ns(namespace), lease_id=lease_id, fencing_token=fencing_token
        )
        if progress is not None:
            request.progress = progress
        return await self.unary_timed(lambda e: e.lease.Renew, request, safe=True, timeout=timeout)

    async def release(
        self,
        lease_id: str,
        fencing_token: int,
        *,
        holder: str | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> lease_pb2.Lease:
        """End a lease as its holder. Releasing a released lease again returns it; a lease
        that expired or was revoked first is refused (``LeaseExpired`` / ``LeaseRevoked``):
        whatever was done under it since then was not protected."""
        request = lease_pb2.ReleaseRequest(
            namespace=self._ns(namespace),
            lease_id=lease_id,
            fencing_token=fencing_token,
            holder=holder or self.holder,
        )

        response = await self.unary(lambda e: e.lease.Release, request, safe=True, timeout=timeout)
        return response.lease

    async def revoke(
        self,
        lease_id: str,
        *,
        reason: str = "",
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> lease_pb2.Lease:
        """End someone's lease as an admin."""
        request = lease_pb2.RevokeRequest(
            namespace=self._ns(namespace), lease_id=lease_id, reason=reason
        )

        response = await self.unary(lambda e: e.lease.Revoke, request, safe=True, timeout=timeout)
        return response.lease

    async def get_lease(
        self,
        *,
        lease_id: str | None = None,
        key: str | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> lease_pb2.Lease:
        """One lease by id, or the latest lease of a key."""
        if (lease_id is None) == (key is None):
            raise ValueError("give exactly one of lease_id and key")
        request = lease_pb2.GetLeaseRequest(namespace=self._ns(namespace))
        if lease_id is not None:
            request.lease_id = lease_id
        else:
            request.key = key or ""

        response = await self.unary(lambda e: e.lease.GetLease, request, safe=True, timeout=timeout)
        return response.lease

    async def list_leases(
        self,
        *,
        key_prefix: str = "",
        holder: str = "",
        states: Iterable[lease_pb2.LeaseState.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> lease_pb2.ListLeasesResponse:
        """One page of leases; see :meth:`iter_leases` for all of them."""
        request = lease_pb2.ListLeasesRequest(
            namespace=self._ns(namespace),
            key_prefix=key_prefix,
            holder=holder,
            states=list(states),
            page_size=page_size,
            page_token=page_token,
        )

        return await self.unary(lambda e: e.lease.ListLeases, request, safe=True, timeout=timeout)

    async def iter_leases(
        self,
        *,
        key_prefix: str = "",
        holder: str = "",
        states: Iterable[lease_pb2.LeaseState.ValueType] = (),
        page_size: int = 0,
        namespace: str | None = None,
    ) -> AsyncIterator[lease_pb2.Lease]:
        """Every matching lease, page after page."""
        states = list(states)
        token = ""
        while True:
            page = await self.list_leases(
                key_prefix=key_prefix,
                holder=holder,
                states=states,
                page_size=page_size,
                page_token=token,
                namespace=namespace,
            )
            for lease in page.leases:
                yield lease
            token = page.next_page_token
            if not token:
                return

    async def watch(
        self,
        *,
        key_prefix: str = "",
        start_revision: int = 0,
        namespace: str | None = None,
        resume: bool = True,
    ) -> AsyncIterator[lease_pb2.LeaseEvent]:
        """Lease events under ``key_prefix`` in revision order, from ``start_revision`` on.

        When the stream breaks on a transient failure it is re-opened (with backoff, on the
        next replica) from the revision after the last delivered event, so no event is lost
        or repeated. Raises ``RevisionCompacted`` when that revision has been purged.

        Like any async generator, it opens its stream on the first iteration: a watch "from
        now" (``start_revision=0``) starts then, not when ``watch()`` is called. To miss
        nothing, read the current revision first and pass ``start_revision``.
        """
        next_revision = start_revision
        failures = 0
        while True:
            endpoint = self.connection.current
            call = endpoint.lease.Watch(
                lease_pb2.WatchRequest(
                    namespace=self._ns(namespace),
                    key_prefix=key_prefix,
                    start_revision=next_revision,
                ),
                metadata=self.connection.metadata(),
            )
            try:
                async for response in call:
                    failures = 0
                    if next_revision == 0:
                        # A watch "from now" resumes after the revision it started at.
                        next_revision = response.header_revision + 1
                    for event in response.events:
                        next_revision = event.revision + 1
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if isinstance(error, RevisionCompacted) or not (resume and is_transient(error)):
                    raise error from exc
                self.connection.fail_over(endpoint)
                failures += 1
                await self.clock.sleep(self.retry_policy.delay(failures))
            finally:
                call.cancel()

    def hold(
        self,
        key: str,
        *,
        ttl: Seconds,
        holder: str | None = None,
        namespace: str | None = None,
        wait: Seconds = 0,
        lock_delay: Seconds = 0,
        labels: Mapping[str, str] | None = None,
        progress: bytes | None = None,
        on_lost: OnLost = None,
        timeout: float | None = None,
    ) -> AbstractAsyncContextManager[HeldLease]:
        """Acquire ``key`` and keep it renewed until the block exits, then release it.

        ``on_lost="cancel"`` cancels the body when the lease is lost, and the block raises
        ``LeaseLost``; a callable is called with the lease instead. Either way
        ``lease.lost`` is set and every later ``lease.fencing_token`` raises ``LeaseLost``.
        When the release on exit finds that the server ended the lease first (revoked, or
        expired before this client's safety deadline), the lease is lost the same way and a
        block that ended normally raises ``LeaseLost`` (its ``cause`` says which): the work
        ran without the lease for a while. A block that raised keeps its error, with a note.
        """
        callback: LostCallback | None = None if on_lost == "cancel" else on_lost
        return self.keeper.hold(
            key,
            ttl=seconds(ttl),
            holder=holder or self.holder,
            namespace=self._ns(namespace),
            wait=seconds(wait),
            lock_delay=seconds(lock_delay),
            labels=dict(labels or {}),
            progress=progress,
            cancel_on_lost=on_lost == "cancel",
            on_lost=callback,
            timeout=timeout,
        )

    # --- sagas ------------------------------------------------------------------------

    def run_saga(
        self,
        kind: str,
        saga_id: str | None = None,
        input: Mapping[str, object] | None = None,
        *,
        ttl: Seconds = 30,
        holder: str | None = None,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        on_stale: OnStale | None = None,
        max_attempts: int | None = None,
        deadline: datetime | None = None,
        wait: Seconds = 0,
        compensate: CompensateMode = "inline",
        retryable: bool = False,
        retry_after: Seconds = 0,
        handlers: Mapping[str, Handler] | None = None,
    ) -> AbstractAsyncContextManager[SagaRun]:
        """Claim a saga and run the block as its next attempt: ``async with ... as saga``.

        With ``saga_id`` the saga is created first when it does not exist (``input``,
        ``labels``, ``on_stale``, ``max_attempts``, ``deadline``; with an ``input`` a
        repeat must match the first body), its key ``sagas/<saga_id>`` is held with
        ``hold(ttl, on_lost="cancel")``, waiting up to ``wait`` for it, and the saga is
        claimed under that lease. Without it, the oldest claimable saga of ``kind`` is
        claimed (long-polling up to ``wait``; ``NothingClaimable`` when there is none).

        The block runs ``await saga.step(...)``. When it ends normally the saga is
        completed (with ``saga.set_output``); when it raises, the saga is failed with the
        error's repr (``retryable``: back to claimable after ``retry_after`` while attempts
        are left) and, with ``compensate="inline"``, the compensations run here, last step
        first, with each step's ``compensate`` or ``handlers[name]``; ``"hand_off"``
        leaves them to a compensation worker (as does a missing handler). The block's
        error is re-raised either way. A lost lease cancels the block (``LeaseLost``); a
        refused fence propagates; then nothing more is recorded.
        """
        return run_saga(
            self,
            kind,
            saga_id,
            input,
            ttl=ttl,
            holder=holder,
            namespace=namespace,
            labels=labels,
            on_stale=on_stale,
            max_attempts=max_attempts,
            deadline=deadline,
            wait=wait,
            compensate=compensate,
            retryable=retryable,
            retry_after=retry_after,
            handlers=handlers,
        )

    def compensation_worker(
        self,
        kind: str,
        handlers: Mapping[str, Handler],
        *,
        ttl: Seconds = 30,
        holder: str | None = None,
        namespace: str | None = None,
        wait: Seconds = 0,
        poll_interval: float = 1.0,
        stop: asyncio.Event | None = None,
    ) -> CompensationWorker:
        """A worker compensating sagas of ``kind``: ``await worker.run()`` until ``stop``
        is set, or ``await worker.run_once()`` for at most one saga."""
        return CompensationWorker(
            self,
            kind,
            handlers,
            ttl=ttl,
            holder=holder,
            namespace=namespace,
            wait=wait,
            poll_interval=poll_interval,
            stop=stop,
        )

    # --- objects ----------------------------------------------------------------------

    def finalizer_worker(
        self,
        finalizer: str,
        kind: str,
        handler: FinalizerHandler,
        *,
        namespace: str | None = None,
        holder: str | None = None,
        ttl: Seconds = 30,
        refusal_retry: Seconds = 30,
        max_refusal_retry: Seconds = 600,
        initial_backoff: Seconds = 1,
        max_backoff: Seconds = 60,
        resync_interval: Seconds = 60,
        concurrency: int = 1,
        stop: asyncio.Event | None = None,
    ) -> FinalizerWorker:
        """A worker removing ``finalizer`` from terminating objects of ``kind`` once
        ``handler(obj)`` returns (``RefuseFinalization(reason)`` keeps it, recorded on the
        object, and retries after ``refusal_retry``): ``await worker.run()`` until ``stop``
        is set, or ``await worker.run_once()`` for every object pending now.

        Each object is handled under the lease ``finalizers/<finalizer>/<uid>`` (``ttl``),
        so one worker at a time handles it; a failing handler is retried with backoff from
        ``initial_backoff`` to ``max_backoff``. See :mod:`tether_client.objects`.
        """
        return FinalizerWorker(
            self,
            finalizer,
            kind,
            handler,
            namespace=namespace,
            holder=holder,
            ttl=ttl,
            refusal_retry=refusal_retry,
            max_refusal_retry=max_refusal_retry,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            resync_interval=resync_interval,
            concurrency=concurrency,
            stop=stop,
        )


__all__ = ["HeldLease", "TetherClient", "TetherError", "default_holder"]
