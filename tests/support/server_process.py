"""Run the real tether server as a subprocess (end-to-end, crash and restart tests).

The server is started exactly as an operator would start it::

    python -m tether_server.cli serve --listen 127.0.0.1:PORT --db URL [extra args]

and is ready once ``grpc.health.v1.Health/Check`` for service ``""`` answers ``SERVING``.
Its stdout and stderr go to a log file whose tail is included in every startup error.
The port is kept across restarts, so clients can reconnect to the same target.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.ports import free_port

MICROS = 1_000_000
DEFAULT_START_US = 1_700_000_000 * MICROS
# Variables the server reads; never inherit them from the developer's shell by accident.
_SERVER_ENV = ("TETHER_LISTEN", "TETHER_DB", "TETHER_CLOCK")

# Strong references: a server whose object was dropped must still be stopped at exit.
_live: set[ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Last resort when a test forgot to stop its server: never leave processes behind.
    for server in list(_live):
        server._hard_stop()


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One tether server process on a fixed 127.0.0.1 port.

    Use as a context manager (``with ServerProcess(db_url) as server: ...``) or call
    :meth:`start` and :meth:`terminate` / :meth:`kill` yourself.
    """

    def __init__(
        self,
        db_url: str,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: Path | str | None = None,
        startup_timeout: float = 30.0,
        name: str = "tether",
        health_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.db_url = db_url
        # A TLS server's readiness is checked over TLS (a plaintext check never hears it).
        self.health_credentials = health_credentials
        self.port = port if port is not None else free_port()
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.name = name
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp())
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{name}-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # --- introspection ----------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tether_server.cli",
            "serve",
            "--listen",
            self.target,
            "--db",
            self.db_url,
            *self.extra_args,
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Start the process and block until it reports SERVING (or raise with its log)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV}
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Tests decide when a server process sweeps (RunSweep, or --sweep-start-delay): the
        # file clock moves in big steps and a periodic sweep would settle what they watch.
        env.setdefault("TETHER_SWEEP_START_DELAY", "8760h")
        self._starts += 1
        with self.log_path.open("ab") as log:
            header = f"\n=== start #{self._starts}: {' '.join(self.command)}\n"
            log.write(header.encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C aimed at pytest does not hit the server mid-test;
                # teardown stops it deliberately.
                start_new_session=True,
            )
        _live.add(self)
        try:
            self._wait_serving()
        except BaseException:
            self._hard_stop()
            raise
        return self

    async def start_async(self) -> ServerProcess:
        """:meth:`start` without blocking the event loop of an async test."""
        return await asyncio.to_thread(self.start)

    def _wait_serving(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {code} during startup "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            status = self._check_health()
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            if isinstance(status, str):
                last_error = status
            else:
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} was not SERVING on {self.target} after "
                    f"{self.startup_timeout:.0f} s (last: {last_error}; log {self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def _check_health(self) -> int | str:
        # A fresh channel per attempt: a long-lived one would back off for seconds after the
        # first refused connection.
        channel = (
            grpc.secure_channel(self.target, self.health_credentials)
            if self.health_credentials is not None
            else grpc.insecure_channel(self.target)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return int(response.status)

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit on its own; return its status."""
        assert self._proc is not None, "never started"
        return self._proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 20.0) -> int | None:
        """Graceful stop: SIGTERM, then wait. Raises (after SIGKILL) if it does not exit."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._hard_stop()
                raise RuntimeError(
                    f"{self.name} did not exit within {timeout:.0f} s of SIGTERM; killed it "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                ) from None
        _live.discard(self)
        return self._proc.returncode

    def kill(self) -> int | None:
        """Crash: SIGKILL, no chance to clean up. Returns the exit status (-9)."""
        self._hard_stop()
        return self._proc.returncode if self._proc is not None else None

    def restart(self, *, kill: bool = False) -> ServerProcess:
        """Stop (gracefully, or SIGKILL with ``kill=True``) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.terminate()
        return self.start()

    def _hard_stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        _live.discard(self)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            # Already failing: stop without masking the original error.
            with contextlib.suppress(RuntimeError):
                self.terminate()
        else:
            self.terminate()


class FileClockDriver:
    """Drives the clock of a server started with ``--clock file:PATH`` / ``TETHER_CLOCK``.

    The file holds integer microseconds since the Unix epoch; it is replaced atomically so
    the server never reads a half-written value. Like ``FakeClock`` it never goes backwards.
    """

    def __init__(self, path: Path | str, start_us: int = DEFAULT_START_US) -> None:
        self.path = Path(path)
        self._now = start_us
        self._write()

    @property
    def spec(self) -> str:
        """The clock spec for the server: ``file:PATH``."""
        return f"file:{self.path}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for :class:`ServerProcess` that points the server at this clock."""
        return {"TETHER_CLOCK": self.spec}

    def now_us(self) -> int:
        return self._now

    def set_us(self, now_us: int) -> None:
        if now_us < self._now:
            raise ValueError("a FileClockDriver never goes backwards")
        self._now = now_us
        self._write()

    def advance(self, seconds: float) -> None:
        self.set_us(self._now + round(seconds * MICROS))

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(f"{self._now}\n")
        os.replace(tmp, self.path)
