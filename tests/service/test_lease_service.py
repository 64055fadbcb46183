"""LeaseService over gRPC: Acquire, Renew, Release, Revoke, GetLease, ListLeases.

Every test runs once per backend. Time moves only when a test advances the fake clock.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tether_client.pb import lease_pb2
from tether_server.domain.lease import Refuse
from tether_server.domain.time import format_us

from .conftest import (
    KEEPALIVE_IDLE_S,
    WAIT_S,
    Harness,
    advance_until_done,
    dur,
    dur_us,
    error_info,
    eventually,
    expect_error,
    ts_us,
)

S = 1_000_000
FP = grpc.StatusCode.FAILED_PRECONDITION
ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
RELEASED = lease_pb2.LEASE_STATE_RELEASED
EXPIRED = lease_pb2.LEASE_STATE_EXPIRED
REVOKED = lease_pb2.LEASE_STATE_REVOKED


def refusals(tether: Harness) -> int:
    return sum(isinstance(outcome, Refuse) for outcome in tether.acquire_outcomes)


# ---- Acquire ------------------------------------------------------------------------


async def test_acquire_grants_a_fully_populated_lease(tether: Harness) -> None:
    now = tether.clock.now_us()
    response = await tether.stub.Acquire(
        lease_pb2.AcquireRequest(
            key="jobs/a",
            holder="worker-1",
            ttl=dur(30),
            lock_delay=dur(5),
            labels={"team": "infra", "example.com/tier": "gold"},
        )
    )
    lease = response.lease
    assert response.created is True
    assert lease.namespace == "default"
    assert lease.key == "jobs/a"
    assert lease.holder == "worker-1"
    assert lease.lease_id
    assert lease.fencing_token == 1
    assert lease.state == ACTIVE
    assert dur_us(lease.ttl) == 30 * S
    assert dur_us(lease.lock_delay) == 5 * S
    assert ts_us(lease.acquired_at) == now
    assert ts_us(lease.renewed_at) == now
    assert ts_us(lease.expires_at) == ts_us(lease.acquired_at) + 30 * S
    assert dict(lease.labels) == {"team": "infra", "example.com/tier": "gold"}
    assert not lease.HasField("ended_at")
    assert lease.progress == b""
    assert lease.principal
    assert lease.create_revision > 0
    assert lease.mod_revision == lease.create_revision
    assert lease.heartbeat_stream_attached is False
    # What was granted is what is stored.
    assert await tether.get(lease.lease_id) == lease


async def test_same_holder_gets_its_live_lease_back(tether: Harness) -> None:
    first = await tether.stub.Acquire(
        lease_pb2.AcquireRequest(key="jobs/a", holder="w1", ttl=dur(10))
    )
    tether.clock.advance(3)
    again = await tether.stub.Acquire(
        lease_pb2.AcquireRequest(key="jobs/a", holder="w1", ttl=dur(10))
    )
    assert again.created is False
    assert again.lease == first.lease
    leases = await tether.list_all()
    assert [lease.lease_id for lease in leases] == [first.lease.lease_id]


async def test_other_holder_is_refused_with_lease_held(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=10)
    before = await tether.snapshot()
    metadata = await expect_error(
        tether.stub.Acquire(lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10))),
        FP,
        "LEASE_HELD",
    )
    assert metadata["holder"] == "w1"
    assert metadata["expires_at"] == format_us(ts_us(lease.expires_at))
    assert await tether.snapshot() == before


async def test_request_id_retry_returns_the_first_result(tether: Harness) -> None:
    request = lease_pb2.AcquireRequest(key="jobs/a", holder="w1", ttl=dur(10), request_id="req-1")
    first = await tether.stub.Acquire(request)
    assert first.created is True
    tether.clock.advance(1)
    retried = await tether.stub.Acquire(request)
    assert retried.created is False
    assert retried.lease == first.lease
    # Still the first result after the lease ended: a retry never grants a second lease.
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=first.lease.lease_id, fencing_token=first.lease.fencing_token, holder="w1"
        )
    )
    late = await tether.stub.Acquire(request)
    assert late.created is False
    assert late.lease.lease_id == first.lease.lease_id
    assert len(await tether.list_all()) == 1


async def test_request_id_reused_for_another_key_conflicts(tether: Harness) -> None:
    await tether.acquire("jobs/a", "w1", request_id="req-1")
    before = await tether.snapshot()
    metadata = await expect_error(
        tether.stub.Acquire(
            lease_pb2.AcquireRequest(key="jobs/b", holder="w1", ttl=dur(10), request_id="req-1")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_CONFLICT",
    )
    assert metadata["request_id"] == "req-1"
    assert await tether.snapshot() == before


async def test_lock_delay_after_expiry_until_deadline_plus_delay(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=5, lock_delay=dur(10))
    deadline = ts_us(lease.expires_at)
    tether.clock.set(deadline + 1 * S)
    request = lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(5))
    metadata = await expect_error(tether.stub.Acquire(request), FP, "LOCK_DELAY")
    assert metadata["available_at"] == format_us(deadline + 10 * S)
    # The refusal recorded the expiry; the key stays unavailable until deadline + delay.
    assert (await tether.get(lease.lease_id)).state == EXPIRED
    tether.clock.set(deadline + 10 * S - 1)
    await expect_error(tether.stub.Acquire(request), FP, "LOCK_DELAY")
    tether.clock.set(deadline + 10 * S)
    granted = await tether.stub.Acquire(request)
    assert granted.created is True
    assert granted.lease.holder == "w2"
    assert granted.lease.fencing_token == 2


async def test_lock_delay_also_applies_after_the_expiry_loop_recorded_it(
    tether: Harness,
) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=5, lock_delay=dur(10))
    deadline = ts_us(lease.expires_at)
    tether.clock.set(deadline)
    result = await tether.server.expiry.run_once()
    assert [expired.lease_id for expired in result.expired] == [lease.lease_id]
    tether.clock.set(deadline + 9 * S)
    request = lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(5))
    await expect_error(tether.stub.Acquire(request), FP, "LOCK_DELAY")
    tether.clock.set(deadline + 10 * S)
    assert (await tether.stub.Acquire(request)).lease.holder == "w2"


async def test_waiting_acquire_succeeds_when_the_holder_releases(tether: Harness) -> None:
    held = await tether.acquire("jobs/a", "w1", ttl_s=600)
    waiter = asyncio.ensure_future(
        tether.stub.Acquire(
            lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10), wait=dur(10)),
            timeout=WAIT_S,
        )
    )
    # The waiter has been refused once and is now waiting.
    await eventually(lambda: refusals(tether) >= 1, "the waiter's first attempt")
    assert not waiter.done()
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=held.lease_id, fencing_token=held.fencing_token, holder="w1"
        )
    )
    response = await asyncio.wait_for(waiter, WAIT_S)
    assert response.created is True
    assert response.lease.holder == "w2"
    assert response.lease.fencing_token == held.fencing_token + 1


async def test_waiting_acquire_times_out_with_wait_timeout(tether: Harness) -> None:
    held = await tether.acquire("jobs/a", "w1", ttl_s=3600)
    started = tether.clock.now_us()
    waiter = asyncio.ensure_future(
        tether.stub.Acquire(
            lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10), wait=dur(10)),
            timeout=WAIT_S,
        )
    )
    await eventually(lambda: refusals(tether) >= 1, "the waiter's first attempt")
    assert not waiter.done()
    await advance_until_done(
        tether.clock, waiter, step_s=1, max_steps=60, progress=lambda: refusals(tether)
    )
    # It gave up no earlier than its wait and long before the holder's deadline.
    assert tether.clock.now_us() - started >= 10 * S
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        waiter.result()
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "WAIT_TIMEOUT")
    assert metadata["holder"] == "w1"
    assert metadata["cause"] == "LEASE_HELD"
    assert metadata["expires_at"] == format_us(ts_us(held.expires_at))
    assert [lease.holder for lease in await tether.list_all()] == ["w1"]


async def test_waiting_acquire_gets_the_key_when_the_holder_expires(tether: Harness) -> None:
    held = await tether.acquire("jobs/a", "w1", ttl_s=5)
    waiter = asyncio.ensure_future(
        tether.stub.Acquire(
            lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10), wait=dur(30)),
            timeout=WAIT_S,
        )
    )
    await eventually(lambda: refusals(tether) >= 1, "the waiter's first attempt")
    assert not waiter.done()
    advanced = await advance_until_done(
        tether.clock, waiter, step_s=1, max_steps=30, progress=lambda: refusals(tether)
    )
    assert advanced >= 5
    response = waiter.result()
    assert response.lease.holder == "w2"
    assert response.lease.fencing_token == held.fencing_token + 1
    # Granted no earlier than the holder's deadline.
    assert ts_us(response.lease.acquired_at) >= ts_us(held.expires_at)
    old = await tether.get(held.lease_id)
    assert old.state == EXPIRED
    assert ts_us(old.ended_at) == ts_us(held.expires_at)


# ---- Renew --------------------------------------------------------------------------


async def test_renew_extends_the_deadline_to_now_plus_ttl(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=10)
    tether.clock.advance(4)
    now = tether.clock.now_us()
    renewed = await tether.stub.Renew(
        lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
    )
    assert renewed.lease_id == lease.lease_id
    assert renewed.fencing_token == lease.fencing_token
    assert ts_us(renewed.expires_at) == now + 10 * S
    assert dur_us(renewed.ttl) == 10 * S
    stored = await tether.get(lease.lease_id)
    assert ts_us(stored.expires_at) == now + 10 * S
    assert ts_us(stored.renewed_at) == now
    assert stored.state == ACTIVE
    # Alive past its original deadline.
    tether.clock.advance(8)
    assert (await tether.get(lease.lease_id)).state == ACTIVE


async def test_renew_stores_progress_and_unset_progress_keeps_it(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    ident = {"lease_id": lease.lease_id, "fencing_token": lease.fencing_token}
    await tether.stub.Renew(lease_pb2.RenewRequest(progress=b"step 3 of 7", **ident))
    assert (await tether.get(lease.lease_id)).progress == b"step 3 of 7"
    await tether.stub.Renew(lease_pb2.RenewRequest(**ident))
    assert (await tether.get(lease.lease_id)).progress == b"step 3 of 7"
    # Explicitly empty progress is a value, not "unset".
    await tether.stub.Renew(lease_pb2.RenewRequest(progress=b"", **ident))
    assert (await tether.get(lease.lease_id)).progress == b""


async def test_renew_after_the_deadline_never_resurrects(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=10)
    tether.clock.set(ts_us(lease.expires_at))  # the deadline itself is already too late
    metadata = await expect_error(
        tether.stub.Renew(
            lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        ),
        FP,
        "LEASE_EXPIRED",
    )
    assert metadata["lease_id"] == lease.lease_id
    stored = await tether.get(lease.lease_id)
    assert stored.state == EXPIRED
    assert ts_us(stored.expires_at) == ts_us(lease.expires_at)
    assert ts_us(stored.renewed_at) == ts_us(lease.renewed_at)
    # Still expired once the loop records it, with the original deadline.
    tether.clock.advance(1)
    await tether.server.expiry.run_once()
    stored = await tether.get(lease.lease_id)
    assert stored.state == EXPIRED
    assert ts_us(stored.expires_at) == ts_us(lease.expires_at)
    await expect_error(
        tether.stub.Renew(
            lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        ),
        FP,
        "LEASE_EXPIRED",
    )


async def test_renew_with_a_wrong_token_is_stale(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    metadata = await expect_error(
        tether.stub.Renew(
            lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token + 1)
        ),
        FP,
        "STALE_FENCING_TOKEN",
    )
    assert metadata["current_token"] == str(lease.fencing_token)
    assert ts_us((await tether.get(lease.lease_id)).expires_at) == ts_us(lease.expires_at)


async def test_renew_unknown_lease_is_not_found(tether: Harness) -> None:
    await expect_error(
        tether.stub.Renew(lease_pb2.RenewRequest(lease_id="0" * 32, fencing_token=1)),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )


async def test_renew_released_lease_is_refused(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w1"
        )
    )
    await expect_error(
        tether.stub.Renew(
            lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        ),
        FP,
        "LEASE_RELEASED",
    )


async def test_renew_from_another_namespace_is_not_found(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", namespace="team-a")
    assert lease.namespace == "team-a"
    for namespace in ("", "team-b"):
        await expect_error(
            tether.stub.Renew(
                lease_pb2.RenewRequest(
                    namespace=namespace,
                    lease_id=lease.lease_id,
                    fencing_token=lease.fencing_token,
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "LEASE_NOT_FOUND",
        )
    assert ts_us((await tether.get(lease.lease_id, "team-a")).expires_at) == ts_us(lease.expires_at)
    await expect_error(
        tether.stub.GetLease(lease_pb2.GetLeaseRequest(lease_id=lease.lease_id)),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )


# ---- Release and Revoke -------------------------------------------------------------


async def test_release_is_for_the_holder_only(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    before = await tether.snapshot()
    metadata = await expect_error(
        tether.stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w2"
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_LEASE_HOLDER",
    )
    assert metadata["holder"] == "w1"
    assert await tether.snapshot() == before


async def test_release_with_a_stale_token_is_refused(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    await expect_error(
        tether.stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token + 1, holder="w1"
            )
        ),
        FP,
        "STALE_FENCING_TOKEN",
    )
    assert (await tether.get(lease.lease_id)).state == ACTIVE


async def test_release_is_idempotent_and_frees_the_key(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", lock_delay=dur(30))
    request = lease_pb2.ReleaseRequest(
        lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w1"
    )
    tether.clock.advance(2)
    first = (await tether.stub.Release(request)).lease
    assert first.state == RELEASED
    assert ts_us(first.ended_at) == tether.clock.now_us()
    assert first.mod_revision > lease.mod_revision
    revision = await tether.server.db.current_revision()
    tether.clock.advance(1)
    second = (await tether.stub.Release(request)).lease
    assert second == first
    assert await tether.server.db.current_revision() == revision  # no second event
    # A voluntary release frees the key at once, lock-delay or not.
    after = await tether.acquire("jobs/a", "w2")
    assert after.fencing_token > lease.fencing_token


async def test_revoke_ends_the_lease_and_applies_lock_delay_from_now(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=60, lock_delay=dur(10))
    tether.clock.advance(5)
    revoked_at = tether.clock.now_us()
    revoked = (
        await tether.stub.Revoke(
            lease_pb2.RevokeRequest(lease_id=lease.lease_id, reason="stuck worker")
        )
    ).lease
    assert revoked.state == REVOKED
    assert ts_us(revoked.ended_at) == revoked_at
    assert await tether.get(lease.lease_id) == revoked
    ident = {"lease_id": lease.lease_id, "fencing_token": lease.fencing_token}
    await expect_error(tether.stub.Renew(lease_pb2.RenewRequest(**ident)), FP, "LEASE_REVOKED")
    request = lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(5))
    metadata = await expect_error(tether.stub.Acquire(request), FP, "LOCK_DELAY")
    assert metadata["available_at"] == format_us(revoked_at + 10 * S)
    tether.clock.set(revoked_at + 10 * S - 1)
    await expect_error(tether.stub.Acquire(request), FP, "LOCK_DELAY")
    tether.clock.set(revoked_at + 10 * S)
    granted = (await tether.stub.Acquire(request)).lease
    assert granted.fencing_token == lease.fencing_token + 1
    # Revoking again is idempotent.
    again = (await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id))).lease
    assert again == revoked


# ---- GetLease and ListLeases --------------------------------------------------------


async def test_get_lease_by_id_and_by_key(tether: Harness) -> None:
    first = await tether.acquire("jobs/a", "w1")
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=first.lease_id, fencing_token=first.fencing_token, holder="w1"
        )
    )
    second = await tether.acquire("jobs/a", "w2")
    by_key = (await tether.stub.GetLease(lease_pb2.GetLeaseRequest(key="jobs/a"))).lease
    assert by_key == second
    by_id = await tether.get(first.lease_id)
    assert by_id.lease_id == first.lease_id
    assert by_id.state == RELEASED
    await expect_error(
        tether.stub.GetLease(lease_pb2.GetLeaseRequest(key="jobs/none")),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    )


async def test_list_filters_by_prefix_holder_and_state(tether: Harness) -> None:
    a = await tether.acquire("jobs/a", "w1", ttl_s=100)
    b = await tether.acquire("jobs/b", "w2", ttl_s=100)
    c = await tether.acquire("jobs/c", "w1", ttl_s=5)
    d = await tether.acquire("other/d", "w1", ttl_s=100)
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(lease_id=b.lease_id, fencing_token=b.fencing_token, holder="w2")
    )
    tether.clock.advance(10)  # c passes its deadline; the expiry loop does not run

    async def ids(**filters: object) -> list[str]:
        return [lease.lease_id for lease in await tether.list_all(**filters)]

    assert await ids() == [a.lease_id, b.lease_id, c.lease_id, d.lease_id]
    assert await ids(key_prefix="jobs/") == [a.lease_id, b.lease_id, c.lease_id]
    assert await ids(key_prefix="jobs/b") == [b.lease_id]
    assert await ids(key_prefix="JOBS/") == []
    assert await ids(holder="w1") == [a.lease_id, c.lease_id, d.lease_id]
    assert await ids(holder="w2", key_prefix="other/") == []
    assert await ids(states=[ACTIVE]) == [a.lease_id, d.lease_id]
    assert await ids(states=[EXPIRED]) == [c.lease_id]
    assert await ids(states=[RELEASED]) == [b.lease_id]
    assert await ids(states=[RELEASED, EXPIRED]) == [b.lease_id, c.lease_id]
    assert await ids(states=[REVOKED]) == []
    assert await ids(states=[ACTIVE], holder="w1", key_prefix="jobs/") == [a.lease_id]
    listed = {lease.lease_id: lease for lease in await tether.list_all()}
    assert listed[c.lease_id].state == EXPIRED
    assert ts_us(listed[c.lease_id].ended_at) == ts_us(c.expires_at)
    assert listed[a.lease_id].state == ACTIVE
    # The same after the loop records the expiry.
    await tether.server.expiry.run_once()
    assert await ids(states=[EXPIRED]) == [c.lease_id]
    assert await ids(states=[ACTIVE]) == [a.lease_id, d.lease_id]


async def test_list_namespaces_are_separate(tether: Harness) -> None:
    a = await tether.acquire("jobs/a", "w1", namespace="team-a")
    b = await tether.acquire("jobs/a", "w2", namespace="team-b")
    assert [x.lease_id for x in await tether.list_all(namespace="team-a")] == [a.lease_id]
    assert [x.lease_id for x in await tether.list_all(namespace="team-b")] == [b.lease_id]
    assert await tether.list_all() == []


async def test_list_pagination_walks_every_lease_once(tether: Harness) -> None:
    expected = set()
    for index in range(7):
        lease = await tether.acquire(f"jobs/{index % 3}/{index}", f"w{index}")
        expected.add(lease.lease_id)
    # A second lease on one key: pages are ordered by (key, token), not by key alone.
    first = await tether.acquire("jobs/dup", "x")
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(lease_id=first.lease_id, fencing_token=1, holder="x")
    )
    second = await tether.acquire("jobs/dup", "y")
    expected |= {first.lease_id, second.lease_id}
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = await tether.stub.ListLeases(
            lease_pb2.ListLeasesRequest(key_prefix="jobs/", page_size=2, page_token=token)
        )
        pages += 1
        assert len(response.leases) <= 2
        seen.extend(lease.lease_id for lease in response.leases)
        token = response.next_page_token
        if not token:
            break
        assert pages < 20
    assert len(seen) == len(set(seen)), "a lease was listed twice"
    assert set(seen) == expected
    assert pages == 5  # 9 leases, 2 per page
    assert seen == [lease.lease_id for lease in await tether.list_all(key_prefix="jobs/")]


async def test_list_shows_heartbeat_stream_attached_while_the_stream_is_open(
    tether: Harness,
) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    other = await tether.acquire("jobs/b", "w1")
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    await call.write(
        lease_pb2.KeepAliveRequest(
            sequence=1,
            renewals=[
                lease_pb2.KeepAliveRenewal(
                    lease_id=lease.lease_id, fencing_token=lease.fencing_token
                )
            ],
        )
    )
    response = await call.read()
    assert response.results[0].HasField("expires_at")

    async def attached() -> dict[str, bool]:
        return {x.lease_id: x.heartbeat_stream_attached for x in await tether.list_all()}

    assert await attached() == {lease.lease_id: True, other.lease_id: False}
    assert (await tether.get(lease.lease_id)).heartbeat_stream_attached is True
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    await eventually(
        lambda: _detached(tether, lease.lease_id), "the stream to be detached", within=5
    )
    assert await attached() == {lease.lease_id: False, other.lease_id: False}
    # Closing the stream never ends the lease early.
    assert (await tether.get(lease.lease_id)).state == ACTIVE
    assert KEEPALIVE_IDLE_S > 0


async def _detached(tether: Harness, lease_id: str) -> bool:
    return not (await tether.get(lease_id)).heartbeat_stream_attached


# ---- Fencing tokens -----------------------------------------------------------------


async def test_fencing_tokens_strictly_increase_across_every_way_a_lease_ends(
    tether: Harness,
) -> None:
    tokens = []
    first = await tether.acquire("jobs/a", "w1", ttl_s=5)
    tokens.append(first.fencing_token)
    tether.clock.advance(6)
    await tether.server.expiry.run_once()
    assert (await tether.get(first.lease_id)).state == EXPIRED
    second = await tether.acquire("jobs/a", "w2", ttl_s=5)
    tokens.append(second.fencing_token)
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=second.lease_id, fencing_token=second.fencing_token, holder="w2"
        )
    )
    third = await tether.acquire("jobs/a", "w1", ttl_s=5)
    tokens.append(third.fencing_token)
    # Lazy expiry (the loop does not run) and then a revoke.
    tether.clock.advance(6)
    fourth = await tether.acquire("jobs/a", "w3", ttl_s=5)
    tokens.append(fourth.fencing_token)
    await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=fourth.lease_id))
    fifth = await tether.acquire("jobs/a", "w3", ttl_s=5)
    tokens.append(fifth.fencing_token)
    assert tokens == sorted(set(tokens)), tokens
    assert tokens[0] == 1
    # The old holders are fenced out.
    for old in (first, second, third, fourth):
        await expect_error(
            tether.stub.Renew(
                lease_pb2.RenewRequest(lease_id=old.lease_id, fencing_token=old.fencing_token)
            ),
            FP,
            {
                first.lease_id: "LEASE_EXPIRED",
                second.lease_id: "LEASE_RELEASED",
                third.lease_id: "LEASE_EXPIRED",
                fourth.lease_id: "LEASE_REVOKED",
            }[old.lease_id],
        )


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"key": "jobs/b"}, id="other-key"),
        pytest.param({"holder": "w2"}, id="other-holder"),
        pytest.param({"ttl": dur(60)}, id="other-ttl"),
        pytest.param({"labels": {"team": "b"}}, id="other-labels"),
        pytest.param({"lock_delay": dur(5)}, id="other-lock-delay"),
    ],
)
async def test_request_id_reused_with_different_content_conflicts(
    tether: Harness, changed: dict[str, object]
) -> None:
    """common.proto: REQUEST_ID_CONFLICT is "a request id ... reused with different
    content"; a silent "first result" would hand back a lease unlike the one asked for."""
    first = {
        "key": "jobs/a",
        "holder": "w1",
        "ttl": dur(10),
        "labels": {"team": "a"},
        "request_id": "req-1",
    }
    await tether.stub.Acquire(lease_pb2.AcquireRequest(**first))  # type: ignore[arg-type]
    before = await tether.snapshot()
    await expect_error(
        tether.stub.Acquire(lease_pb2.AcquireRequest(**{**first, **changed})),  # type: ignore[arg-type]
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_CONFLICT",
    )
    assert await tether.snapshot() == before


