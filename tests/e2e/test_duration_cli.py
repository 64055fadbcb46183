"""Durations the ``tether`` command cannot use (NaN, infinities, overflowing values) are
usage errors (exit status 2, one line naming the flag), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.cli_support import cli_env
from tests.support.ports import free_port

BAD = ["inf", "nan", "-inf", "1e400", "1e400s", "99999999999999h", "876601h"]


def tether(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real ``tether`` command (its console script runs this same module)."""
    return subprocess.run(
        [sys.executable, "-m", "tether_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**cli_env(), **(env or {})},
        cwd=cwd,
        check=False,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], flag: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert f"error: argument {flag}: " in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("value", BAD)
def test_serve_max_ttl(tmp_path: Path, value: str) -> None:
    result = tether(tmp_path, "serve", "--listen", "127.0.0.1:0", "--max-ttl", value)
    assert_usage_error(result, "--max-ttl")
    assert not list(tmp_path.iterdir()), "nothing started, no database created"


@pytest.mark.parametrize(
    "flag", ["--grace", "--min-ttl", "--keepalive-idle-timeout", "--sweep-interval"]
)
def test_serve_other_durations(tmp_path: Path, flag: str) -> None:
    assert_usage_error(tether(tmp_path, "serve", "--listen", "127.0.0.1:0", flag, "inf"), flag)


def test_serve_duration_from_the_environment(tmp_path: Path) -> None:
    result = tether(tmp_path, "serve", "--listen", "127.0.0.1:0", env={"TETHER_MAX_TTL": "nan"})
    assert_usage_error(result, "--max-ttl")


@pytest.mark.parametrize("value", BAD)
def test_lease_acquire_ttl(tmp_path: Path, value: str) -> None:
    target = f"127.0.0.1:{free_port()}"  # never reached: the usage error comes first
    result = tether(tmp_path, "lease", "--target", target, "acquire", "jobs/a", "--ttl", value)
    assert_usage_error(result, "--ttl")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("acquire", "--wait"),
        ("acquire", "--lock-delay"),
        ("run", "--wait"),
        ("run", "--grace"),
    ],
)
def test_lease_other_durations(tmp_path: Path, command: str, flag: str) -> None:
    target = f"127.0.0.1:{free_port()}"
    args = ["lease", "--target", target, command, "jobs/a", "--ttl", "30s", flag, "nan"]
    if command == "run":
        args += ["--", "true"]
    assert_usage_error(tether(tmp_path, *args), flag)
