"""How ``tether`` behaves before its first connection, as a person sees it: a word after a
second without one, exit 69 (EX_UNAVAILABLE) naming the target once ``--timeout`` passes,
one ``hint:`` line when the TLS options do not fit the server, and no gRPC core logging
unless ``-vv``.

Real processes on real ports: a port nothing listens on, a TLS server with the test
certificates (on both backends), a plaintext one, and the TLS server behind an address its
certificate does not name. Nothing here waits for time to pass: each test waits for lines
and exits, with generous deadlines.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import DbFactory, ServerFactory
from tests.e2e.cli_support import Forwarder, Running, cli_env, tether_argv
from tests.support.certs import TestPki, TlsServerProcess, channel_credentials, server_tls_args
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

EXIT_UNAVAILABLE = 69
# A line gRPC core logs: severity, date, time, thread, file:line]
GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.M)
# The lines tether itself writes to stderr.
OURS = ("tether: ", "hint: ")


def dead_target() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def start(*args: str) -> Running:
    return Running(tether_argv(*args))


def assert_no_connection(status: int, err: str, target: str) -> list[str]:
    """The error lines of a command that got no connection to ``target``."""
    assert status == EXIT_UNAVAILABLE, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert f"tether: connecting to {target} ... (retrying)" in lines, err
    failure = [line for line in lines if line.startswith("tether: UNAVAILABLE: ")]
    assert len(failure) == 1, err
    assert f"no connection to {target} within " in failure[0], err
    return lines


# --- nothing listening --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("lease", "list"),
        ("lease", "watch"),
        ("lease", "acquire", "jobs/1", "--ttl", "30s", "--wait", "5m"),
        ("saga", "list"),
        ("object", "get", "Worktree", "wt-1"),
        ("sweep", "reports"),
    ],
    ids=lambda command: "-".join(command[:2]),
)
def test_no_server_says_connecting_then_gives_up_with_69(command: tuple[str, ...]) -> None:
    target = dead_target()
    group, *rest = command
    proc = start(group, "--target", target, "--timeout", "3s", *rest)
    proc.wait_for(f"connecting to {target} ... (retrying)")
    status, out, err = proc.finish()
    lines = assert_no_connection(status, err, target)
    assert out == ""
    assert "Connection refused" in err
    # Said once, before the failure; no hint: nothing points at TLS.
    assert lines.count(f"tether: connecting to {target} ... (retrying)") == 1
    assert not [line for line in lines if line.startswith("hint:")], err


def test_every_target_of_a_fail_over_list_is_named() -> None:
    first, second = dead_target(), dead_target()
    targets = f"{first},{second}"
    proc = start("lease", "--target", targets, "--timeout", "2s", "get", "jobs/1")
    status, _, err = proc.finish()
    assert status == EXIT_UNAVAILABLE, err
    assert f"tether: connecting to {first}, {second} ... (retrying)" in err
    assert f"no connection to any of {first}, {second} within 2s" in err
    assert f"  {first}: " in err
    assert f"  {second}: " in err


def test_the_run_command_is_not_run_without_a_connection(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = start(
        "lease",
        "--target",
        dead_target(),
        "--timeout",
        "1s",
        "run",
        "jobs/1",
        "--ttl",
        "30s",
        "--",
        "touch",
        str(marker),
    )
    status, _, err = proc.finish()
    assert status == EXIT_UNAVAILABLE, err
    assert not marker.exists()


def test_the_help_lists_the_exit_statuses() -> None:
    for args in ((), ("lease",), ("saga",), ("object",), ("sweep",), ("lease", "watch")):
        result = subprocess.run(
            tether_argv(*args, "--help"),
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert re.search(r"^  69 +no connection within --timeout", result.stdout, re.M), args
        assert re.search(r"^  130 +interrupted", result.stdout, re.M), args
    watch = subprocess.run(
        tether_argv("lease", "watch", "--help"), capture_output=True, text=True, check=False
    )
    assert "Ctrl-C, which exits 130" in " ".join(watch.stdout.split())


# --- TLS settings that do not fit the server --------------------------------------------


@pytest.fixture
def tls_server(db_url: str, test_pki: TestPki, tmp_path: Path) -> Iterator[TlsServerProcess]:
    server = TlsServerProcess(
        db_url,
        health_credentials=channel_credentials(test_pki),
        extra_args=server_tls_args(test_pki),
        log_dir=tmp_path / "logs",
    )
    with server:
        yield server


def _hint(err: str) -> str:
    hints = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, err
    return hints[0]


def test_tls_mismatches_get_one_hint_each(
    tls_server: TlsServerProcess,
    test_pki: TestPki,
    server_factory: ServerFactory,
    db_factory: DbFactory,
) -> None:
    target = tls_server.target
    plaintext_server = server_factory(db_factory("sqlite")).target
    with Forwarder("127.0.0.2", tls_server.port) as other_name:
        cases = {
            # Plaintext to the TLS port: the server closes the socket.
            "plaintext": (target, ()),
            # TLS, but the system's CAs, which never signed the test certificate.
            "no-ca-file": (target, ("--tls",)),
            # The right CA; the certificate names localhost and 127.0.0.1 only.
            "other-name": (other_name.target, ("--ca-file", str(test_pki.ca))),
            # TLS to a port that speaks plaintext.
            "tls-to-plaintext": (plaintext_server, ("--ca-file", str(test_pki.ca))),
            # Another CA's file.
            "wrong-ca-file": (target, ("--ca-file", str(test_pki.other_ca))),
        }
        # All at once: each waits out its own --timeout.
        running = {
            name: start("lease", "--target", where, *options, "--timeout", "2s", "list")
            for name, (where, options) in cases.items()
        }
        results = {name: proc.finish() for name, proc in running.items()}

    for name, (status, out, err) in results.items():
        assert_no_connection(status, err, cases[name][0])
        assert out == "", name
    hints = {name: _hint(err) for name, (_, _, err) in results.items()}
    assert "the server may expect TLS: add --tls" in hints["plaintext"]
    assert "give its CA with --ca-file" in hints["no-ca-file"]
    assert "not issued for 127.0.0.2" in hints["other-name"]
    assert "does not speak TLS on this port" in hints["tls-to-plaintext"]
    assert f"not signed by the CA in {test_pki.other_ca}" in hints["wrong-ca-file"]
    # The hint comes right after the error line.
    ours = [line for line in results["plaintext"][2].splitlines() if line.startswith(OURS)]
    assert ours[-1].startswith("hint: ")
    assert ours[-2].startswith("tether: UNAVAILABLE: ")


def test_the_right_tls_options_connect_without_a_word(
    tls_server: TlsServerProcess, test_pki: TestPki
) -> None:
    proc = start("lease", "--target", tls_server.target, "--ca-file", str(test_pki.ca), "list")
    status, out, err = proc.finish()
    assert status == 0, err
    assert err == ""
    assert out.split() == ["KEY", "HOLDER", "STATE", "TOKEN", "EXPIRES", "LEASE", "ID"]


# --- gRPC's own logging ------------------------------------------------------------------


def test_grpc_core_logs_nothing_unless_vv(tls_server: TlsServerProcess) -> None:
    # A handshake that fails (the system's CAs): gRPC core would log it, again and again.
    args = ("lease", "--target", tls_server.target, "--tls", "--timeout", "2s")
    quiet = start(*args, "list")
    verbose = start(*args, "-v", "list")
    very = start(*args, "-vv", "list")
    for proc in (quiet, verbose):
        status, _, err = proc.finish()
        assert status == EXIT_UNAVAILABLE, err
        assert not GRPC_LOG_LINE.search(err), err
    status, _, err = very.finish()
    assert status == EXIT_UNAVAILABLE, err
    assert GRPC_LOG_LINE.search(err), err
    assert "CERTIFICATE_VERIFY_FAILED" in err
    # Without -v: the word after a second, the error line, the hint; nothing else.
    connecting, failure, hint = quiet.lines["stderr"]
    assert connecting.startswith("tether: connecting to ")
    assert failure.startswith("tether: UNAVAILABLE: ")
    assert hint.startswith("hint: ")


def test_the_environment_of_lease_run_is_left_alone(
    db_url: str, server_factory: ServerFactory
) -> None:
    """The command under ``lease run`` sees gRPC's settings as they were, not the ones
    ``tether`` chose for itself."""
    target = server_factory(db_url).target
    script = 'echo "v=${GRPC_VERBOSITY-unset} t=${GRPC_TRACE-unset}"'
    proc = start(
        "lease", "--target", target, "run", "jobs/1", "--ttl", "30s", "--", "sh", "-c", script
    )
    status, out, err = proc.finish()
    assert status == 0, err
    assert out == "v=unset t=unset"
