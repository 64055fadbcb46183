"""tether.v1.SweepService: protobuf in, the sweeper or the report store, protobuf out."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from tether_client.pb import sweep_pb2
from tether_server.domain import errors, paging, validation
from tether_server.domain.sweep import SweepTrigger, choose_parts
from tether_server.domain.validation import Limits
from tether_server.services import sweep_convert as conv
from tether_server.services.saga_convert import enum_value
from tether_server.services.streaming import count_fitting
from tether_server.store.sweeps import SweepStore
from tether_server.sweeper import Sweeper

Context = Any  # grpc.aio.ServicerContext

# Sweep ids are UUIDs (version 7); anything else cannot name a report.
_FIRST = (2**63 - 1, "")
_SWEEP_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class SweepService:
    def __init__(
        self,
        sweeper: Sweeper,
        store: SweepStore,
        limits: Limits | None = None,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        self._sweeper = sweeper
        self._store = store
        self._limits = limits or Limits()
        self._max_response_bytes = max_response_bytes

    async def RunSweep(
        self, request: sweep_pb2.RunSweepRequest, context: Context
    ) -> sweep_pb2.RunSweepResponse:
        # Only admins get here: the RPC boundary checks roles (domain/access.py).
        # Empty means every namespace here (not the default one).
        namespace = validation.namespace(request.namespace) if request.namespace else ""
        requested = [enum_value(conv.PART_FROM_PB, p, "parts", "sweep part") for p in request.parts]
        parts = choose_parts(requested, namespace)
        # Shielded: a caller that gives up (deadline, Ctrl-C) does not stop the sweep
        # between two batches; it finishes and its report is stored for ListSweepReports.
        report = await asyncio.shield(
            self._sweeper.run(
                SweepTrigger.ON_DEMAND, parts=parts, namespace=namespace, dry_run=request.dry_run
            )
        )
        return sweep_pb2.RunSweepResponse(report=conv.report_to_pb(report))

    async def ListSweepReports(
        self, request: sweep_pb2.ListSweepReportsRequest, context: Context
    ) -> sweep_pb2.ListSweepReportsResponse:
        triggers = sorted(
            {
                enum_value(conv.TRIGGER_FROM_PB, t, "triggers", "sweep trigger")
                for t in request.triggers
            }
        )
        size = validation.page_size(request.page_size, self._limits)
        digest = paging.query_digest("sweep_reports", [t.value for t in triggers])
        # The first page starts after every real position.
        position = paging.decode(request.page_token, digest)
        after = paging.int_and_id(position, paging.pattern(_SWEEP_ID)) or _FIRST
        page = await self._store.list_reports(triggers, after, size + 1)
        messages = [conv.report_to_pb(r) for r in page[:size]]
        fits = count_fitting(messages, self._max_response_bytes)
        response = sweep_pb2.ListSweepReportsResponse(reports=messages[:fits])
        if fits < len(page):
            last = page[fits - 1]
            response.next_page_token = paging.encode([last.started_at_us, last.sweep_id], digest)
        return response

    async def GetSweepReport(
        self, request: sweep_pb2.GetSweepReportRequest, context: Context
    ) -> sweep_pb2.GetSweepReportResponse:
        sweep_id = request.sweep_id
        if not _SWEEP_ID.fullmatch(sweep_id):
            raise errors.InvalidField("sweep_id", "must be a sweep id as reports show it (a UUID)")
        report = await self._store.get_report(sweep_id)
        if report is None:
            raise errors.SweepReportNotFound(
                f"no sweep report {sweep_id!r} (never written, or purged by retention)",
                {"sweep_id": sweep_id},
            )
        return sweep_pb2.GetSweepReportResponse(report=conv.report_to_pb(report))
