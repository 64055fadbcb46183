"""``client.sweeps``: SweepService as keyword methods returning sweep reports.

::

    report = await client.sweeps.run(dry_run=True, parts=["expire-leases", "stale-sagas"])
    async for report in client.sweeps.reports(triggers=["periodic"]):
        ...

Sweeps reclaim what crashes, expiries and deletions left behind; servers run them at start
and periodically, these calls on demand. A sweep's namespace defaults to every namespace,
not the client's. Reads and dry runs are retried on ``Unavailable``; a real sweep is tried
once (a repeat would sweep and report twice).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TypeAlias

from tether_client.convert import Seconds
from tether_client.pb import sweep_pb2
from tether_client.transport import EnumNames, Transport

SweepPart: TypeAlias = sweep_pb2.SweepPart.ValueType
SweepTrigger: TypeAlias = sweep_pb2.SweepTrigger.ValueType

sweep_parts: EnumNames[SweepPart] = EnumNames(
    "SWEEP_PART_", dict(sweep_pb2.SweepPart.items()), "a sweep part"
)
sweep_triggers: EnumNames[SweepTrigger] = EnumNames(
    "SWEEP_TRIGGER_", dict(sweep_pb2.SweepTrigger.items()), "a sweep trigger"
)


class SweepsClient:
    """SweepService: run sweeps, read their reports."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def run(
        self,
        *,
        dry_run: bool = False,
        parts: str | SweepPart | Iterable[str | SweepPart] = (),
        namespace: str = "",
        timeout: Seconds | None = None,
    ) -> sweep_pb2.SweepReport:
        """Admin: sweep now (``parts``: e.g. ``["expire-leases"]``; all when empty).

        ``namespace`` "" sweeps every namespace, whatever the client's default: sweeping is
        an operator's act on the whole store. A namespaced sweep cannot purge events or
        reports (``InvalidField``). ``dry_run`` reports what it would do and changes
        nothing, so only a dry run is retried."""
        request = sweep_pb2.RunSweepRequest(
            namespace=namespace, dry_run=dry_run, parts=sweep_parts.many(parts)
        )
        response = await self._transport.unary(
            lambda e: e.sweep.RunSweep, request, safe=dry_run, timeout=timeout
        )
        return response.report

    def reports(
        self,
        *,
        triggers: str | SweepTrigger | Iterable[str | SweepTrigger] = (),
        page_size: int = 0,
        timeout: Seconds | None = None,
    ) -> AsyncIterator[sweep_pb2.SweepReport]:
        """Every stored sweep report (``triggers``: e.g. ``["periodic", "on-demand"]``),
        page after page; ``timeout`` bounds each page."""
        request = sweep_pb2.ListSweepReportsRequest(
            triggers=sweep_triggers.many(triggers), page_size=page_size
        )
        return self._transport.pages(
            lambda e: e.sweep.ListSweepReports, request, lambda page: page.reports, timeout=timeout
        )

    async def get(self, sweep_id: str, *, timeout: Seconds | None = None) -> sweep_pb2.SweepReport:
        """One sweep report by its id (``SweepReportNotFound`` once purged)."""
        request = sweep_pb2.GetSweepReportRequest(sweep_id=sweep_id)
        response = await self._transport.unary(
            lambda e: e.sweep.GetSweepReport, request, safe=True, timeout=timeout
        )
        return response.report


__all__ = ["SweepsClient", "sweep_parts", "sweep_triggers"]
