"""The real grpcurl binary against a real ``tether serve``: reflection, JSON, ErrorInfo, health.

grpcurl works out of the box (docs/operations.md, docs/grpcurl.md). Every test here runs
grpcurl v1.8.6 as a subprocess, exactly as an operator would type it, on both backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e import ServerFactory, error_info, lease_stub
from tests.support.server_process import ServerProcess
from tether_client.pb import lease_pb2

pytestmark = pytest.mark.e2e

GRPCURL = Path(sys.executable).parent / "grpcurl"
LEASE_SERVICE = "tether.v1.LeaseService"
LEASE_RPCS = (
    "Acquire",
    "Renew",
    "KeepAlive",
    "Release",
    "Revoke",
    "GetLease",
    "ListLeases",
    "Watch",
)
SECONDS_30 = Duration(seconds=30)
ACQUIRE_JSON = '{"key":"tasks/168","holder":"agent-1","ttl":"30s"}'
# grpcurl exits with 64 + the gRPC status code when the call fails.
GRPCURL_FAILED_PRECONDITION = 64 + grpc.StatusCode.FAILED_PRECONDITION.value[0]


def grpcurl(target: str, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(GRPCURL), "-plaintext"]
    if data is not None:
        command += ["-d", data]
    command += [target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"grpcurl exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture
def server(db_url: str, server_factory: ServerFactory) -> ServerProcess:
    if not GRPCURL.exists():
        pytest.fail(f"grpcurl is not installed at {GRPCURL} (dev dependency)")
    return server_factory(db_url)


def test_grpcurl_version() -> None:
    result = subprocess.run(
        [str(GRPCURL), "-version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "1.8.6" in result.stdout + result.stderr


def test_list_and_describe(server: ServerProcess) -> None:
    services = ok(grpcurl(server.target, "list")).split()
    for name in (
        "tether.v1.LeaseService",
        "tether.v1.SagaService",
        "tether.v1.OwnerRefService",
        "tether.v1.SweepService",
        "grpc.health.v1.Health",
    ):
        assert name in services, services

    description = ok(grpcurl(server.target, "describe", LEASE_SERVICE))
    assert f"{LEASE_SERVICE} is a service" in description
    rpcs = [line.split()[1] for line in description.splitlines() if line.strip().startswith("rpc ")]
    assert sorted(rpcs) == sorted(LEASE_RPCS), description
    assert "stream .tether.v1.KeepAliveRequest" in description
    assert "returns ( stream .tether.v1.WatchResponse )" in description


async def test_acquire_json_conflict_error_info_and_stubs(server: ServerProcess) -> None:
    # The first Acquire, as JSON, answered as JSON.
    result = grpcurl(server.target, f"{LEASE_SERVICE}/Acquire", data=ACQUIRE_JSON)
    body = json.loads(ok(result))
    lease = body["lease"]
    assert body["created"] is True
    assert lease["key"] == "tasks/168"
    assert lease["holder"] == "agent-1"
    assert lease["namespace"] == "default"
    assert lease["ttl"] == "30s"
    # uint64 is a JSON string in the protobuf JSON mapping.
    assert lease["fencing_token"] == "1"
    assert lease["state"] == "LEASE_STATE_ACTIVE"
    assert lease["lease_id"]

    # Another holder: FAILED_PRECONDITION, and grpcurl prints the ErrorInfo details.
    other = '{"key":"tasks/168","holder":"agent-2","ttl":"30s"}'
    refused = grpcurl(server.target, f"{LEASE_SERVICE}/Acquire", data=other)
    assert refused.returncode == GRPCURL_FAILED_PRECONDITION, refused
    assert "Code: FailedPrecondition" in refused.stderr, refused.stderr
    assert "Message: key 'tasks/168' is held by 'agent-1'" in refused.stderr, refused.stderr
    assert "Details:" in refused.stderr
    detail_line = next(
        line for line in refused.stderr.splitlines() if "google.rpc.ErrorInfo" in line
    )
    detail = json.loads(detail_line.split("\t", 1)[1] if "\t" in detail_line else detail_line)
    assert detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert detail["reason"] == "LEASE_HELD"
    assert detail["domain"] == "tether.dev"
    assert detail["metadata"]["holder"] == "agent-1"
    assert detail["metadata"]["lease_id"] == lease["lease_id"]
    assert detail["metadata"]["fencing_token"] == "1"
    assert detail["metadata"]["expires_at"] == lease["expires_at"]

    # The same Acquire through the generated stubs, against the same process.
    async with lease_stub(server.target) as stub:
        again = await stub.Acquire(
            lease_pb2.AcquireRequest(key="tasks/168", holder="agent-1", ttl=SECONDS_30),
            timeout=10,
        )
        assert again.created is False  # the same holder gets its live lease back
        assert again.lease.lease_id == lease["lease_id"]
        assert again.lease.fencing_token == 1
        assert again.lease.state == lease_pb2.LEASE_STATE_ACTIVE

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Acquire(
                lease_pb2.AcquireRequest(key="tasks/168", holder="agent-2", ttl=SECONDS_30),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(caught.value)
        assert info.reason == "LEASE_HELD"
        assert info.metadata["holder"] == "agent-1"

        fresh = await stub.Acquire(
            lease_pb2.AcquireRequest(key="tasks/169", holder="agent-1", ttl=SECONDS_30),
            timeout=10,
        )
        assert fresh.created is True
        assert fresh.lease.fencing_token == 1

    # And grpcurl reads what the stubs wrote.
    got = json.loads(
        ok(grpcurl(server.target, f"{LEASE_SERVICE}/GetLease", data='{"key":"tasks/169"}'))
    )
    assert got["lease"]["lease_id"] == fresh.lease.lease_id
    assert got["lease"]["state"] == "LEASE_STATE_ACTIVE"


def test_health_check(server: ServerProcess) -> None:
    body = json.loads(ok(grpcurl(server.target, "grpc.health.v1.Health/Check")))
    assert body == {"status": "SERVING"}
    per_service = json.loads(
        ok(
            grpcurl(
                server.target,
                "grpc.health.v1.Health/Check",
                data=json.dumps({"service": LEASE_SERVICE}),
            )
        )
    )
    assert per_service == {"status": "SERVING"}

    # The same answer through the generated health stub.
    with grpc.insecure_channel(server.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_saga_json_round_trip_and_terminal_refusal(server: ServerProcess) -> None:
    """An operator creates, claims and completes a saga with JSON, then sees the refusal
    a terminal saga gives (the ErrorInfo reason in grpcurl's output)."""
    target = server.target
    create = '{"saga_id":"pr-42","kind":"agent","input":{"repo":"tether","issue":42}}'
    created = json.loads(ok(grpcurl(target, "tether.v1.SagaService/CreateSaga", data=create)))
    assert created["created"] is True
    assert created["saga"]["input"] == {"repo": "tether", "issue": 42}
    assert created["saga"]["state"] == "SAGA_STATE_PLANNED"
    claim = (
        '{"saga_id":"pr-42","purpose":"CLAIM_PURPOSE_EXECUTE",'
        '"new_lease":{"holder":"ops","ttl":"60s"}}'
    )
    claimed = json.loads(ok(grpcurl(target, "tether.v1.SagaService/ClaimSaga", data=claim)))
    fence = claimed["fence"]
    step = json.dumps(
        {
            "saga_id": "pr-42",
            "fence": fence,
            "index": 0,
            "name": "open-pr",
            "status": "STEP_STATUS_SUCCEEDED",
            "output": {"url": "https://example/pr/42"},
        }
    )
    ok(grpcurl(target, "tether.v1.SagaService/RecordStep", data=step))
    complete = json.dumps({"saga_id": "pr-42", "fence": fence})
    done = json.loads(ok(grpcurl(target, "tether.v1.SagaService/CompleteSaga", data=complete)))
    assert done["saga"]["state"] == "SAGA_STATE_COMPLETED"
    assert done["saga"]["steps"][0]["output"] == {"url": "https://example/pr/42"}
    refused = grpcurl(target, "tether.v1.SagaService/RecordStep", data=step)
    assert refused.returncode == GRPCURL_FAILED_PRECONDITION
    assert "SAGA_TERMINAL" in refused.stderr + refused.stdout


def test_objects_tree_and_stuck_deletion_with_grpcurl(server: ServerProcess) -> None:
    """An operator builds a small tree with JSON, deletes its root in the foreground, sees
    why it is stuck (GetObject, GetOwnerGraph), and unsticks it (ForceRemoveFinalizers)."""
    target = server.target
    service = "tether.v1.OwnerRefService"

    def call(method: str, body: dict[str, object]) -> dict[str, object]:
        result: dict[str, object] = json.loads(
            ok(grpcurl(target, f"{service}/{method}", data=json.dumps(body)))
        )
        return result

    task = call("CreateObject", {"object": {"kind": "Task", "name": "t1"}})["object"]
    assert isinstance(task, dict)
    worktree = {
        "kind": "Worktree",
        "name": "t1-wt",
        "ownerReferences": [
            {"kind": "Task", "name": "t1", "uid": task["uid"], "blockOwnerDeletion": True}
        ],
        "finalizers": ["example.com/worktree"],
        "spec": {"path": "/work/t1"},
    }
    call("CreateObject", {"object": worktree})
    deleting = call(
        "DeleteObject",
        {"kind": "Task", "name": "t1", "propagationPolicy": "PROPAGATION_POLICY_FOREGROUND"},
    )
    # grpcurl prints the proto field names.
    assert "deletion_timestamp" in deleting["object"]  # type: ignore[operator]
    graph = call("GetOwnerGraph", {"kind": "Task", "name": "t1"})
    assert {n["ref"]["name"] for n in graph["nodes"]} == {"t1", "t1-wt"}  # type: ignore[attr-defined,index]

    def stuck() -> dict[str, object]:
        got = call("GetObject", {"kind": "Task", "name": "t1"})["object"]
        assert isinstance(got, dict)
        return got

    # The collector marks the worktree terminating; the task waits for it.
    for _ in range(200):
        termination = stuck().get("termination", {})
        if termination.get("blocking_dependents") == "1":
            break
    assert termination["blocking_examples"][0]["name"] == "t1-wt"
    forced = call(
        "ForceRemoveFinalizers",
        {"kind": "Worktree", "name": "t1-wt", "reason": "worktree deleted by hand"},
    )
    assert forced["deleted"] is True
    refused = grpcurl(
        target,
        f"{service}/AddFinalizer",
        data=json.dumps({"kind": "Task", "name": "t1", "finalizer": "example.com/x"}),
    )
    assert refused.returncode in (
        GRPCURL_FAILED_PRECONDITION,
        64 + grpc.StatusCode.NOT_FOUND.value[0],
    )
    assert "OBJECT_TERMINATING" in refused.stderr + refused.stdout or "OBJECT_NOT_FOUND" in (
        refused.stderr + refused.stdout
    )


def test_sweeps_with_grpcurl(server: ServerProcess) -> None:
    """An operator asks what a sweep would do (dry run, JSON enums by name), finds the
    server's startup report in the list, reads it, and gets ErrorInfo for a bad id."""
    target = server.target
    service = "tether.v1.SweepService"
    dry = json.loads(
        ok(
            grpcurl(
                target,
                f"{service}/RunSweep",
                data='{"dry_run": true, "parts": ["SWEEP_PART_EXPIRE_LEASES"]}',
            )
        )
    )["report"]
    assert dry["dry_run"] is True
    assert dry["trigger"] == "SWEEP_TRIGGER_ON_DEMAND"
    assert dry["parts"] == ["SWEEP_PART_EXPIRE_LEASES"]
    listed = json.loads(
        ok(
            grpcurl(
                target,
                f"{service}/ListSweepReports",
                data='{"triggers": ["SWEEP_TRIGGER_STARTUP"]}',
            )
        )
    )["reports"]
    assert len(listed) == 1
    startup = json.loads(
        ok(
            grpcurl(
                target,
                f"{service}/GetSweepReport",
                data=json.dumps({"sweep_id": listed[0]["sweep_id"]}),
            )
        )
    )["report"]
    assert startup == listed[0]
    assert "SWEEP_PART_COLLECT_GARBAGE" in startup["parts"]
    missing = grpcurl(
        target,
        f"{service}/GetSweepReport",
        data='{"sweep_id": "0190a3c4-1111-7aaa-8bbb-0123456789ab"}',
    )
    assert missing.returncode == 64 + grpc.StatusCode.NOT_FOUND.value[0]
    assert "SWEEP_REPORT_NOT_FOUND" in missing.stderr + missing.stdout
