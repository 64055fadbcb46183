"""The committed generated code and vendored error protos match what `make proto` makes,
protos/ pass buf lint, and the API stays compatible with the published baseline.

``tests/data/api-baseline.binpb`` is the buf image of ``tether.v1`` as first published
(``buf build -o tests/data/api-baseline.binpb``); ``buf breaking`` (FILE rules) checks the
protos against it, so a change that would break a generated client fails here. Rebuild it
only when a new major version starts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from tether_client import pb

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GEN_DIR = ROOT / "client" / "tether_client" / "_gen"
GEN_SCRIPT = ROOT / "tools" / "gen_protos.py"
VENDORED = PROTOS / "google"
BASELINE = ROOT / "tests" / "data" / "api-baseline.binpb"

LEASE_RPCS = {
    "Acquire",
    "Renew",
    "KeepAlive",
    "Release",
    "Revoke",
    "GetLease",
    "ListLeases",
    "Watch",
}
SERVICES = {
    "tether.v1.LeaseService": (pb.lease_pb2, pb.lease_pb2_grpc),
    "tether.v1.SagaService": (pb.saga_pb2, pb.saga_pb2_grpc),
    "tether.v1.OwnerRefService": (pb.owner_ref_pb2, pb.owner_ref_pb2_grpc),
    "tether.v1.SweepService": (pb.sweep_pb2, pb.sweep_pb2_grpc),
}


def _generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _rpcs_in_protos() -> dict[str, set[str]]:
    """``{"tether.v1.Service": {rpc names}}`` read from the .proto sources themselves."""
    found: dict[str, set[str]] = {}
    for proto in sorted(PROTOS.rglob("*.proto")):
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        package = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.MULTILINE)
        assert package, f"{proto} has no package"
        for service in re.finditer(r"\bservice\s+(\w+)\s*\{(.*?)\n\}", text, re.DOTALL):
            rpcs = set(re.findall(r"\brpc\s+(\w+)\s*\(", service.group(2)))
            found[f"{package.group(1)}.{service.group(1)}"] = rpcs
    return found


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    vendored = tmp_path / "google"
    result = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), str(out), str(vendored)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"tools/gen_protos.py failed:\n{result.stdout}{result.stderr}"

    fresh = _generated_files(out)
    committed = _generated_files(GEN_DIR)
    assert fresh, "tools/gen_protos.py generated nothing"
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not missing, f"generated files missing: {missing}: run `make proto`"
    assert not extra, f"stale generated files: {extra}: run `make proto`"
    changed = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not changed, f"generated code differs from protos/ in {changed}: run `make proto`"
    assert _generated_files(vendored) == _generated_files(VENDORED), (
        "protos/google differs from the pinned googleapis-common-protos: run `make proto`"
    )


def test_protoc_needs_only_the_protos_directory(tmp_path: Path) -> None:
    """What a client in another language does: one include path, every file, one set."""
    files = sorted(
        str(p.relative_to(PROTOS))
        for sub in ("tether", "google")
        for p in (PROTOS / sub).rglob("*.proto")
    )
    out = tmp_path / "api.binpb"
    # The well-known types (google/protobuf/*) come with every protoc; grpc_tools has them.
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", "--include_imports"]
    assert protoc.main([*args, f"--descriptor_set_out={out}", *files]) == 0
    names = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    messages = {f"{f.package}.{m.name}" for f in names.file for m in f.message_type}
    services = {f"{f.package}.{s.name}" for f in names.file for s in f.service}
    assert {"google.rpc.Status", "google.rpc.ErrorInfo", "google.rpc.RetryInfo"} <= messages
    assert services == set(SERVICES)


def test_error_protos_ship_with_the_api() -> None:
    """``protoc -I protos`` finds everything a client needs to read a refusal."""
    for name in ("rpc/status.proto", "rpc/error_details.proto", "LICENSE"):
        assert (VENDORED / name).is_file(), f"protos/google/{name} is missing"
    assert "message ErrorInfo" in (VENDORED / "rpc" / "error_details.proto").read_text()
    assert "Apache License" in (VENDORED / "LICENSE").read_text()


def test_buf_lint() -> None:
    buf = Path(sys.executable).parent / "buf"
    assert buf.exists(), f"buf not found at {buf}: install the dev extras (make test does)"
    result = subprocess.run(
        [str(buf), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"


def _buf_breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    buf = Path(sys.executable).parent / "buf"
    return subprocess.run(
        [str(buf), "breaking", "--against", str(BASELINE)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_api_is_compatible_with_the_baseline() -> None:
    result = _buf_breaking(ROOT)
    assert result.returncode == 0, f"buf breaking against the baseline:\n{result.stdout}"


def test_a_breaking_change_is_caught(tmp_path: Path) -> None:
    shutil.copytree(PROTOS, tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    lease = tmp_path / "protos" / "tether" / "v1" / "lease.proto"
    field = "  uint64 fencing_token = 6;\n"
    assert field in lease.read_text()
    lease.write_text(lease.read_text().replace(field, "  reserved 6;\n"))
    result = _buf_breaking(tmp_path)
    assert result.returncode != 0
    assert "fencing_token" in result.stdout


def test_every_service_and_rpc_is_generated() -> None:
    in_protos = _rpcs_in_protos()
    assert set(in_protos) == set(SERVICES), "services in protos/ changed; update this test"
    assert in_protos["tether.v1.LeaseService"] == LEASE_RPCS

    for full_name, (messages, _) in SERVICES.items():
        short = full_name.rsplit(".", 1)[1]
        descriptor = messages.DESCRIPTOR.services_by_name.get(short)
        assert descriptor is not None, f"{full_name} missing from generated messages"
        assert descriptor.full_name == full_name
        assert {m.name for m in descriptor.methods} == in_protos[full_name], full_name


@pytest.mark.parametrize("full_name", sorted(SERVICES))
def test_stubs_and_servicers_have_every_rpc(full_name: str) -> None:
    messages, grpc_module = SERVICES[full_name]
    short = full_name.rsplit(".", 1)[1]
    rpcs = {m.name for m in messages.DESCRIPTOR.services_by_name[short].methods}
    assert rpcs

    servicer = _attr(grpc_module, f"{short}Servicer")
    assert rpcs <= set(vars(servicer)), f"{short}Servicer lacks {rpcs - set(vars(servicer))}"
    assert callable(_attr(grpc_module, f"add_{short}Servicer_to_server"))

    # Stubs bind their methods in __init__; a channel connects only when called.
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = _attr(grpc_module, f"{short}Stub")(channel)
        for rpc in sorted(rpcs):
            assert callable(getattr(stub, rpc, None)), f"{short}Stub lacks {rpc}"


def _attr(module: ModuleType, name: str) -> type:
    value = getattr(module, name, None)
    assert value is not None, f"{module.__name__} lacks {name}"
    return value  # type: ignore[no-any-return]
