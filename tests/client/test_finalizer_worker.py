"""``client.finalizer_worker()`` against a real server (in process, SQLite and PostgreSQL).

Clients run on a ``ManualClock``: a backoff elapses only when a test advances the clocks,
so the worker's watch (not a periodic listing) is what finds objects deleted while it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.client.conftest import ClientFactory, Clocks, InProcessServer, advance_until
from tether_client import FinalizerWorker, RefuseFinalization, TetherClient
from tether_client.errors import ObjectNotFound
from tether_client.pb import owner_ref_pb2

KIND = "Worktree"
FINALIZER = "example.com/worktree"
OTHER = "example.com/other"
WAIT_S = 10.0


class Boom(Exception):
    pass


async def create(
    client: TetherClient, name: str, finalizers: tuple[str, ...] = (FINALIZER,)
) -> owner_ref_pb2.Object:
    created = await client.objects.create(
        KIND, name, finalizers=finalizers, spec={"path": f"/work/{name}"}
    )
    return created.object


async def terminate(
    client: TetherClient, name: str, finalizers: tuple[str, ...] = (FINALIZER,)
) -> owner_ref_pb2.Object:
    """A new object with ``finalizers``, deleted: it stays, terminating."""
    await create(client, name, finalizers)
    response = await client.objects.delete(KIND, name)
    assert not response.deleted
    assert response.object.HasField("deletion_timestamp")
    return response.object


async def find(client: TetherClient, name: str) -> owner_ref_pb2.Object | None:
    try:
        return await client.objects.get(KIND, name)
    except ObjectNotFound:
        return None


async def until(condition: Callable[[], Awaitable[bool]], within: float = WAIT_S) -> None:
    """Poll ``condition`` (real time) until it holds; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.02)


async def gone(client: TetherClient, *names: str) -> bool:
    return all([await find(client, name) is None for name in names])


async def stop_worker(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, WAIT_S)


