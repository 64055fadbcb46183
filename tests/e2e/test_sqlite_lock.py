"""One server process per SQLite file: a second ``tether serve`` on the same file refuses
to start with a clear error (it used to start and detach the first one's KeepAlive
streams), the first keeps serving, and the lock goes with the process that held it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from tests.conftest import DbFactory, ServerFactory
from tests.support.server_process import ServerStartError
from tether_client.pb import lease_pb2, lease_pb2_grpc
from tether_server.clock import FakeClock
from tether_server.store.database import Database
from tether_server.store.sqlite_backend import DatabaseInUse

IN_USE = "is in use by another tether process"


def _path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def _lock_path(url: str) -> str:
    return f"{os.path.realpath(_path(url))}.lock"


async def _acquire(target: str, key: str) -> lease_pb2.Lease:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        ttl = duration_pb2.Duration(seconds=600)
        request = lease_pb2.AcquireRequest(key=key, holder="w", ttl=ttl)
        response = await stub.Acquire(request, timeout=10)
        return response.lease


async def test_a_second_server_on_the_file_refuses_to_start(
    db_factory: DbFactory, server_factory: ServerFactory
) -> None:
    url = db_factory("sqlite")
    first = server_factory(url, name="first")
    await _acquire(first.target, "jobs/before")

    with pytest.raises(ServerStartError):
        server_factory(url, name="second")
    # It said why, and it exited with an error status.
    logs = sorted(first.log_dir.glob("second-*.log"))
    assert logs, "the second server wrote no log"
    text = logs[0].read_text(errors="replace")
    assert IN_USE in text, text
    assert str(_path(url)) in text
    assert "Traceback" not in text

    # The first one still serves, on the same file.
    assert first.running
    await _acquire(first.target, "jobs/after")

    # Its lock goes with it: stopped, the file can be served again.
    assert first.terminate() == 0
    third = server_factory(url, name="third")
    await _acquire(third.target, "jobs/third")
    # Killed, too (the kernel drops the lock of a dead process).
    third.kill()
    server_factory(url, name="fourth")


def test_migrate_refuses_a_file_a_server_is_serving(
    db_factory: DbFactory, server_factory: ServerFactory
) -> None:
    """``tether migrate`` takes the same lock, briefly: the schema never changes under a
    running server (whose code expects the schema it started with)."""
    url = db_factory("sqlite")
    server = server_factory(url)
    command = [sys.executable, "-m", "tether_server.cli", "migrate", "--db", url]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1
    assert IN_USE in refused.stdout + refused.stderr
    assert server.running
    server.terminate()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- in process --------------------------------------------------------------------------


async def test_the_lock_in_process(db_factory: DbFactory, fake_clock: FakeClock) -> None:
    url = db_factory("sqlite")
    # Another process's lock, as flock sees it: a separate open file description.
    other = os.open(_lock_path(url), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(other, b"4242\n")
        refused = Database(url, fake_clock)
        try:
            with pytest.raises(DatabaseInUse, match="pid 4242"):
                await refused.migrate()
        finally:
            await refused.dispose()
        fcntl.flock(other, fcntl.LOCK_UN)

        # Databases of one process share the lock (tests run replicas in one process)...
        first, second = Database(url, fake_clock), Database(url, fake_clock)
        await first.migrate()
        await second.migrate()
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        await first.dispose()
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # ...and the last one to go releases it.
        await second.dispose()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
