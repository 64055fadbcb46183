"""Who may call what: roles, the rule of every RPC, and the decision (pure, no I/O).

Roles are ranked: an ``admin`` may do all an ``operator`` may, an operator all a
``worker`` may. A principal holds roles per namespace (``*`` = every namespace); a call
is judged by the principal's best role in the call's namespace. Calls about the whole
deployment (sweep reports, a sweep of every namespace) need the role in ``*``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum

from tether_server.domain import errors

__all__ = [
    "ALL_NAMESPACES",
    "RULES",
    "Role",
    "Rule",
    "Scope",
    "authorize",
    "best_role",
    "parse_role",
]

ALL_NAMESPACES = "*"


class Role(IntEnum):
    WORKER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def parse_role(text: str) -> Role:
    try:
        return Role[text.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown role {text!r} (admin, operator or worker)") from None


class Scope(Enum):
    # The request's namespace field ("" = "default").
    NAMESPACE = "namespace"
    # The whole deployment: needs the role in "*".
    GLOBAL = "global"
    # The request's namespace when set, else the whole deployment (RunSweep).
    NAMESPACE_OR_GLOBAL = "namespace_or_global"


@dataclass(frozen=True)
class Rule:
    role: Role
    scope: Scope = Scope.NAMESPACE


_W = Rule(Role.WORKER)
_O = Rule(Role.OPERATOR)
_A = Rule(Role.ADMIN)

# Every RPC of tether.v1 by full method path. A method missing here is refused to everyone
# (tests check that every served method has a rule).
RULES: dict[str, Rule] = {
    # Workers hold leases; reading them is open to every role of the namespace. Only an
    # admin revokes another's lease.
    "/tether.v1.LeaseService/Acquire": _W,
    "/tether.v1.LeaseService/Renew": _W,
    "/tether.v1.LeaseService/KeepAlive": _W,
    "/tether.v1.LeaseService/Release": _W,
    "/tether.v1.LeaseService/GetLease": _W,
    "/tether.v1.LeaseService/ListLeases": _W,
    "/tether.v1.LeaseService/Watch": _W,
    "/tether.v1.LeaseService/Revoke": _A,
    # Workers create, claim and run sagas; operators step in when one is stuck.
    "/tether.v1.SagaService/CreateSaga": _W,
    "/tether.v1.SagaService/ClaimSaga": _W,
    "/tether.v1.SagaService/RecordStep": _W,
    "/tether.v1.SagaService/HeartbeatSaga": _W,
    "/tether.v1.SagaService/CompleteSaga": _W,
    "/tether.v1.SagaService/FailSaga": _W,
    "/tether.v1.SagaService/RecordCompensation": _W,
    "/tether.v1.SagaService/AnnotateSaga": _W,
    "/tether.v1.SagaService/GetSaga": _W,
    "/tether.v1.SagaService/ListSagas": _W,
    "/tether.v1.SagaService/WatchSagas": _W,
    "/tether.v1.SagaService/CancelSaga": _O,
    "/tether.v1.SagaService/QuarantineSaga": _O,
    "/tether.v1.SagaService/RedriveSaga": _O,
    "/tether.v1.SagaService/MarkStepCompensated": _O,
    # Workers manage the objects they make (deletion still waits for every finalizer);
    # removing finalizers by force can orphan external residue: admin only.
    "/tether.v1.OwnerRefService/CreateObject": _W,
    "/tether.v1.OwnerRefService/GetObject": _W,
    "/tether.v1.OwnerRefService/ListObjects": _W,
    "/tether.v1.OwnerRefService/UpdateObject": _W,
    "/tether.v1.OwnerRefService/AddFinalizer": _W,
    "/tether.v1.OwnerRefService/RemoveFinalizer": _W,
    "/tether.v1.OwnerRefService/DeleteObject": _W,
    "/tether.v1.OwnerRefService/ListDependents": _W,
    "/tether.v1.OwnerRefService/GetOwnerGraph": _W,
    "/tether.v1.OwnerRefService/WatchObjects": _W,
    "/tether.v1.OwnerRefService/ForceRemoveFinalizers": _A,
    # Sweeps purge and settle across the store: admins run them, operators read reports
    # (which span namespaces).
    "/tether.v1.SweepService/RunSweep": Rule(Role.ADMIN, Scope.NAMESPACE_OR_GLOBAL),
    "/tether.v1.SweepService/ListSweepReports": Rule(Role.OPERATOR, Scope.GLOBAL),
    "/tether.v1.SweepService/GetSweepReport": Rule(Role.OPERATOR, Scope.GLOBAL),
}

Grants = Mapping[str, frozenset[Role]]


def best_role(grants: Grants, namespace: str | None) -> Role | None:
    """The principal's highest role in ``namespace`` (None: the whole deployment)."""
    everywhere = grants.get(ALL_NAMESPACES)
    here = grants.get(namespace) if namespace is not None else None
    best = max(everywhere) if everywhere else None
    if here:
        local = max(here)
        if best is None or local > best:
            best = local
    return best


def authorize(
    principal: str, grants: Grants, method: str, rule: Rule | None, namespace: str | None
) -> None:
    """Raise the refusal for ``principal`` calling ``method`` (whose ``RULES`` entry is
    ``rule``) in ``namespace`` (None when the call is about the whole deployment), or return
    when it may."""
    role = best_role(grants, namespace)
    # Every call passes here: the refusal's facts are built only for a refusal.
    if rule is not None and role is not None and role >= rule.role:
        return
    where = namespace if namespace is not None else ALL_NAMESPACES
    facts = {"principal": principal, "namespace": where, "method": method}
    if rule is None:
        raise errors.RoleRequired(f"{method} is not open to any role", facts)
    if role is None:
        raise errors.NamespaceForbidden(
            f"principal {principal!r} has no role in namespace {where!r}", facts
        )
    facts = {**facts, "required_role": rule.role.label, "role": role.label}
    message = (
        f"{method} needs the {rule.role.label} role in namespace {where!r}; "
        f"principal {principal!r} is {role.label} there"
    )
    if rule.role is Role.ADMIN:
        raise errors.AdminRequired(message, facts)
    raise errors.RoleRequired(message, facts)


def call_namespace(rule: Rule | None, requested: str, default: str) -> str | None:
    """The namespace a call is judged in: None for the whole deployment."""
    if rule is None or rule.scope is Scope.NAMESPACE:
        return requested or default
    if rule.scope is Scope.GLOBAL:
        return None
    if rule.scope is Scope.NAMESPACE_OR_GLOBAL and not requested:
        return None
    return requested or default
