"""``tether lease ...`` as a subprocess against a real server, on both backends.

The CLI runs as ``python -m tether_client.cli`` (plus one test of the installed ``tether``
script). Leases are lost by revoking them, never by waiting for an expiry, and every wait is
a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import ServerFactory
from tests.e2e.cli_support import Cli, Running, cli_env

pytestmark = pytest.mark.e2e

EXIT_LEASE_LOST = 75

# The command under `lease run`: records its pid and TETHER_* environment, records SIGTERM
# (and exits with the status given, or keeps sleeping with "ignore"), and sleeps.
COMMAND = r"""
import json, os, signal, sys, time
from pathlib import Path

out, on_term = Path(sys.argv[1]), sys.argv[2]

def term(signum, frame):
    (out / "term").write_text("1")
    if on_term != "ignore":
        sys.exit(int(on_term))

signal.signal(signal.SIGTERM, term)
facts = {k: v for k, v in os.environ.items() if k.startswith("TETHER_")}
facts["pid"] = os.getpid()
(out / "started.tmp").write_text(json.dumps(facts))
os.replace(out / "started.tmp", out / "started")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
(out / "done").write_text("1")
"""


LEASE = Cli("lease")
tether = LEASE
ok = LEASE.ok
ok_json = LEASE.ok_json


def fields(text: str) -> dict[str, str]:
    """The ``name:  value`` lines the CLI prints for one lease."""
    pairs = (line.split(":", 1) for line in text.splitlines())
    return {name.strip(): value.strip() for name, value in pairs}


def start(target: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(LEASE.argv(target, *args), text=True, env=cli_env(), **kwargs)


def wait_for_file(path: Path, proc: subprocess.Popen[str], within: float = 15) -> str:
    deadline = time.monotonic() + within
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before {path.name} appeared: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {within} s")
        time.sleep(0.02)
    return path.read_text()


def finish(proc: subprocess.Popen[str], within: float = 20) -> tuple[int, str]:
    """Exit status and stderr of a process expected to end on its own."""
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running after {within} s; stderr: {err}") from None
    return proc.returncode, err


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def command(tmp_path: Path) -> list[str]:
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    return [sys.executable, str(script), str(tmp_path)]


def run_under_lease(
    target: str, key: str, command: list[str], on_term: str, *options: str
) -> subprocess.Popen[str]:
    return start(
        target, "run", key, "--ttl", "2s", *options, "--", *command, on_term, stderr=subprocess.PIPE
    )


# --- one-shot commands --------------------------------------------------------------------


def test_acquire_get_list_release_round_trip(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target

    acquired = ok_json(target, "acquire", "jobs/1", "--ttl", "30s", "--label", "team=infra")
    lease = acquired["lease"]
    assert acquired["created"] is True
    assert lease["state"] == "LEASE_STATE_ACTIVE"
    assert lease["labels"] == {"team": "infra"}
    lease_id, token = lease["lease_id"], lease["fencing_token"]
    ok(target, "acquire", "jobs/2", "--ttl", "30s")

    shown = fields(ok(target, "get", "jobs/1"))
    assert shown["lease_id"] == lease_id
    assert shown["fencing_token"] == token
    assert shown["state"] == "active"
    assert shown["labels"] == "team=infra"
    assert ok_json(target, "get", "--id", lease_id)["key"] == "jobs/1"

    table = ok(target, "list", "--prefix", "jobs/").splitlines()
    assert len(table) == 3
    assert table[0].split() == ["KEY", "HOLDER", "STATE", "TOKEN", "EXPIRES", "LEASE", "ID"]
    assert [row.split()[0] for row in table[1:]] == ["jobs/1", "jobs/2"]
    row = table[1].split()
    assert row[2:4] == ["active", token]
    assert row[-1] == lease_id
    # Columns line up: every row starts its STATE cell where the header does.
    cells = ["STATE", "active", "active"]
    assert len({line.index(cell) for line, cell in zip(table, cells, strict=True)}) == 1

    listed = ok_json(target, "list", "--prefix", "jobs/", "--limit", "1")
    assert [item["lease_id"] for item in listed] == [lease_id]

    # Another invocation, same default holder (user@host): the holder may release it.
    released = ok_json(target, "release", lease_id, "--token", token)
    assert released["state"] == "LEASE_STATE_RELEASED"
    active = ok_json(target, "list", "--prefix", "jobs/", "--state", "active")
    assert [item["key"] for item in active] == ["jobs/2"]
    assert len(ok(target, "list", "--prefix", "jobs/1", "--state", "active").splitlines()) == 1


def test_a_held_key_is_refused_with_its_holder(
    db_url: str, server_factory: ServerFactory, command: list[str], tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    ok(target, "--holder", "agent-1", "acquire", "jobs/1", "--ttl", "30s")

    refused = tether(target, "--holder", "agent-2", "acquire", "jobs/1", "--ttl", "30s")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith("tether: LEASE_HELD: ")
    assert "  holder: agent-1" in refused.stderr
    assert "  expires_at: " in refused.stderr
    assert "Traceback" not in refused.stderr

    # `lease run` on the held key does not run its command, also after a --wait.
    for wait in ((), ("--wait", "0.3s")):
        proc = run_under_lease(target, "jobs/1", command, "0", *wait)
        status, err = finish(proc)
        assert status == 1, err
        assert ("WAIT_TIMEOUT" if wait else "LEASE_HELD") in err
        assert not (tmp_path / "started").exists()


def test_watch_json_streams_events(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    # From revision 1: no race between the watch starting and the acquire below.
    watch = start(
        target,
        "watch",
        "--json",
        "--prefix",
        "jobs/",
        "--from-revision",
        "1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        stdout = watch.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                lines.put(line)

        # A reader thread, so every read below can have a deadline.
        threading.Thread(target=read, daemon=True).start()
        acquired = ok_json(target, "acquire", "jobs/1", "--ttl", "30s")["lease"]
        ok(target, "acquire", "other/1", "--ttl", "30s")
        ok(target, "release", acquired["lease_id"], "--token", acquired["fencing_token"])

        events = [json.loads(lines.get(timeout=10)) for _ in range(2)]
        assert [e["type"] for e in events] == [
            "LEASE_EVENT_TYPE_ACQUIRED",
            "LEASE_EVENT_TYPE_RELEASED",
        ]
        assert {e["lease"]["lease_id"] for e in events} == {acquired["lease_id"]}
        assert int(events[0]["revision"]) < int(events[1]["revision"])
    finally:
        watch.send_signal(signal.SIGTERM)
        status, err = finish(watch)
    assert status == 0, err  # SIGTERM is the normal way to end a watch


def test_ctrl_c_ends_a_watch_with_130(db_url: str, server_factory: ServerFactory) -> None:
    target = server_factory(db_url).target
    # From revision 1: no race between the watch starting and the acquire below.
    watch = Running(LEASE.argv(target, "watch", "--prefix", "jobs/", "--from-revision", "1"))
    try:
        # Connected and streaming: the acquire's event arrives.
        ok(target, "acquire", "jobs/1", "--ttl", "30s")
        watch.wait_for("ACQUIRED", stream="stdout")
        watch.proc.send_signal(signal.SIGINT)
        status, _, err = watch.finish()
    finally:
        watch.kill()
    assert status == 130, err  # as the help says
    assert "Traceback" not in err


def test_a_wait_says_who_holds_the_key_and_until_when(
    db_url: str, server_factory: ServerFactory, command: list[str], tmp_path: Path
) -> None:
    target = server_factory(db_url).target

    def notice(holder: str, lease: dict[str, Any]) -> str:
        until = lease["expires_at"][:19] + "Z"  # to the second, as the CLI prints times
        return (
            f"tether: jobs/1 is held by {holder} until {until} (unless renewed); waiting up to 5m"
        )

    def release(holder: str, lease: dict[str, Any]) -> None:
        ok(
            target,
            "--holder",
            holder,
            "release",
            lease["lease_id"],
            "--token",
            lease["fencing_token"],
        )

    first = ok_json(target, "--holder", "agent-1", "acquire", "jobs/1", "--ttl", "30s")["lease"]
    waiting = Running(
        LEASE.argv(
            target,
            "--holder",
            "agent-2",
            "acquire",
            "jobs/1",
            "--ttl",
            "30s",
            "--wait",
            "5m",
            "--json",
        )
    )
    try:
        assert waiting.wait_for("is held by") == notice("agent-1", first)
        release("agent-1", first)
        status, out, err = waiting.finish()
    finally:
        waiting.kill()
    assert status == 0, err
    second = json.loads(out)["lease"]
    assert second["holder"] == "agent-2"
    assert len([line for line in err.splitlines() if "is held by" in line]) == 1

    running = Running(
        LEASE.argv(target, "run", "jobs/1", "--ttl", "30s", "--wait", "5m", "--", *command, "0")
    )
    try:
        assert running.wait_for("is held by") == notice("agent-2", second)
        release("agent-2", second)
        json.loads(wait_for_file(tmp_path / "started", running.proc))
        running.proc.send_signal(signal.SIGTERM)
        status, _, err = running.finish()
    finally:
        running.kill()
    assert status == 0, err


def test_the_installed_tether_has_lease_and_server_commands(
    db_url: str, server_factory: ServerFactory
) -> None:
    target = server_factory(db_url).target
    tether_bin = Path(sys.executable).with_name("tether")
    assert tether_bin.exists(), "install the workspace: make .venv/.installed"

    def run(*args: str) -> str:
        result = subprocess.run(
            [str(tether_bin), *args], capture_output=True, text=True, env=cli_env(), timeout=30
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    help_text = run("--help")
    for name in ("lease", "serve", "migrate"):
        # A row of the command list, not the word anywhere in the prose.
        assert re.search(rf"^\s+{name}\s", help_text, re.M), name
    assert "--listen" in run("serve", "--help")
    run("lease", "--target", target, "acquire", "jobs/1", "--ttl", "30s")
    assert "jobs/1" in run("lease", "--target", target, "list")


# --- lease run -----------------------------------------------------------------------------


def test_run_passes_the_exit_status_through_and_releases(
    db_url: str, server_factory: ServerFactory
) -> None:
    target = server_factory(db_url).target

    result = tether(target, "run", "jobs/1", "--ttl", "30s", "--", "sh", "-c", "exit 7")
    assert result.returncode == 7, result.stderr
    lease = ok_json(target, "get", "jobs/1")
    assert lease["state"] == "LEASE_STATE_RELEASED"

    # Killed by a signal: 128+N, as a shell reports it; released all the same.
    result = tether(target, "run", "jobs/1", "--ttl", "30s", "--", "sh", "-c", "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    again = ok_json(target, "get", "jobs/1")
    assert again["state"] == "LEASE_STATE_RELEASED"
    assert int(again["fencing_token"]) == int(lease["fencing_token"]) + 1


def test_run_gives_the_command_its_lease(
    db_url: str, server_factory: ServerFactory, command: list[str], tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    proc = run_under_lease(target, "jobs/1", command, "0", "--label", "by=test")
    try:
        facts = json.loads(wait_for_file(tmp_path / "started", proc))
        lease = ok_json(target, "get", "jobs/1")
        assert lease["state"] == "LEASE_STATE_ACTIVE"
        assert lease["labels"] == {"by": "test"}
        assert facts["TETHER_LEASE_KEY"] == "jobs/1"
        assert facts["TETHER_LEASE_ID"] == lease["lease_id"]
        assert facts["TETHER_FENCING_TOKEN"] == lease["fencing_token"]
        assert facts["TETHER_NAMESPACE"] == lease["namespace"] == "default"
        # Two runs on one machine exclude each other: the holder is per invocation.
        second = tether(target, "run", "jobs/1", "--ttl", "30s", "--", "true")
        assert second.returncode == 1
        assert "LEASE_HELD" in second.stderr

        # A SIGTERM to `lease run` goes to the command; its status comes back; then release.
        proc.send_signal(signal.SIGTERM)
        status, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 0, err
    assert (tmp_path / "term").exists()
    assert ok_json(target, "get", "jobs/1")["state"] == "LEASE_STATE_RELEASED"


def test_run_stops_the_command_when_the_lease_is_lost(
    db_url: str, server_factory: ServerFactory, command: list[str], tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    # The command exits 0 on SIGTERM: a lost lease still makes the status 75.
    proc = run_under_lease(target, "jobs/1", command, "0")
    try:
        facts = json.loads(wait_for_file(tmp_path / "started", proc))
        ok(target, "revoke", facts["TETHER_LEASE_ID"], "--reason", "test")
        status, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == EXIT_LEASE_LOST, err
    assert "lease lost" in err
    assert "LEASE_REVOKED" in err
    assert (tmp_path / "term").exists()
    assert not (tmp_path / "done").exists()
    assert not alive(facts["pid"])
    # A lost lease is not released: it stays revoked.
    lease = ok_json(target, "get", "--id", facts["TETHER_LEASE_ID"])
    assert lease["state"] == "LEASE_STATE_REVOKED"


def test_run_kills_a_command_that_ignores_sigterm(
    db_url: str, server_factory: ServerFactory, command: list[str], tmp_path: Path
) -> None:
    target = server_factory(db_url).target
    proc = run_under_lease(target, "jobs/1", command, "ignore", "--grace", "0.5s")
    try:
        facts = json.loads(wait_for_file(tmp_path / "started", proc))
        # Taken before the revoke: any delay in noticing SIGTERM only lengthens the interval.
        termed = time.monotonic()
        ok(target, "revoke", facts["TETHER_LEASE_ID"])
        wait_for_file(tmp_path / "term", proc)
        status, err = finish(proc)
        killed_after = time.monotonic() - termed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == EXIT_LEASE_LOST, err
    assert "SIGKILL" in err
    assert killed_after >= 0.5  # the grace was given
    assert not (tmp_path / "done").exists()
    assert not alive(facts["pid"])
    assert ok_json(target, "get", "jobs/1")["state"] == "LEASE_STATE_REVOKED"
