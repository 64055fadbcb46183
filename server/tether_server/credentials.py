"""The tokens file: which bearer tokens exist, whose they are, and every principal's roles.

One grant per line, ``#`` starts a comment, fields separated by whitespace::

    # CREDENTIAL          PRINCIPAL   ROLES             NAMESPACES
    sha256:9f86d08...     ci-runner   worker            ci,builds
    token:s3cret          alice       operator,worker   *
    cert                  agent-7     worker            default

CREDENTIAL is ``sha256:<hex>`` (the SHA-256 of the token: the file then holds no secret),
``token:<token>`` (the token itself, hashed when read), or ``cert`` (roles for a principal
that authenticates with a client certificate). ROLES is a comma list of ``admin``,
``operator``, ``worker``; NAMESPACES a comma list, ``*`` for every namespace. Grants of one
principal add up over its lines; a token belongs to exactly one principal.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tether_server.domain.access import ALL_NAMESPACES, Role, parse_role
from tether_server.domain.errors import TetherError
from tether_server.domain.validation import namespace as valid_namespace

__all__ = [
    "Credentials",
    "CredentialsError",
    "load_credentials",
    "parse_credentials",
    "token_digest",
]

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# Printable ASCII without spaces: what fits an HTTP header value and a file field.
_TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")
_PRINCIPAL = re.compile(r"[\x21-\x7e]{1,256}")


class CredentialsError(ValueError):
    """The tokens file cannot be used; says which line and why."""


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Credentials:
    # SHA-256 of each token -> its principal.
    tokens: Mapping[bytes, str] = field(default_factory=dict)
    # principal -> namespace (or "*") -> roles.
    grants: Mapping[str, Mapping[str, frozenset[Role]]] = field(default_factory=dict)

    def grants_of(self, principal: str) -> Mapping[str, frozenset[Role]]:
        return self.grants.get(principal, _NONE)

    def principal_of_token(self, token: str) -> str | None:
        return self.tokens.get(token_digest(token))


_NONE: Mapping[str, frozenset[Role]] = MappingProxyType({})


def parse_credentials(text: str, source: str = "tokens file") -> Credentials:
    tokens: dict[bytes, str] = {}
    grants: dict[str, dict[str, set[Role]]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        fields = line.split()
        if len(fields) != 4:
            raise CredentialsError(
                f"{where}: expected 4 fields (CREDENTIAL PRINCIPAL ROLES NAMESPACES), "
                f"got {len(fields)}"
            )
        credential, principal, roles_text, namespaces_text = fields
        if not _PRINCIPAL.fullmatch(principal):
            raise CredentialsError(f"{where}: principal must be 1-256 printable characters")
        digest = _credential_digest(credential, where)
        if digest is not None:
            owner = tokens.setdefault(digest, principal)
            if owner != principal:
                raise CredentialsError(
                    f"{where}: this token already belongs to principal {owner!r}"
                )
        try:
            roles = {parse_role(role) for role in roles_text.split(",") if role}
        except ValueError as exc:
            raise CredentialsError(f"{where}: {exc}") from None
        if not roles:
            raise CredentialsError(f"{where}: no role")
        per_namespace = grants.setdefault(principal, {})
        for namespace in _namespaces(namespaces_text, where):
            per_namespace.setdefault(namespace, set()).update(roles)
    return Credentials(
        tokens=MappingProxyType(tokens),
        grants=MappingProxyType(
            {
                principal: MappingProxyType({ns: frozenset(r) for ns, r in by_ns.items()})
                for principal, by_ns in grants.items()
            }
        ),
    )


def load_credentials(path: str) -> Credentials:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read tokens file {path}: {exc}") from None
    return parse_credentials(text, path)


def _credential_digest(credential: str, where: str) -> bytes | None:
    kind, _, value = credential.partition(":")
    if credential == "cert":
        return None
    if kind == "sha256" and _HEX_DIGEST.fullmatch(value.lower()):
        return bytes.fromhex(value)
    if kind == "token":
        if not _TOKEN.fullmatch(value):
            raise CredentialsError(
                f"{where}: a token must be 16-4096 printable ASCII characters without spaces"
            )
        return token_digest(value)
    raise CredentialsError(
        f"{where}: CREDENTIAL must be sha256:<64 hex digits>, token:<token> or cert"
    )


def _namespaces(text: str, where: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    if not names:
        raise CredentialsError(f"{where}: no namespace")
    for name in names:
        if name == ALL_NAMESPACES:
            continue
        try:
            valid_namespace(name)
        except TetherError as exc:
            raise CredentialsError(f"{where}: namespace {name!r}: {exc}") from None
    return names