async def test_request_id_retry_after_returning_an_existing_lease(tether: Harness) -> None:
    held = await tether.acquire("jobs/a", "w1")
    request = lease_pb2.AcquireRequest(
        key="jobs/a", holder="w1", ttl=dur(10), request_id="req-again"
    )
    first = await tether.stub.Acquire(request)
    assert (first.created, first.lease.lease_id) == (False, held.lease_id)
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=held.lease_id, fencing_token=held.fencing_token, holder="w1"
        )
    )
    # The same request delivered again (a client retry, a duplicated message).
    retried = await tether.stub.Acquire(request)
    assert retried.lease.lease_id == first.lease.lease_id
    assert retried.created is False
    assert len(await tether.list_all(states=[ACTIVE])) == 0


async def test_waiting_acquire_gets_the_key_when_the_lock_delay_ends(tether: Harness) -> None:
    held = await tether.acquire("jobs/a", "w1", ttl_s=5, lock_delay=dur(10))
    deadline = ts_us(held.expires_at)
    waiter = asyncio.ensure_future(
        tether.stub.Acquire(
            lease_pb2.AcquireRequest(key="jobs/a", holder="w2", ttl=dur(10), wait=dur(60)),
            timeout=WAIT_S,
        )
    )
    await eventually(lambda: refusals(tether) >= 1, "the waiter's first attempt")
    await advance_until_done(
        tether.clock, waiter, step_s=1, max_steps=40, progress=lambda: refusals(tether)
    )
    granted = waiter.result().lease
    assert granted.holder == "w2"
    assert ts_us(granted.acquired_at) >= deadline + 10 * S
    reasons = [type(o.error).__name__ for o in tether.acquire_outcomes if isinstance(o, Refuse)]
    assert reasons[0] == "LeaseHeld"
    assert "LockDelay" in reasons
