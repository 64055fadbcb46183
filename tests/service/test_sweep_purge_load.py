"""A purge of a large history (100 000 ended leases, a tenth with request ids, on 500 keys)
runs in batches while live leases keep renewing: every renewal succeeds, renewals go on
during the purge (it never holds the store for long), and every purged row is gone.
Latency under this load is the benchmark's business (tests/bench/purge.py), not a test's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tether_client.pb import lease_pb2, sweep_pb2

from .conftest import WAIT_S, Harness
from .sweep_support import DAY_S, PURGE_LEASES, SweepEnv, sweep_env_for

ROWS = 100_000
KEYS = 500
RENEWERS = 20

_NUMBERS_PG = "SELECT i FROM generate_series(1, {rows}) AS s(i)"
_NUMBERS_SQLITE = (
    "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows})"
    " SELECT i FROM s"
)
_LEASES = (
    "INSERT INTO leases (lease_id, namespace, key, holder, principal, ttl_us, fencing_token,"
    " state, acquired_at_us, renewed_at_us, expires_at_us, ended_at_us, lock_delay_us, labels,"
    " progress, stream_id, request_id, create_revision, mod_revision)"
    " SELECT 'old-' || i, 'default', 'bulk/' || (i % {keys}), 'h', 'anonymous', 10000000, i,"
    " 'RELEASED', {t}, {t}, {t}, {t}, 0, '{{}}', {empty}, NULL,"
    " CASE WHEN i % 10 = 0 THEN 'req-' || i END, 0, 0 FROM ({numbers}) n"
)
_REQUESTS = (
    "INSERT INTO lease_requests (namespace, request_id, lease_id, fingerprint, created_at_us)"
    " SELECT 'default', request_id, lease_id, 'f', ended_at_us FROM leases"
    " WHERE request_id IS NOT NULL"
)
_KEYS = (
    "INSERT INTO lease_keys (namespace, key, last_fencing_token, available_at_us,"
    " current_lease_id) SELECT 'default', key, max(fencing_token), 0, NULL FROM leases"
    " GROUP BY key"
)


async def seed_ended_leases(env: SweepEnv, rows: int = ROWS) -> None:
    """``rows`` leases that ended two days ago, a tenth with request ids, on KEYS keys."""
    from tether_server.store.sql import sql
    from tether_server.store.tx import Tx

    old = env.tether.clock.now_us() - round(2 * DAY_S * 1e6)

    def leases(numbers: str, empty: str) -> str:
        return _LEASES.format(keys=KEYS, t=old, empty=empty, numbers=numbers.format(rows=rows))

    async def seed(tx: Tx) -> None:
        await tx.execute(
            sql(leases(_NUMBERS_PG, "'\\x'::bytea"), sqlite=leases(_NUMBERS_SQLITE, "X''"))
        )
        await tx.execute(sql(_REQUESTS))
        await tx.execute(sql(_KEYS))

    await env.server.db.write(seed, emits=False)


@pytest.mark.timeout(300)  # a loaded machine makes the batches small (a time target)
async def test_a_large_purge_runs_in_batches_while_heartbeats_keep_succeeding(
    tether: Harness,
) -> None:
    env = await sweep_env_for(tether)
    await seed_ended_leases(env)
    live = [await tether.acquire(f"live/{n}", ttl_s=30) for n in range(RENEWERS)]
    # A deadline for a busy machine, not a speed goal (the benchmark measures speed).
    purge = asyncio.ensure_future(env.run(PURGE_LEASES, timeout=240))
    renewed_during = [0] * RENEWERS
    failures: list[BaseException] = []

    async def renew(index: int, lease: lease_pb2.Lease) -> None:
        request = lease_pb2.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        while not purge.done():
            try:
                await tether.stub.Renew(request, timeout=WAIT_S)
            except Exception as exc:  # every failure is the finding
                failures.append(exc)
                return
            if not purge.done():
                renewed_during[index] += 1

    await asyncio.gather(*(renew(n, lease) for n, lease in enumerate(live)))
    report = await purge
    assert failures == []
    assert dict(report.rows_purged) == {
        "leases": ROWS,
        "lease_requests": ROWS // 10,
        "lease_keys": KEYS,
    }
    assert report.backlog == 0
    # Renewals got in between the batches: the purge never held the store throughout.
    assert all(count > 0 for count in renewed_during), renewed_during
    assert len(await tether.list_all()) == RENEWERS


async def test_a_sweep_whose_caller_gives_up_still_finishes_and_reports(tether: Harness) -> None:
    env = await sweep_env_for(tether)
    await seed_ended_leases(env, rows=20_000)
    started = asyncio.Event()
    sweeper = env.server.sweeper
    original_run = sweeper.run

    async def spying_run(*args: Any, **kwargs: Any) -> Any:
        started.set()
        return await original_run(*args, **kwargs)

    sweeper.run = spying_run  # type: ignore[method-assign]
    call = env.sweeps.RunSweep(sweep_pb2.RunSweepRequest(parts=[PURGE_LEASES]), timeout=WAIT_S * 4)
    await asyncio.wait_for(started.wait(), WAIT_S)
    call.cancel()  # the caller goes away mid-sweep
    with pytest.raises(asyncio.CancelledError):
        await call

    async def reported() -> list[sweep_pb2.SweepReport]:
        listed = await env.sweeps.ListSweepReports(
            sweep_pb2.ListSweepReportsRequest(triggers=[sweep_pb2.SWEEP_TRIGGER_ON_DEMAND]),
            timeout=WAIT_S,
        )
        return list(listed.reports)

    for _ in range(600):
        found = await reported()
        if found:
            break
        await asyncio.sleep(0.05)
    assert [dict(r.rows_purged).get("leases") for r in found] == [20_000]
