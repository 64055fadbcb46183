"""Who is calling. Until credentials are configured, every caller is the anonymous
principal of a loopback dev server; the security work plugs real identities in here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from tether_server.domain.lease import ANONYMOUS


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool


@dataclass(frozen=True)
class AuthPolicy:
    # A dev server without credentials lets the anonymous principal act as admin.
    anonymous_is_admin: bool = True

    def principal_of(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        del context  # no credentials are configured yet
        return Principal(ANONYMOUS, admin=self.anonymous_is_admin)
