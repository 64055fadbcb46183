"""The servers under test, each started fresh for one scenario and removed afterwards.

- ``etcd``: a single-node etcd (temporary data dir).
- ``noop``: :mod:`tests.bench.noop_server`, the LeaseService with no store.
- ``tether-sqlite``: ``tether serve`` on a SQLite file in a temporary dir.
- ``tether-pg``: ``tether serve`` on a fresh PostgreSQL database ``tether_bench_<hex>``,
  dropped afterwards (``WITH (FORCE)``); with ``replicas=2`` two servers share it.

Everything listens on 127.0.0.1 on free ports. Stopping is in ``finally`` blocks, so a failed
or interrupted run still stops its processes and removes its files and databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.bench.etcd import EtcdProcess, etcd_version
from tests.support.ports import free_port
from tests.support.server_process import ServerProcess

PG_ENV_VARS = ("TETHER_BENCH_POSTGRES_URL", "TETHER_TEST_POSTGRES_URL")
PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB_PREFIX = "tether_bench_"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    name: str
    api: str  # the adapter: "etcd" or "tether"
    targets: list[str]
    server_pids: list[int]
    # (command name, command-line part) of separate database processes: the postgres
    # backends serving this target's database.
    store: tuple[str, str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    processes: list[Any] = field(default_factory=list)


# --- PostgreSQL -------------------------------------------------------------------------


def _dsn(url: str, dbname: str | None = None) -> str:
    parts = urlsplit(url)
    path = f"/{dbname}" if dbname is not None else parts.path
    return urlunsplit(("postgresql", parts.netloc, path, parts.query, ""))


def _pg(admin_url: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(_dsn(admin_url), timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def pg_admin_url() -> tuple[str | None, str | None]:
    """(admin URL, None) or (None, why PostgreSQL is unavailable)."""
    for name in PG_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name], None
    parts = urlsplit(PG_DEFAULT_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            pass
        _pg(PG_DEFAULT_URL, "SELECT 1")
    except Exception as exc:
        return None, f"set one of {', '.join(PG_ENV_VARS)} ({PG_DEFAULT_URL}: {exc})"
    return PG_DEFAULT_URL, None


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    dbname = BENCH_DB_PREFIX + secrets.token_hex(6)
    _pg(admin_url, f'CREATE DATABASE "{dbname}"')
    try:
        yield urlunsplit(("postgresql", urlsplit(admin_url).netloc, f"/{dbname}", "", ""))
    finally:
        _pg(admin_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


# --- servers ----------------------------------------------------------------------------


@contextlib.contextmanager
def etcd_target(binary: str) -> Iterator[Running]:
    process = EtcdProcess(binary).start()
    try:
        assert process.pid is not None
        yield Running(
            "etcd",
            "etcd",
            [process.target],
            [process.pid],
            info={"etcd_version": etcd_version(binary)},
            processes=[process],
        )
    finally:
        process.stop()


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"noop server exited {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"noop server not listening after {timeout} s")


@contextlib.contextmanager
def noop_target() -> Iterator[Running]:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="tether-bench-noop-"))
    log = directory / "noop.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.noop_server", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_port(port, proc, 20, log)
        yield Running("noop", "tether", [f"127.0.0.1:{port}"], [proc.pid], processes=[proc])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def tether_target(backend: str, admin_url: str | None, replicas: int = 1) -> Iterator[Running]:
    log_dir = Path(tempfile.mkdtemp(prefix="tether-bench-logs-"))
    servers: list[ServerProcess] = []
    try:
        with contextlib.ExitStack() as stack:
            if backend == "sqlite":
                url = f"sqlite:///{log_dir / 'bench.db'}"
            else:
                assert admin_url is not None
                url = stack.enter_context(pg_database(admin_url))
            try:
                for i in range(replicas):
                    # One after the other: the first applies the migrations.
                    server = ServerProcess(
                        url,
                        # One anonymous principal holds every lease of a bench run.
                        extra_args=["--grace", "2s", "--max-leases-per-principal", "0"],
                        log_dir=log_dir,
                        name=f"bench{i}",
                    )
                    servers.append(server)
                    server.start()
                name = "tether-sqlite" if backend == "sqlite" else "tether-pg"
                yield Running(
                    name if replicas == 1 else f"{name}x{replicas}",
                    "tether",
                    [s.target for s in servers],
                    [s.pid for s in servers if s.pid is not None],
                    store=("postgres", urlsplit(url).path.lstrip("/"))
                    if backend == "postgres"
                    else None,
                    processes=servers,
                )
            except BaseException:
                for server in servers:
                    tail = server.log_tail(20)
                    if tail:
                        print(f"[bench] {server.name} log tail:\n{tail}", file=sys.stderr)
                raise
            finally:
                for server in servers:
                    try:
                        server.terminate(timeout=15)
                    except RuntimeError as exc:
                        print(f"[bench] {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
