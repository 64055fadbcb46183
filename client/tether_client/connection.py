"""Channels to one or several tether servers, with fail-over between them.

Replicas share one database, so any of them can answer any call. The connection keeps one
channel per target and sends calls to the current one; when a call finds it unavailable,
:meth:`Connection.fail_over` moves on to the next. TLS goes in as channel credentials and a
bearer token (static or rotating) as per-call metadata.

A token is a password: it is refused over a plaintext channel to any target that is not on
this host (see :func:`is_loopback_target`) unless the caller passes ``insecure_token=True``.
:func:`tls_credentials` builds TLS (and mutual-TLS) credentials from PEM files.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tether_client.errors import ClientClosed, TokenOverPlaintext
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


# gRPC target schemes whose addresses never leave the host.
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")
# Schemes followed by a comma-separated list of literal addresses.
_ADDRESS_SCHEMES = ("ipv4:", "ipv6:")


def _is_loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return False  # another name: it may resolve anywhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _host_of(address: str) -> str:
    """``host`` of ``host:port``, ``[v6]:port``, ``host`` or a bare IPv6 address."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        return address.partition(":")[0]
    return address  # no port, or a bare IPv6 address (more than one colon)


def is_loopback_target(target: str) -> bool:
    """Whether every address of the gRPC ``target`` is on this host.

    Loopback is ``localhost``, 127.0.0.0/8, ``::1`` (IPv4-mapped too) and unix sockets,
    written as gRPC targets: ``host:port``, ``[::1]:port``, ``dns:[//authority/]host:port``,
    ``ipv4:``/``ipv6:`` address lists, ``unix:``/``unix-abstract:``. Any other name, and
    any scheme not listed, counts as remote: a resolver may send it anywhere.
    """
    target = target.strip()
    lowered = target.lower()
    if lowered.startswith(_LOCAL_SCHEMES):
        return True
    if lowered.startswith(_ADDRESS_SCHEMES):
        addresses = target.partition(":")[2].split(",")
        return all(_is_loopback_host(_host_of(a.strip())) for a in addresses)
    if lowered.startswith("dns:"):
        target = target[len("dns:") :]
        if target.startswith("//"):  # dns://authority/host:port: the authority is the resolver
            target = target[2:].partition("/")[2]
    elif "://" in target:
        return False  # another scheme (xds:///…): nothing here can say where it goes
    # What is left is host[:port]; anything else misread as that finds no loopback host.
    return bool(target) and _is_loopback_host(_host_of(target))


def _read_pem(path: str | Path, what: str, markers: Sequence[bytes]) -> bytes:
    data = Path(path).read_bytes()  # OSError (names the file) if it cannot be read
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise ValueError(f"{what} {path} is encrypted; gRPC needs an unencrypted key")
    if not any(marker in data for marker in markers):
        raise ValueError(f"{what} {path} holds no PEM {_label(markers[0])}")
    return data


def _label(marker: bytes) -> str:
    return marker.decode().strip("-").removeprefix("BEGIN ")


_CERTIFICATE = (b"-----BEGIN CERTIFICATE-----",)
_PRIVATE_KEY = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
)


def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files, for ``TetherClient(credentials=...)``.

    ``ca_file``: the CA certificates to trust (default: the system's roots, as gRPC finds
    them). ``cert_file`` and ``key_file``: this client's certificate chain and unencrypted
    private key, for a server that requires mutual TLS; both or neither. The files are read
    now: ``OSError`` if one cannot be read, ``ValueError`` if one is not what it should be
    (checked here because gRPC would only fail later, at the handshake, saying less).
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give both cert_file and key_file")
    roots = _read_pem(ca_file, "ca_file", _CERTIFICATE) if ca_file is not None else None
    chain = key = None
    if cert_file is not None and key_file is not None:
        chain = _read_pem(cert_file, "cert_file", _CERTIFICATE)
        key = _read_pem(key_file, "key_file", _PRIVATE_KEY)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )


class Connection:
    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: TokenSource | None = None,
        insecure_token: bool = False,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        """``insecure_token=True`` lets ``token`` go over plaintext to remote targets
        (without it that raises :class:`TokenOverPlaintext`)."""
        self.targets = parse_targets(targets)
        if token is not None and credentials is None and not insecure_token:
            remote = [t for t in self.targets if not is_loopback_target(t)]
            if remote:
                raise TokenOverPlaintext(
                    f"a bearer token would go unencrypted to {', '.join(remote)}: connect with "
                    "TLS (credentials=tls_credentials(...)) or pass insecure_token=True"
                )
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
