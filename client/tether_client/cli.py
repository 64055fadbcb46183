"""The ``tether`` command.

``tether lease ...`` (:mod:`tether_client.cli_lease`), ``tether saga ...``
(:mod:`tether_client.cli_saga`), ``tether object ...`` (:mod:`tether_client.cli_object`)
and ``tether sweep ...`` (:mod:`tether_client.cli_sweep`) talk to a tether server. Other
installed distributions add commands through the ``tether.commands`` entry-point group: each
entry point names a function ``register(subparsers) -> None`` that adds subparsers whose
parsed namespace carries ``handler`` (``args -> exit status``). tether-server adds
``tether serve`` and ``tether migrate`` that way, so a worker that installs only
tether-client still has ``tether lease``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from tether_client import __version__
from tether_client.cli_lease import EXIT_CODES, SubParsers, register_lease
from tether_client.cli_object import register_object
from tether_client.cli_saga import register_saga
from tether_client.cli_sweep import register_sweep

PLUGIN_GROUP = "tether.commands"
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


# --- the command --------------------------------------------------------------------------


def load_plugins(commands: SubParsers) -> None:
    """Let installed distributions add commands (``tether serve`` from tether-server)."""
    seen: set[str] = set()
    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(entry.name)
        try:
            entry.load()(commands)
        except Exception as exc:
            # A broken plugin must not take `tether lease` down with it.
            print(
                f"tether: warning: commands of {entry.name!r} ({entry.value}) not loaded: {exc}",
                file=sys.stderr,
            )


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="tether: leases for unreliable workers",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_lease(commands)
    register_saga(commands)
    register_object(commands)
    register_sweep(commands)
    if plugins:
        load_plugins(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
