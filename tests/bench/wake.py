"""Cross-replica wake-ups: how soon after a release on replica A a waiting Acquire and a
Watch on replica B hear of it (PostgreSQL LISTEN/NOTIFY; the 1 s poll is only a fallback).

Run as ``python -m tests.bench.wake [--rounds N]``: two ``tether serve`` replicas on a fresh
PostgreSQL database on 127.0.0.1, N rounds of (acquire on A; a waiting Acquire and a Watch
on B; release on A), one JSON line with the delays from the release's answer. Bounded in
time; the replicas and the database are removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
from google.protobuf.duration_pb2 import Duration

from tests.bench.targets import pg_admin_url, tether_target
from tether_client.pb import lease_pb2, lease_pb2_grpc

RPC_TIMEOUT_S = 10.0


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(ordered[len(ordered) // 2], 2),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max": round(ordered[-1], 2),
    }


async def _first_event(watch: grpc.aio.UnaryStreamCall) -> float:
    while True:
        message = await watch.read()
        if message is grpc.aio.EOF:
            raise RuntimeError("watch ended")
        if message.events:
            return time.perf_counter()


async def measure(a: str, b: str, rounds: int) -> dict[str, object]:
    async with grpc.aio.insecure_channel(a) as ca, grpc.aio.insecure_channel(b) as cb:
        on_a, on_b = lease_pb2_grpc.LeaseServiceStub(ca), lease_pb2_grpc.LeaseServiceStub(cb)
        waiter_ms: list[float] = []
        watcher_ms: list[float] = []
        for i in range(rounds):
            key = f"wake/{i}"
            held = await on_a.Acquire(
                lease_pb2.AcquireRequest(key=key, holder="a", ttl=Duration(seconds=60)),
                timeout=RPC_TIMEOUT_S,
            )
            watch = on_b.Watch(lease_pb2.WatchRequest(key_prefix=key), timeout=RPC_TIMEOUT_S)
            await watch.read()  # the header: the watch is open
            waiting = asyncio.ensure_future(
                on_b.Acquire(
                    lease_pb2.AcquireRequest(
                        key=key, holder="b", ttl=Duration(seconds=60), wait=Duration(seconds=5)
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
            )
            await asyncio.sleep(0.1)  # let B refuse it once and wait (timing only, no assertion)
            await on_a.Release(
                lease_pb2.ReleaseRequest(
                    lease_id=held.lease.lease_id,
                    fencing_token=held.lease.fencing_token,
                    holder="a",
                ),
                timeout=RPC_TIMEOUT_S,
            )
            released = time.perf_counter()
            event = asyncio.ensure_future(_first_event(watch))
            await waiting
            waiter_ms.append((time.perf_counter() - released) * 1000)
            watcher_ms.append((await event - released) * 1000)
            watch.cancel()
        return {
            "scenario": "wake_across_replicas",
            "target": "tether-pg",
            "waiter_ms": _percentiles(waiter_ms),
            "watcher_ms": _percentiles(watcher_ms),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    admin, why = pg_admin_url()
    if admin is None:
        print(f"tether pg: unavailable ({why})", file=sys.stderr)
        return 0
    with tether_target("postgres", admin, replicas=2) as running:
        a, b = running.targets
        result = asyncio.run(asyncio.wait_for(measure(a, b, args.rounds), 300))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
