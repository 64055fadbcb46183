"""What every ``tether`` command group shares: the connection options, the handler that
connects, calls and reports, the exit statuses, and the shape of a group and its commands.

A handler builds a :class:`TetherClient` from the connection options (refusing options
that do not go together before anything is sent), waits for the first connection
(:mod:`tether_client.cli_connect`: a word after a second, exit 69 after ``--timeout``),
runs the command, and turns a refusal into ``tether: REASON: message`` plus the facts the
server sent, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc

from tether_client import cli_format as fmt
from tether_client.cli_args import positive_duration
from tether_client.cli_connect import NoConnection, Settings, wait_for_server
from tether_client.client import TetherClient
from tether_client.connection import parse_targets, tls_credentials
from tether_client.errors import TetherError, TokenOverPlaintext
from tether_client.retry import RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: no connection within --timeout
EXIT_LOST = 75  # EX_TEMPFAIL: lease run's lease (saga step's claim) was lost meanwhile
EXIT_INTERRUPTED = 130

_STATUS_HEAD = """\
exit status:
  0    success
  1    the server refused the call, or failed it once connected
       (stderr: "tether: REASON: message", then the facts the server sent)
  2    usage error (a mistyped option or command is named, with the closest match)
  69   no connection within --timeout (EX_UNAVAILABLE): stderr names the target,
       with a "hint:" line when the TLS options look wrong
"""
_INTERRUPTED = "  130  interrupted (Ctrl-C)\n"

# `tether --help` and `tether lease --help`.
EXIT_CODES = (
    _STATUS_HEAD
    + f"  {EXIT_LOST}   lease run: the lease was lost while the command ran (EX_TEMPFAIL)\n"
    + "  130  interrupted (Ctrl-C; lease watch too, while SIGTERM ends a watch with 0)\n"
    + "  lease run otherwise exits with the command's own status (128+N if signal N killed it)\n"
)
# The groups of commands that only call (object, sweep).
OPERATOR_EXIT_CODES = _STATUS_HEAD + _INTERRUPTED

Handler = Callable[[argparse.Namespace], int]
Call = Callable[[TetherClient, argparse.Namespace], Awaitable[int]]
Check = Callable[[argparse.Namespace], None]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

log = logging.getLogger("tether_client.cli")
T = TypeVar("T")


class CliError(Exception):
    """A problem with what the user asked for, found after parsing: one line, exit 1."""


class UsageError(CliError):
    """Options that do not go together, found after parsing: the command's usage, exit 2."""


def say(message: str) -> None:
    """``tether: message`` on stderr: what the command tells a person besides its output."""
    print(f"tether: {message}", file=sys.stderr, flush=True)


