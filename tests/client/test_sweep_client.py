"""``client.sweeps`` against a real server (in process, SQLite and PostgreSQL): sweeps run on
demand, their reports listed and read back, and the typed refusals.

One test per backend walks the whole path on one server (the suite's time budget).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.client.conftest import ClientFactory, InProcessServer
from tether_client import TetherClientSync
from tether_client.errors import InvalidField, NotFound, SweepReportNotFound
from tether_client.pb import sweep_pb2


async def test_run_list_and_get_sweep_reports(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    # The client's default namespace does not narrow a sweep: empty means every namespace.
    client = client_factory(tether.target, namespace="team-a")
    sweeps = client.sweeps

    dry = (await sweeps.run_sweep(sweep_pb2.RunSweepRequest(dry_run=True))).report
    assert dry.sweep_id
    assert dry.dry_run is True
    assert dry.trigger == sweep_pb2.SWEEP_TRIGGER_ON_DEMAND
    assert dry.namespace == ""
    # Every part ran (an empty list asks for all of them).
    assert sorted(dry.parts) == sorted(
        v for v in sweep_pb2.SweepPart.values() if v != sweep_pb2.SWEEP_PART_UNSPECIFIED
    )

    request = sweep_pb2.RunSweepRequest(
        namespace="team-a", parts=[sweep_pb2.SWEEP_PART_EXPIRE_LEASES]
    )
    real = (await sweeps.run_sweep(request)).report
    assert real.sweep_id not in ("", dry.sweep_id)
    assert real.dry_run is False
    assert real.namespace == "team-a"
    assert list(real.parts) == [sweep_pb2.SWEEP_PART_EXPIRE_LEASES]

    listed = await sweeps.list_sweep_reports(
        sweep_pb2.ListSweepReportsRequest(triggers=[sweep_pb2.SWEEP_TRIGGER_ON_DEMAND])
    )
    by_id = {report.sweep_id: report for report in listed.reports}
    assert by_id[real.sweep_id] == real
    assert all(r.trigger == sweep_pb2.SWEEP_TRIGGER_ON_DEMAND for r in listed.reports)

    got = await sweeps.get_sweep_report(sweep_pb2.GetSweepReportRequest(sweep_id=real.sweep_id))
    assert got.report == real

    missing = sweep_pb2.GetSweepReportRequest(sweep_id="00000000-0000-7000-8000-000000000000")
    with pytest.raises(SweepReportNotFound) as caught:
        await sweeps.get_sweep_report(missing, timeout=10)
    assert isinstance(caught.value, NotFound)
    assert caught.value.status_code == grpc.StatusCode.NOT_FOUND

    # Events and reports are global: a namespaced sweep cannot purge them.
    global_part = sweep_pb2.RunSweepRequest(
        namespace="team-a", dry_run=True, parts=[sweep_pb2.SWEEP_PART_PURGE_EVENTS]
    )
    with pytest.raises(InvalidField) as refused:
        await sweeps.run_sweep(global_part, timeout=10)
    assert refused.value.field == "parts"

    # The blocking facade reads the same report (from a thread: the server runs on this loop).
    def read_blocking() -> sweep_pb2.SweepReport:
        with TetherClientSync(tether.target) as sync:
            request = sweep_pb2.GetSweepReportRequest(sweep_id=real.sweep_id)
            return sync.sweeps.get_sweep_report(request, timeout=10).report

    assert await asyncio.to_thread(read_blocking) == real
