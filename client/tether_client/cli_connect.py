"""The first connection of a ``tether`` command: what it says while it waits, and when and
how it gives up.

Every command waits for a connection before its first call (:func:`wait_for_server`).
After a second without one it says so on stderr, once: ``tether: connecting to TARGET ...
(retrying)``. When ``--timeout`` passes without a connection to any target the command
gives up with :class:`NoConnection` (exit 69, EX_UNAVAILABLE): the target(s), gRPC's last
reason for each, and a ``hint:`` line when that reason points at the TLS settings
(plaintext to a TLS port, a certificate from a CA this machine does not trust, a
certificate for another name, TLS to a plaintext port, a client certificate refused).

The probe is a ``grpc.health.v1.Health/Check`` on channels of its own (same credentials
and channel options as the client's; no token: connecting needs none), waiting for the
channel to be ready. Any answer at all, a refusal included, means the server is there.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from tether_client.connection import DEFAULT_CHANNEL_OPTIONS

log = logging.getLogger("tether_client.cli")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Say "connecting ... (retrying)" after this long without a connection.
ANNOUNCE_AFTER = 1.0
# How long the last look at a target may take, to learn why it did not answer.
DIAGNOSE_WITHIN = 0.5


class NoConnection(Exception):
    """No connection to any target within the timeout: the error lines and a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Settings:
    """What the connection options asked for (the hints depend on it)."""

    targets: Sequence[str]
    credentials: grpc.ChannelCredentials | None
    ca_file: str = ""
    cert_file: str = ""

    @property
    def tls(self) -> bool:
        return self.credentials is not None


def _open(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    options = list(DEFAULT_CHANNEL_OPTIONS)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def _raw(data: bytes) -> bytes:
    return data


def _check(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(HEALTH_CHECK, request_serializer=_raw, response_deserializer=_raw)


async def _reach(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Whether ``channel`` got a connection within ``timeout``."""
    try:
        await _check(channel)(b"", timeout=timeout, wait_for_ready=True)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Connected to something that did not answer is still connected: the command's
            # own calls will say what is wrong with it.
            return channel.get_state() == grpc.ChannelConnectivity.READY
    return True  # any answer, a refusal included


async def _why(channel: grpc.aio.Channel) -> str | None:
    """Why ``channel`` has no connection (gRPC's last error); ``None`` if it has one now."""
    try:
        await _check(channel)(b"", timeout=DIAGNOSE_WITHIN, wait_for_ready=False)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "no answer (the connection attempt is still pending)"
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return _reason(exc.details() or "unavailable")
    return None


def _reason(details: str) -> str:
    """``failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: Failed
    to connect to remote host: Connection refused`` → ``Failed to connect to remote host:
    Connection refused``."""
    text = details.removeprefix("failed to connect to all addresses; last error: ")
    text = re.sub(r"^[A-Z_]+: ", "", text)
    text = re.sub(r"^(ipv4|ipv6|unix|unix-abstract):\S*: ", "", text)
    return text


def hint(reason: str, settings: Settings, target: str) -> str | None:
    """One line on what to change, when gRPC's ``reason`` points at the TLS settings."""
    lowered = reason.lower()
    if not settings.tls:
        if "socket closed" in lowered or "connection reset" in lowered:
            return (
                "the server may expect TLS: add --tls (env TETHER_TLS=1), and --ca-file PEM "
                "if its certificate comes from a private CA"
            )
        return None
    if "certificate_verify_failed" in lowered:
        if settings.ca_file:
            return (
                f"the server's certificate is not signed by the CA in {settings.ca_file}: "
                "is that the right --ca-file?"
            )
        return (
            "the server's certificate is not signed by a CA this machine trusts: "
            "give its CA with --ca-file PEM (env TETHER_CA_FILE)"
        )
    if "hostname verification" in lowered or "peer name" in lowered:
        host = target.rpartition(":")[0] or target
        return (
            f"the server's certificate is not issued for {host}: connect by a name or "
            "address the certificate lists"
        )
    if "wrong_version_number" in lowered or "packet_length_too_long" in lowered:
        return (
            "the server does not speak TLS on this port: leave out --tls and --ca-file "
            "(env TETHER_TLS, TETHER_CA_FILE)"
        )
    if "socket closed" in lowered or "connection reset" in lowered or "alert" in lowered:
        if settings.cert_file:
            return (
                f"the server ended the TLS handshake: it may not trust the client "
                f"certificate in {settings.cert_file}"
            )
        return (
            "the server ended the TLS handshake: it may require a client certificate "
            "(--cert PEM --key PEM)"
        )
    return None


async def wait_for_server(
    settings: Settings, *, timeout: float, say: Callable[[str], None], timeout_text: str
) -> str:
    """Wait until one of the targets takes a connection, and return it; ``NoConnection``
    when none did within ``timeout`` seconds (``timeout_text``: how to write it)."""
    targets = list(settings.targets)
    channels = {target: _open(target, settings.credentials) for target in targets}
    names = ", ".join(targets)
    loop = asyncio.get_running_loop()
    log.info("connecting to %s", names)
    announce = loop.call_later(ANNOUNCE_AFTER, say, f"connecting to {names} ... (retrying)")
    tasks = {
        asyncio.create_task(_reach(channel, timeout)): target
        for target, channel in channels.items()
    }
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.result():
                    log.info("connected to %s", tasks[task])
                    return tasks[task]
        reasons: dict[str, str] = {}
        for target, channel in channels.items():
            why = await _why(channel)
            if why is None:
                return target  # at the last moment
            reasons[target] = why
    finally:
        announce.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels.values():
            await channel.close(grace=None)
    if len(targets) == 1:
        message = f"no connection to {names} within {timeout_text}: {reasons[names]}"
    else:
        lines = [f"no connection to any of {names} within {timeout_text}"]
        lines.extend(f"  {target}: {why}" for target, why in reasons.items())
        message = "\n".join(lines)
    hints = (hint(why, settings, target) for target, why in reasons.items())
    raise NoConnection(message, next((h for h in hints if h), None))
