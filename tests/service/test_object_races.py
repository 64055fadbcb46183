"""Object races, run many times with real concurrency (several channels, one server) on
both backends: crosswise owner updates that would close a cycle, a dependent created while
its owner is deleted (or its lease ends), and a delete racing the collector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tether_client.pb import common_pb2, lease_pb2, owner_ref_pb2

from .conftest import WAIT_S, Harness, dur, error_info
from .object_support import ObjApi, converge, ref

ROUNDS = 20


@pytest.fixture
async def apis(tether: Harness) -> AsyncIterator[list[ObjApi]]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{tether.port}") for _ in range(3)]
    try:
        yield [ObjApi.on(channel, tether.server) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


async def outcome(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return error_info(exc)[1]
    return "OK"


async def test_crosswise_owner_updates_never_close_a_cycle(apis: list[ObjApi]) -> None:
    first, second, _ = apis
    for index in range(ROUNDS):
        a = await first.create(f"a{index}")
        b = await first.create(f"b{index}")
        a.owner_references.append(ref(b))
        b.owner_references.append(ref(a))
        got = await asyncio.gather(
            outcome(first.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=a))),
            outcome(second.stub.UpdateObject(owner_ref_pb2.UpdateObjectRequest(object=b))),
        )
        # Exactly one wins, whichever it is.
        assert sorted(got) == ["OK", "OWNER_CYCLE"], got


async def test_a_dependent_created_while_its_owner_goes_is_never_left_behind(
    tether: Harness, apis: list[ObjApi]
) -> None:
    first, second, _ = apis
    created = 0
    for index in range(ROUNDS):
        owner = await first.create(f"owner{index}")
        got = await asyncio.gather(
            outcome(first.delete(f"owner{index}")),
            outcome(second.create(f"dep{index}", owners=[ref(owner)])),
        )
        assert got[0] == "OK"
        assert got[1] in ("OK", "OWNER_NOT_FOUND"), got
        created += got[1] == "OK"
    await converge(tether.server)
    assert await first.names() == set(), f"{created} dependents were created in time"


async def test_a_dependent_created_while_its_lease_ends_is_never_left_behind(
    tether: Harness, apis: list[ObjApi]
) -> None:
    first, second, _ = apis
    for index in range(ROUNDS):
        lease = (
            await tether.stub.Acquire(
                lease_pb2.AcquireRequest(key=f"k{index}", holder="w", ttl=dur(30)),
                timeout=WAIT_S,
            )
        ).lease
        owner = common_pb2.OwnerReference(
            kind="tether.v1/Lease", name=lease.key, uid=lease.lease_id
        )
        got = await asyncio.gather(
            outcome(tether.stub.Revoke(lease_pb2.RevokeRequest(lease_id=lease.lease_id))),
            outcome(second.create(f"dep{index}", owners=[owner])),
        )
        assert got[0] == "OK"
        assert got[1] in ("OK", "OWNER_NOT_FOUND"), got
    await converge(tether.server)
    assert await first.names() == set()


async def test_deletes_racing_the_collector_converge(tether: Harness, apis: list[ObjApi]) -> None:
    first, second, third = apis
    for index in range(ROUNDS // 4):
        root = await first.create(f"root{index}")
        children = [await first.create(f"c{index}-{n}", owners=[ref(root)]) for n in range(10)]
        await first.delete(f"root{index}")
        # The collector works on the children while clients delete some of them too.
        results = await asyncio.gather(
            tether.server.objects.collect(),
            *(
                outcome(api.delete(c.name))
                for api, c in zip((second, third) * 5, children, strict=True)
            ),
        )
        assert all(r in ("OK", "OBJECT_NOT_FOUND") for r in results[1:]), results
    await converge(tether.server)
    assert await first.names() == set()
