"""``tether serve`` and ``tether migrate``: the server's subcommands of the ``tether`` command.

The ``tether`` console script belongs to tether-client (workers install only that); this
package plugs its subcommands in through the ``tether.commands`` entry point, which names
:func:`register`. ``python -m tether_server.cli serve ...`` still works on its own.

Building the parser imports nothing heavy (no SQLAlchemy, no server modules): every
``tether`` invocation, ``tether lease ...`` included, builds it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tether_client.convert import parse_duration, parse_int
from tether_server import __version__, logs
from tether_server.cli_limits import add_limit_options, limits_from_args
from tether_server.defaults import DEFAULT_DB, DEFAULT_LISTEN

if TYPE_CHECKING:
    from tether_server.config import ServerConfig
    from tether_server.domain.sweep import SweepConfig

log = logging.getLogger("tether")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _seconds(text: str) -> float:
    """A duration flag, parsed as the client's CLI parses them (``30s``, ``1m30s``, ...)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batch_size(text: str) -> int:
    """Rows per transaction: 1 to 1 000 000 (more would hold the store for seconds)."""
    try:
        return parse_int(text, minimum=1, maximum=1_000_000)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=_env("TETHER_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format", choices=["json", "text"], default=_env("TETHER_LOG_FORMAT", "json")
    )


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve`` and ``migrate`` to the ``tether`` command (the plugin entry point).

    Each parsed namespace carries ``handler``: ``args -> exit status``.
    """
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--listen",
        default=_env("TETHER_LISTEN", DEFAULT_LISTEN),
        help="HOST:PORT to listen on (env TETHER_LISTEN; default %(default)s)",
    )
    serve.add_argument(
        "--db",
        default=_env("TETHER_DB", DEFAULT_DB),
        help=f"sqlite:///PATH (default {DEFAULT_DB}) or postgresql://USER@HOST:PORT/DB",
    )
    serve.add_argument(
        "--clock",
        default=_env("TETHER_CLOCK", "system"),
        help="'system', or 'file:PATH' (tests that drive the clock of a server process)",
    )
    serve.add_argument(
        "--grace",
        type=_seconds,
        default=_env("TETHER_GRACE", "10s"),
        help="DURATION, e.g. 10s (env TETHER_GRACE; default %(default)s)",
    )
    serve.add_argument(
        "--min-ttl",
        type=_seconds,
        default=_env("TETHER_MIN_TTL", "1s"),
        help="DURATION, e.g. 1s (env TETHER_MIN_TTL; default %(default)s)",
    )
    serve.add_argument(
        "--max-ttl",
        type=_seconds,
        default=_env("TETHER_MAX_TTL", "1h"),
        help="DURATION, e.g. 1h (env TETHER_MAX_TTL; default %(default)s)",
    )
    serve.add_argument(
        "--keepalive-idle-timeout",
        type=_seconds,
        default=_env("TETHER_KEEPALIVE_IDLE_TIMEOUT", "2m"),
        help="DURATION (env TETHER_KEEPALIVE_IDLE_TIMEOUT; default %(default)s)",
    )
    serve.add_argument(
        "--clock-step-threshold",
        type=_seconds,
        default=_env("TETHER_CLOCK_STEP_THRESHOLD", "5s"),
        metavar="DURATION",
        help="a wall clock jumping ahead of the monotonic clock by more than this is a step:"
        " live lease deadlines move with it instead of expiring (SQLite; 0 turns it off;"
        " env TETHER_CLOCK_STEP_THRESHOLD; default %(default)s)",
    )
    serve.add_argument(
        "--leader-check-interval",
        type=_seconds,
        default=_env("TETHER_LEADER_CHECK_INTERVAL", "1s"),
        help="DURATION: how often a PostgreSQL replica checks or takes the leader lock, "
        "which bounds how long leader-only work pauses when the leader dies "
        "(env TETHER_LEADER_CHECK_INTERVAL; default %(default)s)",
    )
    serve.add_argument(
        "--replica",
        default=_env("TETHER_REPLICA", ""),
        help="stable replica name (default <hostname>:<port>); a restart reaps its predecessor",
    )
    serve.add_argument(
        "--metrics-listen",
        default=_env("TETHER_METRICS_LISTEN", ""),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (env TETHER_METRICS_LISTEN;"
        " default: off)",
    )
    serve.add_argument(
        "--gc-batch-size",
        type=_batch_size,
        default=_env("TETHER_GC_BATCH_SIZE", "1000"),
        metavar="N",
        help="dependents the garbage collector handles per transaction"
        " (env TETHER_GC_BATCH_SIZE; default %(default)s)",
    )
    _add_auth_options(serve)
    add_limit_options(serve)
    _add_sweep_options(serve)
    _add_log_options(serve)
    serve.set_defaults(handler=_run_serve)

    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--db", default=_env("TETHER_DB", DEFAULT_DB))
    _add_log_options(migrate)
    migrate.set_defaults(handler=_run_migrate)


def _add_auth_options(serve: argparse.ArgumentParser) -> None:
    files = [
        ("--tls-cert", "TETHER_TLS_CERT", "PEM certificate chain: serve TLS"),
        ("--tls-key", "TETHER_TLS_KEY", "PEM private key of --tls-cert"),
        ("--tls-client-ca", "TETHER_TLS_CLIENT_CA",
         "PEM CA bundle: require client certificates it signed (mutual TLS); the principal is "
         "the certificate's first URI SAN, else its subject CN"),
        ("--auth-tokens", "TETHER_AUTH_TOKENS",
         "tokens file: bearer tokens, principals, roles and namespaces (re-read on SIGHUP)"),
    ]  # fmt: skip
    for flag, env, text in files:
        serve.add_argument(flag, default=_env(env, ""), metavar="FILE", help=f"{text} (env {env})")
    serve.add_argument(
        "--insecure-allow-anonymous",
        action="store_true",
        default=_env("TETHER_INSECURE_ALLOW_ANONYMOUS", "") not in ("", "0", "false"),
        help="without --auth-tokens or --tls-client-ca, serve anonymous callers (as admin) on "
        "a non-loopback address too; never do this where others can reach the port "
        "(env TETHER_INSECURE_ALLOW_ANONYMOUS)",
    )
    serve.add_argument(
        "--max-message-size",
        type=_byte_count,
        default=_env("TETHER_MAX_MESSAGE_SIZE", "4MiB"),
        metavar="BYTES",
        help="largest request message accepted, e.g. 4MiB (env TETHER_MAX_MESSAGE_SIZE; "
        "default %(default)s)",
    )


_BYTE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "kb": 1000, "mb": 1000**2}


def _byte_count(text: str) -> int:
    """``4MiB``, ``512KiB``, ``65536``: a positive size of at most 1 GiB."""
    number = text.strip().rstrip("BbIiKkMm")
    unit = text.strip()[len(number) :].lower()
    if unit not in _BYTE_UNITS or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4MiB, 512KiB or 65536")
    value = int(number) * _BYTE_UNITS[unit]
    if not 1024 <= value <= 1024**3:
        raise argparse.ArgumentTypeError(f"{text!r}: a size between 1KiB and 1GiB is needed")
    return value


# (flag, env, default, help) of the sweep's durations; 0 keeps rows forever.
_SWEEP_DURATIONS = [
    ("--sweep-interval", "TETHER_SWEEP_INTERVAL", "5m", "how often the leader sweeps"),
    ("--sweep-start-delay", "TETHER_SWEEP_START_DELAY", "30s",
     "wait before this process's first periodic sweep"),
    ("--sweep-pause", "TETHER_SWEEP_PAUSE", "10ms",
     "pause between purge batches, so live writes get the store"),
    ("--retain-ended-leases", "TETHER_RETAIN_ENDED_LEASES", "24h",
     "keep ended leases (and their request ids) this long; 0 forever"),
    ("--retain-terminal-sagas", "TETHER_RETAIN_TERMINAL_SAGAS", "168h",
     "keep terminal sagas this long; 0 forever"),
    ("--retain-events", "TETHER_RETAIN_EVENTS", "24h",
     "keep watch events this long (older revisions answer OUT_OF_RANGE); 0 forever"),
    ("--retain-sweep-reports", "TETHER_RETAIN_SWEEP_REPORTS", "168h",
     "keep sweep reports this long; 0 forever"),
    ("--blocked-after", "TETHER_BLOCKED_AFTER", "1h",
     "report an object terminating longer than this as blocked"),
]  # fmt: skip


def _add_sweep_options(serve: argparse.ArgumentParser) -> None:
    for flag, env, default, text in _SWEEP_DURATIONS:
        serve.add_argument(
            flag,
            type=_seconds,
            default=_env(env, default),
            metavar="DURATION",
            help=f"{text} (env {env}; default %(default)s)",
        )
    serve.add_argument(
        "--sweep-batch-size",
        type=_batch_size,
        default=_env("TETHER_SWEEP_BATCH_SIZE", "1000"),
        metavar="N",
        help="most rows per sweep transaction; purge batches shrink to take about 25 ms"
        " (env TETHER_SWEEP_BATCH_SIZE; default %(default)s)",
    )


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    from tether_server.domain.sweep import Retention, SweepConfig, SweepLimits

    try:
        return SweepConfig(
            interval_s=args.sweep_interval,
            start_delay_s=args.sweep_start_delay,
            retention=Retention(
                ended_leases_s=args.retain_ended_leases,
                terminal_sagas_s=args.retain_terminal_sagas,
                events_s=args.retain_events,
                reports_s=args.retain_sweep_reports,
            ),
            limits=SweepLimits(
                batch_size=args.sweep_batch_size,
                pause_s=args.sweep_pause,
                blocked_after_s=args.blocked_after,
            ),
        )
    except ValueError as exc:
        raise SystemExit(f"sweep settings: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The server's commands alone, for ``python -m tether_server.cli``."""
    parser = argparse.ArgumentParser(prog="tether", description="tether control plane")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from tether_server.auth import AuthConfig
    from tether_server.config import ServerConfig
    from tether_server.domain.validation import Limits
    from tether_server.expiry import ExpiryConfig
    from tether_server.services.lease import LeaseServiceConfig

    limits = Limits(min_ttl_us=round(args.min_ttl * 1e6), max_ttl_us=round(args.max_ttl * 1e6))
    if not 0 < limits.min_ttl_us <= limits.max_ttl_us:
        raise SystemExit("--min-ttl must be positive and at most --max-ttl")
    return ServerConfig(
        listen=args.listen,
        db_url=args.db,
        clock=args.clock,
        grace_s=args.grace,
        replica=args.replica,
        leader_check_interval_s=args.leader_check_interval,
        metrics_listen=args.metrics_listen,
        gc_batch_size=args.gc_batch_size,
        expiry=ExpiryConfig(clock_step_threshold_s=args.clock_step_threshold),
        sweep=_sweep_config(args),
        auth=AuthConfig(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tokens_file=args.auth_tokens,
            insecure_allow_anonymous=args.insecure_allow_anonymous,
        ),
        max_message_bytes=args.max_message_size,
        resource_limits=limits_from_args(args),
        lease=dataclasses.replace(
            LeaseServiceConfig(),
            limits=limits,
            keepalive_idle_timeout_s=args.keepalive_idle_timeout,
        ),
    )


async def serve(config: ServerConfig) -> None:
    from tether_server.app import TetherServer

    # Handlers first: a SIGTERM during migration or recovery still stops cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = TetherServer(config)
    # The tokens file is re-read on SIGHUP; streams and calls in flight go on.
    loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()


async def migrate(url: str) -> None:
    from tether_server.clock import clock_from_spec
    from tether_server.store.database import Database, describe_url

    db = Database(url, clock_from_spec("system"))
    try:
        await db.migrate()
    finally:
        await db.dispose()
    log.info("migrated", extra={"store": describe_url(url)})


def _run_serve(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    return _guarded(lambda: asyncio.run(serve(config_from_args(args))))


def _run_migrate(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    return _guarded(lambda: asyncio.run(migrate(args.db)))


def _guarded(run: Callable[[], None]) -> int:
    """Operators get one error line, not a traceback, for the failures they can fix."""
    from tether_server.domain.errors import TetherError

    try:
        run()
    except KeyboardInterrupt:
        return 130
    # grpcio reports a taken port as RuntimeError; an unreachable store as TetherError.
    except (OSError, ValueError, RuntimeError, TetherError) as exc:
        log.error("tether failed: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
