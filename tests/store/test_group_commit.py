"""Group commit on both backends: writes that arrive together share one transaction, each
unit in its own savepoint (one refusal or failure never undoes the others), renewals of many
requests merge into one, and revisions stay contiguous."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tether_server.clock import FakeClock
from tether_server.domain import errors
from tether_server.domain.lease import ANONYMOUS, LeaseState
from tether_server.store.database import Database
from tether_server.store.leases import (
    AcquireParams,
    AcquireResult,
    LeaseStore,
    ReleaseParams,
    Renewal,
    Renewed,
)
from tether_server.store.leases.keys import lock as lock_key
from tether_server.store.sql import sql
from tether_server.store.tx import Tx

S = 1_000_000
NS = "default"
_KEY_ROW = sql("SELECT count(*) FROM lease_keys WHERE key = $1")


def params(key: str, holder: str = "w") -> AcquireParams:
    return AcquireParams(NS, key, holder, ANONYMOUS, 10 * S)


@pytest.fixture
def batch_sizes(database: Database) -> list[int]:
    sizes: list[int] = []
    database.on_batch = lambda size, _seconds: sizes.append(size)
    return sizes


async def test_writes_that_arrive_together_share_one_transaction(
    lease_store: LeaseStore, batch_sizes: list[int]
) -> None:
    results = await asyncio.gather(
        *(lease_store.lease_acquire(params(f"k/{i}")) for i in range(40))
    )
    assert all(isinstance(r, AcquireResult) and r.created for r in results)
    # All forty were queued before the committer first ran: one batch, one commit.
    assert batch_sizes == [40]
    revisions = sorted(r.lease.create_revision for r in results if isinstance(r, AcquireResult))
    assert revisions == list(range(1, 41))


async def test_a_failing_unit_is_undone_alone(
    lease_store: LeaseStore, database: Database, batch_sizes: list[int]
) -> None:
    held = await lease_store.lease_acquire(params("held"))
    assert isinstance(held, AcquireResult)
    batch_sizes.clear()

    async def writes_then_fails(tx: Tx) -> None:
        await lock_key(tx, NS, "ghost")  # creates the key's row
        raise errors.InvalidField("x", "refused after writing")

    async def count_key_rows(tx: Tx, key: str) -> int:
        return int(await tx.fetchval(_KEY_ROW, key))

    outcomes: list[Any] = await asyncio.gather(
        lease_store.lease_acquire(params("a")),
        database.write(writes_then_fails),
        # Refused after its locks (a stale token), like a unit that wrote.
        lease_store.lease_release(ReleaseParams(NS, held.lease.lease_id, 99, "w")),
        lease_store.lease_acquire(params("held", holder="other")),  # LEASE_HELD: a Refuse
        lease_store.lease_acquire(params("b")),
        return_exceptions=True,
    )
    assert batch_sizes == [5]
    first, failed, stale, refused, last = outcomes
    assert isinstance(first, AcquireResult)
    assert isinstance(last, AcquireResult)
    assert isinstance(failed, errors.InvalidField)
    assert isinstance(stale, errors.StaleFencingToken)
    assert not isinstance(refused, AcquireResult | BaseException)
    assert await database.read(lambda tx: count_key_rows(tx, "ghost")) == 0
    assert await database.read(lambda tx: count_key_rows(tx, "a")) == 1
    # Contiguous revisions: the held lease, then the two grants of the batch.
    assert sorted([first.lease.create_revision, last.lease.create_revision]) == [2, 3]
    assert await database.current_revision() == (3, 0)
    assert (await lease_store.lease_get(NS, held.lease.lease_id)).state is LeaseState.ACTIVE


async def test_renewals_of_many_requests_merge_and_keep_their_own_outcomes(
    lease_store: LeaseStore, fake_clock: FakeClock, batch_sizes: list[int]
) -> None:
    granted = [await lease_store.lease_acquire(params(f"r/{i}")) for i in range(3)]
    leases = [g.lease for g in granted if isinstance(g, AcquireResult)]
    batch_sizes.clear()
    fake_clock.advance(1)
    a, b, c = leases
    results = await asyncio.gather(
        lease_store.lease_renew_many(NS, [Renewal(a.lease_id, 1, b"a1")], "stream-1"),
        lease_store.lease_renew_many(NS, [Renewal(b.lease_id, 7), Renewal(c.lease_id, 1)]),
        lease_store.lease_renew_many("other", [Renewal(a.lease_id, 1)], "stream-2"),
        lease_store.lease_renew_many(NS, [Renewal(a.lease_id, 1, b"a2")], "stream-3"),
    )
    assert batch_sizes == [4]
    (ok_a,), (stale_b, ok_c), (wrong_ns,), (again_a,) = results
    assert isinstance(ok_a, Renewed)
    assert ok_a.expires_at_us == fake_clock.now_us() + 10 * S
    assert isinstance(stale_b, errors.StaleFencingToken)
    assert isinstance(ok_c, Renewed)
    assert isinstance(wrong_ns, errors.LeaseNotFound)
    assert isinstance(again_a, Renewed)
    stored = await lease_store.lease_get(NS, a.lease_id)
    # The last successful renewal's progress and stream win.
    assert stored.progress == b"a2"
    assert stored.stream_attached
    assert (await lease_store.lease_get(NS, b.lease_id)).expires_at_us == b.expires_at_us
