"""Lease records and the decisions over them. Pure: no I/O, no clock of its own.

The store loads the rows a decision needs inside one transaction (the key row locked),
asks these functions what to do, and applies the answer before committing. Every time
is integer microseconds since the epoch, as stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from tether_server.domain import errors
from tether_server.domain.time import format_us

# The principal of every caller until credentials are configured (a loopback dev server).
ANONYMOUS = "anonymous"


class LeaseState(StrEnum):
    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"

    @property
    def proto_name(self) -> str:
        """The LeaseState value name clients see (in Lease.state and in error metadata)."""
        return f"LEASE_STATE_{self.value}"


class LeaseEventType(StrEnum):
    ACQUIRED = "ACQUIRED"
    RENEWED = "RENEWED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"


@dataclass(frozen=True)
class Lease:
    lease_id: str
    namespace: str
    key: str
    holder: str
    principal: str
    ttl_us: int
    fencing_token: int
    state: LeaseState
    acquired_at_us: int
    renewed_at_us: int
    expires_at_us: int
    ended_at_us: int | None = None
    lock_delay_us: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    progress: bytes = b""
    stream_attached: bool = False
    request_id: str | None = None
    create_revision: int = 0
    mod_revision: int = 0

    def is_live(self, now_us: int) -> bool:
        """Active and before its deadline: the deadline itself is already too late."""
        return self.state is LeaseState.ACTIVE and now_us < self.expires_at_us

    def effective_state(self, now_us: int) -> LeaseState:
        """What every reader sees: a passed deadline reads as EXPIRED before the loop runs."""
        if self.state is LeaseState.ACTIVE and now_us >= self.expires_at_us:
            return LeaseState.EXPIRED
        return self.state


@dataclass(frozen=True)
class LeaseKey:
    """Per-key bookkeeping that outlives every lease on the key."""

    namespace: str
    key: str
    # Highest fencing token ever issued for the key; the next grant uses one more.
    last_fencing_token: int = 0
    # Lock-delay: the key cannot be granted before this moment.
    available_at_us: int = 0
    current_lease_id: str | None = None


@dataclass(frozen=True)
class AcquireIntent:
    holder: str
    principal: str


# Outcomes of an Acquire, decided over the locked key and its current lease.
@dataclass(frozen=True)
class Grant:
    """Grant a new lease; first expire the current one if it passed its deadline."""

    fencing_token: int
    expire_current: Lease | None


@dataclass(frozen=True)
class ReturnExisting:
    lease: Lease


@dataclass(frozen=True)
class Refuse:
    error: errors.TetherError
    # Expire this lease before refusing (it passed its deadline and lock-delay holds the key).
    expire_current: Lease | None = None
    # When the key could free up at the earliest, for callers that wait.
    retry_at_us: int | None = None


AcquireDecision = Grant | ReturnExisting | Refuse


def expiry_available_at(lease: Lease) -> int:
    """Lock-delay after an expiry counts from the deadline, not from when it was noticed."""
    return lease.expires_at_us + lease.lock_delay_us


def decide_acquire(
    key: LeaseKey, current: Lease | None, intent: AcquireIntent, now_us: int
) -> AcquireDecision:
    available_at = key.available_at_us
    to_expire: Lease | None = None
    if current is not None and current.state is LeaseState.ACTIVE:
        if current.is_live(now_us):
            if current.holder == intent.holder and current.principal == intent.principal:
                return ReturnExisting(current)
            return Refuse(lease_held(current), retry_at_us=current.expires_at_us)
        to_expire = current
        available_at = max(available_at, expiry_available_at(current))
    elif current is not None and current.state is LeaseState.EXPIRED:
        # The expiry loop ends leases without touching the key row (lock order: key before
        # lease), so the lock-delay of an expired lease is derived from the lease itself.
        available_at = max(available_at, expiry_available_at(current))
    if now_us < available_at:
        return Refuse(
            errors.LockDelay(
                f"key {key.key!r} is in its lock-delay until {format_us(available_at)}",
                {"available_at": format_us(available_at), "key": key.key},
            ),
            expire_current=to_expire,
            retry_at_us=available_at,
        )
    return Grant(fencing_token=key.last_fencing_token + 1, expire_current=to_expire)


def lease_held(current: Lease) -> errors.LeaseHeld:
    return errors.LeaseHeld(
        f"key {current.key!r} is held by {current.holder!r} "
        f"until {format_us(current.expires_at_us)}",
        {
            "holder": current.holder,
            "expires_at": format_us(current.expires_at_us),
            "lease_id": current.lease_id,
            "fencing_token": str(current.fencing_token),
            "key": current.key,
        },
    )


def ended_error(lease: Lease, now_us: int) -> errors.TetherError:
    """The error for acting on a lease that is no longer live."""
    state = lease.effective_state(now_us)
    facts = {"lease_id": lease.lease_id, "state": state.proto_name}
    if state is LeaseState.RELEASED:
        return errors.LeaseReleased(f"lease {lease.lease_id} was released", facts)
    if state is LeaseState.REVOKED:
        return errors.LeaseRevoked(f"lease {lease.lease_id} was revoked", facts)
    expires_at = format_us(lease.expires_at_us)
    return errors.LeaseExpired(
        f"lease {lease.lease_id} expired at {expires_at}", {**facts, "expires_at": expires_at}
    )


def not_found(lease_id: str, namespace: str) -> errors.LeaseNotFound:
    return errors.LeaseNotFound(
        f"no lease {lease_id!r} in namespace {namespace!r}",
        {"lease_id": lease_id, "namespace": namespace},
    )


def stale_token(lease: Lease, presented: int) -> errors.StaleFencingToken:
    return errors.StaleFencingToken(
        f"fencing token {presented} is not the current token of lease {lease.lease_id}",
        {
            "lease_id": lease.lease_id,
            "presented_token": str(presented),
            "current_token": str(lease.fencing_token),
        },
    )


def renewal_refusal(
    lease: Lease | None, lease_id: str, namespace: str, token: int, principal: str, now_us: int
) -> errors.TetherError:
    """Why a conditional renewal matched no row. Checks in the order a client can act on."""
    if lease is None or lease.namespace != namespace:
        return not_found(lease_id, namespace)
    if lease.principal != principal:
        return not_holder(lease, principal)
    if lease.fencing_token != token:
        return stale_token(lease, token)
    return ended_error(lease, now_us)


def not_holder(lease: Lease, who: str) -> errors.NotLeaseHolder:
    return errors.NotLeaseHolder(
        f"lease {lease.lease_id} is held by {lease.holder!r} ({lease.principal}), not {who!r}",
        {"lease_id": lease.lease_id, "holder": lease.holder},
    )


@dataclass(frozen=True)
class EndNow:
    """End the live lease now with this state."""

    state: LeaseState


@dataclass(frozen=True)
class ExpireFirst:
    """The lease passed its deadline unrecorded: record the expiry, then report it."""


@dataclass(frozen=True)
class AlreadyEnded:
    """Ending is idempotent: the lease already ended; return it unchanged."""


EndDecision = EndNow | ExpireFirst | AlreadyEnded


def decide_release(
    lease: Lease | None,
    lease_id: str,
    namespace: str,
    token: int,
    holder: str,
    principal: str,
    now_us: int,
) -> EndNow | AlreadyEnded:
    """Only the holder, bound to the principal that acquired, may release.

    Releasing again a lease it released is idempotent. A lease that expired or was revoked
    is refused (LEASE_EXPIRED / LEASE_REVOKED), never reported as released: its holder
    worked unprotected for a while and must learn so. The refusal writes nothing; the
    expiry loop records an unrecorded expiry.
    """
    if lease is None or lease.namespace != namespace:
        raise not_found(lease_id, namespace)
    if lease.principal != principal:
        raise not_holder(lease, principal)
    if lease.holder != holder:
        raise not_holder(lease, holder)
    if lease.fencing_token != token:
        raise stale_token(lease, token)
    if lease.is_live(now_us):
        return EndNow(LeaseState.RELEASED)
    if lease.state is LeaseState.RELEASED:
        return AlreadyEnded()
    raise ended_error(lease, now_us)


def decide_revoke(lease: Lease | None, lease_id: str, namespace: str, now_us: int) -> EndDecision:
    if lease is None or lease.namespace != namespace:
        raise not_found(lease_id, namespace)
    return _decide_end(lease, LeaseState.REVOKED, now_us)


def _decide_end(lease: Lease, end_state: LeaseState, now_us: int) -> EndDecision:
    if lease.is_live(now_us):
        return EndNow(end_state)
    if lease.state is LeaseState.ACTIVE:
        return ExpireFirst()
    return AlreadyEnded()


def lock_delay_after_end(lease: Lease, end_state: LeaseState, now_us: int) -> int:
    """When the key becomes available again after the lease ends this way.

    Consul's lock-delay: an involuntary end (expiry, revocation) keeps the key unavailable
    for the lease's lock-delay so a holder that does not know it lost the key stops first.
    A voluntary release frees the key at once.
    """
    if end_state is LeaseState.EXPIRED:
        return expiry_available_at(lease)
    if end_state is LeaseState.REVOKED:
        return now_us + lease.lock_delay_us
    return 0
