"""Channels to one or several tether servers, with fail-over between them.

Replicas share one database, so any of them can answer any call. The connection keeps one
channel per target and sends calls to the current one; when a call finds it unavailable,
:meth:`Connection.fail_over` moves on to the next. TLS goes in as channel credentials and a
bearer token (static or rotating) as per-call metadata, so the security work can plug in
either without touching the call sites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from tether_client.errors import ClientClosed
from tether_client.pb import (
    lease_pb2_grpc,
    owner_ref_pb2_grpc,
    saga_pb2_grpc,
    sweep_pb2_grpc,
)

TokenSource = str | Callable[[], str]

# gRPC keep-alive pings find a dead connection the OS would not report; the server allows a
# ping every 5 s. The reconnect backoff is kept short: a lease keeper cannot wait the default
# 120 s for a replica that came back.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Retries are this client's job (only where safe); gRPC's own would repeat unsafe calls.
    ("grpc.enable_retries", 0),
    ("grpc.primary_user_agent", "tether-client-python"),
)


@dataclass(frozen=True)
class Endpoint:
    """One target's channel and the stubs of every tether service on it."""

    target: str
    channel: grpc.aio.Channel
    lease: lease_pb2_grpc.LeaseServiceAsyncStub
    saga: saga_pb2_grpc.SagaServiceAsyncStub
    owner_ref: owner_ref_pb2_grpc.OwnerRefServiceAsyncStub
    sweep: sweep_pb2_grpc.SweepServiceAsyncStub

    @classmethod
    def open(cls, target: str, channel: grpc.aio.Channel) -> Endpoint:
        return cls(
            target,
            channel,
            lease_pb2_grpc.LeaseServiceStub(channel),
            saga_pb2_grpc.SagaServiceStub(channel),
            owner_ref_pb2_grpc.OwnerRefServiceStub(channel),
            sweep_pb2_grpc.SweepServiceStub(channel),
        )


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` → ``["a:1", "b:2"]`` (at least one)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    cleaned = [item.strip() for item in items if item.strip()]
    if not cleaned:
        raise ValueError("at least one target (host:port) is needed")
    return cleaned


class Connection:
    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: TokenSource | None = None,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self.targets = parse_targets(targets)
        self._credentials = credentials
        self._token = token
        merged = dict(DEFAULT_CHANNEL_OPTIONS)
        merged.update(dict(options))
        self._options = list(merged.items())
        self._endpoints: dict[str, Endpoint] = {}
        self._current = 0
        self.fail_overs = 0
        self.closed = False

    @property
    def current(self) -> Endpoint:
        if self.closed:
            raise ClientClosed("the client is closed")
        target = self.targets[self._current]
        endpoint = self._endpoints.get(target)
        if endpoint is None:
            endpoint = Endpoint.open(target, self._open(target))
            self._endpoints[target] = endpoint
        return endpoint

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    def fail_over(self, failed: Endpoint) -> None:
        """``failed`` did not answer: later calls go to the next target (if any)."""
        if len(self.targets) > 1 and self.targets[self._current] == failed.target:
            self._current = (self._current + 1) % len(self.targets)
            self.fail_overs += 1

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token, read afresh so a rotating one works."""
        if self._token is None:
            return ()
        token = self._token() if callable(self._token) else self._token
        return (("authorization", f"Bearer {token}"),)

    async def close(self) -> None:
        """Close every channel; later calls raise ``ClientClosed``."""
        self.closed = True
        endpoints, self._endpoints = list(self._endpoints.values()), {}
        for endpoint in endpoints:
            await endpoint.channel.close(grace=None)
