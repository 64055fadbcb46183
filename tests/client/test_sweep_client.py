"""``client.sweeps`` against a real server (in process, SQLite and PostgreSQL): sweeps run on
demand, their reports listed (page after page) and read back, and the typed refusals.

One test per backend walks the whole path on one server (the suite's time budget).
"""

from __future__ import annotations

import grpc
import pytest

from tests.client.conftest import ClientFactory, InProcessServer
from tether_client.errors import InvalidField, NotFound, SweepReportNotFound
from tether_client.pb import sweep_pb2


async def test_run_list_and_get_sweep_reports(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    # The client's default namespace does not narrow a sweep: empty means every namespace.
    client = client_factory(tether.target, namespace="team-a")
    sweeps = client.sweeps

    dry = await sweeps.run(dry_run=True)
    assert dry.sweep_id
    assert dry.dry_run is True
    assert dry.trigger == sweep_pb2.SWEEP_TRIGGER_ON_DEMAND
    assert dry.namespace == ""
    # Every part ran (an empty list asks for all of them).
    assert sorted(dry.parts) == sorted(
        v for v in sweep_pb2.SweepPart.values() if v != sweep_pb2.SWEEP_PART_UNSPECIFIED
    )

    real = await sweeps.run(namespace="team-a", parts=["expire-leases"])
    assert real.sweep_id not in ("", dry.sweep_id)
    assert real.dry_run is False
    assert real.namespace == "team-a"
    assert list(real.parts) == [sweep_pb2.SWEEP_PART_EXPIRE_LEASES]
    by_value = await sweeps.run(parts=sweep_pb2.SWEEP_PART_STALE_SAGAS)
    assert by_value.namespace == ""
    assert list(by_value.parts) == [sweep_pb2.SWEEP_PART_STALE_SAGAS]

    listed = [report async for report in sweeps.reports(triggers=["on-demand"])]
    by_id = {report.sweep_id: report for report in listed}
    assert by_id[real.sweep_id] == real
    assert set(by_id) >= {dry.sweep_id, real.sweep_id, by_value.sweep_id}
    assert all(r.trigger == sweep_pb2.SWEEP_TRIGGER_ON_DEMAND for r in listed)
    assert [r async for r in sweeps.reports(triggers=sweep_pb2.SWEEP_TRIGGER_PERIODIC)] == []

    # Page after page, one report a page: all of them, in the same order.
    first = await client.stubs.sweep.ListSweepReports(
        sweep_pb2.ListSweepReportsRequest(page_size=1)
    )
    assert len(first.reports) == 1
    assert first.next_page_token
    paged = [report async for report in sweeps.reports(page_size=1)]
    assert len(paged) >= 3
    assert paged == [report async for report in sweeps.reports()]

    got = await sweeps.get(real.sweep_id)
    assert got == real

    with pytest.raises(SweepReportNotFound) as caught:
        await sweeps.get("00000000-0000-7000-8000-000000000000", timeout=10)
    assert isinstance(caught.value, NotFound)
    assert caught.value.status_code == grpc.StatusCode.NOT_FOUND

    # Events and reports are global: a namespaced sweep cannot purge them.
    with pytest.raises(InvalidField) as refused:
        await sweeps.run(namespace="team-a", dry_run=True, parts=["purge-events"], timeout=10)
    assert refused.value.field == "parts"

    with pytest.raises(ValueError, match="a sweep part is one of expire-leases, "):
        await sweeps.run(parts=["expire"])
