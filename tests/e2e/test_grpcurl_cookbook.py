"""docs/grpcurl.md runs as written: every command, in order, against a real server.

Marker convention in docs/grpcurl.md:

- Every fenced block opened with ```sh is run, unless the last non-blank line before it
  is ``<!-- not run -->`` (commands for a secured server this test does not start).
- Fences without ``sh`` (sample output) are never run.

The runnable blocks, in page order, make one bash script (``set -euo pipefail``) run with
``.venv/bin`` first on PATH and ``TETHER`` set to the test server's address (the page sets
``TETHER=${TETHER:-127.0.0.1:50051}``). ``grpcurl`` in the script is a shell function that
runs the real binary and records each call's arguments, output and exit status, so every
call's result is checked here, not only the script's exit status. Calls meant to fail
(LEASE_HELD; the watches that ``-max-time`` ends) must fail exactly that way; any other
failing call fails the test even when the page's ``|| echo`` hides it from bash.

Coverage: the ``tether.v1.<Service>/<Rpc>`` names in the runnable blocks, the RPCs the
script actually called and the RPCs checked below all equal every RPC of the four services
as the generated descriptors list them: a new RPC needs a cookbook entry and a check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import ServerFactory
from tests.support.server_process import ServerProcess
from tether_client import pb

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
COOKBOOK = ROOT / "docs" / "grpcurl.md"
VENV_BIN = Path(sys.executable).parent
JQ_CLI = ROOT / "tests" / "support" / "jq_cli.py"
NOT_RUN = "<!-- not run -->"
TARGET_LINE = "TETHER=${TETHER:-127.0.0.1:50051}"
METHOD_RE = re.compile(r"\btether\.v1\.(\w+Service)/(\w+)\b")
SERVICE_MODULES = (pb.lease_pb2, pb.saga_pb2, pb.owner_ref_pb2, pb.sweep_pb2)
# grpcurl exits 64 + the gRPC status code when a call fails.
EXIT_DEADLINE_EXCEEDED = 64 + 4  # how -max-time ends a stream
EXIT_FAILED_PRECONDITION = 64 + 9
STREAMS = {
    "tether.v1.LeaseService/Watch",
    "tether.v1.SagaService/WatchSagas",
    "tether.v1.OwnerRefService/WatchObjects",
}

# Records every grpcurl call of the script in its own directory under $CALLS. mkdir claims
# the next number atomically: both ends of a `grpcurl | jq | grpcurl` pipeline run at once.
RECORDER = r"""
grpcurl() {
  local n=1 rc=0
  until mkdir "$CALLS/$n" 2>/dev/null; do n=$((n + 1)); done
  printf '%s\n' "$@" > "$CALLS/$n/args"
  command grpcurl "$@" > "$CALLS/$n/out" 2> "$CALLS/$n/err" || rc=$?
  echo "$rc" > "$CALLS/$n/rc"
  cat "$CALLS/$n/out"
  cat "$CALLS/$n/err" >&2
  return "$rc"
}
"""


def all_rpcs() -> set[str]:
    return {
        f"{service.full_name}/{method.name}"
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def sh_blocks(text: str) -> list[tuple[bool, str]]:
    """(runnable, body) for every ```sh block of the page, in order."""
    blocks: list[tuple[bool, str]] = []
    lines = text.splitlines()
    previous = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if line.strip() == "```sh":
                blocks.append((previous != NOT_RUN, "\n".join(lines[i + 1 : end])))
            previous, i = "", end + 1
            continue
        if line.strip():
            previous = line.strip()
        i += 1
    return blocks


def runnable_text() -> str:
    return "\n\n".join(body for runnable, body in sh_blocks(COOKBOOK.read_text()) if runnable)


def json_documents(text: str) -> list[Any]:
    """The JSON values grpcurl printed one after another (one per response message)."""
    decoder = json.JSONDecoder()
    docs: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return docs
        value, position = decoder.raw_decode(text, position)
        docs.append(value)


