"""LeaseStore conformance: the same behaviour on SQLite and PostgreSQL.

Time only moves when a test advances ``fake_clock``; nothing here sleeps.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest

from tether_server.clock import FakeClock
from tether_server.domain import errors
from tether_server.domain.lease import ANONYMOUS, Lease, LeaseEventType, LeaseState, Refuse
from tether_server.domain.time import format_us
from tether_server.store.database import Database
from tether_server.store.leases import (
    AcquireParams,
    AcquireResult,
    LeaseEventRecord,
    LeaseStore,
    ListLeasesParams,
    ReleaseParams,
    Renewal,
    Renewed,
    RevokeParams,
)
from tether_server.store.tx import Tx

S = 1_000_000
TTL = 10 * S
NS = "default"


def params(
    key: str = "jobs/a",
    holder: str = "worker-1",
    *,
    principal: str = ANONYMOUS,
    ttl_us: int = TTL,
    lock_delay_us: int = 0,
    namespace: str = NS,
    labels: dict[str, str] | None = None,
    request_id: str | None = None,
) -> AcquireParams:
    return AcquireParams(
        namespace=namespace,
        key=key,
        holder=holder,
        principal=principal,
        ttl_us=ttl_us,
        lock_delay_us=lock_delay_us,
        labels=labels,
        request_id=request_id,
    )


async def grant(store: LeaseStore, key: str = "jobs/a", holder: str = "worker-1", **kw) -> Lease:
    """Acquire and insist that a new lease was created."""
    result = await store.lease_acquire(params(key, holder, **kw))
    assert isinstance(result, AcquireResult), result
    assert result.created
    return result.lease


async def refused(store: LeaseStore, key: str = "jobs/a", holder: str = "worker-2", **kw) -> Refuse:
    result = await store.lease_acquire(params(key, holder, **kw))
    assert isinstance(result, Refuse), result
    return result


async def events(
    store: LeaseStore, namespace: str = NS, prefix: str = "", start: int = 0
) -> list[LeaseEventRecord]:
    return (await store.lease_events_since(namespace, prefix, start, limit=100_000)).events


async def events_of(store: LeaseStore, lease_id: str) -> list[LeaseEventType]:
    return [e.type for e in await events(store) if e.lease.lease_id == lease_id]


def release_params(lease: Lease, holder: str | None = None, token: int | None = None):
    return ReleaseParams(
        namespace=lease.namespace,
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token if token is None else token,
        holder=lease.holder if holder is None else holder,
    )


# ---- acquire ------------------------------------------------------------------------


async def test_acquire_free_key_grants_token_one(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    now = fake_clock.now_us()
    lease = await grant(lease_store, labels={"team": "infra"}, lock_delay_us=2 * S)

    assert lease.state is LeaseState.ACTIVE
    assert lease.fencing_token == 1
    assert (lease.acquired_at_us, lease.renewed_at_us, lease.expires_at_us) == (
        now,
        now,
        now + TTL,
    )
    assert lease.ended_at_us is None
    assert lease.create_revision == lease.mod_revision == 1
    assert await lease_store.lease_get(NS, lease.lease_id) == lease
    (event,) = await events(lease_store)
    assert (event.revision, event.type, event.occurred_at_us) == (1, LeaseEventType.ACQUIRED, now)
    assert event.lease == lease
    assert dict(event.lease.labels) == {"team": "infra"}
    assert await lease_store.db.current_revision() == (1, 0)


async def test_reacquire_by_same_holder_is_idempotent(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    fake_clock.advance(3)

    again = await lease_store.lease_acquire(params(ttl_us=60 * S))

    assert again == AcquireResult(lease, created=False)
    assert await events_of(lease_store, lease.lease_id) == [LeaseEventType.ACQUIRED]
    assert (await lease_store.lease_get(NS, lease.lease_id)).expires_at_us == lease.expires_at_us


async def test_other_holder_is_refused_with_holder_and_deadline(lease_store: LeaseStore) -> None:
    lease = await grant(lease_store)

    refusal = await refused(lease_store, holder="worker-2")

    assert isinstance(refusal.error, errors.LeaseHeld)
    assert refusal.error.metadata["holder"] == "worker-1"
    assert refusal.error.metadata["expires_at"] == format_us(lease.expires_at_us)
    assert refusal.error.metadata["lease_id"] == lease.lease_id
    assert refusal.error.metadata["fencing_token"] == "1"
    assert refusal.retry_at_us == lease.expires_at_us
    assert len(await events(lease_store)) == 1


async def test_same_holder_name_other_principal_is_refused(lease_store: LeaseStore) -> None:
    await grant(lease_store)
    refusal = await refused(lease_store, holder="worker-1", principal="mallory")
    assert isinstance(refusal.error, errors.LeaseHeld)


async def test_keys_and_namespaces_are_independent(lease_store: LeaseStore) -> None:
    a = await grant(lease_store, "jobs/a")
    b = await grant(lease_store, "jobs/b", holder="worker-2")
    c = await grant(lease_store, "jobs/a", holder="worker-3", namespace="other")
    assert (a.fencing_token, b.fencing_token, c.fencing_token) == (1, 1, 1)
    assert len({a.lease_id, b.lease_id, c.lease_id}) == 3


async def test_request_id_returns_the_first_result(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    first = await grant(lease_store, request_id="req-1")
    await lease_store.lease_release(release_params(first))
    fake_clock.advance(1)

    retried = await lease_store.lease_acquire(params(request_id="req-1"))

    assert isinstance(retried, AcquireResult)
    assert not retried.created
    assert retried.lease.lease_id == first.lease_id
    assert retried.lease.state is LeaseState.RELEASED
    assert [e.type for e in await events(lease_store)] == [
        LeaseEventType.ACQUIRED,
        LeaseEventType.RELEASED,
    ]


async def test_request_id_reused_for_another_acquire_conflicts(lease_store: LeaseStore) -> None:
    first = await grant(lease_store, request_id="req-1")

    with pytest.raises(errors.RequestIdConflict) as exc:
        await lease_store.lease_acquire(params("jobs/other", request_id="req-1"))
    assert exc.value.metadata["lease_id"] == first.lease_id
    with pytest.raises(errors.RequestIdConflict):
        await lease_store.lease_acquire(params(holder="worker-2", request_id="req-1"))

    # Request ids are scoped to a namespace.
    await grant(lease_store, "jobs/other", namespace="other", request_id="req-1")
    assert len(await events(lease_store)) == 1


async def test_acquire_after_deadline_expires_the_old_lease_first(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    old = await grant(lease_store)
    fake_clock.set(old.expires_at_us)  # the deadline itself is already expired

    new = await grant(lease_store, holder="worker-2")

    assert new.fencing_token == 2
    ended = await lease_store.lease_get(NS, old.lease_id)
    assert ended.state is LeaseState.EXPIRED
    assert ended.ended_at_us == old.expires_at_us
    assert [(e.type, e.lease.lease_id) for e in await events(lease_store)] == [
        (LeaseEventType.ACQUIRED, old.lease_id),
        (LeaseEventType.EXPIRED, old.lease_id),
        (LeaseEventType.ACQUIRED, new.lease_id),
    ]
    # The expiry loop has nothing left to do for it.
    assert (await lease_store.lease_expire_due()).expired == []


async def test_same_holder_after_deadline_gets_a_new_lease(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    old = await grant(lease_store)
    fake_clock.advance(TTL / S + 1)
    new = await grant(lease_store)
    assert new.lease_id != old.lease_id
    assert new.fencing_token == old.fencing_token + 1


@pytest.mark.parametrize("expired_by_loop", [False, True], ids=["lazy", "loop"])
async def test_lock_delay_after_expiry_counts_from_the_deadline(
    lease_store: LeaseStore, fake_clock: FakeClock, expired_by_loop: bool
) -> None:
    old = await grant(lease_store, lock_delay_us=5 * S)
    fake_clock.set(old.expires_at_us + 2 * S)
    if expired_by_loop:
        assert [x.lease_id for x in (await lease_store.lease_expire_due()).expired] == [
            old.lease_id
        ]

    refusal = await refused(lease_store)

    assert isinstance(refusal.error, errors.LockDelay)
    assert refusal.retry_at_us == old.expires_at_us + 5 * S
    assert refusal.error.metadata["available_at"] == format_us(old.expires_at_us + 5 * S)
    # The refusal still recorded the expiry, once.
    assert (await lease_store.lease_get(NS, old.lease_id)).state is LeaseState.EXPIRED
    assert await events_of(lease_store, old.lease_id) == [
        LeaseEventType.ACQUIRED,
        LeaseEventType.EXPIRED,
    ]

    fake_clock.set(old.expires_at_us + 5 * S - 1)
    assert isinstance((await refused(lease_store)).error, errors.LockDelay)
    fake_clock.set(old.expires_at_us + 5 * S)
    assert (await grant(lease_store, holder="worker-2")).fencing_token == 2
    assert await events_of(lease_store, old.lease_id) == [
        LeaseEventType.ACQUIRED,
        LeaseEventType.EXPIRED,
    ]


async def test_release_frees_the_key_at_once_despite_lock_delay(lease_store: LeaseStore) -> None:
    old = await grant(lease_store, lock_delay_us=30 * S)
    await lease_store.lease_release(release_params(old))
    assert (await grant(lease_store, holder="worker-2")).fencing_token == 2


async def test_revoke_sets_lock_delay_from_now(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    old = await grant(lease_store, ttl_us=60 * S, lock_delay_us=5 * S)
    fake_clock.advance(3)
    revoked_at = fake_clock.now_us()

    revoked = await lease_store.lease_revoke(RevokeParams(NS, old.lease_id))

    assert revoked.state is LeaseState.REVOKED
    assert revoked.ended_at_us == revoked_at
    fake_clock.set(revoked_at + 5 * S - 1)
    refusal = await refused(lease_store)
    assert isinstance(refusal.error, errors.LockDelay)
    assert refusal.retry_at_us == revoked_at + 5 * S
    fake_clock.set(revoked_at + 5 * S)
    assert (await grant(lease_store, holder="worker-2")).fencing_token == 2


# ---- renew --------------------------------------------------------------------------


async def test_renew_extends_deadline_and_stores_progress(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    fake_clock.advance(4)
    now = fake_clock.now_us()

    renewed = await lease_store.lease_renew(
        NS, Renewal(lease.lease_id, lease.fencing_token, b"step-3")
    )

    assert renewed == Renewed(lease.lease_id, 1, now + TTL, TTL)
    stored = await lease_store.lease_get(NS, lease.lease_id)
    assert (stored.renewed_at_us, stored.expires_at_us, stored.progress) == (
        now,
        now + TTL,
        b"step-3",
    )
    assert stored.acquired_at_us == lease.acquired_at_us

    fake_clock.advance(4)
    await lease_store.lease_renew(NS, Renewal(lease.lease_id, lease.fencing_token, None))
    assert (await lease_store.lease_get(NS, lease.lease_id)).progress == b"step-3"
    await lease_store.lease_renew(NS, Renewal(lease.lease_id, lease.fencing_token, b""))
    assert (await lease_store.lease_get(NS, lease.lease_id)).progress == b""
    # Renewals are not watch events.
    assert await events_of(lease_store, lease.lease_id) == [LeaseEventType.ACQUIRED]


async def test_renew_just_before_the_deadline_succeeds(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    fake_clock.set(lease.expires_at_us - 1)
    renewed = await lease_store.lease_renew(NS, Renewal(lease.lease_id, 1))
    assert renewed.expires_at_us == lease.expires_at_us - 1 + TTL


async def _assert_renew_refused(
    store: LeaseStore,
    lease: Lease,
    renewal: Renewal,
    error: type[errors.TetherError],
    namespace: str = NS,
) -> errors.TetherError:
    before = await store.lease_get(lease.namespace, lease.lease_id)
    with pytest.raises(error) as exc:
        await store.lease_renew(namespace, renewal)
    after = await store.lease_get(lease.namespace, lease.lease_id)
    assert after == before, "a refused renewal must not change the lease"
    return exc.value


async def test_renew_with_stale_token_is_refused(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    fake_clock.advance(1)
    exc = await _assert_renew_refused(
        lease_store, lease, Renewal(lease.lease_id, 2, b"x"), errors.StaleFencingToken
    )
    assert exc.metadata["current_token"] == "1"
    assert exc.metadata["presented_token"] == "2"


async def test_renew_unknown_or_other_namespace_is_not_found(lease_store: LeaseStore) -> None:
    lease = await grant(lease_store)
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_renew(NS, Renewal("0" * 32, 1))
    await _assert_renew_refused(
        lease_store, lease, Renewal(lease.lease_id, 1), errors.LeaseNotFound, namespace="other"
    )


async def test_renew_released_or_revoked_is_refused(lease_store: LeaseStore) -> None:
    released = await grant(lease_store, "jobs/a")
    revoked = await grant(lease_store, "jobs/b")
    await lease_store.lease_release(release_params(released))
    await lease_store.lease_revoke(RevokeParams(NS, revoked.lease_id))

    await _assert_renew_refused(
        lease_store, released, Renewal(released.lease_id, 1), errors.LeaseReleased
    )
    await _assert_renew_refused(
        lease_store, revoked, Renewal(revoked.lease_id, 1), errors.LeaseRevoked
    )


@pytest.mark.parametrize("expired_by_loop", [False, True], ids=["lazy", "loop"])
@pytest.mark.parametrize("past_deadline_us", [0, 1, 60 * S], ids=["at", "after", "long-after"])
async def test_renew_after_deadline_never_resurrects(
    lease_store: LeaseStore, fake_clock: FakeClock, expired_by_loop: bool, past_deadline_us: int
) -> None:
    lease = await grant(lease_store)
    fake_clock.set(lease.expires_at_us + past_deadline_us)
    if expired_by_loop:
        assert len((await lease_store.lease_expire_due()).expired) == 1

    exc = await _assert_renew_refused(
        lease_store, lease, Renewal(lease.lease_id, 1, b"late"), errors.LeaseExpired
    )

    assert exc.metadata["expires_at"] == format_us(lease.expires_at_us)
    stored = await lease_store.lease_get(NS, lease.lease_id)
    assert stored.expires_at_us == lease.expires_at_us
    assert stored.state is LeaseState.EXPIRED
    assert stored.progress == b""
    # The refused renewal did not block a takeover either.
    assert (await grant(lease_store, holder="worker-2")).fencing_token == 2


async def test_renew_many_reports_each_outcome_in_order(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    live1 = await grant(lease_store, "k/live1", ttl_us=60 * S)
    live2 = await grant(lease_store, "k/live2", ttl_us=60 * S)
    expiring = await grant(lease_store, "k/expiring", ttl_us=5 * S)
    released = await grant(lease_store, "k/released", ttl_us=60 * S)
    revoked = await grant(lease_store, "k/revoked", ttl_us=60 * S)
    other_ns = await grant(lease_store, "k/other", namespace="other", ttl_us=60 * S)
    await lease_store.lease_release(release_params(released))
    await lease_store.lease_revoke(RevokeParams(NS, revoked.lease_id))
    fake_clock.advance(6)
    now = fake_clock.now_us()

    outcomes = await lease_store.lease_renew_many(
        NS,
        [
            Renewal(live2.lease_id, 1, b"two"),
            Renewal(expiring.lease_id, 1),
            Renewal("f" * 32, 1),
            Renewal(live1.lease_id, 7),
            Renewal(released.lease_id, 1),
            Renewal(other_ns.lease_id, 1),
            Renewal(revoked.lease_id, 1),
            Renewal(live1.lease_id, 1),
        ],
    )

    assert [type(o) for o in outcomes] == [
        Renewed,
        errors.LeaseExpired,
        errors.LeaseNotFound,
        errors.StaleFencingToken,
        errors.LeaseReleased,
        errors.LeaseNotFound,
        errors.LeaseRevoked,
        Renewed,
    ]
    assert outcomes[0] == Renewed(live2.lease_id, 1, now + 60 * S, 60 * S)
    assert outcomes[7] == Renewed(live1.lease_id, 1, now + 60 * S, 60 * S)
    assert (await lease_store.lease_get(NS, live2.lease_id)).progress == b"two"
    assert (await lease_store.lease_get(NS, expiring.lease_id)).expires_at_us == (
        expiring.expires_at_us
    )
    assert (await lease_store.lease_get("other", other_ns.lease_id)).expires_at_us == (
        other_ns.expires_at_us
    )
    assert await lease_store.lease_renew_many(NS, []) == []


@pytest.mark.parametrize("right_first", [True, False], ids=["right-first", "wrong-first"])
async def test_renew_many_same_lease_with_right_and_wrong_token(
    lease_store: LeaseStore, fake_clock: FakeClock, right_first: bool
) -> None:
    lease = await grant(lease_store)
    fake_clock.advance(2)
    right, wrong = Renewal(lease.lease_id, 1), Renewal(lease.lease_id, 99)
    batch = [right, wrong] if right_first else [wrong, right]

    outcomes = await lease_store.lease_renew_many(NS, batch)

    kinds = [type(o) for o in outcomes]
    expected = [Renewed, errors.StaleFencingToken]
    assert kinds == (expected if right_first else expected[::-1])
    stored = await lease_store.lease_get(NS, lease.lease_id)
    assert stored.expires_at_us == fake_clock.now_us() + TTL


@pytest.mark.parametrize("right_first", [True, False], ids=["right-first", "wrong-first"])
async def test_renew_many_stale_token_progress_is_never_applied(
    lease_store: LeaseStore, fake_clock: FakeClock, right_first: bool
) -> None:
    """Fencing: progress sent with a stale token must not overwrite the holder's progress.

    Regression: progress used to be applied by lease id whenever the lease was renewed.
    """
    lease = await grant(lease_store)
    await lease_store.lease_renew(NS, Renewal(lease.lease_id, 1, b"mine"))
    right = Renewal(lease.lease_id, 1, None)
    wrong = Renewal(lease.lease_id, 99, b"stale-writer")
    batch = [right, wrong] if right_first else [wrong, right]

    outcomes = await lease_store.lease_renew_many(NS, batch)

    assert sorted(type(o).__name__ for o in outcomes) == ["Renewed", "StaleFencingToken"]
    assert (await lease_store.lease_get(NS, lease.lease_id)).progress == b"mine"


# ---- release and revoke -------------------------------------------------------------


async def test_release_is_idempotent(lease_store: LeaseStore, fake_clock: FakeClock) -> None:
    lease = await grant(lease_store, ttl_us=60 * S)
    fake_clock.advance(2)
    released_at = fake_clock.now_us()

    ended = await lease_store.lease_release(release_params(lease))
    fake_clock.advance(5)
    again = await lease_store.lease_release(release_params(lease))

    assert ended.state is LeaseState.RELEASED
    assert ended.ended_at_us == released_at
    assert not ended.stream_attached
    assert again == ended
    assert await lease_store.lease_get(NS, lease.lease_id) == ended
    assert await events_of(lease_store, lease.lease_id) == [
        LeaseEventType.ACQUIRED,
        LeaseEventType.RELEASED,
    ]
    (_, released_event) = await events(lease_store)
    assert released_event.lease == ended
    assert released_event.revision == ended.mod_revision == 2


async def test_release_refusals(lease_store: LeaseStore) -> None:
    lease = await grant(lease_store)

    with pytest.raises(errors.NotLeaseHolder) as exc:
        await lease_store.lease_release(release_params(lease, holder="worker-2"))
    assert exc.value.metadata["holder"] == "worker-1"
    with pytest.raises(errors.StaleFencingToken):
        await lease_store.lease_release(release_params(lease, token=2))
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_release(replace(release_params(lease), lease_id="a" * 32))
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_release(replace(release_params(lease), namespace="other"))

    assert (await lease_store.lease_get(NS, lease.lease_id)).state is LeaseState.ACTIVE
    assert len(await events(lease_store)) == 1
    # After it ended, a different holder still may not act on it.
    await lease_store.lease_release(release_params(lease))
    with pytest.raises(errors.NotLeaseHolder):
        await lease_store.lease_release(release_params(lease, holder="worker-2"))


async def test_release_after_deadline_is_refused_and_writes_nothing(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    fake_clock.set(lease.expires_at_us + 3 * S)

    with pytest.raises(errors.LeaseExpired) as refused:
        await lease_store.lease_release(release_params(lease))

    assert refused.value.metadata["expires_at"] == format_us(lease.expires_at_us)
    # The expiry is the loop's to record, not the refused release's.
    assert await events_of(lease_store, lease.lease_id) == [LeaseEventType.ACQUIRED]
    await lease_store.lease_expire_due()
    with pytest.raises(errors.LeaseExpired):
        await lease_store.lease_release(release_params(lease))
    assert await events_of(lease_store, lease.lease_id) == [
        LeaseEventType.ACQUIRED,
        LeaseEventType.EXPIRED,
    ]


async def test_release_after_revoke_is_refused(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    revoked = await lease_store.lease_revoke(RevokeParams(lease.namespace, lease.lease_id))
    with pytest.raises(errors.LeaseRevoked) as refused:
        await lease_store.lease_release(release_params(lease))
    assert refused.value.metadata == {"lease_id": lease.lease_id, "state": "LEASE_STATE_REVOKED"}
    assert await lease_store.lease_get(lease.namespace, lease.lease_id) == revoked


async def test_revoke_is_idempotent_and_checks_namespace(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    lease = await grant(lease_store)
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_revoke(RevokeParams("other", lease.lease_id))
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_revoke(RevokeParams(NS, "b" * 32))

    revoked = await lease_store.lease_revoke(RevokeParams(NS, lease.lease_id))
    fake_clock.advance(1)
    assert await lease_store.lease_revoke(RevokeParams(NS, lease.lease_id)) == revoked
    # Revoking a released lease leaves it released.
    other = await grant(lease_store, "jobs/b")
    released = await lease_store.lease_release(release_params(other))
    assert await lease_store.lease_revoke(RevokeParams(NS, other.lease_id)) == released
    assert [e.type for e in await events(lease_store)] == [
        LeaseEventType.ACQUIRED,
        LeaseEventType.REVOKED,
        LeaseEventType.ACQUIRED,
        LeaseEventType.RELEASED,
    ]


# ---- expiry loop --------------------------------------------------------------------


async def test_expire_due_records_each_expiry_exactly_once(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    start = fake_clock.now_us()
    short = await grant(lease_store, "k/short", ttl_us=5 * S)
    mid = await grant(lease_store, "k/mid", ttl_us=8 * S)
    long = await grant(lease_store, "k/long", ttl_us=20 * S)
    released = await grant(lease_store, "k/released", ttl_us=5 * S)
    await lease_store.lease_release(release_params(released))

    assert (await lease_store.lease_expire_due()).expired == []
    assert await lease_store.lease_next_deadline() == start + 5 * S

    fake_clock.set(start + 8 * S)  # mid's deadline exactly
    result = await lease_store.lease_expire_due()

    assert [x.lease_id for x in result.expired] == [short.lease_id, mid.lease_id]
    for ended, original in zip(result.expired, [short, mid], strict=True):
        assert ended.state is LeaseState.EXPIRED
        assert ended.ended_at_us == original.expires_at_us
        assert await lease_store.lease_get(NS, original.lease_id) == ended
    assert result.next_deadline_us == long.expires_at_us
    revisions = [x.mod_revision for x in result.expired]
    assert revisions == [6, 7]

    again = await lease_store.lease_expire_due()
    assert again.expired == []
    assert again.next_deadline_us == long.expires_at_us
    expired_events = [e for e in await events(lease_store) if e.type is LeaseEventType.EXPIRED]
    assert [(e.lease.lease_id, e.revision) for e in expired_events] == [
        (short.lease_id, 6),
        (mid.lease_id, 7),
    ]
    assert expired_events[0].lease == result.expired[0]

    fake_clock.advance(60)
    final = await lease_store.lease_expire_due()
    assert [x.lease_id for x in final.expired] == [long.lease_id]
    assert final.next_deadline_us is None
    assert await lease_store.lease_next_deadline() is None


async def test_expire_due_respects_its_limit(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    leases = [await grant(lease_store, f"k/{i}", ttl_us=(5 + i) * S) for i in range(5)]
    fake_clock.advance(60)

    first = await lease_store.lease_expire_due(limit=2)
    assert [x.lease_id for x in first.expired] == [x.lease_id for x in leases[:2]]
    assert first.next_deadline_us == leases[2].expires_at_us
    rest = await lease_store.lease_expire_due(limit=10)
    assert [x.lease_id for x in rest.expired] == [x.lease_id for x in leases[2:]]


# ---- reads --------------------------------------------------------------------------


async def test_get_and_get_by_key(lease_store: LeaseStore, fake_clock: FakeClock) -> None:
    first = await grant(lease_store)
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_get("other", first.lease_id)
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_get(NS, "c" * 32)
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_get_by_key(NS, "jobs/none")
    with pytest.raises(errors.LeaseNotFound):
        await lease_store.lease_get_by_key("other", "jobs/a")
    assert await lease_store.lease_get_by_key(NS, "jobs/a") == first

    fake_clock.set(first.expires_at_us)
    # Lazily expired for every reader before the loop ran.
    for seen in (
        await lease_store.lease_get(NS, first.lease_id),
        await lease_store.lease_get_by_key(NS, "jobs/a"),
    ):
        assert seen.state is LeaseState.EXPIRED
        assert seen.ended_at_us == first.expires_at_us

    second = await grant(lease_store, holder="worker-2")
    assert await lease_store.lease_get_by_key(NS, "jobs/a") == second

    async def read_now(tx: Tx) -> int:
        return tx.now_us

    assert await lease_store.db.read(read_now) == fake_clock.now_us()


async def _list(store: LeaseStore, **kw) -> list[tuple[str, int]]:
    kw.setdefault("namespace", NS)
    return [(x.key, x.fencing_token) for x in await store.lease_list(ListLeasesParams(**kw))]


async def test_list_filters_by_prefix_holder_and_state(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    a1 = await grant(lease_store, "jobs/a", "w1", ttl_us=5 * S)
    await grant(lease_store, "jobs/b", "w2", ttl_us=60 * S)
    c = await grant(lease_store, "jobs/c", "w1", ttl_us=60 * S)
    d = await grant(lease_store, "tasks/d", "w2", ttl_us=60 * S)
    await grant(lease_store, "jobs/z", "w1", namespace="other")
    await lease_store.lease_release(release_params(c))
    await lease_store.lease_revoke(RevokeParams(NS, d.lease_id))
    fake_clock.set(a1.expires_at_us)  # jobs/a is past its deadline; nothing recorded it yet
    a2 = await grant(lease_store, "jobs/a", "w3", ttl_us=60 * S)

    assert await _list(lease_store) == [
        ("jobs/a", 1),
        ("jobs/a", 2),
        ("jobs/b", 1),
        ("jobs/c", 1),
        ("tasks/d", 1),
    ]
    assert await _list(lease_store, namespace="other") == [("jobs/z", 1)]
    assert await _list(lease_store, key_prefix="jobs/") == [
        ("jobs/a", 1),
        ("jobs/a", 2),
        ("jobs/b", 1),
        ("jobs/c", 1),
    ]
    assert await _list(lease_store, key_prefix="jobs/a") == [("jobs/a", 1), ("jobs/a", 2)]
    assert await _list(lease_store, holder="w1") == [("jobs/a", 1), ("jobs/c", 1)]
    assert await _list(lease_store, holder="w2", key_prefix="tasks") == [("tasks/d", 1)]
    active = frozenset({LeaseState.ACTIVE})
    assert await _list(lease_store, states=active) == [("jobs/a", 2), ("jobs/b", 1)]
    expired = frozenset({LeaseState.EXPIRED})
    assert await _list(lease_store, states=expired) == [("jobs/a", 1)]
    assert await _list(lease_store, states=frozenset({LeaseState.RELEASED})) == [("jobs/c", 1)]
    assert await _list(lease_store, states=frozenset({LeaseState.REVOKED})) == [("tasks/d", 1)]
    ended = frozenset({LeaseState.RELEASED, LeaseState.REVOKED})
    assert await _list(lease_store, states=ended, holder="w2") == [("tasks/d", 1)]

    # jobs/b is ACTIVE in its row but past its deadline now: listed (and shown) as EXPIRED.
    fake_clock.advance(61)
    listed = await lease_store.lease_list(ListLeasesParams(NS, states=expired))
    assert [(x.key, x.fencing_token) for x in listed] == [
        ("jobs/a", 1),
        ("jobs/a", 2),
        ("jobs/b", 1),
    ]
    assert all(x.state is LeaseState.EXPIRED for x in listed)
    assert listed[1].ended_at_us == a2.expires_at_us
    assert await _list(lease_store, states=active) == []


async def test_list_pages_with_after(lease_store: LeaseStore, fake_clock: FakeClock) -> None:
    for key in ["b", "a", "c", "a"]:
        lease = await grant(lease_store, key, holder="w", ttl_us=S)
        fake_clock.advance(1)
        assert lease.key == key
    expected = [("a", 1), ("a", 2), ("b", 1), ("c", 1)]

    seen: list[tuple[str, int]] = []
    after: tuple[str, int] | None = None
    while True:
        page = await _list(lease_store, limit=1, after=after)
        if not page:
            break
        seen.extend(page)
        after = page[-1]
    assert seen == expected
    assert await _list(lease_store, limit=2, after=("a", 1)) == [("a", 2), ("b", 1)]
    assert await _list(lease_store, limit=10, after=("a", 2)) == [("b", 1), ("c", 1)]
    assert await _list(lease_store, limit=10, after=("c", 1)) == []


async def test_list_prefix_is_case_sensitive_and_literal(lease_store: LeaseStore) -> None:
    for key in ["Jobs/1", "jobs/1", "a%b", "axb", "a_c", "ayc", "a\\d", "ü/1", "u/1"]:
        await grant(lease_store, key)

    assert await _list(lease_store, key_prefix="jobs") == [("jobs/1", 1)]
    assert await _list(lease_store, key_prefix="Jobs") == [("Jobs/1", 1)]
    assert await _list(lease_store, key_prefix="JOBS") == []
    assert await _list(lease_store, key_prefix="a%") == [("a%b", 1)]
    assert await _list(lease_store, key_prefix="a_") == [("a_c", 1)]
    assert await _list(lease_store, key_prefix="a\\") == [("a\\d", 1)]
    assert await _list(lease_store, key_prefix="%") == []
    assert await _list(lease_store, key_prefix="_") == []
    assert await _list(lease_store, key_prefix="ü") == [("ü/1", 1)]


async def test_stream_attach_and_detach(lease_store: LeaseStore) -> None:
    a = await grant(lease_store, "k/a")
    b = await grant(lease_store, "k/b")
    c = await grant(lease_store, "k/c")
    assert not a.stream_attached

    outcomes = await lease_store.lease_renew_many(
        NS, [Renewal(a.lease_id, 1), Renewal(b.lease_id, 1), Renewal(c.lease_id, 5)], "stream-1"
    )
    assert [type(o) for o in outcomes] == [Renewed, Renewed, errors.StaleFencingToken]
    listed = await lease_store.lease_list(ListLeasesParams(NS))
    attached = {x.key: x.stream_attached for x in listed}
    assert attached == {"k/a": True, "k/b": True, "k/c": False}
    # A plain renewal keeps the stream attached.
    await lease_store.lease_renew(NS, Renewal(a.lease_id, 1))
    assert (await lease_store.lease_get(NS, a.lease_id)).stream_attached

    # Ending a lease detaches it.
    assert not (await lease_store.lease_release(release_params(b))).stream_attached
    assert not (await lease_store.lease_get(NS, b.lease_id)).stream_attached

    assert await lease_store.lease_detach_stream("stream-1") == 1
    assert await lease_store.lease_detach_stream("stream-1") == 0
    assert await lease_store.lease_detach_stream("never-opened") == 0
    assert not (await lease_store.lease_get(NS, a.lease_id)).stream_attached

    await lease_store.lease_renew_many(NS, [Renewal(a.lease_id, 1)], "stream-2")
    await lease_store.lease_renew_many(NS, [Renewal(c.lease_id, 1)], "stream-3")
    assert await lease_store.lease_detach_stream("stream-2") == 1
    assert (await lease_store.lease_get(NS, c.lease_id)).stream_attached
    assert await lease_store.lease_detach_all_streams() == 1
    assert not (await lease_store.lease_get(NS, c.lease_id)).stream_attached


# ---- watch log ----------------------------------------------------------------------


async def test_events_since_orders_and_filters(lease_store: LeaseStore) -> None:
    a = await grant(lease_store, "jobs/a")  # 1
    await grant(lease_store, "jobs/a", namespace="other")  # 2
    b = await grant(lease_store, "tasks/b")  # 3
    await lease_store.lease_release(release_params(a))  # 4
    await lease_store.lease_revoke(RevokeParams(NS, b.lease_id))  # 5
    await grant(lease_store, "jobs/ab", holder="w2")  # 6

    page = await lease_store.lease_events_since(NS, "", 0)
    assert [(e.revision, e.type, e.lease.key) for e in page.events] == [
        (1, LeaseEventType.ACQUIRED, "jobs/a"),
        (3, LeaseEventType.ACQUIRED, "tasks/b"),
        (4, LeaseEventType.RELEASED, "jobs/a"),
        (5, LeaseEventType.REVOKED, "tasks/b"),
        (6, LeaseEventType.ACQUIRED, "jobs/ab"),
    ]
    assert (page.header_revision, page.compact_revision) == (6, 0)
    assert [e.revision for e in await events(lease_store, "other")] == [2]
    assert [e.revision for e in await events(lease_store, prefix="jobs/a")] == [1, 4, 6]
    assert [e.revision for e in await events(lease_store, prefix="JOBS")] == []
    assert [e.revision for e in await events(lease_store, start=4)] == [4, 5, 6]
    assert [e.revision for e in await events(lease_store, start=7)] == []
    limited = await lease_store.lease_events_since(NS, "", 0, limit=2)
    assert [e.revision for e in limited.events] == [1, 3]
    assert limited.header_revision == 6


async def test_compaction_purges_and_refuses_old_revisions(lease_store: LeaseStore) -> None:
    for i in range(5):
        await grant(lease_store, f"k/{i}")

    assert await lease_store.lease_events_compact(3) == 3
    assert await lease_store.db.current_revision() == (5, 3)
    for start in (1, 2, 3):
        with pytest.raises(errors.RevisionCompacted) as exc:
            await lease_store.lease_events_since(NS, "", start)
        assert exc.value.metadata["compact_revision"] == "3"
    page = await lease_store.lease_events_since(NS, "", 4)
    assert [e.revision for e in page.events] == [4, 5]
    assert page.compact_revision == 3
    # Compacting to an older revision never moves the mark back.
    assert await lease_store.lease_events_compact(2) == 0
    assert await lease_store.db.current_revision() == (5, 3)
    # New events keep counting from the head.
    lease = await grant(lease_store, "k/new")
    assert lease.create_revision == 6


# ---- fencing and durability ---------------------------------------------------------


async def test_fencing_tokens_strictly_increase_across_every_ending(
    lease_store: LeaseStore, fake_clock: FakeClock
) -> None:
    tokens = []
    lease = await grant(lease_store, holder="h1")
    tokens.append(lease.fencing_token)
    fake_clock.set(lease.expires_at_us)
    await lease_store.lease_expire_due()
    lease = await grant(lease_store, holder="h2")
    tokens.append(lease.fencing_token)
    await lease_store.lease_release(release_params(lease))
    lease = await grant(lease_store, holder="h3")
    tokens.append(lease.fencing_token)
    await lease_store.lease_revoke(RevokeParams(NS, lease.lease_id))
    lease = await grant(lease_store, holder="h4")
    tokens.append(lease.fencing_token)
    fake_clock.set(lease.expires_at_us + 1)
    lease = await grant(lease_store, holder="h5")  # lazy expiry inside acquire
    tokens.append(lease.fencing_token)

    assert tokens == [1, 2, 3, 4, 5]
    history = await lease_store.lease_list(ListLeasesParams(NS))
    assert [x.fencing_token for x in history] == [1, 2, 3, 4, 5]
    assert [x.state for x in history] == [
        LeaseState.EXPIRED,
        LeaseState.RELEASED,
        LeaseState.REVOKED,
        LeaseState.EXPIRED,
        LeaseState.ACTIVE,
    ]


async def test_state_survives_a_restart(
    database: Database, db_url: str, fake_clock: FakeClock
) -> None:
    store = LeaseStore(database)
    a = await grant(store, "k/a")
    b = await grant(store, "k/b")
    await store.lease_renew(NS, Renewal(a.lease_id, 1, b"progress"))
    await store.lease_release(release_params(b))
    b2 = await grant(store, "k/b", holder="w2", request_id="r-1")
    before = {x.lease_id: x for x in await store.lease_list(ListLeasesParams(NS))}
    head = await database.current_revision()
    await database.dispose()

    reopened = Database(db_url, fake_clock)
    try:
        await reopened.migrate()
        store = LeaseStore(reopened)
        after = {x.lease_id: x for x in await store.lease_list(ListLeasesParams(NS))}
        assert after == before
        assert after[a.lease_id].progress == b"progress"
        assert await reopened.current_revision() == head
        assert [e.revision for e in await events(store)] == list(range(1, head[0] + 1))
        # Idempotency and fencing continue where they left off.
        retried = await store.lease_acquire(params("k/b", "w2", request_id="r-1"))
        assert retried == AcquireResult(b2, created=False)
        await store.lease_release(release_params(b2))
        assert (await grant(store, "k/b", holder="w3")).fencing_token == 3
        # Revisions continue from the head: release, acquire, then this acquire.
        assert (await grant(store, "k/c")).create_revision == head[0] + 3
    finally:
        await reopened.dispose()


async def test_compaction_past_the_head_does_not_hide_future_events(
    lease_store: LeaseStore,
) -> None:
    # Regression: a compaction mark beyond the head refused events written afterwards.
    await grant(lease_store, "k/0")
    with contextlib.suppress(errors.TetherError):  # refusing is fine too
        await lease_store.lease_events_compact(100)
    later = await grant(lease_store, "k/1")

    page = await lease_store.lease_events_since(NS, "", later.create_revision)
    assert [e.lease.lease_id for e in page.events] == [later.lease_id]


async def test_list_orders_keys_by_code_point_on_every_backend(lease_store: LeaseStore) -> None:
    """Same order as SQLite's BINARY collation (PostgreSQL with a C collation)."""
    for key in ["b", "é", "B", "a", "a-b", "a/b", "ab", "A"]:
        await grant(lease_store, key)
    keys = [key for key, _ in await _list(lease_store)]
    assert keys == sorted(keys)
    assert keys == ["A", "B", "a", "a-b", "a/b", "ab", "b", "é"]


async def test_only_the_acquiring_principal_may_renew_or_release(lease_store: LeaseStore) -> None:
    lease = await lease_store.lease_acquire(AcquireParams(NS, "bound", "w", "alice", 10 * S))
    assert isinstance(lease, AcquireResult)
    held = lease.lease
    (outcome,) = await lease_store.lease_renew_many(
        NS, [Renewal(held.lease_id, held.fencing_token, b"x", principal="mallory")]
    )
    assert isinstance(outcome, errors.NotLeaseHolder)
    with pytest.raises(errors.NotLeaseHolder):
        await lease_store.lease_release(
            ReleaseParams(NS, held.lease_id, held.fencing_token, "w", principal="mallory")
        )
    after = await lease_store.lease_get(NS, held.lease_id)
    assert after.state is LeaseState.ACTIVE
    assert after.expires_at_us == held.expires_at_us
    assert after.progress == b""
