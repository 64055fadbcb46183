"""``client.leases``: LeaseService as keyword methods returning leases.

::

    acquired = await client.leases.acquire("tasks/168", ttl=30)
    lease = await client.leases.get("tasks/168")
    async for lease in client.leases.list(key_prefix="tasks/", states=["active"]):
        ...
    async for event in client.leases.watch(key_prefix="tasks/"):
        ...

To hold a lease while working, use ``client.hold()``: it renews over one multiplexed
``KeepAlive`` stream and says when the lease is lost. These calls are the building blocks.
Acquire, Renew, Release and Revoke are safe to repeat (a generated request id makes a
repeated Acquire return the first grant), so every call here is retried on
``Unavailable`` within its ``timeout``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import TypeAlias

from tether_client.connection import Endpoint
from tether_client.convert import Seconds, seconds, to_datetime, to_duration
from tether_client.pb import lease_pb2
from tether_client.results import Acquired, Renewal
from tether_client.transport import EnumNames, Metadata, Transport

LeaseStateValue: TypeAlias = lease_pb2.LeaseState.ValueType
lease_states: EnumNames[LeaseStateValue] = EnumNames(
    "LEASE_STATE_", dict(lease_pb2.LeaseState.items()), "a lease state"
)


class LeasesClient:
    """LeaseService: acquire, renew, release, revoke, read and watch leases."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def acquire(
        self,
        key: str,
        *,
        ttl: Seconds,
        holder: str | None = None,
        wait: Seconds = 0,
        lock_delay: Seconds = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> Acquired:
        """Acquire ``key``; with ``wait``, block up to that long for it to free up.

        Raises ``LeaseHeld`` / ``LockDelay`` (no wait) or ``WaitTimeout``. The same holder
        acquiring again gets its live lease back (``created`` False).
        """
        acquired, _ = await self._acquire_timed(
            key,
            ttl=ttl,
            holder=holder,
            wait=wait,
            lock_delay=lock_delay,
            labels=labels,
            request_id=request_id,
            namespace=namespace,
            timeout=timeout,
        )
        return acquired

    async def _acquire_timed(
        self,
        key: str,
        *,
        ttl: Seconds,
        holder: str | None = None,
        wait: Seconds = 0,
        lock_delay: Seconds = 0,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> tuple[Acquired, float]:
        """For the keeper: :meth:`acquire`, and when (on the client's clock) the attempt
        that got the grant was sent; its deadline counts from there."""
        t = self._transport
        request = lease_pb2.AcquireRequest(
            namespace=t.ns(namespace),
            key=key,
            holder=holder or t.holder,
            ttl=to_duration(ttl),
            wait=to_duration(wait),
            lock_delay=to_duration(lock_delay),
            labels=dict(labels or {}),
            request_id=t.request_id(request_id),
        )
        response, sent_at = await t.waiting(
            lambda e: e.lease.Acquire, request, wait=seconds(wait), safe=True, timeout=timeout
        )
        return Acquired(response.lease, response.created), sent_at

    async def renew(
        self,
        lease_id: str,
        fencing_token: int,
        *,
        progress: bytes | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> Renewal:
        """Extend a live lease by its ttl (``progress``: details a successor can read)."""
        renewal, _ = await self._renew_timed(
            lease_id, fencing_token, progress=progress, namespace=namespace, timeout=timeout
        )
        return renewal

    async def _renew_timed(
        self,
        lease_id: str,
        fencing_token: int,
        *,
        progress: bytes | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
        safe: bool = True,
    ) -> tuple[Renewal, float]:
        """For the keeper: :meth:`renew`, and when the attempt that got the answer was sent
        (``safe=False``: one attempt; the keeper schedules its own retries)."""
        request = lease_pb2.RenewRequest(
            namespace=self._transport.ns(namespace), lease_id=lease_id, fencing_token=fencing_token
        )
        if progress is not None:
            request.progress = progress
        response, sent_at = await self._transport.unary_timed(
            lambda e: e.lease.Renew, request, safe=safe, timeout=timeout
        )
        renewal = Renewal(
            response.lease_id,
            response.fencing_token,
            to_datetime(response.expires_at),
            response.ttl.ToTimedelta(),
        )
        return renewal, sent_at

    async def release(
        self,
        lease_id: str,
        fencing_token: int,
        *,
        holder: str | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> lease_pb2.Lease:
        """End a lease as its holder. Releasing a released lease again returns it; a lease
        that expired or was revoked first is refused (``LeaseExpired`` / ``LeaseRevoked``):
        whatever was done under it since then was not protected."""
        t = self._transport
        request = lease_pb2.ReleaseRequest(
            namespace=t.ns(namespace),
            lease_id=lease_id,
            fencing_token=fencing_token,
            holder=holder or t.holder,
        )
        response = await t.unary(lambda e: e.lease.Release, request, safe=True, timeout=timeout)
        return response.lease

    async def revoke(
        self,
        lease_id: str,
        *,
        reason: str = "",
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> lease_pb2.Lease:
        """End anyone's lease (admin)."""
        request = lease_pb2.RevokeRequest(
            namespace=self._transport.ns(namespace), lease_id=lease_id, reason=reason
        )
        response = await self._transport.unary(
            lambda e: e.lease.Revoke, request, safe=True, timeout=timeout
        )
        return response.lease

    async def get(
        self,
        key: str | None = None,
        *,
        lease_id: str | None = None,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> lease_pb2.Lease:
        """The latest lease of ``key``, or one lease by ``lease_id``."""
        if (lease_id is None) == (key is None):
            raise ValueError("give exactly one of key and lease_id")
        request = lease_pb2.GetLeaseRequest(namespace=self._transport.ns(namespace))
        if lease_id is not None:
            request.lease_id = lease_id
        else:
            request.key = key or ""
        response = await self._transport.unary(
            lambda e: e.lease.GetLease, request, safe=True, timeout=timeout
        )
        return response.lease

    def list(
        self,
        *,
        key_prefix: str = "",
        holder: str = "",
        states: str | LeaseStateValue | Iterable[str | LeaseStateValue] = (),
        page_size: int = 0,
        namespace: str | None = None,
        timeout: Seconds | None = None,
    ) -> AsyncIterator[lease_pb2.Lease]:
        """Every matching lease, page after page (``states``: e.g. ``["active"]``;
        ``timeout`` bounds each page)."""
        request = lease_pb2.ListLeasesRequest(
            namespace=self._transport.ns(namespace),
            key_prefix=key_prefix,
            holder=holder,
            states=lease_states.many(states),
            page_size=page_size,
        )
        return self._transport.pages(
            lambda e: e.lease.ListLeases, request, lambda page: page.leases, timeout=timeout
        )

    def watch(
        self,
        *,
        key_prefix: str = "",
        start_revision: int = 0,
        namespace: str | None = None,
    ) -> AsyncIterator[lease_pb2.LeaseEvent]:
        """Lease events under ``key_prefix`` in revision order, from ``start_revision`` on
        (0: from now), resumed after a broken stream; ``RevisionCompacted`` once that
        revision is purged.

        The stream opens at the first iteration: a watch "from now" starts then, not when
        ``watch()`` is called. To miss nothing, read a revision first and pass it."""
        ns = self._transport.ns(namespace)

        def open_stream(
            endpoint: Endpoint, revision: int, metadata: Metadata
        ) -> AsyncIterable[lease_pb2.WatchResponse]:
            request = lease_pb2.WatchRequest(
                namespace=ns, key_prefix=key_prefix, start_revision=revision
            )
            return endpoint.lease.Watch(request, metadata=metadata)

        return self._transport.watch(open_stream, start_revision=start_revision)


__all__ = ["LeasesClient", "lease_states"]
