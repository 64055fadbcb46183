"""The pure lease decisions, exhaustively and by property. No I/O, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether_server.domain import errors
from tether_server.domain.lease import (
    AcquireIntent,
    AlreadyEnded,
    EndNow,
    ExpireFirst,
    Grant,
    Lease,
    LeaseKey,
    LeaseState,
    Refuse,
    ReturnExisting,
    decide_acquire,
    decide_release,
    decide_revoke,
    ended_error,
    expiry_available_at,
    lock_delay_after_end,
    renewal_refusal,
)
from tether_server.domain.time import format_us

S = 1_000_000
T0 = 1_700_000_000 * S
TTL = 10 * S
DEADLINE = T0 + TTL


def make_lease(**overrides: object) -> Lease:
    fields: dict[str, object] = {
        "lease_id": "lease-1",
        "namespace": "default",
        "key": "jobs/a",
        "holder": "worker-1",
        "principal": "alice",
        "ttl_us": TTL,
        "fencing_token": 3,
        "state": LeaseState.ACTIVE,
        "acquired_at_us": T0,
        "renewed_at_us": T0,
        "expires_at_us": DEADLINE,
    }
    fields.update(overrides)
    return Lease(**fields)  # type: ignore[arg-type]


def make_key(**overrides: object) -> LeaseKey:
    fields: dict[str, object] = {
        "namespace": "default",
        "key": "jobs/a",
        "last_fencing_token": 3,
        "current_lease_id": "lease-1",
    }
    fields.update(overrides)
    return LeaseKey(**fields)  # type: ignore[arg-type]


OWNER = AcquireIntent("worker-1", "alice")
OTHER = AcquireIntent("worker-2", "bob")


# ---- Lease.effective_state ----------------------------------------------------------


def test_deadline_itself_counts_as_expired() -> None:
    lease = make_lease()
    assert lease.is_live(DEADLINE - 1)
    assert lease.effective_state(DEADLINE - 1) is LeaseState.ACTIVE
    assert not lease.is_live(DEADLINE)
    assert lease.effective_state(DEADLINE) is LeaseState.EXPIRED
    assert lease.effective_state(DEADLINE + 1) is LeaseState.EXPIRED


@pytest.mark.parametrize("state", [LeaseState.RELEASED, LeaseState.REVOKED, LeaseState.EXPIRED])
def test_ended_leases_keep_their_state_and_are_never_live(state: LeaseState) -> None:
    lease = make_lease(state=state)
    for now in (T0, DEADLINE - 1, DEADLINE, DEADLINE + 1):
        assert lease.effective_state(now) is state
        assert not lease.is_live(now)


@given(
    state=st.sampled_from(LeaseState),
    offset=st.integers(-(10**12), 10**12),
)
def test_effective_state_property(state: LeaseState, offset: int) -> None:
    lease = make_lease(state=state)
    now = DEADLINE + offset
    live = state is LeaseState.ACTIVE and offset < 0
    assert lease.is_live(now) is live
    if live:
        expected = LeaseState.ACTIVE
    elif state is LeaseState.ACTIVE:
        expected = LeaseState.EXPIRED
    else:
        expected = state
    assert lease.effective_state(now) is expected


# ---- decide_acquire -----------------------------------------------------------------


def test_free_key_grants_next_token() -> None:
    assert decide_acquire(LeaseKey("default", "k"), None, OTHER, T0) == Grant(1, None)
    key = make_key(last_fencing_token=41, current_lease_id=None)
    assert decide_acquire(key, None, OTHER, T0) == Grant(42, None)


def test_same_holder_and_principal_gets_the_live_lease_back() -> None:
    lease = make_lease()
    assert decide_acquire(make_key(), lease, OWNER, DEADLINE - 1) == ReturnExisting(lease)


@pytest.mark.parametrize(
    "intent",
    [OTHER, AcquireIntent("worker-1", "bob"), AcquireIntent("worker-2", "alice")],
    ids=["other-holder", "same-holder-other-principal", "other-holder-same-principal"],
)
def test_anyone_else_is_refused_with_lease_held(intent: AcquireIntent) -> None:
    lease = make_lease()
    decision = decide_acquire(make_key(), lease, intent, T0 + S)

    assert isinstance(decision, Refuse)
    assert decision.expire_current is None
    assert decision.retry_at_us == DEADLINE
    assert isinstance(decision.error, errors.LeaseHeld)
    assert decision.error.reason == "LEASE_HELD"
    assert decision.error.metadata == {
        "holder": "worker-1",
        "expires_at": format_us(DEADLINE),
        "lease_id": "lease-1",
        "fencing_token": "3",
        "key": "jobs/a",
    }
    assert "worker-1" in str(decision.error)


@pytest.mark.parametrize("intent", [OWNER, OTHER], ids=["same-holder", "other-holder"])
def test_active_lease_past_deadline_is_expired_then_granted(intent: AcquireIntent) -> None:
    lease = make_lease()
    assert decide_acquire(make_key(), lease, intent, DEADLINE) == Grant(4, lease)
    assert decide_acquire(make_key(), lease, intent, DEADLINE + 60 * S) == Grant(4, lease)


def test_lock_delay_after_expiry_counts_from_the_deadline() -> None:
    lease = make_lease(lock_delay_us=5 * S)
    key = make_key()

    # Noticed 2s after the deadline: unavailable for 3 more seconds, not 5.
    decision = decide_acquire(key, lease, OTHER, DEADLINE + 2 * S)
    assert isinstance(decision, Refuse)
    assert isinstance(decision.error, errors.LockDelay)
    assert decision.error.metadata == {
        "available_at": format_us(DEADLINE + 5 * S),
        "key": "jobs/a",
    }
    assert decision.retry_at_us == DEADLINE + 5 * S
    # The expiry is recorded even though the acquire is refused.
    assert decision.expire_current == lease

    assert decide_acquire(key, lease, OTHER, DEADLINE + 5 * S - 1).retry_at_us == (  # type: ignore[union-attr]
        DEADLINE + 5 * S
    )
    assert decide_acquire(key, lease, OTHER, DEADLINE + 5 * S) == Grant(4, lease)
    # Noticed long after the delay ran out: granted at once.
    assert decide_acquire(key, lease, OTHER, DEADLINE + 60 * S) == Grant(4, lease)


def test_lock_delay_of_an_already_expired_lease_still_applies() -> None:
    lease = make_lease(state=LeaseState.EXPIRED, ended_at_us=DEADLINE, lock_delay_us=5 * S)
    # The key row knows nothing of it: the expiry loop does not touch key rows.
    key = make_key(available_at_us=0)

    decision = decide_acquire(key, lease, OTHER, DEADLINE + S)
    assert isinstance(decision, Refuse)
    assert isinstance(decision.error, errors.LockDelay)
    assert decision.expire_current is None
    assert decision.retry_at_us == DEADLINE + 5 * S
    # Not even the previous holder gets it back during the delay.
    assert isinstance(decide_acquire(key, lease, OWNER, DEADLINE + S), Refuse)
    assert decide_acquire(key, lease, OTHER, DEADLINE + 5 * S) == Grant(4, None)


def test_key_lock_delay_after_revoke_applies() -> None:
    lease = make_lease(state=LeaseState.REVOKED, ended_at_us=T0 + S, lock_delay_us=5 * S)
    key = make_key(available_at_us=T0 + 6 * S)
    decision = decide_acquire(key, lease, OTHER, T0 + 2 * S)
    assert isinstance(decision, Refuse)
    assert isinstance(decision.error, errors.LockDelay)
    assert decision.retry_at_us == T0 + 6 * S
    assert decide_acquire(key, lease, OTHER, T0 + 6 * S) == Grant(4, None)


def test_released_lease_frees_the_key_at_once() -> None:
    lease = make_lease(state=LeaseState.RELEASED, ended_at_us=T0 + S, lock_delay_us=5 * S)
    assert decide_acquire(make_key(), lease, OTHER, T0 + S) == Grant(4, None)


def test_key_available_at_wins_when_later_than_the_expiry_delay() -> None:
    lease = make_lease(lock_delay_us=S)
    key = make_key(available_at_us=DEADLINE + 9 * S)
    decision = decide_acquire(key, lease, OTHER, DEADLINE + 2 * S)
    assert isinstance(decision, Refuse)
    assert decision.retry_at_us == DEADLINE + 9 * S
    assert decision.expire_current == lease


leases = st.builds(
    make_lease,
    holder=st.sampled_from(["worker-1", "worker-2"]),
    principal=st.sampled_from(["alice", "bob"]),
    state=st.sampled_from(LeaseState),
    expires_at_us=st.integers(T0, T0 + 100 * S),
    lock_delay_us=st.integers(0, 60 * S),
    fencing_token=st.integers(1, 1000),
)
intents = st.builds(
    AcquireIntent, st.sampled_from(["worker-1", "worker-2"]), st.sampled_from(["alice", "bob"])
)


@given(
    current=st.one_of(st.none(), leases),
    intent=intents,
    now=st.integers(T0, T0 + 200 * S),
    last_token=st.integers(0, 10**6),
    available_at=st.integers(0, T0 + 200 * S),
)
def test_acquire_decision_properties(
    current: Lease | None, intent: AcquireIntent, now: int, last_token: int, available_at: int
) -> None:
    key = LeaseKey("default", "jobs/a", last_token, available_at, "lease-1")
    decision = decide_acquire(key, current, intent, now)
    live = current is not None and current.is_live(now)
    stale_active = current is not None and current.state is LeaseState.ACTIVE and not live

    if isinstance(decision, ReturnExisting):
        assert live
        assert current is not None
        assert (current.holder, current.principal) == (intent.holder, intent.principal)
        assert decision.lease is current
        return
    if live:
        # A live lease is never granted over and never expired.
        assert isinstance(decision, Refuse)
        assert isinstance(decision.error, errors.LeaseHeld)
        assert decision.expire_current is None
        assert current is not None
        assert (current.holder, current.principal) != (intent.holder, intent.principal)
        return
    # Not live: a stale ACTIVE lease is always expired, whatever else is decided.
    assert decision.expire_current == (current if stale_active else None)
    earliest = available_at
    if current is not None and current.state in (LeaseState.ACTIVE, LeaseState.EXPIRED):
        earliest = max(earliest, expiry_available_at(current))
    if isinstance(decision, Grant):
        assert now >= earliest
        assert decision.fencing_token == last_token + 1
    else:
        assert isinstance(decision, Refuse)
        assert isinstance(decision.error, errors.LockDelay)
        assert now < earliest
        assert decision.retry_at_us == earliest


# ---- release and revoke -------------------------------------------------------------


def test_release_not_found_and_wrong_namespace() -> None:
    with pytest.raises(errors.LeaseNotFound) as exc:
        decide_release(None, "lease-x", "default", 1, "worker-1", "alice", T0)
    assert exc.value.metadata == {"lease_id": "lease-x", "namespace": "default"}
    with pytest.raises(errors.LeaseNotFound):
        decide_release(make_lease(), "lease-1", "other", 3, "worker-1", "alice", T0)


def test_release_by_another_principal_is_refused_even_with_the_holder_name() -> None:
    with pytest.raises(errors.NotLeaseHolder):
        decide_release(make_lease(), "lease-1", "default", 3, "worker-1", "mallory", T0)


def test_renewal_by_another_principal_is_refused() -> None:
    refusal = renewal_refusal(make_lease(), "lease-1", "default", 3, "mallory", T0)
    assert isinstance(refusal, errors.NotLeaseHolder)


def test_release_by_another_holder_is_refused_before_the_token_check() -> None:
    with pytest.raises(errors.NotLeaseHolder) as exc:
        decide_release(make_lease(), "lease-1", "default", 99, "worker-2", "alice", T0)
    assert exc.value.metadata == {"lease_id": "lease-1", "holder": "worker-1"}


def test_release_with_stale_token() -> None:
    with pytest.raises(errors.StaleFencingToken) as exc:
        decide_release(make_lease(), "lease-1", "default", 2, "worker-1", "alice", T0)
    assert exc.value.metadata == {
        "lease_id": "lease-1",
        "presented_token": "2",
        "current_token": "3",
    }


def test_release_decisions_by_lease_state() -> None:
    live = make_lease()
    assert decide_release(
        live, "lease-1", "default", 3, "worker-1", "alice", DEADLINE - 1
    ) == EndNow(LeaseState.RELEASED)
    released = make_lease(state=LeaseState.RELEASED, ended_at_us=T0)
    assert (
        decide_release(released, "lease-1", "default", 3, "worker-1", "alice", T0) == AlreadyEnded()
    )


def test_release_of_an_expired_or_revoked_lease_is_refused() -> None:
    # Past its deadline, the expiry not yet recorded: expired all the same.
    for lease in (make_lease(), make_lease(state=LeaseState.EXPIRED, ended_at_us=DEADLINE)):
        with pytest.raises(errors.LeaseExpired) as expired:
            decide_release(lease, "lease-1", "default", 3, "worker-1", "alice", DEADLINE)
        assert expired.value.metadata == {
            "lease_id": "lease-1",
            "state": "LEASE_STATE_EXPIRED",
            "expires_at": format_us(DEADLINE),
        }
    revoked = make_lease(state=LeaseState.REVOKED, ended_at_us=T0)
    with pytest.raises(errors.LeaseRevoked) as exc:
        decide_release(revoked, "lease-1", "default", 3, "worker-1", "alice", T0)
    assert exc.value.metadata == {"lease_id": "lease-1", "state": "LEASE_STATE_REVOKED"}


def test_revoke_decisions() -> None:
    with pytest.raises(errors.LeaseNotFound):
        decide_revoke(None, "lease-1", "default", T0)
    with pytest.raises(errors.LeaseNotFound):
        decide_revoke(make_lease(), "lease-1", "other", T0)
    live = make_lease()
    assert decide_revoke(live, "lease-1", "default", DEADLINE - 1) == EndNow(LeaseState.REVOKED)
    assert decide_revoke(live, "lease-1", "default", DEADLINE) == ExpireFirst()
    for state in (LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED):
        assert decide_revoke(make_lease(state=state), "lease-1", "default", T0) == AlreadyEnded()


def test_lock_delay_after_end() -> None:
    lease = make_lease(lock_delay_us=5 * S)
    now = T0 + 3 * S
    assert lock_delay_after_end(lease, LeaseState.EXPIRED, now) == DEADLINE + 5 * S
    assert lock_delay_after_end(lease, LeaseState.REVOKED, now) == now + 5 * S
    assert lock_delay_after_end(lease, LeaseState.RELEASED, now) == 0


# ---- renewal refusals ---------------------------------------------------------------


def test_renewal_refusal_order() -> None:
    now = T0 + S
    # Unknown, or in another namespace: not found, whatever else is wrong.
    assert isinstance(renewal_refusal(None, "x", "default", 1, "alice", now), errors.LeaseNotFound)
    released = make_lease(state=LeaseState.RELEASED)
    assert isinstance(
        renewal_refusal(released, "lease-1", "other", 99, "alice", now), errors.LeaseNotFound
    )
    # A wrong token is reported before the lease having ended.
    assert isinstance(
        renewal_refusal(released, "lease-1", "default", 99, "alice", now), errors.StaleFencingToken
    )
    expired = make_lease()
    assert isinstance(
        renewal_refusal(expired, "lease-1", "default", 99, "alice", DEADLINE),
        errors.StaleFencingToken,
    )
    # Right token: why it ended.
    assert isinstance(
        renewal_refusal(released, "lease-1", "default", 3, "alice", now), errors.LeaseReleased
    )
    revoked = make_lease(state=LeaseState.REVOKED)
    assert isinstance(
        renewal_refusal(revoked, "lease-1", "default", 3, "alice", now), errors.LeaseRevoked
    )
    refusal = renewal_refusal(expired, "lease-1", "default", 3, "alice", DEADLINE)
    assert isinstance(refusal, errors.LeaseExpired)
    assert refusal.metadata == {
        "lease_id": "lease-1",
        "state": "LEASE_STATE_EXPIRED",
        "expires_at": format_us(DEADLINE),
    }
    recorded = make_lease(state=LeaseState.EXPIRED, ended_at_us=DEADLINE)
    assert isinstance(
        renewal_refusal(recorded, "lease-1", "default", 3, "alice", now), errors.LeaseExpired
    )


@pytest.mark.parametrize(
    ("state", "error"),
    [
        (LeaseState.RELEASED, errors.LeaseReleased),
        (LeaseState.REVOKED, errors.LeaseRevoked),
        (LeaseState.EXPIRED, errors.LeaseExpired),
    ],
)
def test_ended_error_names_the_state(state: LeaseState, error: type[errors.TetherError]) -> None:
    exc = ended_error(make_lease(state=state), T0)
    assert type(exc) is error
    assert exc.metadata["state"] == state.proto_name
    assert exc.reason == f"LEASE_{state.value}"


def test_format_us_is_rfc3339_utc_with_microseconds() -> None:
    assert format_us(T0 + 1) == "2023-11-14T22:13:20.000001Z"
    assert format_us(0) == "1970-01-01T00:00:00Z"


def test_lease_is_frozen() -> None:
    lease = make_lease()
    with pytest.raises(AttributeError):
        lease.state = LeaseState.RELEASED  # type: ignore[misc]
    assert replace(lease, state=LeaseState.RELEASED).state is LeaseState.RELEASED
