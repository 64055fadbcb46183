"""The lease keeper against a scripted LeaseService (pytest-grpc): faults on demand.

The servicer grants leases and acknowledges renewals as the test scripts it: it drops the
stream after N answers, refuses streams with UNAVAILABLE, holds answers back (a slow
server), grants a shorter ttl than asked, or never answers at all. The client runs on a
``ManualClock``; the servicer records the client-clock time of everything it sees, so the
test can check the keeper's arithmetic exactly: ``safe_until`` is the send time of the
last acknowledged renewal plus the granted ttl minus the margin, never later.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from tests.client.conftest import Activity, advance_until, turns, wait_until
from tether_client import KeeperConfig, LeaseLost, ManualClock, TetherClient
from tether_client.errors import LeaseExpired, TetherError
from tether_client.pb import common_pb2, lease_pb2, lease_pb2_grpc

# pytest-grpc runs the servicer on a thread pool; streams each hold a thread.
grpc_max_workers = 16

TTL = 9.0
MARGIN = 0.9  # KeeperConfig default: a tenth of the ttl
SERVER_NOW_S = 1_700_000_000


def _duration(seconds: float) -> duration_pb2.Duration:
    micros = round(seconds * 1e6)
    return duration_pb2.Duration(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


@dataclass
class Script:
    """What the servicer does; a test changes it between (or during) steps."""

    # Answer at most this many KeepAlive requests per stream, then abort UNAVAILABLE.
    drop_after: int | None = None
    refuse_streams: bool = False
    refuse_renew: bool = False
    # Answers wait until this is set (a slow server); set = answer at once.
    release_answers: threading.Event = field(default_factory=threading.Event)
    # Never answer (the stream stays open): a black hole behind a live connection.
    silent: bool = False
    granted_ttl: float | None = None
    # Refuse renewals of these lease ids as expired.
    expired: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.release_answers.set()


@dataclass
class Seen:
    streams: list[float] = field(default_factory=list)
    # (client time received, lease ids renewed) per KeepAlive request.
    requests: list[tuple[float, list[str]]] = field(default_factory=list)
    unary_renewals: list[tuple[float, str]] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    answers: int = 0
    # The authorization header of every call, in arrival order.
    authorization: list[str] = field(default_factory=list)


class ScriptedLeaseService(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.script = Script()
        self.seen = Seen()
        self._lock = threading.Lock()

    def reset(self, clock: ManualClock) -> None:
        self.script.release_answers.set()  # free streams of the previous test
        self.clock = clock
        self.script = Script()
        self.seen = Seen()

    def _grant(self) -> float:
        return self.script.granted_ttl or TTL

    def _note_auth(self, context: Any) -> None:
        headers = dict(context.invocation_metadata())
        self.seen.authorization.append(headers.get("authorization", ""))

    def Acquire(self, request: Any, context: Any) -> lease_pb2.AcquireResponse:
        self._note_auth(context)
        lease = lease_pb2.Lease(
            namespace=request.namespace or "default",
            key=request.key,
            lease_id=uuid.uuid4().hex,
            holder=request.holder,
            ttl=request.ttl,
            fencing_token=7,
            state=lease_pb2.LEASE_STATE_ACTIVE,
            acquired_at=timestamp_pb2.Timestamp(seconds=SERVER_NOW_S),
            expires_at=timestamp_pb2.Timestamp(
                seconds=SERVER_NOW_S + request.ttl.seconds, nanos=request.ttl.nanos
            ),
        )
        return lease_pb2.AcquireResponse(lease=lease, created=True)

    def Renew(self, request: Any, context: Any) -> lease_pb2.RenewResponse:
        self._note_auth(context)
        self.seen.unary_renewals.append((self.clock.monotonic(), request.lease_id))
        if self.script.refuse_renew:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: unary unavailable")
        return lease_pb2.RenewResponse(
            lease_id=request.lease_id,
            fencing_token=request.fencing_token,
            expires_at=timestamp_pb2.Timestamp(seconds=SERVER_NOW_S + 100),
            ttl=_duration(self._grant()),
        )

    def Release(self, request: Any, context: Any) -> lease_pb2.ReleaseResponse:
        self.seen.releases.append(request.lease_id)
        return lease_pb2.ReleaseResponse(
            lease=lease_pb2.Lease(lease_id=request.lease_id, state=lease_pb2.LEASE_STATE_RELEASED)
        )

    def KeepAlive(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        self._note_auth(context)
        script = self.script
        with self._lock:
            self.seen.streams.append(self.clock.monotonic())
        if script.refuse_streams:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: no streams")
        answered = 0
        for request in request_iterator:
            self.seen.requests.append(
                (self.clock.monotonic(), [r.lease_id for r in request.renewals])
            )
            if script.drop_after is not None and answered >= script.drop_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: stream dropped")
            if script.silent:
                continue
            script.release_answers.wait(timeout=30)
            results = []
            for renewal in request.renewals:
                if renewal.lease_id in script.expired:
                    results.append(
                        lease_pb2.KeepAliveResult(
                            lease_id=renewal.lease_id,
                            fencing_token=renewal.fencing_token,
                            error=common_pb2.ErrorDetail(
                                code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                reason="LEASE_EXPIRED",
                                message="scripted: expired",
                            ),
                        )
                    )
                else:
                    results.append(
                        lease_pb2.KeepAliveResult(
                            lease_id=renewal.lease_id,
                            fencing_token=renewal.fencing_token,
                            expires_at=timestamp_pb2.Timestamp(seconds=SERVER_NOW_S + 100),
                            ttl=_duration(self._grant()),
                        )
                    )
            answered += 1
            self.seen.answers += 1
            yield lease_pb2.KeepAliveResponse(sequence=request.sequence, results=results)


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Callable[..., None]:
    return lease_pb2_grpc.add_LeaseServiceServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer() -> ScriptedLeaseService:
    return ScriptedLeaseService()


@pytest.fixture(scope="module")
def grpc_stub_cls() -> type[lease_pb2_grpc.LeaseServiceStub]:
    return lease_pb2_grpc.LeaseServiceStub


@dataclass
class Rig:
    servicer: ScriptedLeaseService
    clock: ManualClock
    client: TetherClient
    activity: Activity

    @property
    def script(self) -> Script:
        return self.servicer.script

    @property
    def seen(self) -> Seen:
        return self.servicer.seen

    async def advance_until(
        self,
        predicate: Callable[[], bool],
        *,
        step: float = 0.1,
        limit: float = 60.0,
        quiet: Callable[[], bool] | None = None,
    ) -> float:
        """Each step waits until the client has nothing under way (``quiet``: by default
        no RPC attempt and no keep-alive request unanswered)."""
        return await advance_until(
            self.clock.advance,
            predicate,
            step=step,
            limit=limit,
            quiet=quiet or self.activity.quiet,
        )


@pytest.fixture
async def rig(
    grpc_server: Any, grpc_addr: str, grpc_servicer: ScriptedLeaseService
) -> AsyncIterator[Rig]:
    clock = ManualClock()
    grpc_servicer.reset(clock)
    client = TetherClient(
        grpc_addr,
        clock=clock,
        keeper=KeeperConfig(reconnect_initial=0.2, reconnect_max=1.0),
    )
    try:
        yield Rig(grpc_servicer, clock, client, Activity(client))
    finally:
        grpc_servicer.script.release_answers.set()
        await client.close()


def renewal_times(rig: Rig) -> list[float]:
    """When (client clock) the server received each request that renewed something."""
    return [t for t, ids in rig.seen.requests if ids]


async def _acked_requests(rig: Rig, count: int) -> None:
    await wait_until(lambda: rig.client.keeper_stats.renewals_acked >= count, "acks")


async def test_safe_deadline_is_send_time_plus_granted_ttl_minus_margin(rig: Rig) -> None:
    start = rig.clock.monotonic()
    async with rig.client.hold("jobs/a", ttl=TTL) as lease:
        assert lease.safe_until == pytest.approx(start + TTL - MARGIN)
        # The first renewal goes out at a third of the ttl: move the clock just past it
        # and hold it there, so a slow machine cannot let it run on before the send.
        rig.clock.advance(max(0.0, start + TTL / 3 + 0.05 - rig.clock.monotonic()))
        await wait_until(lambda: renewal_times(rig), "the renewal at the server")
        (sent_at,) = renewal_times(rig)
        assert sent_at == pytest.approx(start + TTL / 3, abs=0.11)
        # Not before a third of the ttl either.
        assert sent_at >= start + TTL / 3 - 0.11
        await _acked_requests(rig, 1)
        assert lease.safe_until == pytest.approx(sent_at + TTL - MARGIN)
        assert lease.alive
    assert rig.seen.releases == [lease.lease_id]


async def test_slow_answer_counts_from_the_send_not_the_arrival(rig: Rig) -> None:
    async with rig.client.hold("jobs/a", ttl=TTL) as lease:
        await wait_until(lambda: rig.seen.answers >= 1, "the opening ping answered")
        rig.script.release_answers.clear()
        await rig.advance_until(lambda: len(rig.seen.requests) >= 2)  # ping, then renewal
        (sent_at,) = renewal_times(rig)
        rig.clock.advance(2.0)  # the answer is late...
        rig.script.release_answers.set()
        await _acked_requests(rig, 1)
        # ...and the deadline still counts from when the renewal was sent.
        assert lease.safe_until == pytest.approx(sent_at + TTL - MARGIN)


async def test_shorter_granted_ttl_shortens_the_deadline_and_the_renew_interval(rig: Rig) -> None:
    async with rig.client.hold("jobs/a", ttl=TTL) as lease:
        rig.script.granted_ttl = 3.0
        await rig.advance_until(lambda: rig.client.keeper_stats.renewals_acked >= 1)
        (first,) = renewal_times(rig)
        assert lease.safe_until == pytest.approx(first + 3.0 - MARGIN)
        # Renewed after a third of the granted 3 s, not of the asked-for 9 s: just past
        # that moment the second renewal goes out (the clock waits there for it).
        rig.clock.advance(max(0.0, first + 1.0 + 0.05 - rig.clock.monotonic()))
        await _acked_requests(rig, 2)
        second = renewal_times(rig)[1]
        assert second - first == pytest.approx(1.0, abs=0.11)
        assert lease.alive


async def test_dropped_stream_reconnects_and_renewals_resume(rig: Rig) -> None:
    rig.script.drop_after = 2  # each stream: the opening ping and one renewal, then gone
    async with rig.client.hold("jobs/a", ttl=TTL) as lease:
        await rig.advance_until(lambda: rig.client.keeper_stats.renewals_acked >= 4, limit=30)
        assert len(rig.seen.streams) >= 3
        assert rig.client.keeper_stats.streams_broken >= 2
        assert lease.alive
        assert not lease.lost


async def test_refused_streams_back_off_with_jitter_and_fall_back_to_unary_renew(
    rig: Rig,
) -> None:
    rig.script.refuse_streams = True
    async with rig.client.hold("jobs/a", ttl=TTL) as lease:
        await rig.advance_until(lambda: len(rig.seen.unary_renewals) >= 2, limit=30)
        assert lease.alive
        # Reconnect attempts were spaced by jittered backoff, never beyond its cap.
        gaps = [b - a for a, b in zip(rig.seen.streams, rig.seen.streams[1:], strict=False)]
        assert gaps, "the keeper never retried the stream"
        assert max(gaps) <= 1.0 + 0.11
        assert len({round(gap, 1) for gap in gaps}) > 1 or len(gaps) == 1
        # The unary renewals kept the deadline moving.
        last_unary = rig.seen.unary_renewals[-1][0]
        await wait_until(lambda: lease.safe_until >= last_unary + TTL - MARGIN - 1e-6)
        # Once streams work again, renewals go back to the stream.
        rig.script.refuse_streams = False
        streamed = rig.client.keeper_stats.renewals_sent
        await rig.advance_until(lambda: rig.client.keeper_stats.renewals_sent > streamed + 1)
        assert rig.client._keeper.streaming


async def test_silent_server_loses_the_lease_at_the_safety_deadline_and_stops_renewing(
    rig: Rig,
) -> None:
    lost_at: list[float] = []
    stats = rig.client.keeper_stats

    async def body() -> None:
        async with rig.client.hold(
            "jobs/a", ttl=TTL, on_lost=lambda lease: lost_at.append(rig.clock.monotonic())
        ) as lease:
            await rig.advance_until(lambda: stats.renewals_acked >= 1)
            last_ack_send = renewal_times(rig)[-1]
            rig.script.silent = True
            rig.script.refuse_renew = True
            # Nothing sent on the stream is answered now: the steps wait only for the unary
            # renewals, which are refused at once.
            await rig.advance_until(
                lambda: lease.lost, step=0.05, quiet=lambda: rig.activity.attempts == 0
            )
            assert lost_at
            assert lost_at[0] == pytest.approx(last_ack_send + TTL - MARGIN, abs=0.06)
            # The server's own deadline (a full ttl after it received that renewal) is later.
            assert lost_at[0] < last_ack_send + TTL
            with pytest.raises(LeaseLost):
                _ = lease.fencing_token
            assert isinstance(await lease.wait_lost(), LeaseLost)
            renewals = lease.renewals_sent
            sent = (stats.renewals_sent, stats.unary_renewals)
            rig.clock.advance(TTL * 3)
            # Holding nothing, the keeper drops its stream and waits for a lease to keep,
            # not for a moment on the clock: nothing can fall due any more.
            await wait_until(
                lambda: not rig.client._keeper.streaming and rig.clock.sleepers == 0,
                "the keeper to go idle",
            )
            assert rig.client._keeper.held == []
            await turns()
            assert lease.renewals_sent == renewals
            assert (stats.renewals_sent, stats.unary_renewals) == sent
            assert rig.activity.attempts == 0

    # The block ends with the loss.
    with pytest.raises(LeaseLost):
        await body()
    # A lost lease is not released: its token is stale as far as anyone knows.
    assert rig.seen.releases == []


async def test_refused_renewal_loses_the_lease_at_once(rig: Rig) -> None:
    async def body() -> None:
        async with rig.client.hold("jobs/a", ttl=TTL, on_lost="cancel") as lease:
            rig.script.expired.add(lease.lease_id)
            await rig.advance_until(lambda: lease.lost)
            await asyncio.Event().wait()  # cancelled by the loss

    with pytest.raises(LeaseLost) as caught:
        await body()
    assert isinstance(caught.value.cause, LeaseExpired)
    assert rig.seen.releases == []


async def test_a_lease_acquired_but_not_kept_is_released(rig: Rig) -> None:
    rig.script.refuse_renew = True

    async def hold() -> None:
        # Granted after a wait: the hold needs a renewal to know its deadline, which fails
        # (retried on the client's clock until the 0.5 s timeout).
        async with rig.client.hold("jobs/a", ttl=TTL, wait=5, timeout=0.5):
            pytest.fail("the body must not run")

    task = asyncio.create_task(hold())
    await rig.advance_until(task.done, step=0.05)
    with pytest.raises(TetherError):
        await task
    assert len(rig.seen.unary_renewals) > 1
    assert len(rig.seen.releases) == 1
    assert rig.client._keeper.held == []


async def test_token_goes_out_as_bearer_metadata_read_afresh_for_every_call(
    grpc_server: Any, grpc_addr: str, grpc_servicer: ScriptedLeaseService
) -> None:
    clock = ManualClock()
    grpc_servicer.reset(clock)
    issued = 0

    def rotating_token() -> str:
        nonlocal issued
        issued += 1
        return f"t{issued}"

    async with TetherClient(grpc_addr, clock=clock, token=rotating_token) as client:
        await client.leases.acquire("jobs/a", ttl=TTL)
        await client.leases.renew("lease", 1)
        async with client.hold("jobs/b", ttl=TTL):  # its Acquire, then the stream
            await wait_until(lambda: len(grpc_servicer.seen.authorization) >= 4)
    assert grpc_servicer.seen.authorization[:4] == [
        "Bearer t1",
        "Bearer t2",
        "Bearer t3",
        "Bearer t4",
    ]
