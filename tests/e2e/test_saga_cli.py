"""``tether saga ...`` as a subprocess against a real server, on both backends.

The sagas are set up with the Python client (``run_saga``) in the test process; the CLI
then reads them and acts on them as an operator.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e import ServerFactory
from tests.e2e.cli_support import Cli, fields, section
from tether_client import TetherClient

pytestmark = pytest.mark.e2e


class Boom(Exception):
    pass


tether = Cli("saga")
ok = tether.ok
ok_json = tether.ok_json


async def _setup(target: str) -> None:
    """``done``: completed; ``stuck``: compensating (handed off, two compensations);
    ``waiting``: planned, never run."""
    async with TetherClient(target, holder="worker-1") as client:
        async with client.run_saga("deploy", "done", {"app": "web"}, ttl=30) as saga:
            await saga.step("build", lambda: {"image": "web:1"})
            saga.set_output({"url": "https://web"})
        try:
            async with client.run_saga(
                "deploy", "stuck", {"app": "api"}, ttl=30, compensate="hand_off"
            ) as saga:
                await saga.step("build", lambda: 1, compensate="drop_image")
                await saga.step("push", lambda: 2, compensate="unpush")
                raise Boom("rollout failed")
        except Boom:
            pass
        await client.sagas.create("waiting", "report", labels={"team": "ops"})


def test_list_and_get(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    asyncio.run(_setup(target))

    table = ok(target, "list").splitlines()
    assert table[0].split() == [
        "SAGA",
        "ID",
        "KIND",
        "STATE",
        "ATTEMPT",
        "FLAGS",
        "HOLDER",
        "UPDATED",
    ]
    rows = {row.split()[0]: row.split() for row in table[1:]}
    assert set(rows) == {"done", "stuck", "waiting"}
    assert rows["done"][1:4] == ["deploy", "completed", "1"]
    assert rows["stuck"][2] == "compensating"
    assert rows["waiting"][1:4] == ["report", "planned", "0"]

    listed = ok_json(target, "list", "--state", "compensating,planned", "--kind", "deploy")
    assert [saga["saga_id"] for saga in listed] == ["stuck"]
    assert [s["saga_id"] for s in ok_json(target, "list", "--label", "team=ops")] == ["waiting"]
    assert len(ok_json(target, "list", "--limit", "2")) == 2

    shown = ok(target, "get", "stuck")
    facts = fields(shown)
    assert facts["state"] == "compensating"
    assert facts["kind"] == "deploy"
    assert facts["attempt"] == "1 of 3"
    assert facts["input"] == '{"app": "api"}'
    assert "rollout failed" in facts["failure_reason"]
    assert [row[:3] for row in section(shown, "steps")[1:]] == [
        ["0", "build", "succeeded"],
        ["1", "push", "succeeded"],
    ]
    assert [row[:4] for row in section(shown, "compensations")[1:]] == [
        ["1", "unpush", "pending", "0/3"],
        ["0", "drop_image", "pending", "0/3"],
    ]

    done = ok_json(target, "get", "done")
    assert done["state"] == "SAGA_STATE_COMPLETED"
    assert done["output"] == {"url": "https://web"}
    assert done["steps"][0]["output"] == {"image": "web:1"}


def test_operator_actions(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    asyncio.run(_setup(target))

    note = ok(target, "annotate", "done", "checked by hand", "--attr", "ticket=T-1")
    assert "checked by hand" in note
    assert "ticket=T-1" in note
    annotations = section(ok(target, "get", "done"), "annotations")
    assert any("checked" in row and "ticket=T-1" in row for row in annotations)

    quarantined = ok_json(target, "quarantine", "stuck", "--reason", "pager")
    assert quarantined["state"] == "SAGA_STATE_QUARANTINED"
    redriven = fields(ok(target, "redrive", "stuck", "--reason", "fixed the registry"))
    assert redriven["state"] == "compensating"
    marked = ok_json(target, "mark-compensated", "stuck", "1", "--reason", "unpushed by hand")
    assert marked["state"] == "SAGA_STATE_COMPENSATING"
    marked = ok_json(target, "mark-compensated", "stuck", "0", "--reason", "deleted by hand")
    assert marked["state"] == "SAGA_STATE_COMPENSATED"
    statuses = {c["step_index"]: c["status"] for c in marked["compensations"]}
    assert statuses == {1: "COMPENSATION_STATUS_MANUAL", 0: "COMPENSATION_STATUS_MANUAL"}

    cancelled = fields(ok(target, "cancel", "waiting", "--reason", "not needed"))
    assert cancelled["state"] == "cancelled"


def test_refusals_and_usage_errors(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    asyncio.run(_setup(target))

    missing = tether(target, "get", "nope")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("tether: SAGA_NOT_FOUND: ")
    assert "Traceback" not in missing.stderr

    terminal = tether(target, "cancel", "done")
    assert terminal.returncode == 1
    assert terminal.stderr.startswith("tether: SAGA_TERMINAL: ")
    assert "  state: SAGA_STATE_COMPLETED" in terminal.stderr

    # A redrive needs a QUARANTINED saga; a compensating one is refused with its state.
    refused = tether(target, "redrive", "stuck")
    assert refused.returncode == 1
    assert "  state: SAGA_STATE_COMPENSATING" in refused.stderr

    assert tether(target, "mark-compensated", "stuck", "0").returncode == 2  # no --reason
    assert tether(target, "list", "--state", "sleepy").returncode == 2
    assert tether(target, "redrive", "stuck", "--mode", "sideways").returncode == 2
