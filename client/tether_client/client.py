"""``TetherClient``: the asyncio client for every tether service.

One client per service area, all on one transport (channels, credentials, retries, the
clock, the defaults): ``client.leases``, ``client.sagas``, ``client.objects``,
``client.sweeps``. On the client itself: ``hold()`` keeps a lease while work runs,
``run_saga()`` runs a saga's next attempt under a claim, and the workers
(``compensation_worker()``, ``finalizer_worker()``) clean up after failures and
deletions. Every failure is a :class:`tether_client.errors.TetherError` subclass.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Literal, Unpack

import grpc

from tether_client.clock import Clock, SystemClock
from tether_client.connection import Connection, Endpoint, TokenSource
from tether_client.convert import Seconds, seconds
from tether_client.finalizers import FinalizerHandler, FinalizerOptions, FinalizerWorker
from tether_client.keeper import HeldLease, Keeper, KeeperConfig, KeeperStats, LostCallback
from tether_client.leases import LeasesClient
from tether_client.objects import ObjectsClient
from tether_client.retry import RetryPolicy
from tether_client.saga_run import (
    CompensationOptions,
    CompensationWorker,
    Handler,
    SagaOptions,
    SagaRun,
    run_saga,
)
from tether_client.sagas import SagasClient
from tether_client.sweeps import SweepsClient
from tether_client.transport import Transport

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
    ``clock`` drives every wait of the client (retries, renewals, deadlines): tests pass a
    :class:`~tether_client.ManualClock`.
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
        connection = Connection(
            targets,
            credentials=credentials,
            token=token,
            insecure_token=insecure_token,
            options=channel_options,
        )
        self._transport = Transport(
            connection,
            clock=clock or SystemClock(),
            retry=retry or RetryPolicy(),
            namespace=namespace,
            holder=holder or default_holder(),
        )
        self.leases = LeasesClient(self._transport)
        self.sagas = SagasClient(self._transport)
        self.objects = ObjectsClient(self._transport)
        self.sweeps = SweepsClient(self._transport)
        self._keeper = Keeper(self._transport, self.leases, keeper or KeeperConfig())

    @property
    def namespace(self) -> str:
        """The namespace of calls that name none."""
        return self._transport.namespace

    @property
    def holder(self) -> str:
        """The holder of leases and claims that name none."""
        return self._transport.holder

    @property
    def stubs(self) -> Endpoint:
        """The generated gRPC stubs (``.lease``, ``.saga``, ``.owner_ref``, ``.sweep``) on the
        current target, for what the area clients do not cover. Calls made through them get
        no retries, defaults or typed errors; pass ``metadata=`` yourself when the server
        wants a token."""
        return self._transport.stubs

    @property
    def keeper_stats(self) -> KeeperStats:
        """What the lease keeper did: streams, renewals, losses (for tests and debugging)."""
        return self._keeper.stats

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
        await self._keeper.close()
        await self._transport.connection.close()

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
        timeout: Seconds | None = None,
    ) -> AbstractAsyncContextManager[HeldLease]:
        """Acquire ``key`` and keep it renewed until the block exits, then release it.

        ``on_lost="cancel"`` cancels the body when the lease is lost; a callable is called
        with the lease instead. Either way ``lease.lost`` is set, every later
        ``lease.fencing_token`` raises ``LeaseLost``, and the block ends with ``LeaseLost``
        whatever the body did (chained from its own error, if it raised one). When the
        release on exit finds that the server ended the lease first (revoked, or expired
        before this client's safety deadline), a block that ended normally raises
        ``LeaseLost`` too (its ``cause`` says which): the work ran without the lease for a
        while. A block that raised keeps its error, with a note.
        """
        return self._keeper.hold(
            key,
            ttl=seconds(ttl),
            holder=holder or self.holder,
            namespace=self._transport.ns(namespace),
            wait=seconds(wait),
            lock_delay=seconds(lock_delay),
            labels=dict(labels or {}),
            progress=progress,
            cancel_on_lost=on_lost == "cancel",
            on_lost=None if on_lost == "cancel" else on_lost,
            timeout=None if timeout is None else seconds(timeout),
        )

    def run_saga(
        self,
        kind: str,
        saga_id: str | None = None,
        input: Mapping[str, Any] | None = None,
        **options: Unpack[SagaOptions],
    ) -> AbstractAsyncContextManager[SagaRun]:
        """Claim a saga and run the block as its next attempt: ``async with ... as saga``.

        See :func:`tether_client.saga_run.run_saga` for the options and what happens at
        the end of the block."""
        return run_saga(self._transport, self.sagas, self._keeper, kind, saga_id, input, **options)

    def compensation_worker(
        self, kind: str, handlers: Mapping[str, Handler], **options: Unpack[CompensationOptions]
    ) -> CompensationWorker:
        """A worker compensating sagas of ``kind``: ``await worker.run()`` until ``stop``
        is set, or ``await worker.run_once()`` for at most one saga."""
        return CompensationWorker(
            self._transport, self.sagas, self._keeper, kind, handlers, **options
        )

    def finalizer_worker(
        self,
        finalizer: str,
        kind: str,
        handler: FinalizerHandler,
        **options: Unpack[FinalizerOptions],
    ) -> FinalizerWorker:
        """A worker removing ``finalizer`` from terminating objects of ``kind`` once
        ``handler(obj)`` returns; see :class:`tether_client.finalizers.FinalizerWorker`."""
        return FinalizerWorker(
            self._transport, self.objects, self._keeper, finalizer, kind, handler, **options
        )


__all__ = ["OnLost", "TetherClient", "default_holder"]
