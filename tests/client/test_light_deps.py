"""Workers install only tether-client: it must import and work without server packages,
and without anything it no longer uses (retries are its own: no tenacity)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CLIENT_PYPROJECT = Path(__file__).parents[2] / "client" / "pyproject.toml"
LIGHT = {"grpcio", "protobuf", "googleapis-common-protos"}
HEAVY = ("sqlalchemy", "aiosqlite", "asyncpg", "alembic", "tether_server")
# Not server packages, but not the client's either (any more).
UNUSED = ("tenacity",)
REFUSED = HEAVY + UNUSED
# The package's modules after the redesign: one transport, one client per service area.
MODULES = {
    "tether_client.client",
    "tether_client.transport",
    "tether_client.retry",
    "tether_client.clock",
    "tether_client.errors",
    "tether_client.keeper",
    "tether_client.leases",
    "tether_client.sagas",
    "tether_client.objects",
    "tether_client.sweeps",
    "tether_client.saga_run",
    "tether_client.finalizers",
    "tether_client.values",
    "tether_client.results",
    "tether_client.threads",
    "tether_client.sync",
}

PROGRAM = textwrap.dedent(
    f"""
    import importlib, importlib.abc, pkgutil, sys

    HEAVY = {REFUSED!r}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{{name}} is not installed on a worker")
            return None

    sys.meta_path.insert(0, Refuse())
    for name in list(sys.modules):
        if name.split(".")[0] in HEAVY:
            raise SystemExit(f"{{name}} was imported before the test began")

    import tether_client
    imported = [tether_client.__name__]
    for module in pkgutil.walk_packages(tether_client.__path__, "tether_client."):
        importlib.import_module(module.name)
        imported.append(module.name)

    client = tether_client.TetherClient("127.0.0.1:1")
    sync = tether_client.TetherClientSync("127.0.0.1:1")
    sync.close()
    leaked = sorted(n for n in sys.modules if n.split(".")[0] in HEAVY)
    if leaked:
        raise SystemExit(f"imported anyway: {{leaked}}")
    print("\\n".join(imported))
    """
)


def test_the_client_imports_and_constructs_without_server_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    # The walk really covered the package, generated code included.
    assert imported >= MODULES
    assert "tether_client.services" not in imported  # split into the area clients
    assert "tether_client._gen.tether.v1.saga_pb2_grpc" in imported


def test_the_refusal_covers_unused_packages_too() -> None:
    program = PROGRAM.replace("import tether_client\n", "import tenacity\n", 1)
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "not installed on a worker" in result.stderr


def test_the_refusal_really_refuses() -> None:
    program = PROGRAM.replace("import tether_client\n", "import sqlalchemy\n", 1)
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "not installed on a worker" in result.stderr


def test_client_dependencies_are_exactly_the_light_set() -> None:
    """No more than the client imports: tenacity went with the client's own retry loop."""
    project = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]
    names = [canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]]
    assert sorted(names) == sorted(LIGHT)
    assert not project.get("optional-dependencies")
