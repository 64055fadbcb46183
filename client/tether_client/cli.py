"""The ``tether`` command.

``tether lease ...`` (:mod:`tether_client.cli_lease`), ``tether saga ...``
(:mod:`tether_client.cli_saga`), ``tether object ...`` (:mod:`tether_client.cli_object`)
and ``tether sweep ...`` (:mod:`tether_client.cli_sweep`) talk to a tether server. Other
installed distributions add commands through the ``tether.commands`` entry-point group: each
entry point names a function ``register(subparsers) -> None`` that adds subparsers whose
parsed namespace carries ``handler`` (``args -> exit status``). tether-server adds
``tether serve`` and ``tether migrate`` that way, so a worker that installs only
tether-client still has ``tether lease``; there, ``tether serve`` says what to install.
"""

# gRPC reads its logging settings when it is first imported: before anything else.
import sys

from tether_client.cli_env import set_grpc_logging

set_grpc_logging(sys.argv[1:])

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from importlib.metadata import entry_points  # noqa: E402

from tether_client import __version__  # noqa: E402
from tether_client.cli_args import Parser  # noqa: E402
from tether_client.cli_common import (  # noqa: E402
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    SubParsers,
)
from tether_client.cli_lease import register_lease  # noqa: E402
from tether_client.cli_object import register_object  # noqa: E402
from tether_client.cli_saga import register_saga  # noqa: E402
from tether_client.cli_sweep import register_sweep  # noqa: E402

PLUGIN_GROUP = "tether.commands"
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# The server's commands, and the distribution that adds them.
SERVER_COMMANDS = ("serve", "migrate")
SERVER_DISTRIBUTION = "tether-server"


# --- the command --------------------------------------------------------------------------


def load_plugins(commands: SubParsers) -> list[str]:
    """Let installed distributions add commands (``tether serve`` from tether-server); the
    entry points that failed to load."""
    seen: set[str] = set()
    failed: list[str] = []
    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(entry.name)
        try:
            entry.load()(commands)
        except Exception as exc:
            # A broken plugin must not take `tether lease` down with it.
            failed.append(entry.name)
            print(
                f"tether: warning: commands of {entry.name!r} ({entry.value}) not loaded: {exc}",
                file=sys.stderr,
            )
    return failed


def _missing_command(name: str, *, broken: bool) -> argparse.Namespace:
    """What ``tether serve`` says when tether-server is not there to add it."""

    def handler(args: argparse.Namespace) -> int:
        if broken:
            why = f"{SERVER_DISTRIBUTION} is installed but its commands did not load (see above)"
        else:
            why = f"it comes with the server: pip install {SERVER_DISTRIBUTION}"
        print(f"tether: 'tether {name}' is not available: {why}", file=sys.stderr)
        return EXIT_USAGE

    return argparse.Namespace(handler=handler)


def _add_missing_server_commands(commands: SubParsers, *, broken: bool) -> None:
    """Stand-ins for ``serve`` and ``migrate`` when no plugin added them: not listed in the
    help, taking any arguments, saying what to install."""
    for name in SERVER_COMMANDS:
        if name in commands.choices:
            continue
        stand_in = commands.add_parser(name, add_help=False, prefix_chars="\0")
        stand_in.add_argument("rest", nargs=argparse.REMAINDER)
        stand_in.set_defaults(handler=_missing_command(name, broken=broken).handler)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(
        prog="tether",
        description="tether: leases for unreliable workers, sagas, owner references, sweeps",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_lease(commands)
    register_saga(commands)
    register_object(commands)
    register_sweep(commands)
    failed = load_plugins(commands) if plugins else []
    _add_missing_server_commands(commands, broken=bool(failed))
    return parser


def main(argv: Sequence[str] | None = None, *, plugins: bool = True) -> int:
    try:
        args = build_parser(plugins=plugins).parse_args(argv)
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `tether lease list | head`: the reader left. Point stdout at /dev/null so the
        # flush at exit does not fail again, and exit as if SIGPIPE had ended us.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status


if __name__ == "__main__":
    sys.exit(main())
