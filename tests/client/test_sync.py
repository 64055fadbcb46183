"""The blocking client, against a real server process (``tether serve``, both backends).

The in-process ``tether`` fixture lives on the test's event loop; a sync client runs its own
loop in a thread, so these tests talk to a subprocess instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import ServerFactory
from tether_client import HeldLease, LeaseLost, TetherClientSync
from tether_client.errors import (
    DeadlineExceeded,
    LeaseHeld,
    LeaseRevoked,
    ObjectNotFound,
    SagaNotFound,
    SweepReportNotFound,
    Unavailable,
)
from tether_client.pb import lease_pb2, owner_ref_pb2, saga_pb2, sweep_pb2

ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
RELEASED = lease_pb2.LEASE_STATE_RELEASED
WITHIN = 10.0  # bound on every real-time wait; nothing should come close


def eventually(predicate: Callable[[], Any], what: str, within: float = WITHIN) -> Any:
    give_up = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def target(db_url: str, server_factory: ServerFactory) -> str:
    return server_factory(db_url).target


@pytest.fixture
def client(target: str) -> Iterator[TetherClientSync]:
    with TetherClientSync(target, holder="sync-1") as client:
        yield client


def test_acquire_get_list_release(client: TetherClientSync) -> None:
    acquired = client.acquire("jobs/a", ttl=30)
    assert acquired.created
    lease = acquired.lease
    assert lease.holder == "sync-1"
    assert client.get_lease(lease_id=lease.lease_id) == lease
    assert client.get_lease(key="jobs/a").lease_id == lease.lease_id
    assert [item.lease_id for item in client.list_leases(key_prefix="jobs/").leases] == [
        lease.lease_id
    ]
    # Another holder is refused with the typed error.
    with TetherClientSync(client.client.connection.targets, holder="sync-2") as other:
        with pytest.raises(LeaseHeld) as caught:
            other.acquire("jobs/a", ttl=30)
        assert caught.value.holder == "sync-1"
    released = client.release(lease.lease_id, lease.fencing_token)
    assert released.state == RELEASED
    assert client.get_lease(lease_id=lease.lease_id).state == RELEASED


def test_iter_leases_walks_every_page(client: TetherClientSync) -> None:
    keys = [f"many/{i}" for i in range(5)]
    for key in keys:
        client.acquire(key, ttl=30)
    leases = client.iter_leases(key_prefix="many/", page_size=2)
    assert sorted(lease.key for lease in leases) == keys


def test_hold_renews_in_the_background_and_releases_on_exit(client: TetherClientSync) -> None:
    stats = client.keeper.stats
    with client.hold("jobs/held", ttl=1.5) as lease:
        assert isinstance(lease, HeldLease)
        token = lease.fencing_token
        acked = stats.renewals_acked
        # The body blocks this thread; renewals go on in the client's loop thread.
        eventually(lambda: stats.renewals_acked > acked, "a renewal acknowledged")
        assert not lease.lost
        assert lease.fencing_token == token
        assert client.get_lease(lease_id=lease.lease_id).state == ACTIVE
    assert client.get_lease(lease_id=lease.lease_id).state == RELEASED
    assert client.keeper.held == []


def test_hold_refuses_to_cancel_a_blocking_body(client: TetherClientSync) -> None:
    with pytest.raises(ValueError, match="callback"):  # noqa: SIM117
        with client.hold("jobs/c", ttl=5, on_lost="cancel"):  # type: ignore[arg-type]
            pass
    assert list(client.iter_leases(key_prefix="jobs/c")) == []


def test_a_revoked_lease_is_reported_lost(client: TetherClientSync) -> None:
    losses: list[HeldLease] = []
    refusals: list[RuntimeError] = []

    def on_lost(lost: HeldLease) -> None:
        losses.append(lost)
        # Runs in the client's loop thread: a blocking call from there would hang forever.
        try:
            client.get_lease(lease_id=lost.lease_id)
        except RuntimeError as exc:
            refusals.append(exc)

    with client.hold("jobs/r", ttl=3, on_lost=on_lost) as lease:
        revoked = client.revoke(lease.lease_id, reason="test")
        assert revoked.state == lease_pb2.LEASE_STATE_REVOKED
        eventually(lambda: lease.lost, "the lease reported lost")
        with pytest.raises(LeaseLost) as caught:
            _ = lease.fencing_token
        assert isinstance(caught.value.cause, LeaseRevoked)
        eventually(lambda: losses, "the on_lost callback")
        assert losses == [lease]
        assert len(refusals) == 1
        assert "loop thread" in str(refusals[0])
    # A lost lease is not released on exit: it stays revoked.
    assert client.get_lease(lease_id=lease.lease_id).state == lease_pb2.LEASE_STATE_REVOKED


def test_closing_a_watch_cancels_its_stream(client: TetherClientSync) -> None:
    client.list_leases()  # opens the channel on the client's loop
    endpoint = client.client.connection.current
    calls: list[Any] = []
    open_watch = endpoint.lease.Watch

    def spy(*args: Any, **kwargs: Any) -> Any:
        call = open_watch(*args, **kwargs)
        calls.append(call)
        return call

    endpoint.lease.Watch = spy  # type: ignore[assignment]
    acquired = client.acquire("w/a", ttl=30)
    # Like the async one, the generator opens its stream on the first next().
    events = client.watch(key_prefix="w/", start_revision=acquired.lease.mod_revision)
    assert calls == []
    event = next(events)
    assert event.lease.lease_id == acquired.lease.lease_id
    assert event.type == lease_pb2.LEASE_EVENT_TYPE_ACQUIRED
    assert len(calls) == 1
    assert not calls[0].done()
    events.close()
    # Synchronously: once close() returns, the stream is gone.
    assert calls[0].cancelled()


def test_service_clients_raise_typed_errors(client: TetherClientSync) -> None:
    with pytest.raises(SagaNotFound):
        client.sagas.get_saga(saga_pb2.GetSagaRequest(saga_id="s1"))
    with pytest.raises(ObjectNotFound):
        client.objects.get_object(owner_ref_pb2.GetObjectRequest(kind="Thing", name="nope"))
    with pytest.raises(SweepReportNotFound):
        client.sweeps.get_sweep_report(
            sweep_pb2.GetSweepReportRequest(sweep_id="0190a3c4-1111-7aaa-8bbb-0123456789ab")
        )


# --- no server needed -----------------------------------------------------------------


def test_methods_after_close_raise_and_the_thread_ends() -> None:
    before = set(threading.enumerate())
    client = TetherClientSync("127.0.0.1:1")
    started = set(threading.enumerate()) - before
    assert any(thread.name == "tether-client-sync" for thread in started)
    client.close()
    client.close()  # idempotent
    assert client.closed
    assert not any(thread.is_alive() for thread in started)
    with pytest.raises(RuntimeError, match="closed"):
        client.acquire("jobs/a", ttl=5)
    with pytest.raises(RuntimeError, match="closed"):
        client.get_lease(key="jobs/a")
    with pytest.raises(RuntimeError, match="closed"):
        client.iter_leases()
    with pytest.raises(RuntimeError, match="closed"):
        client.watch()
    with pytest.raises(RuntimeError, match="closed"):  # noqa: SIM117
        with client.hold("jobs/a", ttl=5):
            pass
    with pytest.raises(RuntimeError, match="closed"):
        client.sagas.get_saga(saga_pb2.GetSagaRequest())


def test_a_call_is_bounded_by_its_timeout_without_a_server() -> None:
    with TetherClientSync("127.0.0.1:1") as client:
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            client.get_lease(key="jobs/a", timeout=0.5)
        assert time.monotonic() - started < 3
