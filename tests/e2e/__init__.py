"""End-to-end tests: real ``tether serve`` processes on free loopback ports.

Small helpers shared by the e2e modules live here: reading the ``google.rpc.ErrorInfo``
of a failed call, and collecting Watch events with a bounded wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from tests.support import error_contract
from tests.support.server_process import ServerProcess
from tether_client.pb import lease_pb2, lease_pb2_grpc

# The conftest fixtures' call signatures.
ServerFactory = Callable[..., ServerProcess]
DbFactory = Callable[..., str]
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MICROS = 1_000_000


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo packed in the ``grpc-status-details-bin`` trailer (fails if absent)."""
    metadata = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    error_contract.check(exc.code(), info.reason, info.metadata)
                    return info
    raise AssertionError(f"no ErrorInfo in the trailers of {exc!r}")


@asynccontextmanager
async def lease_stub(target: str) -> AsyncIterator[lease_pb2_grpc.LeaseServiceStub]:
    """An asyncio LeaseService stub on its own channel, closed on exit."""
    async with grpc.aio.insecure_channel(target) as channel:
        yield lease_pb2_grpc.LeaseServiceStub(channel)


async def open_renewing_stream(
    stub: lease_pb2_grpc.LeaseServiceStub, lease: lease_pb2.Lease
) -> Any:
    """A KeepAlive stream that has renewed ``lease`` once, acknowledged without error."""
    stream = stub.KeepAlive()
    await stream.write(
        lease_pb2.KeepAliveRequest(
            sequence=1,
            renewals=[
                lease_pb2.KeepAliveRenewal(
                    lease_id=lease.lease_id, fencing_token=lease.fencing_token
                )
            ],
        )
    )
    ack = await asyncio.wait_for(stream.read(), 10)
    assert ack.sequence == 1
    assert not ack.results[0].HasField("error")
    return stream


def ts_us(ts: Any) -> int:
    """A protobuf Timestamp as microseconds since the epoch."""
    return int(ts.seconds) * MICROS + int(ts.nanos) // 1000


class EventCollector:
    """Reads a Watch stream in the background and keeps every event, in arrival order."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: list[lease_pb2.LeaseEvent] = []
        # Monotonic arrival time of each event (same index as ``events``).
        self.arrived: list[float] = []
        self.responses: list[lease_pb2.WatchResponse] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    @classmethod
    async def open(
        cls,
        stub: lease_pb2_grpc.LeaseServiceStub,
        *,
        start_revision: int = 0,
        key_prefix: str = "",
        within: float = 10.0,
    ) -> EventCollector:
        """Open the Watch and wait for its first (confirming, empty) message."""
        call = stub.Watch(
            lease_pb2.WatchRequest(key_prefix=key_prefix, start_revision=start_revision)
        )
        collector = cls(call)
        first = await asyncio.wait_for(call.read(), within)
        assert first is not grpc.aio.EOF, "Watch ended before confirming"
        assert not first.events, "the first Watch message confirms the watch and is empty"
        collector.responses.append(first)
        collector._task = asyncio.create_task(collector._run())
        return collector

    async def _run(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self.error = EOFError("the Watch stream ended")
                    self._changed.set()
                    return
                now = time.monotonic()
                self.responses.append(response)
                for event in response.events:
                    self.events.append(event)
                    self.arrived.append(now)
                self._changed.set()
        except BaseException as exc:  # recorded for the test to inspect
            self.error = exc
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[lease_pb2.LeaseEvent], bool], within: float = 10.0
    ) -> lease_pb2.LeaseEvent:
        """The first event matching ``predicate``, waiting at most ``within`` seconds."""
        async with asyncio.timeout(within):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                if self.error is not None:
                    raise AssertionError(f"Watch ended: {self.error!r}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_revision(self, revision: int, within: float = 10.0) -> None:
        await self.wait_for(lambda e: e.revision >= revision, within)

    async def close(self) -> None:
        self.call.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
