"""SweepService on both backends: each stale-saga policy applied once, retention purges
(ended leases with their request ids and keys, terminal sagas and what they owned, events,
reports), fencing tokens still growing after a key's history is purged, blocked objects
with their handlers' reasons, the collector's state, a dry run that changes nothing, and
the report store (listing, paging, the startup report)."""

from __future__ import annotations

import dataclasses
import logging

import grpc
import pytest

from tether_client.pb import (
    common_pb2,
    lease_pb2,
    owner_ref_pb2,
    saga_pb2,
    sweep_pb2,
    sweep_pb2_grpc,
)
from tether_server.app import TetherServer
from tether_server.clock import FakeClock
from tether_server.domain.sweep import SweepLimits

from .conftest import WAIT_S, Harness, dur, expect_error, make_test_config
from .object_support import FIN, FOREGROUND, ref
from .saga_support import (
    COMPENSATING,
    COMPLETED,
    FAILED,
    ON_STALE_COMPENSATE,
    ON_STALE_QUARANTINE,
    QUARANTINED,
    REQUEUE,
    RUNNING,
    SagaApi,
    comp,
)
from .sweep_support import (
    BLOCKED,
    COLLECT,
    DAY_S,
    EXPIRE,
    PURGE_EVENTS,
    PURGE_LEASES,
    PURGE_REPORTS,
    PURGE_SAGAS,
    RECONCILE,
    STALE,
    SweepEnv,
    actions,
    quiet,
    release,
    run_sweep,
    sweep_env_for,
    table_contents,
)

NOTHING = {
    "leases_expired": 0,
    "sagas_requeued": 0,
    "sagas_compensating": 0,
    "sagas_failed": 0,
    "sagas_quarantined": 0,
    "objects_collected": 0,
    "objects_orphaned": 0,
    "rows_purged": {},
}


@pytest.fixture
async def env(tether: Harness) -> SweepEnv:
    return await sweep_env_for(tether)


async def _stale_sagas(env: SweepEnv) -> dict[str, common_pb2.Fence]:
    """One saga per outcome, each claimed under a 10 s lease, plus one live claim; the
    fences by saga id."""
    api = env.sagas
    policies = {"rq": REQUEUE, "cp": ON_STALE_COMPENSATE, "cp-none": ON_STALE_COMPENSATE}
    policies["q"] = ON_STALE_QUARANTINE
    fences = {}
    for saga_id, policy in policies.items():
        await api.create(saga_id, on_stale=policy)
        claimed = await api.claim(saga_id, ttl_s=10)
        fences[saga_id] = claimed.fence
        if saga_id == "cp":
            await api.step(saga_id, claimed.fence, 0, "make", compensation=comp("undo"))
    await api.create("live")
    fences["live"] = (await api.claim("live", ttl_s=600)).fence
    return fences