def emit(text: str) -> None:
    print(text, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cli_holder() -> str:
    """``user@host``: the same in every invocation, so ``release`` matches ``acquire``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with an arbitrary uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# --- options ------------------------------------------------------------------------------


def add_connection_options(
    parser: argparse.ArgumentParser, *, leaf: bool, taken: Collection[str] = ()
) -> None:
    """The options every command shares.

    They go after the group (``tether lease``, where their defaults and help live) or after
    the command itself: the leaf copies default to SUPPRESS, so a value given there
    overrides the group's and an absent one leaves it alone. A command whose own option has
    the same name (``taken``: ``--token`` of renew/release, ``--holder`` of list) takes
    only the group's.
    """

    def add(flag: str, **kwargs: Any) -> None:
        if flag in taken:
            return
        if leaf:
            kwargs["default"] = argparse.SUPPRESS
            kwargs["help"] = argparse.SUPPRESS
        parser.add_argument(flag, **kwargs)

    env = os.environ.get
    add(
        "--target",
        default=env("TETHER_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT[,...]",
        help="server, or a comma-separated fail-over list (env TETHER_TARGET; default %(default)s)",
    )
    add(
        "--namespace",
        default=env("TETHER_NAMESPACE", ""),
        help="namespace (env TETHER_NAMESPACE; default: the server's, 'default')",
    )
    add(
        "--holder",
        default=env("TETHER_HOLDER") or None,
        help="holder name (env TETHER_HOLDER; default USER@HOST, and USER@HOST/PID for run)",
    )
    add(
        "--tls",
        action="store_true",
        default=env_flag("TETHER_TLS"),
        help="connect with TLS (env TETHER_TLS=1; implied by --ca-file and --cert)",
    )
    add(
        "--ca-file",
        default=env("TETHER_CA_FILE", ""),
        metavar="PEM",
        help="CA certificates to trust (env TETHER_CA_FILE; default: the system's)",
    )
    add(
        "--cert",
        dest="cert_file",
        default=env("TETHER_CERT", ""),
        metavar="PEM",
        help="client certificate for mutual TLS, with --key (env TETHER_CERT)",
    )
    add(
        "--key",
        # Not "key": the commands' KEY argument has that name.
        dest="key_file",
        default=env("TETHER_KEY", ""),
        metavar="PEM",
        help="the client certificate's unencrypted private key (env TETHER_KEY)",
    )
    add(
        "--token",
        dest="auth_token",
        default=env("TETHER_TOKEN", ""),
        metavar="TOKEN",
        help="bearer token sent with every call (env TETHER_TOKEN)",
    )
    add(
        "--token-file",
        default=env("TETHER_TOKEN_FILE", ""),
        metavar="FILE",
        help="read the bearer token from FILE instead (env TETHER_TOKEN_FILE)",
    )
    add(
        "--insecure-token",
        action="store_true",
        default=env_flag("TETHER_INSECURE_TOKEN"),
        help="allow the token over plaintext to a server not on this host "
        "(env TETHER_INSECURE_TOKEN=1; anyone on the way can read it)",
    )
    add(
        "--timeout",
        type=positive_duration,
        default=env("TETHER_TIMEOUT", "10s"),
        metavar="DURATION",
        help="give up on the first connection, and on each call (retries included), after "
        "this long (env TETHER_TIMEOUT; default %(default)s)",
    )
    # Option combinations are checked after parsing (connection_settings); their refusal
    # is a usage error of the command they were given to.
    parser.set_defaults(usage_error=parser.error)


def add_verbose_option(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if leaf else 0,
        help=argparse.SUPPRESS
        if leaf
        else "log what the client does (-vv: gRPC's own logs too: connections, TLS handshakes)",
    )


def configure_logging(verbosity: int) -> None:
    # Quiet by default: the command reports what matters itself (errors, a lost lease).
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="tether: %(levelname)s: %(name)s: %(message)s")


def add_json_option(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if leaf else False,
        help="print JSON (the protobuf JSON mapping) instead of text",
    )


# --- the client -----------------------------------------------------------------------------


def _channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS option is given; ``None`` for plaintext."""
    if bool(args.cert_file) != bool(args.key_file):
        raise UsageError("--cert and --key go together (a client certificate and its key)")
    if not (args.tls or args.ca_file or args.cert_file):
        return None
    try:
        return tls_credentials(args.ca_file or None, args.cert_file or None, args.key_file or None)
    except OSError as exc:
        raise CliError(f"{exc.strerror or exc}: {exc.filename}") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _bearer_token(args: argparse.Namespace) -> str | None:
    if args.auth_token and args.token_file:
        raise UsageError(
            "give --token or --token-file, not both (env TETHER_TOKEN, TETHER_TOKEN_FILE)"
        )
    token: str = args.auth_token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise CliError(f"--token-file: {reason}: {args.token_file}") from None
        if not token:
            raise CliError(f"--token-file: no token in {args.token_file}")
    # gRPC metadata takes printable ASCII only; it would fail later, at the first call.
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise UsageError("the bearer token must be printable ASCII without spaces")
    return token or None


def make_client(args: argparse.Namespace, *, holder: str) -> tuple[TetherClient, Settings]:
    """A client for the connection options, and what they asked for; ``UsageError`` for
    options that do not go together, ``CliError`` for files that cannot be used."""
    credentials = _channel_credentials(args)
    token = _bearer_token(args)
    try:
        targets = parse_targets(args.target)
        client = TetherClient(
            targets,
            namespace=args.namespace,
            holder=holder,
            credentials=credentials,
            token=token,
            insecure_token=args.insecure_token,
            retry=RetryPolicy(default_timeout=args.timeout),
        )
    except TokenOverPlaintext:
        raise UsageError(
            f"the token would go unencrypted to {args.target}: add --tls (and --ca-file), "
            "or --insecure-token to send it anyway"
        ) from None
    except ValueError as exc:
        raise CliError(f"--target: {exc}") from None
    settings = Settings(targets, credentials, ca_file=args.ca_file, cert_file=args.cert_file)
    return client, settings


def report(error: TetherError, facts: Collection[str] = ()) -> None:
    """``tether: REASON: message`` plus the ``facts`` the server sent, to stderr."""
    fmt.report(error, facts)


def command_handler(
    call: Call,
    *,
    holder: Callable[[], str] = cli_holder,
    report_error: Callable[[TetherError], None] = report,
    check: Check | None = None,
) -> Handler:
    """An ``args -> exit status`` handler that runs ``call`` with a connected client,
    reporting errors with ``report_error``. ``check`` looks at the arguments first (a
    ``UsageError`` for ones that do not go together), before anything is sent."""

    def handler(args: argparse.Namespace) -> int:
        configure_logging(args.verbose)

        async def main() -> int:
            if check is not None:
                check(args)
            client, settings = make_client(args, holder=args.holder or holder())
            async with client:
                await wait_for_server(
                    settings,
                    timeout=args.timeout,
                    say=say,
                    timeout_text=fmt.duration(args.timeout),
                )
                return await call(client, args)

        try:
            return asyncio.run(main())
        except NoConnection as exc:
            say(f"UNAVAILABLE: {exc.message}")
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr, flush=True)
            return EXIT_UNAVAILABLE
        except TetherError as exc:
            report_error(exc)
        except UsageError as exc:
            args.usage_error(str(exc))  # exits with status 2, like argparse's own errors
        except CliError as exc:
            say(str(exc))
        return EXIT_ERROR

    return handler


