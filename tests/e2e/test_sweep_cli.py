"""``tether sweep ...`` as a subprocess against a real server, on both backends.

One server per backend: a worktree is left stuck terminating on its finalizer (set up with
the Python client, the server's file clock moved two hours on), then the CLI runs sweeps,
lists their reports and shows them. How a report with every section reads is checked on a
hand-made report, without a server.
"""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from tests.e2e import ServerFactory
from tests.e2e.cli_support import Cli, fields, section
from tests.support.server_process import FileClockDriver
from tether_client import TetherClient
from tether_client.cli_sweep import PARTS, report_details, report_table
from tether_client.pb import sweep_pb2

FINALIZER = "example.com/worktree"
REFUSAL = "uncommitted changes in src/"
# A well-formed sweep id (a UUID) that names no report.
UNKNOWN_ID = "00000000-0000-7000-8000-000000000000"


tether = Cli("sweep")
ok = tether.ok
ok_json = tether.ok_json


async def _stuck_worktree(target: str) -> str:
    """Worktree/wt-1, deleted but kept by its finalizer, whose handler refused; its uid."""
    async with TetherClient(target) as client:
        created = await client.objects.create("Worktree", "wt-1", finalizers=[FINALIZER])
        await client.objects.delete("Worktree", "wt-1")
        await client.objects.remove_finalizer("Worktree", "wt-1", FINALIZER, refusal=REFUSAL)
        return created.object.uid


@pytest.mark.e2e
def test_run_list_and_show(
    db_url: str, server_factory: ServerFactory, file_clock: FileClockDriver
) -> None:
    server = server_factory(db_url, env=file_clock.env, extra_args=["--replica", "sweeper-1"])
    target = server.target
    uid = asyncio.run(_stuck_worktree(target))
    file_clock.advance(2 * 3600)

    text = ok(target, "run", "--dry-run")
    dry = fields(text)
    assert dry["trigger"] == "on-demand"
    assert dry["dry_run"].startswith("yes")
    assert dry["namespace"] == "(every namespace)"
    assert dry["replica"] == "sweeper-1"
    assert sorted(dry["parts"].split(",")) == sorted(PARTS)
    assert dry["blocked_objects"] == "1"
    assert dry["backlog"].isdigit()
    blocked = section(text, "blocked objects")
    assert blocked[0] == ["NAMESPACE", "KIND", "NAME", "UID", "AGE", "FINALIZERS", "REASON"]
    assert blocked[1][:6] == ["default", "Worktree", "wt-1", uid, "2h", FINALIZER]
    assert " ".join(blocked[1][6:]) == REFUSAL
    assert len(blocked) == 2

    real = ok_json(target, "run", "--namespace", "team-a", "--part", "expire-leases")
    assert real["trigger"] == "SWEEP_TRIGGER_ON_DEMAND"
    assert real["dry_run"] is False
    assert real["namespace"] == "team-a"
    assert real["parts"] == ["SWEEP_PART_EXPIRE_LEASES"]
    sweep_id = real["sweep_id"]

    table = ok(target, "reports").splitlines()
    header = ["SWEEP", "ID", "STARTED", "TRIGGER", "DRY", "RUN", "REPLICA", "DURATION", "COUNTS"]
    assert table[0].split() == header
    rows = {row.split()[0]: row.split() for row in table[1:]}
    assert rows[sweep_id][2:5] == ["on-demand", "no", "sweeper-1"]
    assert rows[dry["sweep_id"]][2:4] == ["on-demand", "yes"]
    assert "blocked=1" in rows[dry["sweep_id"]][6:]
    newest = ok_json(target, "reports", "--trigger", "on-demand", "--limit", "1")
    assert [report["trigger"] for report in newest] == ["SWEEP_TRIGGER_ON_DEMAND"]

    shown = fields(ok(target, "show", sweep_id))
    assert shown["sweep_id"] == sweep_id
    assert shown["dry_run"] == "no"
    assert shown["namespace"] == "team-a"
    assert shown["parts"] == "expire-leases"
    assert ok_json(target, "show", sweep_id) == real

    missing = tether(target, "show", UNKNOWN_ID)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("tether: SWEEP_REPORT_NOT_FOUND: ")
    assert "Traceback" not in missing.stderr
    refused = tether(target, "run", "--namespace", "team-a", "--part", "purge-events")
    assert refused.returncode == 1
    assert refused.stderr.startswith("tether: INVALID_FIELD: ")
    assert "  field: parts" in refused.stderr.splitlines()
    assert tether(target, "run", "--part", "sideways").returncode == 2


def test_a_report_reads_with_every_section() -> None:
    report = sweep_pb2.SweepReport(
        sweep_id="s-1",
        trigger=sweep_pb2.SWEEP_TRIGGER_PERIODIC,
        replica="r1",
        started_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        duration=duration_pb2.Duration(nanos=250_000_000),
        parts=[sweep_pb2.SWEEP_PART_EXPIRE_LEASES, sweep_pb2.SWEEP_PART_PURGE_EVENTS],
        leases_expired=3,
        rows_purged={"events": 40, "leases": 2, "sagas": 0},
        blocked=[
            sweep_pb2.BlockedObject(
                namespace="default",
                kind="Worktree",
                name="wt-1",
                uid="u-1",
                finalizers=[FINALIZER],
                age=duration_pb2.Duration(seconds=5400),
            )
        ],
        blocked_total=3,
        collector_failures=[
            sweep_pb2.CollectorFailure(
                namespace="default", owner_uid="o-1", attempts=4, last_error="store is down"
            )
        ],
        failures=["purge-events: store is down"],
        backlog=7,
    )
    text = report_details(report)
    facts = fields(text)
    assert facts["trigger"] == "periodic"
    assert facts["dry_run"] == "no"
    assert facts["duration"] == "250ms"
    assert facts["parts"] == "expire-leases,purge-events"
    assert facts["leases_expired"] == "3"
    assert facts["backlog"] == "7"
    # Counts that are zero are left out.
    assert not {"sagas_requeued", "objects_collected", "gc_queue_depth"} & set(facts)
    assert section(text, "rows purged")[1:] == [["leases", "2"], ["events", "40"]]
    blocked = ["default", "Worktree", "wt-1", "u-1", "1h30m", FINALIZER, "-"]
    assert facts["blocked_objects"] == "3"
    assert section(text, "blocked objects")[1:] == [blocked, ["(and", "2", "more)"]]
    assert section(text, "collector failures")[1] == [
        "default",
        "o-1",
        "4",
        "-",
        "store",
        "is",
        "down",
    ]
    assert text.endswith("failures:\npurge-events: store is down")

    (row,) = report_table([report]).splitlines()[1:]
    assert row.split()[2:6] == ["periodic", "no", "r1", "250ms"]
    assert row.split()[6:] == ["expired=3", "blocked=3", "purged=42", "backlog=7", "failures=1"]
