"""The README's worker and saga examples type-check under ``mypy --strict`` and actually work."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerFactory
from tether_client import TetherClient
from tether_client.pb import lease_pb2, saga_pb2

ROOT = Path(__file__).resolve().parents[2]
MYPY = Path(sys.executable).with_name("mypy")


def _readme_block(marker: str) -> str:
    """The one Python block of the README that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"the README should show exactly one {marker} example"
    return found[0]


def readme_example() -> str:
    return _readme_block("client.hold(")


def readme_saga_example() -> str:
    return _readme_block("client.run_saga(")


def _mypy_strict(tmp_path: Path, source: str) -> None:
    example = tmp_path / "example.py"
    example.write_text(source)
    # googleapis-common-protos ships no types; from an installed (not editable) client
    # mypy would not look inside tether_client at all.
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\n[mypy-google.rpc.*]\nignore_missing_imports = True\n"
    )
    result = subprocess.run(
        [str(MYPY), "--strict", "--no-incremental", "--config-file", "mypy.ini", str(example)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # The client is installed in editable mode, which mypy does not follow.
        env={**os.environ, "MYPYPATH": str(ROOT / "client")},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("example", [readme_example, readme_saga_example], ids=["hold", "saga"])
def test_readme_examples_pass_mypy_strict(tmp_path: Path, example: Any) -> None:
    _mypy_strict(tmp_path, example())


@pytest.mark.e2e
async def test_readme_example_runs(
    tmp_path: Path, db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url)
    example = tmp_path / "worker.py"
    example.write_text(readme_example())
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(example)],
        capture_output=True,
        text=True,
        env={**os.environ, "TETHER_TARGET": server.target},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"step {i} with fencing token 1" for i in range(3)]
    async with TetherClient(server.target) as client:
        lease = await client.get_lease(key="tasks/168")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


@pytest.mark.e2e
async def test_readme_saga_example_runs(
    tmp_path: Path, db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url)
    example = tmp_path / "saga.py"
    example.write_text(readme_saga_example())
    work = tmp_path / "work"
    work.mkdir()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(example), str(work)],
        capture_output=True,
        text=True,
        env={**os.environ, "TETHER_TARGET": server.target},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "compensated: removed worktree-168",
        "compensated: removed branch-168",
        "saga failed: the agent gave up",
    ]
    assert list(work.iterdir()) == []
    async with TetherClient(server.target) as client:
        saga = (await client.sagas.get_saga(saga_pb2.GetSagaRequest(saga_id="task-168"))).saga
    assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED
    assert [c.step_index for c in saga.compensations] == [1, 0]
    assert all(c.status == saga_pb2.COMPENSATION_STATUS_SUCCEEDED for c in saga.compensations)