async def test_worker_removes_its_finalizer_and_the_object_goes(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    handled: list[str] = []

    def handler(obj: owner_ref_pb2.Object) -> None:  # sync: run in a thread
        assert obj.HasField("deletion_timestamp")
        handled.append(obj.name)

    await terminate(client, "wt-1")
    await terminate(client, "wt-2", (FINALIZER, OTHER))
    await create(client, "wt-live")  # ours, but not being deleted: left alone
    await terminate(client, "wt-theirs", (OTHER,))  # not ours

    stop = asyncio.Event()
    worker = client.finalizer_worker(FINALIZER, KIND, handler, stop=stop)
    task = asyncio.create_task(worker.run())
    await until(lambda: gone(client, "wt-1"))
    # Deleted while the worker runs: the watch brings it (no time passes for a resync).
    await terminate(client, "wt-3")
    await until(lambda: gone(client, "wt-3"))

    async def ours_removed() -> bool:
        obj = await find(client, "wt-2")
        return obj is not None and list(obj.finalizers) == [OTHER]

    await until(ours_removed)
    await stop_worker(stop, task)

    assert sorted(handled) == ["wt-1", "wt-2", "wt-3"]
    live = await find(client, "wt-live")
    assert live is not None
    assert list(live.finalizers) == [FINALIZER]
    theirs = await find(client, "wt-theirs")
    assert theirs is not None
    assert list(theirs.termination.pending_finalizers) == [OTHER]
    assert {outcome for _, outcome in worker.outcomes} == {"finalized"}


async def test_a_refusal_is_recorded_and_the_object_tried_again(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    answers: list[Exception | None] = [Boom("disk full"), RefuseFinalization("uncommitted: a.py")]

    async def handler(obj: owner_ref_pb2.Object) -> None:
        answer = answers.pop(0) if answers else None
        if answer is not None:
            raise answer

    obj = await terminate(client, "wt-dirty")
    worker = client.finalizer_worker(FINALIZER, KIND, handler, initial_backoff=0.01)

    assert await worker.run_once() == 0  # failed: nothing recorded on the object
    kept = await find(client, "wt-dirty")
    assert kept is not None
    assert not kept.termination.refusals

    assert await worker.run_once() == 0  # refused
    kept = await find(client, "wt-dirty")
    assert kept is not None
    assert list(kept.finalizers) == [FINALIZER]
    assert [(r.finalizer, r.reason) for r in kept.termination.refusals] == [
        (FINALIZER, "uncommitted: a.py")
    ]
    assert any("uncommitted: a.py" in entry.text for entry in kept.history)

    assert await worker.run_once() == 1  # the cause was fixed
    assert await find(client, "wt-dirty") is None
    assert worker.outcomes == [(obj.uid, "failed"), (obj.uid, "refused"), (obj.uid, "finalized")]
    assert await worker.run_once() == 0  # nothing left


async def test_a_refused_object_is_retried_after_refusal_retry(
    tether: InProcessServer, client_factory: ClientFactory, clocks: Clocks
) -> None:
    client = client_factory(tether.target)
    calls: list[str] = []

    async def handler(obj: owner_ref_pb2.Object) -> None:
        calls.append(obj.name)
        if len(calls) == 1:
            raise RefuseFinalization("a process still runs in it")

    await terminate(client, "wt-busy")
    stop = asyncio.Event()
    worker = client.finalizer_worker(FINALIZER, KIND, handler, refusal_retry=4, stop=stop)
    task = asyncio.create_task(worker.run())

    async def refused() -> bool:
        return [outcome for _, outcome in worker.outcomes] == ["refused"]

    await until(refused)
    # Not again at once (its own refusal's event must not retry it): after 2 to 4 s.
    advanced = await advance_until(clocks.advance, lambda: len(calls) == 2, step=1, limit=10)
    assert advanced >= 2
    await until(lambda: gone(client, "wt-busy"))
    await stop_worker(stop, task)


async def test_two_workers_handle_an_object_one_at_a_time(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    gate = asyncio.Event()
    active = 0
    most = 0
    calls = 0

    async def handler(obj: owner_ref_pb2.Object) -> None:
        nonlocal active, most, calls
        active += 1
        calls += 1
        most = max(most, active)
        try:
            await gate.wait()
        finally:
            active -= 1

    stop = asyncio.Event()
    # Separate clients, as separate processes would be: each its own holder.
    pool: list[FinalizerWorker] = [
        client_factory(tether.target).finalizer_worker(FINALIZER, KIND, handler, stop=stop)
        for _ in range(2)
    ]
    tasks = [asyncio.create_task(worker.run()) for worker in pool]
    client = client_factory(tether.target)
    await terminate(client, "wt-shared")

    async def one_runs_the_other_found_it_held() -> bool:
        # The holder may still be on its way into the handler when the other finds the
        # lease held: wait for both.
        busy = any(outcome == "busy" for worker in pool for _, outcome in worker.outcomes)
        return busy and calls == 1

    await until(one_runs_the_other_found_it_held)
    gate.set()
    await until(lambda: gone(client, "wt-shared"))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert calls == 1
    assert most == 1
    outcomes = [outcome for worker in pool for _, outcome in worker.outcomes]
    assert outcomes.count("finalized") == 1


async def test_an_object_recreated_under_the_same_name_is_not_finalized(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    seen: list[owner_ref_pb2.Object] = []

    async def handler(obj: owner_ref_pb2.Object) -> None:
        seen.append(obj)

    old = await terminate(client, "wt-again")
    worker = client.finalizer_worker(FINALIZER, KIND, handler)
    await worker._resync()
    # Gone (forced) and recreated, not deleted, before the worker gets to it.
    await client.objects.force_remove_finalizers(KIND, "wt-again", reason="test")
    new = await create(client, "wt-again")
    assert new.uid != old.uid

    assert await worker._process(old.uid) == "gone"
    assert seen == []
    kept = await find(client, "wt-again")
    assert kept is not None
    assert kept.uid == new.uid
    assert list(kept.finalizers) == [FINALIZER]
