"""Operators get one clear line, not a traceback, when `tether serve` cannot start."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.ports import free_port


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether_server.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "error"
    ]
    assert len(errors) == 1, result.stderr
    assert words in errors[0]["msg"]


def test_a_taken_port_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path}/t.db")
    assert_one_line_failure(result, "tether failed")


def test_an_unreachable_store_is_one_error_line() -> None:
    closed = free_port()
    result = serve("--listen", "127.0.0.1:0", "--db", f"postgresql://postgres@127.0.0.1:{closed}/x")
    assert_one_line_failure(result, "store is unavailable")
