"""``tether serve`` flags for the resource limits (services/limits.py), each with its
environment variable. Imports nothing heavy: every ``tether`` invocation builds the parser."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from tether_client.convert import parse_int

if TYPE_CHECKING:
    from tether_server.services.limits import ServerLimits

# (flag, env, default, ServerLimits field, help); defaults match ServerLimits'.
_LIMITS = [
    ("--max-concurrent-rpcs", "TETHER_MAX_CONCURRENT_RPCS", 1000, "max_concurrent_rpcs",
     "unary calls handled at once; more are refused RESOURCE_EXHAUSTED / CONCURRENCY_LIMIT"),
    ("--max-streams-per-connection", "TETHER_MAX_STREAMS_PER_CONNECTION", 100,
     "max_streams_per_connection",
     "KeepAlive and Watch streams open at once on one client connection (STREAM_LIMIT)"),
    ("--max-leases-per-principal", "TETHER_MAX_LEASES_PER_PRINCIPAL", 10_000,
     "max_leases_per_principal",
     "live leases one principal may hold, across replicas (LEASE_LIMIT); without"
     " credentials every caller is the one principal 'anonymous'"),
    ("--max-watches-per-principal", "TETHER_MAX_WATCHES_PER_PRINCIPAL", 100,
     "max_watches_per_principal",
     "Watch, WatchSagas and WatchObjects streams one principal may have open on this"
     " server process (WATCH_LIMIT)"),
]  # fmt: skip


# Far above any real cap; keeps values inside the database's integers.
_MAX = 1_000_000_000


def _count(text: str) -> int:
    try:
        return parse_int(text, maximum=_MAX)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (0 is no cap)") from None


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("resource limits (0 turns a limit off)")
    for flag, env, default, _field, text in _LIMITS:
        group.add_argument(
            flag,
            type=_count,
            # A string default goes through ``type`` like the flag, so a bad environment
            # value is a usage error too (and only for ``tether serve``).
            default=os.environ.get(env, str(default)),
            metavar="N",
            help=f"{text} (env {env}; default %(default)s)",
        )


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    from tether_server.services.limits import ServerLimits

    return ServerLimits(
        **{field: getattr(args, flag[2:].replace("-", "_")) for flag, _, _, field, _ in _LIMITS}
    )
