"""Requests and responses at the edges of what the wire allows: large progress details,
64-bit tokens, batches at the configured maximum, forged page tokens."""

from __future__ import annotations

import grpc

from tests.service.conftest import Harness, expect_error
from tether_client.pb import lease_pb2
from tether_server.domain import paging

PROGRESS = b"p" * 60_000  # close to the 64 KiB limit
# Clients refuse messages over 4 MiB by default; 80 leases carry about 4.8 MB of progress.
LEASES = 80


async def leases_with_large_progress(tether: Harness) -> list[lease_pb2.Lease]:
    held = []
    for index in range(LEASES):
        lease = await tether.acquire(f"big/{index:03d}", "w1", ttl_s=60)
        await tether.stub.Renew(
            lease_pb2.RenewRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token, progress=PROGRESS
            )
        )
        held.append(lease)
    return held


async def test_watch_splits_large_history_into_messages_clients_accept(tether: Harness) -> None:
    held = await leases_with_large_progress(tether)
    for lease in held:
        await tether.stub.Release(
            lease_pb2.ReleaseRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token, holder="w1"
            )
        )
    call = tether.stub.Watch(lease_pb2.WatchRequest(start_revision=1))
    revisions: list[int] = []
    while len(revisions) < 2 * LEASES:
        response = await call.read()
        assert response is not grpc.aio.EOF
        assert response.ByteSize() < 4 * 1024 * 1024
        revisions.extend(event.revision for event in response.events)
    call.cancel()
    assert revisions == list(range(1, 2 * LEASES + 1))


async def test_list_pages_stay_under_the_client_message_limit(tether: Harness) -> None:
    held = await leases_with_large_progress(tether)
    first = await tether.stub.ListLeases(lease_pb2.ListLeasesRequest())
    assert first.next_page_token, "a page must end before it outgrows a message"
    assert first.ByteSize() < 4 * 1024 * 1024
    listed = await tether.list_all()
    assert [lease.lease_id for lease in listed] == [lease.lease_id for lease in held]
    assert all(lease.progress == PROGRESS for lease in listed)


async def test_tokens_beyond_int64_are_invalid_not_internal(tether: Harness) -> None:
    lease = await tether.acquire("tokens/a", "w1")
    for token in (2**63, 2**64 - 1):
        await expect_error(
            tether.stub.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=token)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        )
    call = tether.stub.KeepAlive()
    await call.write(
        lease_pb2.KeepAliveRequest(
            sequence=1,
            renewals=[
                lease_pb2.KeepAliveRenewal(
                    lease_id=lease.lease_id, fencing_token=lease.fencing_token
                ),
                lease_pb2.KeepAliveRenewal(lease_id=lease.lease_id, fencing_token=2**64 - 1),
            ],
        )
    )
    response = await call.read()
    good, bad = response.results
    assert not good.HasField("error")
    assert bad.error.reason == "INVALID_FIELD"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_keepalive_batch_at_the_configured_maximum(tether: Harness) -> None:
    lease = await tether.acquire("batch/a", "w1", ttl_s=60)
    maximum = tether.server.config.limits.max_renewals_per_request
    renewals = [
        lease_pb2.KeepAliveRenewal(lease_id=f"{index:032x}", fencing_token=1)
        for index in range(maximum - 1)
    ]
    renewals.append(
        lease_pb2.KeepAliveRenewal(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
    )
    call = tether.stub.KeepAlive()
    await call.write(lease_pb2.KeepAliveRequest(sequence=7, renewals=renewals))
    response = await call.read()
    assert len(response.results) == maximum
    assert {r.error.reason for r in response.results[:-1]} == {"LEASE_NOT_FOUND"}
    assert not response.results[-1].HasField("error")
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_forged_page_token_with_out_of_range_position(tether: Harness) -> None:
    await tether.acquire("forged/a", "w1")
    digest = paging.query_digest("leases", "default", "", "", [])
    # The same digest with an in-range position is accepted: the refusals below are about
    # the position, not about the digest.
    accepted = await tether.stub.ListLeases(
        lease_pb2.ListLeasesRequest(page_token=paging.encode(["a", 1], digest))
    )
    assert [lease.key for lease in accepted.leases] == ["forged/a"]
    for position in (["k", 2**70], ["k", -(2**70)], ["k", 0]):
        await expect_error(
            tether.stub.ListLeases(
                lease_pb2.ListLeasesRequest(page_token=paging.encode(position, digest))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
