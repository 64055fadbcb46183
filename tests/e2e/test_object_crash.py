"""A server killed (SIGKILL) in the middle of a large cascade: after a restart the cascade
finishes, and nothing that should survive was deleted.

The objects are written straight through the store before the server starts (populating
is not what is tested); the delete goes through the real RPC and the real collector, with
small batches so the cascade takes many transactions and the kill lands inside it.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import ServerFactory
from tether_client.pb import owner_ref_pb2, owner_ref_pb2_grpc
from tether_server.clock import SystemClock
from tether_server.domain.objects import OwnerRef
from tether_server.store.database import Database
from tether_server.store.objects import CreateParams, units
from tether_server.store.tx import Tx

pytestmark = pytest.mark.e2e

FLAT = 1500
SHARED = 300
GRANDCHILDREN = 300
BYSTANDERS = 100
KEPT_GRANDCHILDREN = 50


def _params(name: str, owners: list[OwnerRef], uid: str) -> CreateParams:
    return CreateParams(
        namespace="default", kind="Thing", name=name, uid=uid, owner_refs=tuple(owners)
    )


async def _populate(db_url: str) -> None:
    db = Database(db_url, SystemClock())
    await db.migrate()

    def owner(name: str) -> OwnerRef:
        return OwnerRef(uid=f"uid-{name}", kind="Thing", name=name)

    async def bulk(tx: Tx) -> None:
        for name in ("root", "keeper", "other-root"):
            await units.create(tx, _params(name, [], f"uid-{name}"))
        for n in range(FLAT):
            owners = [owner("root")] + ([owner("keeper")] if n < SHARED else [])
            await units.create(tx, _params(f"flat-{n}", owners, f"uid-flat-{n}"))
        for n in range(GRANDCHILDREN):
            # Under dependents that go; the first few also have the keeper.
            owners = [owner(f"flat-{SHARED + n % 2}")]
            owners += [owner("keeper")] if n < KEPT_GRANDCHILDREN else []
            await units.create(tx, _params(f"grand-{n}", owners, f"uid-grand-{n}"))
        for n in range(BYSTANDERS):
            await units.create(tx, _params(f"bystander-{n}", [owner("other-root")], f"uid-by-{n}"))

    try:
        await db.write(bulk)
    finally:
        await db.dispose()


async def _live(target: str) -> dict[str, list[str]]:
    """Every object's name -> the names of the owners it still references."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
        found: dict[str, list[str]] = {}
        token = ""
        while True:
            response = await stub.ListObjects(
                owner_ref_pb2.ListObjectsRequest(page_size=1000, page_token=token), timeout=30
            )
            for obj in response.objects:
                found[obj.name] = [r.name for r in obj.owner_references]
            token = response.next_page_token
            if not token:
                return found


async def test_sigkill_mid_cascade_then_restart_finishes_it(
    db_url: str, server_factory: ServerFactory
) -> None:
    await _populate(db_url)
    server = server_factory(db_url, extra_args=["--gc-batch-size", "25"])
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = owner_ref_pb2_grpc.OwnerRefServiceStub(channel)
        watch = stub.WatchObjects(owner_ref_pb2.WatchObjectsRequest(), timeout=60)
        await watch.read()  # the header: the watch is in place
        response = await stub.DeleteObject(
            owner_ref_pb2.DeleteObjectRequest(kind="Thing", name="root"), timeout=30
        )
        assert response.deleted
        # Kill as soon as the collector has deleted its first dependents.
        while True:
            message = await watch.read()
            assert message is not grpc.aio.EOF
            if any(e.object.name != "root" for e in message.events):
                break
        server.kill()
        watch.cancel()
    await asyncio.to_thread(server.start)
    live = await _live(server.target)
    expected = {"keeper", "other-root"}
    expected |= {f"flat-{n}" for n in range(SHARED)}
    expected |= {f"bystander-{n}" for n in range(BYSTANDERS)}
    expected |= {f"grand-{n}" for n in range(KEPT_GRANDCHILDREN)}
    assert set(live) == expected
    assert all(live[f"flat-{n}"] == ["keeper"] for n in range(SHARED))
    assert all(live[f"bystander-{n}"] == ["other-root"] for n in range(BYSTANDERS))
    assert all(live[f"grand-{n}"] == ["keeper"] for n in range(KEPT_GRANDCHILDREN))
