"""The real ``tether`` command run as a subprocess, as the CLI tests drive it, and
readers of its text output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The developer's own settings must not point these tests elsewhere.
CLI_ENV = (
    "TETHER_TARGET",
    "TETHER_NAMESPACE",
    "TETHER_HOLDER",
    "TETHER_TOKEN",
    "TETHER_TLS",
    "TETHER_CA_FILE",
    "TETHER_CERT",
    "TETHER_KEY",
    "TETHER_TOKEN_FILE",
    "TETHER_INSECURE_TOKEN",
    "TETHER_TIMEOUT",
)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLI_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class Cli:
    """``tether <group> --target TARGET ARGS…`` for one command group."""

    group: str

    def argv(self, target: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "tether_client.cli", self.group, "--target", target, *args]

    def __call__(
        self,
        target: str,
        *args: str,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tether GROUP --target TARGET ARGS``; ``env`` adds to the clean environment."""
        return subprocess.run(
            self.argv(target, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**cli_env(), **(env or {})},
            check=False,
        )

    def ok(self, target: str, *args: str, env: Mapping[str, str] | None = None) -> str:
        result = self(target, *args, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def ok_json(self, target: str, *args: str, env: Mapping[str, str] | None = None) -> Any:
        return json.loads(self.ok(target, "--json", *args, env=env))


def fields(text: str) -> dict[str, str]:
    """The ``name:  value`` lines that open a details view (up to a blank line)."""
    head = text.split("\n\n", 1)[0]
    pairs = (line.split(":", 1) for line in head.splitlines())
    return {name.strip(): value.strip() for name, value in pairs}


def section(text: str, title: str) -> list[list[str]]:
    """The rows (split on blanks) of the table under ``title:``, header first."""
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0] == f"{title}:":
            return [line.split() for line in lines[1:]]
    raise AssertionError(f"no {title!r} section in:\n{text}")
