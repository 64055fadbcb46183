"""Who is calling, and may they.

The RPC boundary (services/handlers.py) asks the :class:`Authenticator` for every call:
it authenticates the caller (a bearer token from the tokens file, else the verified client
certificate of a mutual-TLS connection, else the anonymous principal of a server that
needs no credentials), authorizes the method in the request's namespace
(domain/access.py), and sets the principal for the handler, which reads it with
:func:`current_principal`.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tether_server.credentials import Credentials, load_credentials
from tether_server.domain import errors
from tether_server.domain.access import ALL_NAMESPACES, Role
from tether_server.domain.lease import ANONYMOUS

log = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS_ADMIN",
    "AuthConfig",
    "Authenticator",
    "Principal",
    "current_principal",
    "is_loopback_listen",
    "set_current_principal",
]


@dataclass(frozen=True)
class Principal:
    name: str
    # namespace (or "*" for every namespace) -> roles granted there
    grants: Mapping[str, frozenset[Role]] = field(default_factory=dict)


ANONYMOUS_ADMIN = Principal(ANONYMOUS, {ALL_NAMESPACES: frozenset({Role.ADMIN})})

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "tether_principal", default=ANONYMOUS_ADMIN
)


def current_principal() -> Principal:
    """The principal of the call being handled (set by the RPC boundary)."""
    return _current.get()


def set_current_principal(principal: Principal) -> None:
    _current.set(principal)


@dataclass(frozen=True)
class AuthConfig:
    # TLS on the listening port: PEM certificate chain and key.
    tls_cert: str = ""
    tls_key: str = ""
    # Mutual TLS: client certificates are required and verified against this CA bundle.
    tls_client_ca: str = ""
    # Bearer tokens and every principal's roles (credentials.py has the format).
    tokens_file: str = ""
    # Serve anonymous callers on a non-loopback address (never in production).
    insecure_allow_anonymous: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def requires_credentials(self) -> bool:
        return bool(self.tokens_file or self.tls_client_ca)

    def describe(self) -> str:
        if not self.requires_credentials:
            return "anonymous"
        kinds = [k for k, on in (("tokens", self.tokens_file), ("mtls", self.tls_client_ca)) if on]
        return "+".join(kinds)

    def check(self, listen: str) -> None:
        """Refuse settings that cannot work or would expose the server."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if (
            not self.requires_credentials
            and not self.insecure_allow_anonymous
            and not is_loopback_listen(listen)
        ):
            raise ValueError(
                f"refusing to serve anonymous callers on {listen}: anyone who reaches the port "
                "could revoke any lease. Give --auth-tokens FILE and/or --tls-client-ca FILE "
                "(with --tls-cert/--tls-key), listen on a loopback address, or pass "
                "--insecure-allow-anonymous"
            )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        try:
            key = Path(self.tls_key).read_bytes()
            chain = Path(self.tls_cert).read_bytes()
            client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        except OSError as exc:
            raise ValueError(f"cannot read TLS files: {exc}") from None
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


def is_loopback_listen(listen: str) -> bool:
    """True for HOST:PORT addresses only this machine can reach (and unix sockets)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Turns a call's credentials into a principal; the tokens file is re-read on reload()."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._credentials = (
            load_credentials(config.tokens_file) if config.tokens_file else Credentials()
        )
        self._principals: dict[str, Principal] = {}

    def reload(self) -> bool:
        """Re-read the tokens file (SIGHUP). A file that cannot be used keeps the old one.
        Calls and streams already open keep the principal they started with."""
        if not self.config.tokens_file:
            return False
        try:
            credentials = load_credentials(self.config.tokens_file)
        except ValueError as exc:
            log.error("tokens file not reloaded, keeping the previous one: %s", exc)
            return False
        self._credentials = credentials
        self._principals = {}
        log.info(
            "tokens file reloaded",
            extra={"tokens": len(credentials.tokens), "principals": len(credentials.grants)},
        )
        return True

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        if not self.config.requires_credentials:
            return ANONYMOUS_ADMIN
        token = _bearer_token(context.invocation_metadata())
        if token is not None:
            name = self._credentials.principal_of_token(token) if token else None
            if name is None:
                raise errors.InvalidCredentials("the bearer token is not valid on this server")
            return self._principal(name)
        name = _certificate_principal(context) if self.config.tls_client_ca else None
        if name is None:
            raise errors.CredentialsRequired(
                "this server needs credentials: a bearer token (authorization: Bearer ...) "
                "or a client certificate"
            )
        return self._principal(name)

    def _principal(self, name: str) -> Principal:
        principal = self._principals.get(name)
        if principal is None:
            principal = Principal(name, self._credentials.grants_of(name))
            self._principals[name] = principal
        return principal


def _bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer`` header; "" for a malformed header."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if not isinstance(value, str):
            return ""
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _certificate_principal(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The verified client certificate's first URI SAN, else its subject CN."""
    properties = context.auth_context()
    for name in ("peer_uri", "x509_common_name"):
        values = properties.get(name) or []
        for value in values:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if text:
                return text
    return None