@dataclass
class Call:
    args: list[str]
    rc: int
    out: str
    err: str

    @property
    def method(self) -> str:
        """The RPC called, or "list" / "describe <symbol>"."""
        for arg in self.args:
            if re.fullmatch(r"[\w.]+/\w+", arg):
                return arg
        if "list" in self.args:
            return "list"
        return f"describe {self.args[-1]}"

    @property
    def docs(self) -> list[Any]:
        return json_documents(self.out)

    @property
    def body(self) -> dict[str, Any]:
        """The one response of a unary call."""
        assert self.rc == 0, self
        docs = self.docs
        assert len(docs) == 1, self
        return dict(docs[0])

    def events(self) -> list[dict[str, Any]]:
        """The events a watch printed; a watch ends only by -max-time."""
        assert self.rc == EXIT_DEADLINE_EXCEEDED, self
        assert "Code: DeadlineExceeded" in self.err, self
        docs = self.docs
        # The first message confirms the watch started: a header, no events.
        assert docs, self
        assert "events" not in docs[0], self
        assert "header_revision" in docs[0], self
        return [event for doc in docs for event in doc.get("events", [])]

    def error_info(self) -> dict[str, Any]:
        detail = next(line for line in self.err.splitlines() if "google.rpc.ErrorInfo" in line)
        return dict(json.loads(detail[detail.index("{") :]))


@dataclass
class Session:
    calls: list[Call]
    output: str
    checked: set[str] = field(default_factory=set)

    def of(self, method: str) -> list[Call]:
        found = [call for call in self.calls if call.method == method]
        assert found, f"no call of {method}"
        return found

    def one(self, method: str) -> dict[str, Any]:
        (call,) = self.of(method)
        return call.body


Check = Callable[[Session], None]
CHECKS: dict[str, Check] = {}


