"""Every Python example of the README type-checks under ``mypy --strict`` and actually works."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerFactory
from tether_client import TetherClient
from tether_client.pb import lease_pb2, saga_pb2

ROOT = Path(__file__).resolve().parents[2]
MYPY = Path(sys.executable).with_name("mypy")

# Each Python block of the README, named by a call only it makes.
EXAMPLES = {
    "hold": "client.hold(",
    "areas": "client.sweeps.run(",
    "saga": "client.run_saga(",
}


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def readme_example(name: str) -> str:
    """The one Python block of the README that makes the call ``EXAMPLES[name]``."""
    marker = EXAMPLES[name]
    found = [block for block in _readme_blocks() if marker in block]
    assert len(found) == 1, f"the README should show exactly one {marker} example"
    return found[0]


def test_every_python_block_of_the_readme_is_tested() -> None:
    untested = [
        block
        for block in _readme_blocks()
        if sum(marker in block for marker in EXAMPLES.values()) != 1
    ]
    assert not untested, "README Python blocks no test here runs:\n\n" + "\n---\n".join(untested)
    assert len(_readme_blocks()) == len(EXAMPLES)


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


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_readme_examples_pass_mypy_strict(tmp_path: Path, name: str) -> None:
    _mypy_strict(tmp_path, readme_example(name))


async def _run(example: Path, target: str, *args: str) -> list[str]:
    """Run a README example against ``target``; its output lines (stderr must stay empty:
    no warning, no stray traceback)."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(example), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TETHER_TARGET": target},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


@pytest.mark.e2e
async def test_readme_example_runs(
    tmp_path: Path, db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url)
    example = tmp_path / "worker.py"
    example.write_text(readme_example("hold"))
    output = await _run(example, server.target)
    assert output == [f"step {i} with fencing token 1" for i in range(3)]
    async with TetherClient(server.target) as client:
        lease = await client.leases.get("tasks/168")
    assert lease.state == lease_pb2.LEASE_STATE_RELEASED


@pytest.mark.e2e
async def test_readme_service_clients_example_runs(
    tmp_path: Path, db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url)
    example = tmp_path / "areas.py"
    example.write_text(readme_example("areas"))
    expected = [
        "task-169: agent-task, attempt 0",
        "planned: task-169",
        "Task t1 gone at once: False",
        "deleted: Worktree t1-wt",
        "deleted: Task t1",
        "a sweep would expire 0 leases",
    ]
    assert await _run(example, server.target) == expected
    # What the README says it prints.
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert ", ".join(f"`{line}`" for line in expected[:-1]) in readme
    # Run again: the create is a repeat, the objects are new incarnations.
    assert await _run(example, server.target) == expected
    async with TetherClient(server.target) as client:
        sagas = [saga.saga_id async for saga in client.sagas.list(kind="agent-task")]
        objects = [obj.name async for obj in client.objects.list()]
    assert sagas == ["task-169"]
    assert objects == []


@pytest.mark.e2e
async def test_readme_saga_example_runs_and_runs_again(
    tmp_path: Path, db_url: str, server_factory: ServerFactory
) -> None:
    server = server_factory(db_url)
    example = tmp_path / "saga.py"
    example.write_text(readme_example("saga"))
    work = tmp_path / "work"
    work.mkdir()
    assert await _run(example, server.target, str(work)) == [
        "compensated: removed worktree-168",
        "compensated: removed branch-168",
        "saga failed: the agent gave up",
    ]
    assert list(work.iterdir()) == []
    async with TetherClient(server.target) as client:
        saga = await client.sagas.get("task-168")
    assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED
    assert [c.step_index for c in saga.compensations] == [1, 0]
    assert all(c.status == saga_pb2.COMPENSATION_STATUS_SUCCEEDED for c in saga.compensations)

    # Run twice: the saga has ended, so nothing runs and one friendly line says why.
    assert await _run(example, server.target, str(work)) == [
        "saga task-168 has already ended: COMPENSATED"
    ]
    assert list(work.iterdir()) == []
    async with TetherClient(server.target) as client:
        again = await client.sagas.get("task-168")
    assert again.revision == saga.revision
    assert again.attempt == saga.attempt
