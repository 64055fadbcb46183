"""SweepService refuses what a client can get wrong with the precise status and ErrorInfo
reason (never INTERNAL or UNKNOWN), and a refused RunSweep sweeps nothing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tether_client.pb import sweep_pb2

from .conftest import WAIT_S, Harness, error_info
from .sweep_support import PURGE_EVENTS, PURGE_REPORTS, STALE, SweepEnv, sweep_env_for

IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def env(tether: Harness) -> SweepEnv:
    return await sweep_env_for(tether)


RUN_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown part", {"parts": [99]}, "parts"),
    ("unspecified part", {"parts": [0]}, "parts"),
    ("bad namespace", {"namespace": "Not_A_Label"}, "namespace"),
    ("long namespace", {"namespace": "a" * 64}, "namespace"),
    ("namespaced event purge", {"namespace": "team-a", "parts": [STALE, PURGE_EVENTS]}, "parts"),
    ("namespaced report purge", {"namespace": "team-a", "parts": [PURGE_REPORTS]}, "parts"),
]


@pytest.mark.parametrize(("case", "fields", "field"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
async def test_run_sweep_refuses_malformed_scopes(
    env: SweepEnv, case: str, fields: dict[str, Any], field: str
) -> None:
    before = await env.sweeps.ListSweepReports(sweep_pb2.ListSweepReportsRequest(), timeout=WAIT_S)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sweeps.RunSweep(sweep_pb2.RunSweepRequest(**fields), timeout=WAIT_S)
    code, reason, metadata = error_info(caught.value)
    assert (code, reason, metadata.get("field")) == (IA, "INVALID_FIELD", field), case
    after = await env.sweeps.ListSweepReports(sweep_pb2.ListSweepReportsRequest(), timeout=WAIT_S)
    assert after == before  # nothing ran, no report


LIST_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("negative page size", {"page_size": -1}, "INVALID_FIELD", "page_size"),
    ("unknown trigger", {"triggers": [7]}, "INVALID_FIELD", "triggers"),
    ("garbage token", {"page_token": "not-a-token"}, "INVALID_PAGE_TOKEN", "page_token"),
]


@pytest.mark.parametrize(
    ("case", "fields", "reason", "field"), LIST_CASES, ids=[c[0] for c in LIST_CASES]
)
async def test_list_sweep_reports_refuses_bad_filters(
    env: SweepEnv, case: str, fields: dict[str, Any], reason: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sweeps.ListSweepReports(
            sweep_pb2.ListSweepReportsRequest(**fields), timeout=WAIT_S
        )
    code, got_reason, metadata = error_info(caught.value)
    assert (code, got_reason, metadata.get("field")) == (IA, reason, field), case


async def test_a_page_token_of_another_query_is_refused(env: SweepEnv) -> None:
    for _ in range(2):
        await env.run(STALE, dry_run=True)
    page = await env.sweeps.ListSweepReports(
        sweep_pb2.ListSweepReportsRequest(page_size=1), timeout=WAIT_S
    )
    assert page.next_page_token
    other = sweep_pb2.ListSweepReportsRequest(
        page_size=1,
        page_token=page.next_page_token,
        triggers=[sweep_pb2.SWEEP_TRIGGER_PERIODIC],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sweeps.ListSweepReports(other, timeout=WAIT_S)
    assert error_info(caught.value)[:2] == (IA, "INVALID_PAGE_TOKEN")


@pytest.mark.parametrize(
    ("sweep_id", "expected"),
    [
        ("", (IA, "INVALID_FIELD")),
        ("x'; DROP TABLE sweep_reports; --", (IA, "INVALID_FIELD")),
        ("0190a3c4-1111-7aaa-8bbb-0123456789ab", (NF, "SWEEP_REPORT_NOT_FOUND")),
    ],
    ids=["empty", "injection", "unknown"],
)
async def test_get_sweep_report_of_a_bad_or_unknown_id(
    env: SweepEnv, sweep_id: str, expected: tuple[grpc.StatusCode, str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sweeps.GetSweepReport(
            sweep_pb2.GetSweepReportRequest(sweep_id=sweep_id), timeout=WAIT_S
        )
    assert error_info(caught.value)[:2] == expected