async def test_a_sweep_applies_each_stale_policy_once(env: SweepEnv) -> None:
    fences = await _stale_sagas(env)
    env.advance(11)
    first = await env.run(*RECONCILE)
    assert actions(first) == {
        **NOTHING,
        "leases_expired": 4,
        "sagas_requeued": 1,
        "sagas_compensating": 1,
        "sagas_failed": 1,
        "sagas_quarantined": 1,
    }
    states = {s: (await env.sagas.get(s)).state for s in ("rq", "cp", "cp-none", "q", "live")}
    assert states == {
        "rq": RUNNING,
        "cp": COMPENSATING,
        "cp-none": FAILED,
        "q": QUARANTINED,
        "live": RUNNING,
    }
    # The worker that went quiet hears why its claim ended, as it would have before.
    await expect_error(
        env.sagas.step("rq", fences["rq"], 0, "late"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_EXPIRED",
    )
    # The requeued saga is claimable again: its claim ended.
    assert (await env.sagas.claim("rq", holder="w2")).saga.attempt == 2
    assert actions(await env.run(*RECONCILE)) == NOTHING


async def test_ended_leases_go_with_their_request_ids_and_keys_tokens_keep_growing(
    env: SweepEnv,
) -> None:
    tether = env.tether
    first = await tether.acquire("k", request_id="req-1")
    await release(tether, first)
    second = await tether.acquire("k")
    await release(tether, second)
    kept = await tether.acquire("other", ttl_s=3600)  # past its ttl, never expired
    env.advance(DAY_S + 1)
    report = await env.run(PURGE_LEASES)
    assert dict(report.rows_purged) == {"leases": 2, "lease_requests": 1, "lease_keys": 1}
    for gone in (first, second):
        await expect_error(tether.get(gone.lease_id), grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
    assert (await tether.get(kept.lease_id)).lease_id == kept.lease_id
    # The request id is free again: a new lease, not the purged one.
    again = await tether.acquire("k", request_id="req-1")
    assert again.lease_id != first.lease_id
    assert again.fencing_token > second.fencing_token > first.fencing_token


async def test_terminal_sagas_go_with_their_logs_and_what_they_owned(env: SweepEnv) -> None:
    api = env.sagas
    await api.create("done")
    claimed = await api.claim("done")
    await api.step("done", claimed.fence, 0, "make")
    await api.complete("done", claimed.fence)
    await api.create("open")
    saga_owner = common_pb2.OwnerReference(kind="tether.v1/Saga", name="done", uid="done")
    await env.objects.create("workdir", owners=[saga_owner])
    env.advance(7 * DAY_S - 60)
    assert dict((await env.run(PURGE_SAGAS)).rows_purged) == {}
    env.advance(120)
    report = await env.run(PURGE_SAGAS, COLLECT)
    assert dict(report.rows_purged) == {"sagas": 1}
    assert report.objects_collected == 1
    await expect_error(api.get("done"), grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND")
    assert await env.objects.get("workdir") is None
    assert (await api.get("open")).state == saga_pb2.SAGA_STATE_PLANNED


async def test_purged_events_answer_out_of_range_and_old_reports_go(env: SweepEnv) -> None:
    tether = env.tether
    startup = (
        await env.sweeps.ListSweepReports(
            sweep_pb2.ListSweepReportsRequest(triggers=[sweep_pb2.SWEEP_TRIGGER_STARTUP]),
            timeout=WAIT_S,
        )
    ).reports
    assert len(startup) == 1
    lease = await tether.acquire("a")
    env.advance(DAY_S + 1)
    await tether.acquire("b")
    report = await env.run(PURGE_EVENTS)
    assert report.rows_purged["events"] == 1
    watch = tether.stub.Watch(lease_pb2.WatchRequest(start_revision=1), timeout=WAIT_S)
    await expect_error(watch.read(), grpc.StatusCode.OUT_OF_RANGE, "REVISION_COMPACTED")
    # Younger events stay readable.
    recent = tether.stub.Watch(lease_pb2.WatchRequest(start_revision=2), timeout=WAIT_S)
    keys: list[str] = []
    while not keys:
        keys = [e.lease.key for e in (await recent.read()).events]
    assert keys == ["b"]
    recent.cancel()
    # Purging events leaves the leases they were about alone.
    assert (await tether.get(lease.lease_id)).key == "a"
    env.advance(7 * DAY_S)
    assert (await env.run(PURGE_REPORTS)).rows_purged["sweep_reports"] >= 2
    await expect_error(
        env.sweeps.GetSweepReport(
            sweep_pb2.GetSweepReportRequest(sweep_id=startup[0].sweep_id), timeout=WAIT_S
        ),
        grpc.StatusCode.NOT_FOUND,
        "SWEEP_REPORT_NOT_FOUND",
    )


async def test_objects_stuck_on_finalizers_are_reported_with_their_reason(env: SweepEnv) -> None:
    objects = env.objects
    owner = await objects.create("task")
    await objects.create("worktree", owners=[ref(owner, block=True)], finalizers=[FIN])
    await objects.create("quick", finalizers=[FIN])
    await objects.delete("task", FOREGROUND)
    await objects.delete("quick")
    await objects.stub.RemoveFinalizer(
        owner_ref_pb2.RemoveFinalizerRequest(
            kind="Thing", name="quick", finalizer=FIN, refusal="uncommitted work"
        ),
        timeout=WAIT_S,
    )
    await env.run(COLLECT)  # the foreground cascade marks the worktree terminating
    env.advance(2 * 3600)
    report = await env.run(BLOCKED, COLLECT)
    blocked = {b.name: b for b in report.blocked}
    assert report.blocked_total == len(blocked) == 3
    assert set(blocked) == {"task", "worktree", "quick"}
    assert list(blocked["quick"].finalizers) == [FIN]
    assert blocked["quick"].reason == "uncommitted work"
    assert blocked["quick"].age.seconds >= 2 * 3600
    assert list(blocked["task"].finalizers) == ["foregroundDeletion"]
    # The owner waits for the worktree: its queue item stays, and the report says so.
    assert report.gc_queue_depth == 1
    assert list(report.collector_failures) == []


async def test_a_dry_run_changes_nothing_and_predicts_the_sweep(env: SweepEnv) -> None:
    tether, api = env.tether, env.sagas
    for task in ("store-heartbeat", "replica-reaper"):  # they write liveness, not data
        await env.server.runner.stop_task(task)
    ended = await tether.acquire("old", request_id="r-old")
    await release(tether, ended)
    await api.create("finished")
    claimed = await api.claim("finished")
    await api.complete("finished", claimed.fence)
    env.advance(8 * DAY_S)
    await _stale_sagas(env)
    await tether.acquire("expiring", ttl_s=5)
    env.advance(11)
    before = await table_contents(env.server, skip=["sweep_reports"])
    dry = await env.run(dry_run=True)
    assert await table_contents(env.server, skip=["sweep_reports"]) == before
    assert dry.dry_run
    real = await env.run()
    assert not real.dry_run
    predicted = actions(dry)
    assert actions(real) == predicted
    assert predicted["leases_expired"] == 5
    assert predicted["rows_purged"]["sagas"] == 1
    # The released lease and the one the finished saga's claim created.
    assert predicted["rows_purged"]["leases"] == 2


async def test_reports_are_listed_newest_first_by_trigger_and_paged(env: SweepEnv) -> None:
    ids = []
    for _ in range(3):
        env.advance(1)
        ids.append((await env.run(EXPIRE, dry_run=True)).sweep_id)
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await env.sweeps.ListSweepReports(
            sweep_pb2.ListSweepReportsRequest(
                page_size=2, page_token=token, triggers=[sweep_pb2.SWEEP_TRIGGER_ON_DEMAND]
            ),
            timeout=WAIT_S,
        )
        assert len(page.reports) <= 2
        seen += [r.sweep_id for r in page.reports]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    everything = await env.sweeps.ListSweepReports(
        sweep_pb2.ListSweepReportsRequest(), timeout=WAIT_S
    )
    triggers = [r.trigger for r in everything.reports]
    assert triggers == [sweep_pb2.SWEEP_TRIGGER_ON_DEMAND] * 3 + [sweep_pb2.SWEEP_TRIGGER_STARTUP]
    got = await env.sweeps.GetSweepReport(
        sweep_pb2.GetSweepReportRequest(sweep_id=ids[0]), timeout=WAIT_S
    )
    assert got.report == everything.reports[2]
    assert list(got.report.parts) == [EXPIRE]


async def test_a_namespaced_sweep_touches_only_its_namespace(env: SweepEnv) -> None:
    api = env.sagas
    for namespace in ("team-a", "team-b"):
        await api.stub.CreateSaga(
            saga_pb2.CreateSagaRequest(namespace=namespace, saga_id="s", kind="k"), timeout=WAIT_S
        )
        claimed = await api.stub.ClaimSaga(
            saga_pb2.ClaimSagaRequest(
                namespace=namespace,
                saga_id="s",
                purpose=saga_pb2.CLAIM_PURPOSE_EXECUTE,
                new_lease=saga_pb2.ClaimLeaseSpec(holder="w", ttl=dur(10)),
            ),
            timeout=WAIT_S,
        )
        await api.stub.CompleteSaga(
            saga_pb2.CompleteSagaRequest(namespace=namespace, saga_id="s", fence=claimed.fence),
            timeout=WAIT_S,
        )
    env.advance(8 * DAY_S)
    report = await env.run(namespace="team-a")
    assert report.namespace == "team-a"
    assert PURGE_EVENTS not in report.parts
    assert STALE in report.parts
    assert dict(report.rows_purged).get("sagas") == 1
    kept = await api.get("s", namespace="team-b")
    assert kept.state == COMPLETED


async def test_a_backlog_over_the_threshold_warns_and_shows_in_metrics(
    db_url: str, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash storm: more stale sagas than one sweep may settle. The sweep settles its
    share, reports the rest as backlog, warns, and the metrics say the same."""
    config = make_test_config(db_url)
    limits = SweepLimits(batch_size=2, max_batches=1, backlog_warning=3)
    config = dataclasses.replace(config, sweep=dataclasses.replace(config.sweep, limits=limits))
    server = TetherServer(config, fake_clock)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await quiet(server)
        api = SagaApi(channel)
        for n in range(8):
            await api.create(f"s{n}")
            await api.claim(f"s{n}", ttl_s=10)
        fake_clock.advance(11)
        with caplog.at_level(logging.WARNING, logger="tether_server.sweeper"):
            report = await run_sweep(sweep_pb2_grpc.SweepServiceStub(channel), STALE)
        assert report.sagas_requeued == 2
        assert report.backlog == 6
        assert any("crash storm" in r.getMessage() for r in caplog.records)
        scraped = server.metrics.scrape().decode()
        assert "tether_sweep_backlog 6.0" in scraped
        assert 'tether_sweep_actions_total{action="sagas_requeued"} 2.0' in scraped
        assert 'tether_sweeps_total{result="ok",trigger="on-demand"} 1.0' in scraped
    finally:
        try:
            await server.stop(0)
        finally:
            await channel.close()


async def test_an_owner_the_collector_keeps_failing_on_is_in_the_report(
    env: SweepEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector never stops silently: an owner whose collection fails stays queued
    with its error, and the sweep report names it (the fault is injected, as in the
    collector's own tests)."""
    from tether_server.store.objects import collector

    owner = await env.objects.create("owner")
    await env.objects.create("dependent", owners=[ref(owner)])
    real = collector.collect_item

    async def broken(tx: object, namespace: str, uid: str, batch: int) -> object:
        if uid == owner.uid:
            raise RuntimeError("disk on fire")
        return await real(tx, namespace, uid, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(collector, "collect_item", broken)
    await env.objects.delete("owner")
    report = await env.run(COLLECT)
    assert list(report.failures) == []  # the collector recorded it; the sweep went on
    assert report.gc_queue_depth == 1
    (failing,) = report.collector_failures
    assert failing.owner_uid == owner.uid
    assert failing.attempts == 1
    assert "disk on fire" in failing.last_error
