"""Issue #11: memory grew about 5 KB per call answered UNIMPLEMENTED (one exception object
per method raised again on every call, its traceback keeping every call's frames). A
refused call must leave nothing behind: 20 000 calls of one kind, then the process's
memory and its live exceptions and tracebacks are compared with before.

Client and server share this process, so the bounds cover both; they are generous (the
leak was 100 MB for these calls) and measured after full collections.
"""

from __future__ import annotations

import asyncio
import gc
import os
import types
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from tether_client.pb import lease_pb2

from .conftest import WAIT_S, Harness

CALLS = 20_000
# Refusals that read the store first are slower: fewer, against a proportional bound.
STORE_CALLS = 5_000
WARM_UP = 2_000
# Calls in flight at once: keeps the test short without queueing much.
CONCURRENCY = 32
MAX_GROWTH_BYTES = 20 << 20
# Exceptions and tracebacks alive after the calls, beyond those before: a few the event
# loop or grpc keep for their own reasons, never one per call.
MAX_NEW_EXCEPTIONS = 200


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_exceptions() -> int:
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, BaseException | types.TracebackType | types.FrameType)
    )


Call = Callable[[], Awaitable[Any]]


async def refuse_many(call: Call, count: int, code: grpc.StatusCode) -> None:
    async def worker(share: int) -> None:
        for _ in range(share):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert caught.value.code() == code
            del caught

    shares = [count // CONCURRENCY + (i < count % CONCURRENCY) for i in range(CONCURRENCY)]
    await asyncio.gather(*(worker(share) for share in shares))


async def measure(call: Call, code: grpc.StatusCode, calls: int) -> tuple[int, int]:
    """(bytes of resident memory, exceptions and tracebacks) added by ``calls`` refused
    calls after a warm-up."""
    await refuse_many(call, WARM_UP, code)
    gc.collect()
    rss, exceptions = rss_bytes(), live_exceptions()
    await refuse_many(call, calls, code)
    gc.collect()
    grown, kept = rss_bytes() - rss, live_exceptions() - exceptions
    print(f"{calls} calls: {grown} bytes, {kept} exceptions, tracebacks and frames")
    return grown, kept


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
# grpc answers these before any handler or store is involved: one backend is enough.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_calls_answered_unimplemented_keep_no_memory(tether: Harness) -> None:
    unknown = tether.channel.unary_unary(
        "/tether.v1.LeaseService/NoSuchMethod",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    grown, exceptions = await measure(
        lambda: unknown(b"", timeout=WAIT_S), grpc.StatusCode.UNIMPLEMENTED, CALLS
    )
    assert grown < MAX_GROWTH_BYTES, f"{grown / CALLS:.0f} bytes per call"
    assert exceptions < MAX_NEW_EXCEPTIONS


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
async def test_calls_refused_by_the_service_keep_no_memory(tether: Harness) -> None:
    """A domain refusal (NOT_FOUND after a read) goes through the error boundary and
    ``context.abort``, once per call."""
    request = lease_pb2.GetLeaseRequest(lease_id="0" * 32)
    grown, exceptions = await measure(
        lambda: tether.stub.GetLease(request, timeout=WAIT_S),
        grpc.StatusCode.NOT_FOUND,
        STORE_CALLS,
    )
    assert grown < MAX_GROWTH_BYTES * STORE_CALLS // CALLS, f"{grown / STORE_CALLS:.0f} B/call"
    assert exceptions < MAX_NEW_EXCEPTIONS
