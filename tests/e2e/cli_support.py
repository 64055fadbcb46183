"""The real ``tether`` command run as a subprocess, as the CLI tests drive it (to the end,
or in the background with its output lines read as they come), readers of its text
output, and a TCP forwarder that puts a server behind another address."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

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
    # gRPC's own logging would add lines to what the tests read.
    "GRPC_VERBOSITY",
    "GRPC_TRACE",
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


class Running:
    """A ``tether`` process started in the background whose stdout and stderr lines are
    read by threads, so every wait for a line has a deadline."""

    def __init__(self, argv: list[str], *, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**cli_env(), **(env or {})},
        )
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            with self._changed:
                self.lines[name].append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, text: str, *, stream: str = "stderr", within: float = 30) -> str:
        """The first line of ``stream`` that contains ``text``, waiting up to ``within``."""
        deadline = time.monotonic() + within
        with self._changed:
            while True:
                for line in self.lines[stream]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                done = self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)
                if left <= 0 or done:
                    raise AssertionError(
                        f"no {text!r} on {stream} within {within} s "
                        f"(exit status {self.proc.poll()}): {self.lines}"
                    )
                self._changed.wait(min(left, 0.1))

    def finish(self, within: float = 60) -> tuple[int, str, str]:
        """Exit status, stdout and stderr of a process expected to end on its own."""
        try:
            status = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {within} s: {self.lines}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        return status, "\n".join(self.lines["stdout"]), "\n".join(self.lines["stderr"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tether_argv(*args: str) -> list[str]:
    """``tether ARGS`` as the tests run it (the console script runs this same module)."""
    return [sys.executable, "-m", "tether_client.cli", *args]


class Forwarder:
    """A TCP forwarder from ``listen_host``:(free port) to 127.0.0.1:``port``, in threads:
    the same server reached under another address (a certificate not issued for it)."""

    def __init__(self, listen_host: str, port: int) -> None:
        self._upstream = ("127.0.0.1", port)
        self._listener = socket.socket()
        self._listener.bind((listen_host, 0))
        self._listener.listen()
        self.target = f"{listen_host}:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