# --- groups and commands ----------------------------------------------------------------


def leaf(
    commands: SubParsers,
    name: str,
    *,
    help: str,
    handler: Handler,
    json: bool = True,
    taken: Collection[str] = (),
    description: str | None = None,
    epilog: str | None = None,
    usage: str | None = None,
) -> argparse.ArgumentParser:
    """A command: its own options come after, with the group's connection, verbose and
    JSON options accepted there too."""
    parser = commands.add_parser(
        name,
        help=help,
        usage=usage,
        description=description or help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    add_connection_options(parser, leaf=True, taken=taken)
    add_verbose_option(parser, leaf=True)
    if json:
        add_json_option(parser, leaf=True)
    return parser


def group(
    commands: SubParsers,
    name: str,
    *,
    help: str,
    description: str,
    epilog: str = OPERATOR_EXIT_CODES,
    taken: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> SubParsers:
    """The group ``tether NAME`` with the connection, verbose and JSON options, and the
    subparsers its commands go in. ``taken`` connection options are the commands' own;
    ``defaults`` stand in for them."""
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_options(parser, leaf=False, taken=taken)
    add_verbose_option(parser, leaf=False)
    add_json_option(parser, leaf=False)
    parser.set_defaults(**(defaults or {}))
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def command(
    sub: SubParsers,
    name: str,
    help: str,
    call: Call,
    *,
    report_error: Callable[[TetherError], None],
    taken: Collection[str] = (),
    holder: Callable[[], str] = cli_holder,
    epilog: str = OPERATOR_EXIT_CODES,
    description: str | None = None,
    json: bool = True,
    check: Check | None = None,
) -> argparse.ArgumentParser:
    """A command of a group: ``call`` with a client, errors by ``report_error``, the
    arguments looked at by ``check`` first."""
    handler = command_handler(call, report_error=report_error, holder=holder, check=check)
    return leaf(
        sub,
        name,
        help=help,
        handler=handler,
        taken=taken,
        epilog=epilog,
        description=description,
        json=json,
    )


async def take(items: AsyncIterator[T], limit: int) -> list[T]:
    """The first ``limit`` items of an async iterator (0: all of them)."""
    found: list[T] = []
    try:
        async for item in items:
            found.append(item)
            if limit and len(found) >= limit:
                break
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()
    return found


def page_size(limit: int) -> int:
    """A page no bigger than ``--limit`` needs (0: the server's default)."""
    return min(limit, fmt.DEFAULT_PAGE_SIZE) if limit else 0
