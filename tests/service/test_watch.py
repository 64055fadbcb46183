"""LeaseService.Watch: lease events in revision order, resumable, filtered, compactable."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from sqlalchemy.engine import make_url

from tether_client.pb import lease_pb2
from tether_server.store.tx import Tx

from .conftest import WAIT_S, Harness, error_info, eventually, ts_us

ACQUIRED = lease_pb2.LEASE_EVENT_TYPE_ACQUIRED
RELEASED = lease_pb2.LEASE_EVENT_TYPE_RELEASED
EXPIRED = lease_pb2.LEASE_EVENT_TYPE_EXPIRED
REVOKED = lease_pb2.LEASE_EVENT_TYPE_REVOKED


async def open_watch(
    tether: Harness, start_revision: int = 0, **fields: object
) -> tuple[grpc.aio.UnaryStreamCall, lease_pb2.WatchResponse]:
    """Start a watch and return it with its first (header-only) message."""
    call = tether.stub.Watch(
        lease_pb2.WatchRequest(start_revision=start_revision, **fields),  # type: ignore[arg-type]
        timeout=WAIT_S * 3,
    )
    header = await asyncio.wait_for(call.read(), WAIT_S)
    assert header is not grpc.aio.EOF
    assert list(header.events) == [], "the first message only confirms the watch"
    return call, header


async def read_events(call: grpc.aio.UnaryStreamCall, count: int) -> list[lease_pb2.LeaseEvent]:
    events: list[lease_pb2.LeaseEvent] = []
    while len(events) < count:
        message = await asyncio.wait_for(call.read(), WAIT_S)
        assert message is not grpc.aio.EOF, f"stream ended after {len(events)} events"
        assert list(message.events), "only the first message may carry no events"
        events.extend(message.events)
    assert len(events) == count, f"got {len(events)} events, expected {count}"
    return events


def summary(events: list[lease_pb2.LeaseEvent]) -> list[tuple[int, str, int]]:
    return [(e.type, e.lease.key, e.lease.fencing_token) for e in events]


async def make_history(tether: Harness) -> list[lease_pb2.Lease]:
    """ACQUIRED, RELEASED, ACQUIRED, EXPIRED (loop), ACQUIRED, REVOKED: six events."""
    a = await tether.acquire("jobs/a", "w1", ttl_s=100)
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(lease_id=a.lease_id, fencing_token=a.fencing_token, holder="w1")
    )
    b = await tether.acquire("jobs/b", "w2", ttl_s=5)
    tether.clock.advance(6)
    result = await tether.server.expiry.run_once()
    assert [lease.lease_id for lease in result.expired] == [b.lease_id]
    c = await tether.acquire("jobs/c", "w3", ttl_s=100)
    await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=c.lease_id, reason="test"))
    return [a, b, c]


EXPECTED_HISTORY = [
    (ACQUIRED, "jobs/a", 1),
    (RELEASED, "jobs/a", 1),
    (ACQUIRED, "jobs/b", 1),
    (EXPIRED, "jobs/b", 1),
    (ACQUIRED, "jobs/c", 1),
    (REVOKED, "jobs/c", 1),
]


async def test_watch_from_now_delivers_live_events_in_revision_order(tether: Harness) -> None:
    before = await tether.acquire("jobs/before", "w0")
    call, header = await open_watch(tether)
    current, _ = await tether.server.db.current_revision()
    assert header.header_revision == current
    assert tether.server.metrics.watch_streams_open == 1
    a, b, c = await make_history(tether)
    events = await read_events(call, 6)
    assert summary(events) == EXPECTED_HISTORY
    revisions = [event.revision for event in events]
    assert revisions == sorted(set(revisions))
    assert revisions[0] > header.header_revision
    assert before.lease_id not in {event.lease.lease_id for event in events}
    # Each event carries the lease as the event left it.
    states = [event.lease.state for event in events]
    assert states == [
        lease_pb2.LEASE_STATE_ACTIVE,
        lease_pb2.LEASE_STATE_RELEASED,
        lease_pb2.LEASE_STATE_ACTIVE,
        lease_pb2.LEASE_STATE_EXPIRED,
        lease_pb2.LEASE_STATE_ACTIVE,
        lease_pb2.LEASE_STATE_REVOKED,
    ]
    assert [event.lease.lease_id for event in events] == [
        a.lease_id,
        a.lease_id,
        b.lease_id,
        b.lease_id,
        c.lease_id,
        c.lease_id,
    ]
    for event in events:
        assert event.lease.mod_revision == event.revision
    assert ts_us(events[3].lease.ended_at) == ts_us(b.expires_at)
    assert ts_us(events[3].occurred_at) == tether.clock.now_us()
    call.cancel()
    await eventually(lambda: tether.server.metrics.watch_streams_open == 0, "watch closed")


async def test_resume_from_any_revision_has_no_gaps_or_duplicates(tether: Harness) -> None:
    await make_history(tether)
    # Events of another namespace interleave; they take revisions but are not ours.
    await tether.acquire("jobs/x", "w9", namespace="team-a")
    d = await tether.acquire("jobs/d", "w4")
    call, _ = await open_watch(tether, start_revision=1)
    full = await read_events(call, 7)
    call.cancel()
    assert summary(full) == [*EXPECTED_HISTORY, (ACQUIRED, "jobs/d", 1)]
    assert full[-1].lease.lease_id == d.lease_id
    revisions = [event.revision for event in full]
    assert revisions == [1, 2, 3, 4, 5, 6, 8]
    for start in range(1, 11):
        call, header = await open_watch(tether, start_revision=start)
        assert header.header_revision == full[-1].revision
        expected = [event for event in full if event.revision >= start]
        got = await read_events(call, len(expected)) if expected else []
        assert got == expected, f"resumed from {start}"
        # Live events continue right after the backlog.
        if start == 3:
            await tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=d.lease_id))
            (live,) = await read_events(call, 1)
            assert (live.type, live.revision) == (REVOKED, 9)
            full.append(live)
        call.cancel()


async def test_live_events_after_a_backlog_are_neither_lost_nor_repeated(
    tether: Harness,
) -> None:
    for index in range(5):
        await tether.acquire(f"jobs/{index}", "w")
    call, _ = await open_watch(tether, start_revision=2)
    tasks = [asyncio.ensure_future(tether.acquire(f"live/{i}", "w")) for i in range(10)]
    events = await read_events(call, 14)
    await asyncio.gather(*tasks)
    assert [event.revision for event in events] == list(range(2, 16))
    assert sorted(event.lease.key for event in events[4:]) == sorted(f"live/{i}" for i in range(10))
    call.cancel()


async def test_watch_filters_by_prefix_and_namespace(tether: Harness) -> None:
    jobs, _ = await open_watch(tether, key_prefix="jobs/")
    team, _ = await open_watch(tether, namespace="team-a")
    everything, _ = await open_watch(tether)
    await tether.acquire("other/x", "w1")
    await tether.acquire("jobs/x", "w1", namespace="team-a")
    await tether.acquire("jobsx", "w1")
    await tether.acquire("jobs/a", "w1")
    await tether.acquire("team/y", "w1", namespace="team-a")
    (event,) = await read_events(jobs, 1)
    assert (event.lease.namespace, event.lease.key) == ("default", "jobs/a")
    got = await read_events(team, 2)
    assert [(e.lease.namespace, e.lease.key) for e in got] == [
        ("team-a", "jobs/x"),
        ("team-a", "team/y"),
    ]
    got = await read_events(everything, 3)
    assert [e.lease.key for e in got] == ["other/x", "jobsx", "jobs/a"]
    # The filtered streams have nothing else pending.
    marker = await tether.acquire("jobs/zz", "w1")
    (event,) = await read_events(jobs, 1)
    assert event.lease.lease_id == marker.lease_id
    for call in (jobs, team, everything):
        call.cancel()


@pytest.mark.parametrize("start", [1, 2, 3])
async def test_compacted_revisions_are_out_of_range(tether: Harness, start: int) -> None:
    await make_history(tether)  # revisions 1..6
    purged = await tether.server.leases.lease_events_compact(3)
    assert purged == 3
    call = tether.stub.Watch(lease_pb2.WatchRequest(start_revision=start), timeout=WAIT_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), WAIT_S)
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.OUT_OF_RANGE, "REVISION_COMPACTED")
    assert metadata["compact_revision"] == "3"
    assert metadata["requested_revision"] == str(start)


async def test_watch_after_the_compacted_revision_still_works(tether: Harness) -> None:
    await make_history(tether)
    await tether.server.leases.lease_events_compact(3)
    call, header = await open_watch(tether, start_revision=4)
    assert header.compact_revision == 3
    events = await read_events(call, 3)
    assert [event.revision for event in events] == [4, 5, 6]
    assert summary(events) == EXPECTED_HISTORY[3:]
    call.cancel()
    # Starting "now" is never compacted away.
    call, header = await open_watch(tether, start_revision=0)
    assert (header.header_revision, header.compact_revision) == (6, 3)
    call.cancel()


class _InterposingTx:
    """Delegates to a Tx; runs ``before`` once, just before the statement that reads the
    events of a Watch page (after the revision header was read)."""

    def __init__(self, tx: Tx, before: Callable[[], Awaitable[None]]) -> None:
        self._tx = tx
        self._before = before

    async def fetch(self, stmt: Any, *args: Any) -> Any:
        if "FROM events" in stmt.pg:
            await self._before()
        return await self._tx.fetch(stmt, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)


def _commit_event_outside(db_path: str) -> int:
    """Commit one more event through a connection of its own (SQLite reads run in a thread
    whose unit cannot wait for the event loop)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        revision = conn.execute(
            "UPDATE revisions SET current = current + 1 WHERE id = 1 RETURNING current"
        ).fetchone()[0]
        snapshot = conn.execute(
            "SELECT snapshot FROM events ORDER BY revision DESC LIMIT 1"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO events VALUES (?, 'lease', 'default', 'jobs/b', 'x', 'ACQUIRED', 0, ?)",
            (revision, snapshot.replace('"jobs/a"', '"jobs/b"')),
        )
        conn.execute("COMMIT")
        return int(revision)
    finally:
        conn.close()


