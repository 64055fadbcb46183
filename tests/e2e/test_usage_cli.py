"""Usage errors of the real ``tether`` command, as a person makes them: a mistyped option
or command is named with the closest real one (and that wins over the "required" error it
causes), a negative duration is called negative, a KEY=VALUE argument is called what it is,
and ``tether serve`` without tether-server installed says what to install. Exit status 2,
one message, no traceback; nothing is sent anywhere (the target has no server)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.e2e.cli_support import cli_env, tether_argv
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

EXIT_USAGE = 2


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tether_argv(*args), capture_output=True, text=True, env=cli_env(), timeout=60, check=False
    )


def usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """The ``error:`` line of a usage error."""
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def lease(*args: str) -> subprocess.CompletedProcess[str]:
    return tether("lease", "--target", f"127.0.0.1:{free_port()}", *args)


def test_a_mistyped_option_is_named_with_the_closest_one() -> None:
    # --ttl is required: the mistyped --tll is what explains its absence.
    error = usage_error(lease("acquire", "jobs/1", "--tll", "30s"))
    assert error == "tether lease acquire: error: unrecognized option '--tll' (did you mean --ttl?)"
    error = usage_error(lease("acquire", "jobs/1", "--ttl", "30s", "--lable", "a=b"))
    assert error.endswith("unrecognized option '--lable' (did you mean --label?)")
    # Connection options after the command, and before it.
    error = usage_error(lease("list", "--namespce", "x"))
    assert error.endswith("unrecognized option '--namespce' (did you mean --namespace?)")
    error = usage_error(tether("lease", "--targte", "x", "list"))
    assert error == "tether lease: error: unrecognized option '--targte' (did you mean --target?)"
    # With =VALUE, and with nothing close to it.
    error = usage_error(lease("run", "jobs/1", "--ttl", "30s", "--grcae=1s", "--", "true"))
    assert error.endswith("unrecognized option '--grcae' (did you mean --grace?)")
    error = usage_error(tether("saga", "list", "--zzzzzz"))
    assert error == "tether saga list: error: unrecognized option '--zzzzzz'"


def test_a_mistyped_command_is_named_with_the_closest_one() -> None:
    error = usage_error(lease("aquire", "jobs/1"))
    assert error == "tether lease: error: unknown command 'aquire' (did you mean acquire?)"
    error = usage_error(tether("sagas", "list"))
    assert error == "tether: error: unknown command 'sagas' (did you mean saga?)"


@pytest.mark.parametrize("ttl", ["-5s", "-1m30s", "-2"])
def test_a_negative_duration_is_called_negative(ttl: str) -> None:
    for args in (("--ttl", ttl), (f"--ttl={ttl}",)):
        error = usage_error(lease("acquire", "jobs/1", *args))
        assert error.endswith(f"argument --ttl: a duration cannot be negative: '{ttl}'"), error
    error = usage_error(lease("acquire", "jobs/1", "--ttl", "30s", "--wait", ttl))
    assert error.endswith(f"argument --wait: a duration cannot be negative: '{ttl}'")


def test_key_value_arguments_are_called_what_they_are() -> None:
    error = usage_error(tether("saga", "annotate", "s-1", "text", "--attr", "noequals"))
    assert error.endswith("argument --attr: an attribute is KEY=VALUE, not 'noequals'")
    error = usage_error(lease("acquire", "jobs/1", "--ttl", "30s", "--label", "noequals"))
    assert error.endswith("argument --label: a label is KEY=VALUE, not 'noequals'")


def test_json_arguments_are_checked_before_anything_is_sent() -> None:
    target = f"127.0.0.1:{free_port()}"
    error = usage_error(
        tether("saga", "--target", target, "create", "s-1", "--kind", "k", "--input", "[1, 2]")
    )
    assert "argument --input: not a JSON object" in error
    error = usage_error(
        tether(
            "saga",
            "--target",
            target,
            "step",
            "0",
            "build",
            "--status",
            "succeeded",
            "--output",
            "{nope",
        )
    )
    assert "argument --output: not JSON" in error


def test_saga_commands_need_a_claim() -> None:
    result = tether("saga", "--target", f"127.0.0.1:{free_port()}", "heartbeat")
    error = usage_error(result)
    assert "no claim to act for: no --saga (TETHER_SAGA_ID)" in error
    assert "tether saga claim" in error


def test_serve_without_the_server_says_what_to_install() -> None:
    # The client alone: no tether.commands entry point adds serve or migrate.
    client_only = "import sys; from tether_client.cli import main; sys.exit(main(plugins=False))"
    for command in (["serve", "--listen", "127.0.0.1:0"], ["migrate"], ["serve", "--help"]):
        result = subprocess.run(
            [sys.executable, "-c", client_only, *command],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=60,
            check=False,
        )
        assert result.returncode == EXIT_USAGE, result.stderr
        assert result.stderr.strip() == (
            f"tether: 'tether {command[0]}' is not available: it comes with the server: "
            "pip install tether-server"
        )
    # Installed, it is the real one, and the stand-ins are not in the command list.
    help_text = tether("--help").stdout
    assert re.search(r"^    serve ", help_text, re.M), help_text
    assert tether("serve", "--help").stdout.startswith("usage: tether serve")
    client_help = subprocess.run(
        [sys.executable, "-c", client_only, "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        check=False,
    ).stdout
    assert "lease" in client_help
    assert not re.search(r"^    (serve|migrate) ", client_help, re.M), client_help
