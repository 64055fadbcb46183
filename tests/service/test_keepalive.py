"""LeaseService.KeepAlive: many leases multiplexed on one bidi stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tether_client.pb import lease_pb2

from .conftest import (
    KEEPALIVE_IDLE_S,
    LEASE_SERVICE,
    WAIT_S,
    Harness,
    advance_until_done,
    dur,
    dur_us,
    error_info,
    eventually,
    ts_us,
)

S = 1_000_000
CODE_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
CODE_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
CODE_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def renewal(lease: lease_pb2.Lease, **fields: object) -> lease_pb2.KeepAliveRenewal:
    values: dict[str, object] = {
        "lease_id": lease.lease_id,
        "fencing_token": lease.fencing_token,
    }
    values.update(fields)
    return lease_pb2.KeepAliveRenewal(**values)  # type: ignore[arg-type]


async def exchange(
    call: grpc.aio.StreamStreamCall, request: lease_pb2.KeepAliveRequest
) -> lease_pb2.KeepAliveResponse:
    await call.write(request)
    response = await asyncio.wait_for(call.read(), WAIT_S)
    assert response is not grpc.aio.EOF
    return response


async def test_one_request_renews_several_leases_in_order(tether: Harness) -> None:
    a = await tether.acquire("jobs/a", "w1", ttl_s=10)
    b = await tether.acquire("jobs/b", "w1", ttl_s=20)
    c = await tether.acquire("jobs/c", "w2", ttl_s=30)
    tether.clock.advance(3)
    now = tether.clock.now_us()
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    response = await exchange(
        call,
        lease_pb2.KeepAliveRequest(
            sequence=41, renewals=[renewal(c), renewal(a, progress=b"half"), renewal(b)]
        ),
    )
    assert response.sequence == 41
    assert [r.lease_id for r in response.results] == [c.lease_id, a.lease_id, b.lease_id]
    for result, lease in zip(response.results, (c, a, b), strict=True):
        assert not result.HasField("error"), result.error
        assert result.fencing_token == lease.fencing_token
        assert ts_us(result.expires_at) == now + dur_us(lease.ttl)
        assert dur_us(result.ttl) == dur_us(lease.ttl)
        stored = await tether.get(lease.lease_id)
        assert ts_us(stored.expires_at) == now + dur_us(lease.ttl)
        assert stored.heartbeat_stream_attached is True
    assert (await tether.get(a.lease_id)).progress == b"half"
    assert (await tether.get(b.lease_id)).progress == b""
    # The next request on the same stream is answered too, with its own sequence.
    response = await exchange(call, lease_pb2.KeepAliveRequest(sequence=42, renewals=[renewal(a)]))
    assert response.sequence == 42
    assert (await tether.get(a.lease_id)).progress == b"half"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_mixed_good_and_bad_renewals_fail_alone(tether: Harness) -> None:
    good = await tether.acquire("jobs/good", "w1", ttl_s=60)
    expired = await tether.acquire("jobs/expired", "w1", ttl_s=5)
    released = await tether.acquire("jobs/released", "w1", ttl_s=60)
    other_ns = await tether.acquire("jobs/other", "w1", ttl_s=60, namespace="team-a")
    await tether.stub.Release(
        lease_pb2.ReleaseRequest(
            lease_id=released.lease_id, fencing_token=released.fencing_token, holder="w1"
        )
    )
    tether.clock.advance(6)  # `expired` passes its deadline; the loop does not run
    now = tether.clock.now_us()
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    renewals = [
        renewal(good),
        renewal(good, fencing_token=good.fencing_token + 7),
        lease_pb2.KeepAliveRenewal(lease_id="f" * 32, fencing_token=1),
        renewal(expired),
        lease_pb2.KeepAliveRenewal(lease_id="", fencing_token=1),
        renewal(good, fencing_token=0),
        renewal(released),
        renewal(other_ns),
        renewal(good, progress=b"x" * (64 * 1024 + 1)),
        renewal(good, progress=b"ok"),
    ]
    response = await exchange(call, lease_pb2.KeepAliveRequest(sequence=9, renewals=renewals))
    assert response.sequence == 9
    assert len(response.results) == len(renewals)
    outcomes = [
        (r.lease_id, r.error.code, r.error.reason) if r.HasField("error") else (r.lease_id, "OK")
        for r in response.results
    ]
    assert outcomes == [
        (good.lease_id, "OK"),
        (good.lease_id, CODE_FAILED_PRECONDITION, "STALE_FENCING_TOKEN"),
        ("f" * 32, CODE_NOT_FOUND, "LEASE_NOT_FOUND"),
        (expired.lease_id, CODE_FAILED_PRECONDITION, "LEASE_EXPIRED"),
        ("", CODE_INVALID_ARGUMENT, "INVALID_FIELD"),
        (good.lease_id, CODE_INVALID_ARGUMENT, "INVALID_FIELD"),
        (released.lease_id, CODE_FAILED_PRECONDITION, "LEASE_RELEASED"),
        (other_ns.lease_id, CODE_NOT_FOUND, "LEASE_NOT_FOUND"),
        (good.lease_id, CODE_INVALID_ARGUMENT, "INVALID_FIELD"),
        (good.lease_id, "OK"),
    ]
    assert response.results[4].error.metadata["field"] == "renewals[4].lease_id"
    assert response.results[5].error.metadata["field"] == "renewals[5].fencing_token"
    assert response.results[8].error.metadata["field"] == "renewals[8].progress"
    for index in (0, 9):
        assert ts_us(response.results[index].expires_at) == now + 60 * S
    for result in response.results:
        if result.HasField("error"):
            assert not result.HasField("expires_at")
            assert result.error.message
    # The bad entries changed nothing; the good ones did.
    assert (await tether.get(good.lease_id)).progress == b"ok"
    stored_expired = await tether.get(expired.lease_id)
    assert stored_expired.state == lease_pb2.LEASE_STATE_EXPIRED
    assert ts_us(stored_expired.expires_at) == ts_us(expired.expires_at)
    assert (await tether.get(other_ns.lease_id, "team-a")).expires_at == other_ns.expires_at
    # The stream is still usable.
    response = await exchange(call, lease_pb2.KeepAliveRequest(sequence=10))
    assert response.sequence == 10
    assert list(response.results) == []
    response = await exchange(
        call,
        lease_pb2.KeepAliveRequest(sequence=11, namespace="team-a", renewals=[renewal(other_ns)]),
    )
    assert not response.results[0].HasField("error")
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_empty_request_is_an_acknowledged_ping(tether: Harness) -> None:
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    for sequence in (1, 2, 2**64 - 1):
        response = await exchange(call, lease_pb2.KeepAliveRequest(sequence=sequence))
        assert response.sequence == sequence
        assert list(response.results) == []
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x1a\xff", id="truncated-varint"),
        pytest.param(b"\x1a\x05\x0a", id="truncated-submessage"),
        pytest.param(b"\x0a\x02\xff\xfe", id="invalid-utf8-namespace"),
    ],
)
async def test_garbage_bytes_on_the_stream_are_malformed(tether: Harness, garbage: bytes) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    raw = tether.channel.stream_stream(
        f"/{LEASE_SERVICE}/KeepAlive",
        request_serializer=lambda data: data,
        response_deserializer=lease_pb2.KeepAliveResponse.FromString,
    )
    call = raw(timeout=WAIT_S)
    good = lease_pb2.KeepAliveRequest(sequence=1, renewals=[renewal(lease)])
    await call.write(good.SerializeToString())
    first = await asyncio.wait_for(call.read(), WAIT_S)
    assert first.sequence == 1
    await call.write(garbage)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), WAIT_S)
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert metadata["method"] == f"{LEASE_SERVICE}.KeepAlive"
    # The lease itself is untouched, and the stream no longer counts as attached.
    await eventually(lambda: tether.server.metrics.keepalive_streams_open == 0, "stream closed")
    stored = await tether.get(lease.lease_id)
    assert stored.state == lease_pb2.LEASE_STATE_ACTIVE
    assert stored.heartbeat_stream_attached is False


async def test_a_silent_stream_is_closed_after_the_idle_timeout(tether: Harness) -> None:
    metrics = tether.server.metrics
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    await eventually(lambda: metrics.keepalive_streams_open == 1, "the stream to open")
    reader = asyncio.ensure_future(call.read())
    advanced = await advance_until_done(tether.clock, reader, step_s=1, max_steps=40)
    assert advanced >= KEEPALIVE_IDLE_S
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        reader.result()
    code, reason, metadata = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "KEEPALIVE_IDLE")
    assert metadata["idle_timeout"] == f"{KEEPALIVE_IDLE_S:g}s"
    await eventually(lambda: metrics.keepalive_streams_open == 0, "the stream to close")
    assert metrics.keepalive_streams_broken == 1


async def test_pings_keep_a_stream_open_past_the_idle_timeout(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1", ttl_s=60)
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    for sequence in range(1, 6):
        # 5 x 3 s = 15 s of fake time, three times the idle timeout, never 5 s silent.
        response = await exchange(call, lease_pb2.KeepAliveRequest(sequence=sequence))
        assert response.sequence == sequence
        tether.clock.advance(KEEPALIVE_IDLE_S * 0.6)
    response = await exchange(
        call, lease_pb2.KeepAliveRequest(sequence=99, renewals=[renewal(lease)])
    )
    assert not response.results[0].HasField("error")
    assert tether.server.metrics.keepalive_streams_open == 1
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_metrics_count_open_and_broken_streams(tether: Harness) -> None:
    metrics = tether.server.metrics
    assert metrics.keepalive_streams_open == 0
    first = tether.stub.KeepAlive(timeout=WAIT_S)
    second = tether.stub.KeepAlive(timeout=WAIT_S)
    await exchange(first, lease_pb2.KeepAliveRequest(sequence=1))
    await exchange(second, lease_pb2.KeepAliveRequest(sequence=1))
    assert metrics.keepalive_streams_open == 2
    assert metrics.keepalive_streams_total == 2
    await first.done_writing()
    assert await first.code() == grpc.StatusCode.OK
    await eventually(lambda: metrics.keepalive_streams_open == 1, "one stream open")
    assert metrics.keepalive_streams_broken == 0
    second.cancel()
    await eventually(lambda: metrics.keepalive_streams_open == 0, "no stream open")
    # Not asserted: whether this cancel counts as broken. grpc.aio sometimes ends the
    # request iterator of a cancelled call like a half-close and completes it without
    # marking it cancelled, so the server cannot tell the two apart every time.
    assert metrics.keepalive_streams_total == 2


async def test_renewals_counted_in_metrics(tether: Harness) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    await exchange(
        call,
        lease_pb2.KeepAliveRequest(
            renewals=[renewal(lease), renewal(lease, fencing_token=lease.fencing_token + 1)]
        ),
    )
    assert tether.server.metrics.renewals_ok == 1
    assert tether.server.metrics.renewals_refused == 1
    await call.done_writing()
    await call.code()


async def test_a_thousand_leases_over_ten_concurrent_streams(tether: Harness) -> None:
    gate = asyncio.Semaphore(32)

    async def acquire(index: int) -> lease_pb2.Lease:
        async with gate:
            return await tether.acquire(f"bulk/{index:04d}", f"w{index % 10}", ttl_s=30)

    leases = await asyncio.gather(*(acquire(i) for i in range(1000)))
    assert len({lease.lease_id for lease in leases}) == 1000
    tether.clock.advance(10)
    now = tether.clock.now_us()

    async def stream(shard: list[lease_pb2.Lease]) -> list[lease_pb2.KeepAliveResult]:
        call = tether.stub.KeepAlive(timeout=WAIT_S * 3)
        results: list[lease_pb2.KeepAliveResult] = []
        for sequence, start in enumerate(range(0, len(shard), 25), start=1):
            chunk = shard[start : start + 25]
            response = await exchange(
                call,
                lease_pb2.KeepAliveRequest(sequence=sequence, renewals=[renewal(x) for x in chunk]),
            )
            assert response.sequence == sequence
            assert [r.lease_id for r in response.results] == [x.lease_id for x in chunk]
            results.extend(response.results)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return results

    shards = [leases[i::10] for i in range(10)]
    per_stream = await asyncio.gather(*(stream(shard) for shard in shards))
    results = [result for stream_results in per_stream for result in stream_results]
    assert len(results) == 1000
    failed = [r for r in results if r.HasField("error")]
    assert failed == []
    assert {ts_us(r.expires_at) for r in results} == {now + 30 * S}
    assert tether.server.metrics.renewals_ok == 1000
    assert tether.server.metrics.keepalive_streams_total == 10
    # Past every original deadline, all are alive.
    tether.clock.advance(25)
    active = await tether.list_all(key_prefix="bulk/", states=[lease_pb2.LEASE_STATE_ACTIVE])
    assert len(active) == 1000
    assert dur(30) == leases[0].ttl


@pytest.mark.parametrize("stale_first", [False, True], ids=["current-first", "stale-first"])
async def test_a_refused_entry_never_writes_its_progress(
    tether: Harness, stale_first: bool
) -> None:
    """Fencing: progress sent with a stale token is refused, never silently applied, even
    when the same request also renews the lease with its current token."""
    lease = await tether.acquire("jobs/a", "w1")
    current = renewal(lease, progress=b"from the holder")
    stale = renewal(lease, fencing_token=lease.fencing_token + 1, progress=b"from a stale holder")
    renewals = [stale, current] if stale_first else [current, stale]
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    response = await exchange(call, lease_pb2.KeepAliveRequest(renewals=renewals))
    reasons = [r.error.reason for r in response.results]
    assert reasons == (["STALE_FENCING_TOKEN", ""] if stale_first else ["", "STALE_FENCING_TOKEN"])
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    assert (await tether.get(lease.lease_id)).progress == b"from the holder"


async def test_a_renewal_without_progress_beside_a_stale_one_keeps_progress(
    tether: Harness,
) -> None:
    lease = await tether.acquire("jobs/a", "w1")
    await tether.stub.Renew(
        lease_pb2.RenewRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token, progress=b"step 1"
        )
    )
    call = tether.stub.KeepAlive(timeout=WAIT_S)
    response = await exchange(
        call,
        lease_pb2.KeepAliveRequest(
            renewals=[
                renewal(lease),
                renewal(lease, fencing_token=lease.fencing_token + 1, progress=b"forged"),
            ]
        ),
    )
    assert [r.error.reason for r in response.results] == ["", "STALE_FENCING_TOKEN"]
    await call.done_writing()
    await call.code()
    assert (await tether.get(lease.lease_id)).progress == b"step 1"