def check(*methods: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        for method in methods:
            CHECKS[f"tether.v1.{method}"] = function
        return function

    return register


# --- leases ----------------------------------------------------------------------------


def first_lease(session: Session) -> dict[str, Any]:
    lease: dict[str, Any] = session.of("tether.v1.LeaseService/Acquire")[0].body["lease"]
    return lease


@check("LeaseService/Acquire")
def check_acquire(session: Session) -> None:
    first, refused, second = session.of("tether.v1.LeaseService/Acquire")
    lease = first_lease(session)
    assert first.body["created"] is True
    assert lease["key"] == "tasks/168"
    assert lease["holder"] == "agent-1"
    assert lease["ttl"] == "30s"
    assert lease["fencing_token"] == "1"
    assert lease["state"] == "LEASE_STATE_ACTIVE"
    # The refusal the page explains: FAILED_PRECONDITION with the ErrorInfo details.
    assert refused.rc == EXIT_FAILED_PRECONDITION, refused
    assert "Code: FailedPrecondition" in refused.err
    info = refused.error_info()
    assert info["reason"] == "LEASE_HELD"
    assert info["domain"] == "tether.dev"
    assert info["metadata"]["holder"] == "agent-1"
    assert info["metadata"]["expires_at"] == lease["expires_at"]
    assert "grpcurl exited 73" in session.output
    # After the release, agent-2 gets the key with a higher token.
    taken = second.body["lease"]
    assert taken["holder"] == "agent-2"
    assert taken["fencing_token"] == "2"
    assert taken["lease_id"] != lease["lease_id"]


@check("LeaseService/Renew")
def check_renew(session: Session) -> None:
    renewed = session.one("tether.v1.LeaseService/Renew")
    lease = first_lease(session)
    assert renewed["lease_id"] == lease["lease_id"]
    assert renewed["fencing_token"] == "1"
    assert renewed["expires_at"]
    assert renewed["ttl"] == "30s"


@check("LeaseService/KeepAlive")
def check_keep_alive(session: Session) -> None:
    (call,) = session.of("tether.v1.LeaseService/KeepAlive")
    assert call.rc == 0, call
    ping, renewal = call.docs
    assert ping == {"sequence": "1"}
    assert renewal["sequence"] == "2"
    (result,) = renewal["results"]
    assert result["lease_id"] == first_lease(session)["lease_id"]
    assert "error" not in result, result
    assert result["expires_at"]


@check("LeaseService/GetLease")
def check_get_lease(session: Session) -> None:
    lease = session.one("tether.v1.LeaseService/GetLease")["lease"]
    assert lease["lease_id"] == first_lease(session)["lease_id"]
    assert lease["state"] == "LEASE_STATE_ACTIVE"


@check("LeaseService/ListLeases")
def check_list_leases(session: Session) -> None:
    leases = session.one("tether.v1.LeaseService/ListLeases")["leases"]
    assert [lease["lease_id"] for lease in leases] == [first_lease(session)["lease_id"]]


@check("LeaseService/Watch")
def check_watch(session: Session) -> None:
    (call,) = session.of("tether.v1.LeaseService/Watch")
    events = call.events()
    assert [event["type"] for event in events] == ["LEASE_EVENT_TYPE_ACQUIRED"], events
    assert events[0]["lease"]["lease_id"] == first_lease(session)["lease_id"]


@check("LeaseService/Release")
def check_release(session: Session) -> None:
    lease = session.one("tether.v1.LeaseService/Release")["lease"]
    assert lease["lease_id"] == first_lease(session)["lease_id"]
    assert lease["state"] == "LEASE_STATE_RELEASED"


@check("LeaseService/Revoke")
def check_revoke(session: Session) -> None:
    lease = session.one("tether.v1.LeaseService/Revoke")["lease"]
    assert lease["holder"] == "agent-2"
    assert lease["fencing_token"] == "2"
    assert lease["state"] == "LEASE_STATE_REVOKED"


# --- sagas -----------------------------------------------------------------------------


def saga_state(body: dict[str, Any]) -> str:
    state: str = body["saga"]["state"]
    return state


@check("SagaService/CreateSaga")
def check_create_saga(session: Session) -> None:
    bodies = [call.body for call in session.of("tether.v1.SagaService/CreateSaga")]
    assert [body["saga"]["saga_id"] for body in bodies] == ["pr-42", "pr-43", "pr-44"]
    assert all(body["created"] is True for body in bodies)
    assert {saga_state(body) for body in bodies} == {"SAGA_STATE_PLANNED"}
    assert bodies[0]["saga"]["input"] == {"repo": "tether", "issue": 42}


@check("SagaService/ClaimSaga")
def check_claim_saga(session: Session) -> None:
    bodies = [call.body for call in session.of("tether.v1.SagaService/ClaimSaga")]
    assert [saga_state(body) for body in bodies] == [
        "SAGA_STATE_RUNNING",
        "SAGA_STATE_RUNNING",
        "SAGA_STATE_COMPENSATING",
    ]
    for body in bodies:
        assert body["fence"]["lease_id"] == body["lease"]["lease_id"]
        assert body["fence"]["fencing_token"] == body["lease"]["fencing_token"]
        assert body["lease"]["key"] == f"sagas/{body['saga']['saga_id']}"


@check("SagaService/RecordStep")
def check_record_step(session: Session) -> None:
    bodies = [call.body for call in session.of("tether.v1.SagaService/RecordStep")]
    assert [(body["step"]["name"], body["step"]["status"]) for body in bodies] == [
        ("open-pr", "STEP_STATUS_SUCCEEDED"),
        ("create-worktree", "STEP_STATUS_SUCCEEDED"),
        ("open-pr", "STEP_STATUS_STARTED"),
    ]
    assert {body["state"] for body in bodies} == {"SAGA_STATE_RUNNING"}
    assert bodies[0]["step"]["output"] == {"url": "https://example.com/pr/42"}
    assert bodies[0]["step"]["compensation"]["payload"] == {"pr": 42}


@check("SagaService/HeartbeatSaga")
def check_heartbeat_saga(session: Session) -> None:
    body = session.one("tether.v1.SagaService/HeartbeatSaga")
    assert body["state"] == "SAGA_STATE_RUNNING"
    assert body["expires_at"]


@check("SagaService/CompleteSaga")
def check_complete_saga(session: Session) -> None:
    saga = session.one("tether.v1.SagaService/CompleteSaga")["saga"]
    assert saga["state"] == "SAGA_STATE_COMPLETED"
    assert saga["output"] == {"merged": True}
    assert saga["steps"][0]["output"] == {"url": "https://example.com/pr/42"}
    # The heartbeat's progress, sent as base64 by the shell.
    assert saga["progress"] == "d2FpdGluZyBmb3IgcmV2aWV3"  # "waiting for review"


@check("SagaService/AnnotateSaga")
def check_annotate_saga(session: Session) -> None:
    annotation = session.one("tether.v1.SagaService/AnnotateSaga")["annotation"]
    assert annotation["text"] == "merged by hand"
    assert annotation["attributes"] == {"ticket": "OPS-7"}


@check("SagaService/FailSaga")
def check_fail_saga(session: Session) -> None:
    saga = session.one("tether.v1.SagaService/FailSaga")["saga"]
    assert saga["state"] == "SAGA_STATE_COMPENSATING"
    assert saga["failure_reason"] == "tests failed"
    assert "claim" not in saga  # handed off: the claim ended


@check("SagaService/QuarantineSaga")
def check_quarantine_saga(session: Session) -> None:
    assert saga_state(session.one("tether.v1.SagaService/QuarantineSaga")) == (
        "SAGA_STATE_QUARANTINED"
    )


@check("SagaService/MarkStepCompensated")
def check_mark_step_compensated(session: Session) -> None:
    saga = session.one("tether.v1.SagaService/MarkStepCompensated")["saga"]
    assert saga["state"] == "SAGA_STATE_QUARANTINED"
    statuses = {c.get("step_index", 0): c["status"] for c in saga["compensations"]}
    assert statuses[1] == "COMPENSATION_STATUS_MANUAL", saga["compensations"]


@check("SagaService/RedriveSaga")
def check_redrive_saga(session: Session) -> None:
    assert saga_state(session.one("tether.v1.SagaService/RedriveSaga")) == (
        "SAGA_STATE_COMPENSATING"
    )


@check("SagaService/RecordCompensation")
def check_record_compensation(session: Session) -> None:
    body = session.one("tether.v1.SagaService/RecordCompensation")
    assert body["state"] == "SAGA_STATE_COMPENSATED"
    assert body["compensation"].get("step_index", 0) == 0
    assert body["compensation"]["status"] == "COMPENSATION_STATUS_SUCCEEDED"


@check("SagaService/CancelSaga")
def check_cancel_saga(session: Session) -> None:
    saga = session.one("tether.v1.SagaService/CancelSaga")["saga"]
    assert saga["saga_id"] == "pr-44"
    assert saga["state"] == "SAGA_STATE_CANCELLED"


@check("SagaService/GetSaga")
def check_get_saga(session: Session) -> None:
    saga = session.one("tether.v1.SagaService/GetSaga")["saga"]
    assert saga["saga_id"] == "pr-43"
    assert saga["state"] == "SAGA_STATE_COMPENSATED"
    assert [step["name"] for step in saga["steps"]] == ["create-worktree", "open-pr"]
    # The operator's quarantine, manual compensation and redrive are on record.
    assert len(saga["annotations"]) >= 3, saga["annotations"]


@check("SagaService/ListSagas")
def check_list_sagas(session: Session) -> None:
    sagas = session.one("tether.v1.SagaService/ListSagas")["sagas"]
    assert {(saga["saga_id"], saga["state"]) for saga in sagas} == {
        ("pr-42", "SAGA_STATE_COMPLETED"),
        ("pr-43", "SAGA_STATE_COMPENSATED"),
    }


@check("SagaService/WatchSagas")
def check_watch_sagas(session: Session) -> None:
    (call,) = session.of("tether.v1.SagaService/WatchSagas")
    events = call.events()
    created = [e["saga"]["saga_id"] for e in events if e["type"] == "SAGA_EVENT_TYPE_CREATED"]
    assert created == ["pr-42", "pr-43", "pr-44"], events
    assert events[-1]["saga"]["saga_id"] == "pr-44"
    assert events[-1]["saga"]["state"] == "SAGA_STATE_CANCELLED"


# --- objects ---------------------------------------------------------------------------


def task_uid(session: Session) -> str:
    uid: str = session.of("tether.v1.OwnerRefService/CreateObject")[0].body["object"]["uid"]
    return uid


@check("OwnerRefService/CreateObject")
def check_create_object(session: Session) -> None:
    task, worktree = (c.body for c in session.of("tether.v1.OwnerRefService/CreateObject"))
    assert task["created"] is True
    assert worktree["created"] is True
    assert task["object"]["labels"] == {"app": "agent"}
    (owner,) = worktree["object"]["owner_references"]
    assert owner["uid"] == task_uid(session)
    assert worktree["object"]["finalizers"] == ["example.com/worktree"]


@check("OwnerRefService/GetObject")
def check_get_object(session: Session) -> None:
    for call in session.of("tether.v1.OwnerRefService/GetObject"):
        got = call.body["object"]
        assert got["name"] == "t1-wt"
        assert got["spec"] == {"path": "/work/t1"}


@check("OwnerRefService/UpdateObject")
def check_update_object(session: Session) -> None:
    updated = session.one("tether.v1.OwnerRefService/UpdateObject")["object"]
    read = session.of("tether.v1.OwnerRefService/GetObject")[-1].body["object"]
    assert updated["status"] == {"branch": "fix-168"}
    assert updated["uid"] == read["uid"]
    assert int(updated["resource_version"]) > int(read["resource_version"])


@check("OwnerRefService/AddFinalizer", "OwnerRefService/RemoveFinalizer")
def check_finalizers(session: Session) -> None:
    added = session.one("tether.v1.OwnerRefService/AddFinalizer")["object"]
    removed = session.one("tether.v1.OwnerRefService/RemoveFinalizer")["object"]
    assert added["finalizers"] == ["example.com/worktree", "example.com/audit"]
    assert removed["finalizers"] == ["example.com/worktree"]


@check("OwnerRefService/ListObjects")
def check_list_objects(session: Session) -> None:
    objects = session.one("tether.v1.OwnerRefService/ListObjects")["objects"]
    assert sorted(o["name"] for o in objects) == ["t1", "t1-wt"]


@check("OwnerRefService/ListDependents")
def check_list_dependents(session: Session) -> None:
    (dependent,) = session.one("tether.v1.OwnerRefService/ListDependents")["dependents"]
    assert dependent["object"]["name"] == "t1-wt"
    assert dependent["depth"] == 1
    assert dependent["owner_uid"] == task_uid(session)


@check("OwnerRefService/GetOwnerGraph")
def check_get_owner_graph(session: Session) -> None:
    graph = session.one("tether.v1.OwnerRefService/GetOwnerGraph")
    assert sorted(node["ref"]["name"] for node in graph["nodes"]) == ["t1", "t1-wt"]
    (edge,) = graph["edges"]
    assert edge["owner_uid"] == task_uid(session)


@check("OwnerRefService/DeleteObject")
def check_delete_object(session: Session) -> None:
    body = session.one("tether.v1.OwnerRefService/DeleteObject")
    assert "deleted" not in body  # held by its finalizer
    assert body["object"]["deletion_timestamp"]


@check("OwnerRefService/ForceRemoveFinalizers")
def check_force_remove_finalizers(session: Session) -> None:
    body = session.one("tether.v1.OwnerRefService/ForceRemoveFinalizers")
    assert body["deleted"] is True
    assert body["removed"] == ["example.com/worktree"]


@check("OwnerRefService/WatchObjects")
def check_watch_objects(session: Session) -> None:
    (call,) = session.of("tether.v1.OwnerRefService/WatchObjects")
    events = call.events()
    assert {event["object"]["name"] for event in events} == {"t1-wt"}
    types = [event["type"] for event in events]
    assert types[0] == "OBJECT_EVENT_TYPE_ADDED"
    assert types[-1] == "OBJECT_EVENT_TYPE_DELETED"
    assert "OBJECT_EVENT_TYPE_MODIFIED" in types


# --- sweeps ----------------------------------------------------------------------------


@check("SweepService/RunSweep", "SweepService/ListSweepReports", "SweepService/GetSweepReport")
def check_sweeps(session: Session) -> None:
    report = session.one("tether.v1.SweepService/RunSweep")["report"]
    assert report["dry_run"] is True
    assert report["trigger"] == "SWEEP_TRIGGER_ON_DEMAND"
    listed = session.one("tether.v1.SweepService/ListSweepReports")["reports"]
    assert [r["trigger"] for r in listed] == ["SWEEP_TRIGGER_ON_DEMAND", "SWEEP_TRIGGER_STARTUP"]
    assert listed[0]["sweep_id"] == report["sweep_id"]
    got = session.one("tether.v1.SweepService/GetSweepReport")["report"]
    assert got["sweep_id"] == report["sweep_id"]


def check_discovery(session: Session) -> None:
    (listing,) = session.of("list")
    services = set(listing.out.split())
    assert services >= {service.rsplit("/")[0] for service in all_rpcs()}
    assert "grpc.health.v1.Health" in services
    (service,) = session.of("describe tether.v1.LeaseService")
    assert "rpc KeepAlive ( stream .tether.v1.KeepAliveRequest )" in service.out
    (request,) = session.of("describe tether.v1.AcquireRequest")
    assert "Message template:" in request.out
    assert '"ttl": "0s"' in request.out
    assert session.one("grpc.health.v1.Health/Check") == {"status": "SERVING"}


# --- the run ---------------------------------------------------------------------------


def run_cookbook(target: str, workdir: Path) -> Session:
    calls_dir = workdir / "calls"
    calls_dir.mkdir()
    script = "\n".join(["set -euo pipefail", RECORDER, runnable_text(), ""])
    (workdir / "cookbook.sh").write_text(script)
    # The page's jq is libjq from the pinned wheel (tests/support/jq_cli.py): no system jq.
    tools = workdir / "bin"
    tools.mkdir()
    (tools / "jq").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{JQ_CLI}" "$@"\n')
    (tools / "jq").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TETHER": target,
        "CALLS": str(calls_dir),
    }
    result = subprocess.run(
        ["bash", str(workdir / "cookbook.sh")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"the cookbook failed ({result.returncode})\nstdout:\n{result.stdout[-4000:]}\n"
        f"stderr:\n{result.stderr[-4000:]}"
    )
    calls = []
    for directory in sorted(calls_dir.iterdir(), key=lambda path: int(path.name)):
        calls.append(
            Call(
                args=(directory / "args").read_text().splitlines(),
                rc=int((directory / "rc").read_text()),
                out=(directory / "out").read_text(),
                err=(directory / "err").read_text(),
            )
        )
    return Session(calls=calls, output=result.stdout)


@pytest.fixture
def server(db_url: str, server_factory: ServerFactory) -> ServerProcess:
    if not (VENV_BIN / "grpcurl").exists():
        pytest.fail(f"grpcurl is not installed at {VENV_BIN / 'grpcurl'} (dev dependency)")
    return server_factory(db_url)


def test_cookbook_page_shape() -> None:
    """Coverage and the marker convention, read from the page alone."""
    blocks = sh_blocks(COOKBOOK.read_text())
    skipped = [body for runnable, body in blocks if not runnable]
    assert skipped, "the Tokens and TLS examples are marked <!-- not run -->"
    assert all("authorization: Bearer" in body for body in skipped)
    text = runnable_text()
    documented = {f"tether.v1.{service}/{rpc}" for service, rpc in METHOD_RE.findall(text)}
    assert documented == all_rpcs(), (
        f"missing from docs/grpcurl.md: {sorted(all_rpcs() - documented)}; "
        f"not an RPC: {sorted(documented - all_rpcs())}"
    )
    assert set(CHECKS) == all_rpcs(), sorted(all_rpcs() ^ set(CHECKS))
    # Every command goes to $TETHER, which the first block sets: the test's server.
    assert text.splitlines()[0] == TARGET_LINE
    assert "50051" not in text.replace(TARGET_LINE, "", 1)


def test_cookbook_runs_top_to_bottom(server: ServerProcess, tmp_path: Path) -> None:
    session = run_cookbook(server.target, tmp_path)
    for call in session.calls:
        assert server.target in call.args, call
        if call.method in STREAMS:
            continue  # watches end by -max-time; Call.events checks how
        if call.rc == EXIT_FAILED_PRECONDITION and call.method.endswith("/Acquire"):
            continue  # the LEASE_HELD demo; check_acquire checks it
        assert call.rc == 0, call
    called = {call.method for call in session.calls if call.method.startswith("tether.v1.")}
    assert called == all_rpcs(), sorted(all_rpcs() ^ called)
    check_discovery(session)
    for method in sorted(all_rpcs()):
        CHECKS[method](session)
