"""A saga run by a shell script with ``tether saga create|claim|step|heartbeat|complete|
fail|compensation``, against a real server on both backends.

Each script is real bash: ``eval`` of the claim's ``export`` lines gives later commands
the saga and the fence, as ``tether lease run`` gives its command TETHER_LEASE_ID and
TETHER_FENCING_TOKEN. The steps' commands count their runs in files, so a step skipped on
a later attempt is seen not to run.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import ServerFactory
from tests.e2e.cli_support import Cli, Running, cli_env, tether_argv

pytestmark = pytest.mark.e2e

EXIT_LOST = 75
SAGA = Cli("saga")
LEASE = Cli("lease")
PRELUDE = f"""\
set -eu
tether() {{ {shlex.join([sys.executable, "-m", "tether_client.cli"])} "$@"; }}
"""


def bash(target: str, script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", PRELUDE + script],
        capture_output=True,
        text=True,
        env={**cli_env(), "TETHER_TARGET": target},
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


def saga(target: str, saga_id: str) -> Any:
    return SAGA.ok_json(target, "get", saga_id)


def exported(claim: str) -> dict[str, str]:
    """The variables of ``tether saga claim``'s ``export`` lines."""
    pairs = (line.removeprefix("export ").split("=", 1) for line in claim.splitlines())
    return {name: shlex.split(value)[0] if value else "" for name, value in pairs}


