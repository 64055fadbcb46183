"""tether.v1.LeaseService answered from memory, with no store: the ceiling for a Python
gRPC (grpc.aio, one process) lease server on this machine.

Run as ``python -m tests.bench.noop_server --listen 127.0.0.1:PORT``. The benchmark runs
every scenario against it next to tether, so "tether/noop" says how much of tether's cost
is its store and how much is Python gRPC itself.

It keeps the semantics the benchmark and ``TetherClient.hold()`` rely on, and nothing more:

- ``Acquire`` grants a lease on a free key (the same holder gets its live lease back;
  another holder is refused with FAILED_PRECONDITION); ``acquired_at`` and ``expires_at``
  are set so the client's keeper computes its deadline as against tether.
- ``KeepAlive`` and ``Renew`` extend live leases by their ttl; unknown or ended leases get a
  per-renewal error (LEASE_EXPIRED / LEASE_NOT_FOUND / STALE_FENCING_TOKEN).
- ``Release``, ``Revoke`` and ``GetLease`` (by id or key) work on the in-memory table.
- ``Watch`` streams ACQUIRED / RELEASED / REVOKED / EXPIRED events under a key prefix, from
  now on; a timer fires at the earliest deadline, so EXPIRED events go out on time.
- ``ListLeases`` is not implemented. Namespaces are kept apart.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tether_client.pb import common_pb2, lease_pb2, lease_pb2_grpc

ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
FAILED_PRECONDITION = 9
NOT_FOUND = 5


def _timestamp(t: float) -> Timestamp:
    seconds = int(t)
    return Timestamp(seconds=seconds, nanos=int((t - seconds) * 1e9) // 1000 * 1000)


def _ttl_seconds(ttl: Duration) -> float:
    return ttl.seconds + ttl.nanos / 1e9


@dataclass
class _Lease:
    namespace: str
    key: str
    lease_id: str
    holder: str
    ttl: Duration
    ttl_s: float
    token: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    create_revision: int

    def message(self, state: int = ACTIVE, ended_at: float | None = None) -> lease_pb2.Lease:
        lease = lease_pb2.Lease(
            namespace=self.namespace,
            key=self.key,
            lease_id=self.lease_id,
            holder=self.holder,
            ttl=self.ttl,
            fencing_token=self.token,
            state=state,  # type: ignore[arg-type]
            acquired_at=_timestamp(self.acquired_at),
            renewed_at=_timestamp(self.renewed_at),
            expires_at=_timestamp(self.expires_at),
            create_revision=self.create_revision,
            mod_revision=self.create_revision,
        )
        if ended_at is not None:
            lease.ended_at.CopyFrom(_timestamp(ended_at))
        return lease


@dataclass(eq=False)
class _Watcher:
    namespace: str
    prefix: str
    queue: asyncio.Queue[lease_pb2.LeaseEvent] = field(default_factory=asyncio.Queue)


class NoopLeaseService(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self) -> None:
        self.leases: dict[str, _Lease] = {}
        self.by_key: dict[tuple[str, str], str] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.watchers: set[_Watcher] = set()
        self.revision = 0
        self._ids = itertools.count(1)
        # (deadline, lease id); an entry whose lease was renewed since is pushed again.
        self._heap: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    # --- expiry --------------------------------------------------------------------------

    def _schedule(self, deadline: float, lease_id: str) -> None:
        heapq.heappush(self._heap, (deadline, lease_id))
        if deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, at - time.time()), self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, lease_id = heapq.heappop(heap)
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            if lease.expires_at > now:
                heapq.heappush(heap, (lease.expires_at, lease_id))
                continue
            self._end(lease, lease_pb2.LEASE_STATE_EXPIRED, lease_pb2.LEASE_EVENT_TYPE_EXPIRED)
        if heap:
            self._arm(heap[0][0])

    # --- table -------------------------------------------------------------------------

    def _end(self, lease: _Lease, state: int, event: int) -> lease_pb2.Lease:
        del self.leases[lease.lease_id]
        self.by_key.pop((lease.namespace, lease.key), None)
        ended = lease.message(state, ended_at=time.time())
        self._publish(event, ended)
        return ended

    def _publish(self, event_type: int, lease: lease_pb2.Lease) -> None:
        self.revision += 1
        if not self.watchers:
            return
        event: lease_pb2.LeaseEvent | None = None
        for watcher in self.watchers:
            if watcher.namespace == lease.namespace and lease.key.startswith(watcher.prefix):
                if event is None:
                    event = lease_pb2.LeaseEvent(
                        revision=self.revision,
                        type=event_type,  # type: ignore[arg-type]
                        lease=lease,
                        occurred_at=_timestamp(time.time()),
                    )
                watcher.queue.put_nowait(event)

    def _live(self, namespace: str, lease_id: str) -> _Lease | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.namespace != namespace:
            return None
        return lease

    def _renew(self, namespace: str, lease_id: str, token: int) -> _Lease | common_pb2.ErrorDetail:
        lease = self._live(namespace, lease_id)
        now = time.time()
        if lease is None:
            return common_pb2.ErrorDetail(
                code=NOT_FOUND, reason="LEASE_NOT_FOUND", message="no such live lease"
            )
        if lease.expires_at <= now:
            return common_pb2.ErrorDetail(
                code=FAILED_PRECONDITION, reason="LEASE_EXPIRED", message="expired"
            )
        if token and token != lease.token:
            return common_pb2.ErrorDetail(
                code=FAILED_PRECONDITION, reason="STALE_FENCING_TOKEN", message="stale token"
            )
        lease.renewed_at = now
        lease.expires_at = now + lease.ttl_s
        return lease

    # --- RPCs ----------------------------------------------------------------------------

    async def Acquire(
        self, request: lease_pb2.AcquireRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.AcquireResponse:
        namespace = request.namespace or "default"
        ttl_s = _ttl_seconds(request.ttl)
        if not request.key or not request.holder or ttl_s <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key, holder and ttl needed")
        now = time.time()
        slot = (namespace, request.key)
        current_id = self.by_key.get(slot)
        if current_id is not None:
            current = self.leases[current_id]
            if current.expires_at > now:
                if current.holder == request.holder:
                    return lease_pb2.AcquireResponse(lease=current.message(), created=False)
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LEASE_HELD")
            self._end(current, lease_pb2.LEASE_STATE_EXPIRED, lease_pb2.LEASE_EVENT_TYPE_EXPIRED)
        token = self.tokens.get(slot, 0) + 1
        self.tokens[slot] = token
        lease = _Lease(
            namespace=namespace,
            key=request.key,
            lease_id=f"{next(self._ids):032x}",
            holder=request.holder,
            ttl=request.ttl,
            ttl_s=ttl_s,
            token=token,
            acquired_at=now,
            renewed_at=now,
            expires_at=now + ttl_s,
            create_revision=self.revision + 1,
        )
        self.leases[lease.lease_id] = lease
        self.by_key[slot] = lease.lease_id
        self._schedule(lease.expires_at, lease.lease_id)
        message = lease.message()
        self._publish(lease_pb2.LEASE_EVENT_TYPE_ACQUIRED, message)
        return lease_pb2.AcquireResponse(lease=message, created=True)

    async def Renew(
        self, request: lease_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.RenewResponse:
        outcome = self._renew(
            request.namespace or "default", request.lease_id, request.fencing_token
        )
        if isinstance(outcome, common_pb2.ErrorDetail):
            code = (
                grpc.StatusCode.NOT_FOUND
                if outcome.code == NOT_FOUND
                else (grpc.StatusCode.FAILED_PRECONDITION)
            )
            await context.abort(code, outcome.reason)
            raise AssertionError("unreachable")
        return lease_pb2.RenewResponse(
            lease_id=outcome.lease_id,
            fencing_token=outcome.token,
            expires_at=_timestamp(outcome.expires_at),
            ttl=outcome.ttl,
        )

    async def KeepAlive(
        self,
        request_iterator: AsyncIterator[lease_pb2.KeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[lease_pb2.KeepAliveResponse]:
        async for request in request_iterator:
            namespace = request.namespace or "default"
            response = lease_pb2.KeepAliveResponse(sequence=request.sequence)
            for renewal in request.renewals:
                outcome = self._renew(namespace, renewal.lease_id, renewal.fencing_token)
                if isinstance(outcome, common_pb2.ErrorDetail):
                    response.results.add(
                        lease_id=renewal.lease_id,
                        fencing_token=renewal.fencing_token,
                        error=outcome,
                    )
                else:
                    response.results.add(
                        lease_id=outcome.lease_id,
                        fencing_token=outcome.token,
                        expires_at=_timestamp(outcome.expires_at),
                        ttl=outcome.ttl,
                    )
            yield response

    async def Release(
        self, request: lease_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.ReleaseResponse:
        lease = self._live(request.namespace or "default", request.lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
            raise AssertionError("unreachable")
        if request.holder and request.holder != lease.holder:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "NOT_LEASE_HOLDER")
        ended = self._end(
            lease, lease_pb2.LEASE_STATE_RELEASED, lease_pb2.LEASE_EVENT_TYPE_RELEASED
        )
        return lease_pb2.ReleaseResponse(lease=ended)

    async def Revoke(
        self, request: lease_pb2.RevokeRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.RevokeResponse:
        lease = self._live(request.namespace or "default", request.lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
            raise AssertionError("unreachable")
        ended = self._end(lease, lease_pb2.LEASE_STATE_REVOKED, lease_pb2.LEASE_EVENT_TYPE_REVOKED)
        return lease_pb2.RevokeResponse(lease=ended)

    async def GetLease(
        self, request: lease_pb2.GetLeaseRequest, context: grpc.aio.ServicerContext
    ) -> lease_pb2.GetLeaseResponse:
        namespace = request.namespace or "default"
        lease_id = request.lease_id
        if request.WhichOneof("selector") == "key":
            lease_id = self.by_key.get((namespace, request.key), "")
        lease = self._live(namespace, lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
            raise AssertionError("unreachable")
        if lease.expires_at <= time.time():
            return lease_pb2.GetLeaseResponse(lease=lease.message(lease_pb2.LEASE_STATE_EXPIRED))
        return lease_pb2.GetLeaseResponse(lease=lease.message())

    async def Watch(
        self, request: lease_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lease_pb2.WatchResponse]:
        watcher = _Watcher(request.namespace or "default", request.key_prefix)
        self.watchers.add(watcher)
        try:
            yield lease_pb2.WatchResponse(header_revision=self.revision)
            while True:
                events = [await watcher.queue.get()]
                while not watcher.queue.empty() and len(events) < 1000:
                    events.append(watcher.queue.get_nowait())
                yield lease_pb2.WatchResponse(header_revision=self.revision, events=events)
        finally:
            self.watchers.discard(watcher)


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    lease_pb2_grpc.add_LeaseServiceServicer_to_server(NoopLeaseService(), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"noop LeaseService listening on {listen}", flush=True)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.noop_server")
    parser.add_argument("--listen", default="127.0.0.1:50062", help="HOST:PORT (loopback)")
    args = parser.parse_args(argv)
    host = args.listen.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the noop server listens on loopback only")
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
