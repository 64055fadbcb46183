"""The ``tether`` command: ``tether serve`` and ``tether migrate``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence

from tether_server import __version__, logs
from tether_server.clock import clock_from_spec
from tether_server.config import DEFAULT_DB, DEFAULT_LISTEN, ServerConfig
from tether_server.domain.errors import TetherError
from tether_server.domain.validation import Limits
from tether_server.services.lease import LeaseServiceConfig
from tether_server.store.database import Database, describe_url

log = logging.getLogger("tether")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _seconds(text: str) -> float:
    """``30``, ``30s``, ``500ms``, ``2m`` or ``1h``."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * units[suffix]
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="tether control plane")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument("--log-level", default=_env("TETHER_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format", choices=["json", "text"], default=_env("TETHER_LOG_FORMAT", "json")
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--listen", default=_env("TETHER_LISTEN", DEFAULT_LISTEN))
    serve.add_argument(
        "--db",
        default=_env("TETHER_DB", DEFAULT_DB),
        help="sqlite:///PATH (default ./tether.db) or postgresql://USER@HOST:PORT/DB",
    )
    serve.add_argument(
        "--clock",
        default=_env("TETHER_CLOCK", "system"),
        help="'system', or 'file:PATH' (tests that drive the clock of a server process)",
    )
    serve.add_argument("--grace", type=_seconds, default=_env("TETHER_GRACE", "10s"))
    serve.add_argument("--min-ttl", type=_seconds, default=_env("TETHER_MIN_TTL", "1s"))
    serve.add_argument("--max-ttl", type=_seconds, default=_env("TETHER_MAX_TTL", "1h"))
    serve.add_argument(
        "--keepalive-idle-timeout",
        type=_seconds,
        default=_env("TETHER_KEEPALIVE_IDLE_TIMEOUT", "2m"),
    )
    serve.add_argument(
        "--replica",
        default=_env("TETHER_REPLICA", ""),
        help="stable replica name (default <hostname>:<port>); a restart reaps its predecessor",
    )

    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--db", default=_env("TETHER_DB", DEFAULT_DB))
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    limits = Limits(min_ttl_us=round(args.min_ttl * 1e6), max_ttl_us=round(args.max_ttl * 1e6))
    if not 0 < limits.min_ttl_us <= limits.max_ttl_us:
        raise SystemExit("--min-ttl must be positive and at most --max-ttl")
    return ServerConfig(
        listen=args.listen,
        db_url=args.db,
        clock=args.clock,
        grace_s=args.grace,
        replica=args.replica,
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
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()


async def migrate(url: str) -> None:
    db = Database(url, clock_from_spec("system"))
    try:
        await db.migrate()
    finally:
        await db.dispose()
    log.info("migrated", extra={"store": describe_url(url)})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            asyncio.run(serve(config_from_args(args)))
        elif args.command == "migrate":
            asyncio.run(migrate(args.db))
    except KeyboardInterrupt:
        return 130
    # grpcio reports a taken port as RuntimeError; an unreachable store as TetherError.
    except (OSError, ValueError, RuntimeError, TetherError) as exc:
        log.error("tether failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