def test_a_script_runs_a_saga_to_completion(
    db_url: str, server_factory: ServerFactory, tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    script = """
tether saga create deploy-1 --kind deploy --input '{"app": "web"}' --label team=ops >/dev/null
claim=$(tether saga claim deploy-1 --ttl 30s); eval "$claim"
echo "saga=$TETHER_SAGA_ID ns=$TETHER_NAMESPACE token=$TETHER_FENCING_TOKEN"
echo "attempt=$TETHER_SAGA_ATTEMPT next=$TETHER_SAGA_NEXT_STEP input=$TETHER_SAGA_INPUT"
echo "key=$TETHER_LEASE_KEY lease=$TETHER_LEASE_ID"
image=$(tether saga step 0 build -- sh -c 'echo x >> runs-build; echo web:1')
echo "image=$image"
tether saga step 1 push --status started --compensation unpush --payload "\\"$image\\""
tether saga heartbeat --progress "pushing" >/dev/null
pushed=$(tether saga step 1 push --status succeeded --output '{"digest": "sha256:1"}')
echo "pushed=$pushed"
tether saga complete --output "{\\"image\\": \\"$image\\"}" >/dev/null
"""
    result = bash(target, script, tmp_path)
    assert result.returncode == 0, result.stderr
    echoed = result.stdout.splitlines()
    done = saga(target, "deploy-1")
    assert echoed[:3] == [
        "saga=deploy-1 ns=default token=1",
        'attempt=1 next=0 input={"app":"web"}',
        f"key=sagas/deploy-1 lease={echoed[2].rpartition('=')[2]}",
    ]
    assert len(echoed[2].rpartition("=")[2]) > 0
    assert echoed[3:] == ["image=web:1", 'pushed={"digest": "sha256:1"}']
    assert done["state"] == "SAGA_STATE_COMPLETED"
    assert done["output"] == {"image": "web:1"}
    assert done["labels"] == {"team": "ops"}
    assert [(s["name"], s["status"], s.get("output")) for s in done["steps"]] == [
        ("build", "STEP_STATUS_SUCCEEDED", "web:1"),
        ("push", "STEP_STATUS_SUCCEEDED", {"digest": "sha256:1"}),
    ]
    assert done["steps"][1]["compensation"]["name"] == "unpush"
    assert done["steps"][1]["compensation"]["payload"] == "web:1"
    assert (tmp_path / "runs-build").read_text() == "x\n"


def test_a_retried_saga_skips_the_steps_that_succeeded(
    db_url: str, server_factory: ServerFactory, tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    SAGA.ok(target, "create", "deploy-2", "--kind", "deploy")
    # Each attempt runs the same script; `push` fails the first time only.
    script = """
claim=$(tether saga claim --kind deploy --ttl 30s); eval "$claim"
echo "attempt=$TETHER_SAGA_ATTEMPT next=$TETHER_SAGA_NEXT_STEP"
image=$(tether saga step 0 build -- sh -c 'echo x >> runs-build; echo "{\\"image\\": \\"web:1\\"}"')
echo "image=$image"
if ! tether saga step 1 push -- sh -c 'echo x >> runs-push; [ -e push-works ]'; then
  tether saga fail --reason "push failed" --retryable >/dev/null
  exit 3
fi
tether saga complete >/dev/null
"""
    first = bash(target, script, tmp_path)
    assert first.returncode == 3, first.stderr
    assert "attempt=1 next=0" in first.stdout
    assert 'image={"image": "web:1"}' in first.stdout
    failed = saga(target, "deploy-2")
    assert failed["state"] == "SAGA_STATE_PLANNED"
    assert failed["steps"][1]["status"] == "STEP_STATUS_FAILED"
    assert failed["steps"][1]["error"] == "sh exited with status 1"

    (tmp_path / "push-works").touch()
    second = bash(target, script, tmp_path)
    assert second.returncode == 0, second.stderr
    # Step 0 succeeded before: not run again, its recorded output printed all the same.
    assert "attempt=2 next=1" in second.stdout
    assert 'image={"image": "web:1"}' in second.stdout
    assert "step 0 (build) succeeded in attempt 1; not run again" in second.stderr
    assert (tmp_path / "runs-build").read_text() == "x\n"
    assert (tmp_path / "runs-push").read_text() == "x\nx\n"
    assert saga(target, "deploy-2")["state"] == "SAGA_STATE_COMPLETED"


def test_a_refused_fence_exits_1_with_the_reason(
    db_url: str, server_factory: ServerFactory, tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    SAGA.ok(target, "create", "deploy-3", "--kind", "deploy")
    claim = bash(target, "tether saga claim deploy-3 --ttl 30s", tmp_path)
    assert claim.returncode == 0, claim.stderr
    env = exported(claim.stdout)
    assert env["TETHER_SAGA_STEPS"] == "[]"
    assert json.loads(env["TETHER_SAGA_COMPENSATIONS"]) == []
    stale = SAGA(
        target, "step", "0", "build", "--status", "started", "--fencing-token", "999", env=env
    )
    assert stale.returncode == 1, stale.stderr
    assert stale.stderr.startswith("tether: STALE_FENCING_TOKEN: ")
    assert "  presented_token: 999" in stale.stderr
    LEASE.ok(target, "revoke", env["TETHER_LEASE_ID"])
    ended = SAGA(target, "heartbeat", env=env)
    assert ended.returncode == 1
    assert ended.stderr.startswith("tether: LEASE_REVOKED: "), ended.stderr
    # Nothing claimable by kind: exit 1, and nothing on stdout for eval.
    SAGA.ok(target, "create", "report-1", "--kind", "report")
    SAGA.ok(target, "claim", "--kind", "report", "--ttl", "30s")
    nothing = SAGA(target, "claim", "--kind", "report", "--ttl", "30s")
    assert nothing.returncode == 1
    assert nothing.stdout == ""
    assert nothing.stderr.startswith("tether: NOTHING_CLAIMABLE: ")


def test_a_lost_claim_stops_the_step_command_with_75(
    db_url: str, server_factory: ServerFactory, tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    SAGA.ok(target, "create", "deploy-4", "--kind", "deploy")
    claim = SAGA.ok_json(target, "claim", "deploy-4", "--ttl", "3s")
    fence = claim["fence"]
    # The command says it started, then waits to be stopped.
    command = "echo started >&2; exec sleep 120"
    step = Running(
        tether_argv(
            "saga",
            "--target",
            target,
            "step",
            "0",
            "build",
            "--saga",
            "deploy-4",
            "--lease-id",
            fence["lease_id"],
            "--fencing-token",
            str(fence["fencing_token"]),
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            command,
        )
    )
    try:
        step.wait_for("started")
        LEASE.ok(target, "revoke", fence["lease_id"])
        status, out, err = step.finish()
    finally:
        step.kill()
    assert status == EXIT_LOST, err
    assert "claim lost: LEASE_REVOKED" in err
    assert "stopping the command: SIGTERM" in err
    assert out == ""
    recorded = saga(target, "deploy-4")["steps"][0]
    assert recorded["status"] == "STEP_STATUS_STARTED"


def test_a_claim_that_compensates_inline(
    db_url: str, server_factory: ServerFactory, tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    script = """
tether saga create deploy-5 --kind deploy >/dev/null
claim=$(tether saga claim deploy-5 --ttl 30s); eval "$claim"
tether saga step 0 build --status succeeded --compensation drop --payload '"web:1"' >/dev/null
tether saga step 1 push --status failed --error "registry down"
tether saga fail --reason "push failed" | grep '^state:'
tether saga compensation 0 --status succeeded
"""
    result = bash(target, script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["state:", "compensating"]
    assert "saga_state:  compensated" in result.stdout
    done = saga(target, "deploy-5")
    assert done["state"] == "SAGA_STATE_COMPENSATED"
    assert done["compensations"][0]["status"] == "COMPENSATION_STATUS_SUCCEEDED"


def test_claim_json_and_create_json(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    created = SAGA.ok_json(target, "create", "deploy-6", "--kind", "deploy", "--input", '{"a": 1}')
    assert created["created"] is True
    assert created["saga"]["input"] == {"a": 1}
    again = SAGA.ok_json(target, "create", "deploy-6", "--kind", "deploy", "--input", '{"a": 1}')
    assert again["created"] is False
    claim = SAGA.ok_json(target, "claim", "deploy-6", "--ttl", "30s")
    assert claim["saga"]["state"] == "SAGA_STATE_RUNNING"
    assert claim["lease"]["key"] == "sagas/deploy-6"
    assert claim["fence"]["lease_id"] == claim["lease"]["lease_id"]
    assert int(claim["fence"]["fencing_token"]) == int(claim["lease"]["fencing_token"])