async def test_header_revision_covers_every_event_in_its_message(
    tether: Harness,
) -> None:
    """WatchResponse.header_revision is "the latest revision the server had committed when
    it sent this message", so it can never be below an event the message carries.

    Deterministic interleaving: another transaction commits between the page's read of the
    revision counter and its read of the events.
    """
    await tether.acquire("jobs/a", "w1")  # revision 1
    db = tether.server.db
    original_read = db.read
    injected: list[int] = []

    async def commit_another_event() -> None:
        if injected:
            return
        injected.append(0)
        if db.is_sqlite:
            injected[0] = _commit_event_outside(make_url(db.url).database or "")
        else:
            injected[0] = (await tether.acquire("jobs/b", "w2")).create_revision

    async def interposing_read(unit: Any, *, snapshot: bool = True) -> Any:
        return await original_read(
            lambda tx: unit(_InterposingTx(tx, commit_another_event)), snapshot=snapshot
        )

    db.read = interposing_read  # type: ignore[method-assign]
    try:
        call, _ = await open_watch(tether, start_revision=1)
        seen: list[int] = []
        while len(seen) < 2:
            message = await asyncio.wait_for(call.read(), WAIT_S)
            assert message is not grpc.aio.EOF
            revisions = [event.revision for event in message.events]
            seen.extend(revisions)
            assert message.header_revision >= max(revisions), (
                f"header_revision {message.header_revision} below events {revisions}"
            )
        call.cancel()
    finally:
        db.read = original_read  # type: ignore[method-assign]
    assert injected == [2]
    assert seen == [1, 2]
