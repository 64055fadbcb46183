"""One client surface over two lease APIs, so every scenario drives etcd and tether alike.

- ``grant``: etcd ``LeaseGrant``; tether ``Acquire`` on a fresh key.
- ``keepalive().send(ids)``: etcd sends one ``LeaseKeepAliveRequest`` per lease (its only
  form); tether sends one ``KeepAliveRequest`` carrying every id given (one id = etcd's
  shape; many = the client's batching). ``recv()`` returns the per-lease outcomes of one
  response message; both answer a stream's requests in order.
- ``expiry_watch``: tether ``Watch`` EXPIRED events; etcd has no lease event, so a key is
  attached to each lease and the DELETE of that key on a prefix watch is the report.

A lease's deadline (wall clock, for the expiry delay): tether's ``expires_at`` as granted;
etcd's reply arrival + granted TTL (etcd starts the clock when it applies the grant, just
before replying, so its delay reads at most one grant round trip too small).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

LeaseId = Any  # int for etcd, str for tether


@dataclass(frozen=True)
class Granted:
    lease_id: LeaseId
    ttl_s: float
    deadline: float  # wall clock (time.time())


def _channels(targets: Sequence[str], per_target: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool per channel: each channel really is its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [
        grpc.aio.insecure_channel(target, options=options)
        for _ in range(per_target)
        for target in targets
    ]


class LeaseAPI:
    kind = "?"
    # RPCs per lease when leases are set up for an expiry watch (etcd also attaches a key).
    calls_per_watched_lease = 1

    def __init__(self, targets: Sequence[str], channels: int = 1, rpc_timeout: float = 10.0):
        self.targets = list(targets)
        self.rpc_timeout = rpc_timeout
        self.chans = _channels(self.targets, channels)
        self._rr = itertools.count()

    def _pick(self) -> int:
        return next(self._rr) % len(self.chans)

    async def ready(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.chans)), timeout)

    async def close(self) -> None:
        for channel in self.chans:
            await channel.close()

    async def grant(self, ttl_s: int, prefix: str) -> Granted:
        raise NotImplementedError

    def keepalive(self) -> KeepAliveStream:
        raise NotImplementedError

    def expiry_watch(self, prefix: str) -> ExpiryWatch:
        raise NotImplementedError


class KeepAliveStream:
    async def send(self, lease_ids: Sequence[LeaseId]) -> None:
        raise NotImplementedError

    async def recv(self) -> list[tuple[LeaseId, bool]] | None:
        """Outcomes of the next response message; None at the end of the stream."""
        raise NotImplementedError

    async def done_writing(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class ExpiryWatch:
    async def start(self, timeout: float) -> None:
        raise NotImplementedError

    async def attach(self, granted: Granted) -> None:
        """Called right after each grant."""

    def events(self) -> AsyncIterator[tuple[LeaseId, float]]:
        """(lease id, arrival wall time) per lease reported expired."""
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


# --- tether -----------------------------------------------------------------------------


class TetherAPI(LeaseAPI):
    kind = "tether"

    def __init__(self, targets: Sequence[str], channels: int = 1, rpc_timeout: float = 10.0):
        super().__init__(targets, channels, rpc_timeout)
        from tether_client.pb import lease_pb2, lease_pb2_grpc

        self.pb = lease_pb2
        self.stubs = [lease_pb2_grpc.LeaseServiceStub(c) for c in self.chans]
        self.tokens: dict[str, int] = {}
        self._keys = itertools.count(1)
        self.holder = f"bench-{os.getpid()}"

    async def grant(self, ttl_s: int, prefix: str) -> Granted:
        response = await self.stubs[self._pick()].Acquire(
            self.pb.AcquireRequest(
                key=f"{prefix}{next(self._keys)}", holder=self.holder, ttl=Duration(seconds=ttl_s)
            ),
            timeout=self.rpc_timeout,
        )
        lease = response.lease
        self.tokens[lease.lease_id] = lease.fencing_token
        deadline = lease.expires_at.seconds + lease.expires_at.nanos / 1e9
        return Granted(lease.lease_id, lease.ttl.seconds + lease.ttl.nanos / 1e9, deadline)

    def keepalive(self) -> KeepAliveStream:
        return _TetherKeepAlive(self, self.stubs[self._pick()].KeepAlive())

    def expiry_watch(self, prefix: str) -> ExpiryWatch:
        return _TetherExpiryWatch(self, prefix)


class _TetherKeepAlive(KeepAliveStream):
    def __init__(self, api: TetherAPI, call: Any) -> None:
        self.api = api
        self.call = call
        self.sequence = itertools.count(1)

    async def send(self, lease_ids: Sequence[LeaseId]) -> None:
        pb, tokens = self.api.pb, self.api.tokens
        request = pb.KeepAliveRequest(sequence=next(self.sequence))
        for lease_id in lease_ids:
            request.renewals.add(lease_id=lease_id, fencing_token=tokens.get(lease_id, 0))
        await self.call.write(request)

    async def recv(self) -> list[tuple[LeaseId, bool]] | None:
        response = await self.call.read()
        if response is grpc.aio.EOF:
            return None
        return [(r.lease_id, not r.HasField("error")) for r in response.results]

    async def done_writing(self) -> None:
        await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()


class _TetherExpiryWatch(ExpiryWatch):
    def __init__(self, api: TetherAPI, prefix: str) -> None:
        self.api = api
        self.call = api.stubs[0].Watch(api.pb.WatchRequest(key_prefix=prefix))

    async def start(self, timeout: float) -> None:
        first = await asyncio.wait_for(self.call.read(), timeout)
        if first is grpc.aio.EOF:
            raise RuntimeError("the Watch ended before confirming")

    async def events(self) -> AsyncIterator[tuple[LeaseId, float]]:
        expired = self.api.pb.LEASE_EVENT_TYPE_EXPIRED
        while True:
            response = await self.call.read()
            if response is grpc.aio.EOF:
                return
            arrived = time.time()
            for event in response.events:
                if event.type == expired:
                    yield event.lease.lease_id, arrived

    def cancel(self) -> None:
        self.call.cancel()


# --- etcd -------------------------------------------------------------------------------


class EtcdAPI(LeaseAPI):
    kind = "etcd"
    calls_per_watched_lease = 2

    def __init__(self, targets: Sequence[str], channels: int = 1, rpc_timeout: float = 10.0):
        super().__init__(targets, channels, rpc_timeout)
        from tests.bench.etcd import load_stubs

        self.pb, rpc_grpc = load_stubs()
        self.lease_stubs = [rpc_grpc.LeaseStub(c) for c in self.chans]
        self.kv = rpc_grpc.KVStub(self.chans[0])
        self.watch = rpc_grpc.WatchStub(self.chans[0])

    async def grant(self, ttl_s: int, prefix: str) -> Granted:
        response = await self.lease_stubs[self._pick()].LeaseGrant(
            self.pb.LeaseGrantRequest(TTL=ttl_s), timeout=self.rpc_timeout
        )
        if response.error:
            raise RuntimeError(f"LeaseGrant: {response.error}")
        return Granted(response.ID, float(response.TTL), time.time() + response.TTL)

    def keepalive(self) -> KeepAliveStream:
        return _EtcdKeepAlive(self, self.lease_stubs[self._pick()].LeaseKeepAlive())

    def expiry_watch(self, prefix: str) -> ExpiryWatch:
        return _EtcdExpiryWatch(self, prefix)


class _EtcdKeepAlive(KeepAliveStream):
    def __init__(self, api: EtcdAPI, call: Any) -> None:
        self.request = api.pb.LeaseKeepAliveRequest
        self.call = call

    async def send(self, lease_ids: Sequence[LeaseId]) -> None:
        for lease_id in lease_ids:
            await self.call.write(self.request(ID=lease_id))

    async def recv(self) -> list[tuple[LeaseId, bool]] | None:
        response = await self.call.read()
        if response is grpc.aio.EOF:
            return None
        return [(response.ID, response.TTL > 0)]  # TTL 0: unknown (expired) lease

    async def done_writing(self) -> None:
        await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()


class _EtcdExpiryWatch(ExpiryWatch):
    def __init__(self, api: EtcdAPI, prefix: str) -> None:
        self.api = api
        self.prefix = f"{prefix}{os.getpid()}/".encode()
        end = bytearray(self.prefix)
        end[-1] += 1
        self.range_end = bytes(end)
        self.keys: dict[bytes, LeaseId] = {}
        self.call = api.watch.Watch()

    async def start(self, timeout: float) -> None:
        pb = self.api.pb
        await self.call.write(
            pb.WatchRequest(
                create_request=pb.WatchCreateRequest(
                    key=self.prefix,
                    range_end=self.range_end,
                    filters=[pb.WatchCreateRequest.NOPUT],
                )
            )
        )
        first = await asyncio.wait_for(self.call.read(), timeout)
        if first is grpc.aio.EOF or not first.created:
            raise RuntimeError(f"etcd watch not created: {first}")

    async def attach(self, granted: Granted) -> None:
        key = self.prefix + b"%x" % granted.lease_id
        self.keys[key] = granted.lease_id
        await self.api.kv.Put(
            self.api.pb.PutRequest(key=key, value=b"1", lease=granted.lease_id),
            timeout=self.api.rpc_timeout,
        )

    async def events(self) -> AsyncIterator[tuple[LeaseId, float]]:
        while True:
            response = await self.call.read()
            if response is grpc.aio.EOF:
                return
            arrived = time.time()
            for event in response.events:
                if event.type == 1:  # mvccpb.Event.DELETE
                    lease_id = self.keys.get(event.kv.key)
                    if lease_id is not None:
                        yield lease_id, arrived

    def cancel(self) -> None:
        self.call.cancel()


def make_api(
    kind: str, targets: Sequence[str], channels: int = 1, rpc_timeout: float = 10.0
) -> LeaseAPI:
    if kind == "etcd":
        return EtcdAPI(targets, channels, rpc_timeout)
    if kind == "tether":
        return TetherAPI(targets, channels, rpc_timeout)
    raise ValueError(f"unknown api {kind!r}")
