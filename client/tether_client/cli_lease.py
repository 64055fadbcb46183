"""``tether lease ...``: lease calls from a shell, over :class:`TetherClient`.

Text for people (aligned tables, ``name: value`` blocks), JSON with ``--json``; errors as
``tether: REASON: message`` on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from tether_client import cli_format as fmt
from tether_client.cli_run import EXIT_LEASE_LOST, Runner, RunSpec
from tether_client.client import TetherClient
from tether_client.connection import tls_credentials
from tether_client.convert import parse_duration, parse_int
from tether_client.errors import LeaseHeld, LockDelay, TetherError, TokenOverPlaintext, WaitTimeout
from tether_client.pb import lease_pb2
from tether_client.retry import RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_ERROR = 1

EXIT_CODES = f"""\
exit status:
  0    success
  1    the server refused the call or could not be reached
       (stderr: "tether: REASON: message")
  2    usage error
  {EXIT_LEASE_LOST}   lease run: the lease was lost while the command ran
  130  interrupted (Ctrl-C)
  lease run otherwise exits with the command's own status (128+N if signal N killed it)
"""

Handler = Callable[[argparse.Namespace], int]
LeaseCall = Callable[[TetherClient, argparse.Namespace], Awaitable[int]]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# --- argument types -----------------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration(text: str) -> float:
    value = _duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    # Bounded by what an int64 field holds: a bigger number is a usage error, not an
    # overflow when the request is built.
    try:
        return parse_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        return parse_int(text, minimum=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, not {text!r}")
    return key, value


# ``active`` or ``active,expired``.
_states = fmt.name_list(fmt.STATES, "state")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cli_holder() -> str:
    """``user@host``: the same in every invocation, so ``release`` matches ``acquire``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with an arbitrary uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# --- connection options -------------------------------------------------------------------


def _add_connection_options(
    parser: argparse.ArgumentParser, *, leaf: bool, taken: Collection[str] = ()
) -> None:
    """The options every lease command shares.

    They go after ``tether lease`` (where their defaults and help live) or after the command
    itself: the leaf copies default to SUPPRESS, so a value given there overrides the group's
    and an absent one leaves it alone. A command whose own option has the same name
    (``taken``: ``--token`` of renew/release, ``--holder`` of list) takes only the group's.
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
        help="lease namespace (env TETHER_NAMESPACE; default: the server's, 'default')",
    )
    add(
        "--holder",
        default=env("TETHER_HOLDER") or None,
        help="holder name (env TETHER_HOLDER; default USER@HOST, and USER@HOST/PID for run)",
    )
    add(
        "--tls",
        action="store_true",
        default=_env_flag("TETHER_TLS"),
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
        default=_env_flag("TETHER_INSECURE_TOKEN"),
        help="allow the token over plaintext to a server not on this host "
        "(env TETHER_INSECURE_TOKEN=1; anyone on the way can read it)",
    )
    add(
        "--timeout",
        type=_positive_duration,
        default=env("TETHER_TIMEOUT", "10s"),
        metavar="DURATION",
        help="deadline of each call, retries included (env TETHER_TIMEOUT; default %(default)s)",
    )
    # Option combinations are checked after parsing (make_client); their refusal is a usage
    # error of the command they were given to.
    parser.set_defaults(usage_error=parser.error)


def _add_verbose_option(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if leaf else 0,
        help=argparse.SUPPRESS if leaf else "log what the client does (-vv: more)",
    )


def _configure_logging(verbosity: int) -> None:
    # Quiet by default: the command reports what matters itself (errors, a lost lease).
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="tether: %(levelname)s: %(name)s: %(message)s")


def _add_json_option(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if leaf else False,
        help="print JSON (the protobuf JSON mapping) instead of text",
    )


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


def make_client(args: argparse.Namespace, *, holder: str) -> TetherClient:
    """A client for the connection options; ``UsageError`` for ones that do not go together,
    ``CliError`` for files that cannot be used."""
    credentials = _channel_credentials(args)
    token = _bearer_token(args)
    try:
        return TetherClient(
            args.target,
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


class CliError(Exception):
    """A problem with what the user asked for, found after parsing: one line, exit 1."""


class UsageError(CliError):
    """Options that do not go together, found after parsing: the command's usage, exit 2."""


def report(error: TetherError) -> None:
    """``tether: REASON: message`` plus the facts a person acts on, to stderr."""
    names: tuple[str, ...] = ()
    if isinstance(error, LeaseHeld | WaitTimeout):
        names = ("holder", "expires_at")
    elif isinstance(error, LockDelay):
        names = ("available_at",)
    fmt.report(error, names)


def _lease_handler(
    call: LeaseCall,
    *,
    holder: Callable[[], str] = cli_holder,
    report_error: Callable[[TetherError], None] = report,
) -> Handler:
    """An ``args -> exit status`` handler that runs ``call`` with a client, reporting errors
    (``tether saga`` uses it too, with its own ``report_error``)."""

    def handler(args: argparse.Namespace) -> int:
        _configure_logging(args.verbose)

        async def main() -> int:
            async with make_client(args, holder=args.holder or holder()) as client:
                return await call(client, args)

        try:
            return asyncio.run(main())
        except TetherError as exc:
            report_error(exc)
        except UsageError as exc:
            args.usage_error(str(exc))  # exits with status 2, like argparse's own errors
        except CliError as exc:
            print(f"tether: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR

    return handler


def _emit(text: str) -> None:
    print(text, flush=True)


# --- lease commands -----------------------------------------------------------------------


async def _acquire(client: TetherClient, args: argparse.Namespace) -> int:
    response = await client.acquire(
        args.key,
        ttl=args.ttl,
        wait=args.wait,
        lock_delay=args.lock_delay,
        labels=dict(args.labels),
    )
    if args.json:
        _emit(fmt.json_block(fmt.to_json(response)))
    else:
        pairs = fmt.lease_fields(response.lease)
        created = "yes" if response.created else "no (this holder already held it)"
        _emit(fmt.fields([*pairs, ("created", created)]))
    return 0


async def _renew(client: TetherClient, args: argparse.Namespace) -> int:
    response = await client.renew(args.lease_id, args.fencing_token)
    if args.json:
        _emit(fmt.json_block(fmt.to_json(response)))
    else:
        pairs = [
            ("lease_id", response.lease_id),
            ("fencing_token", str(response.fencing_token)),
            ("ttl", fmt.duration(response.ttl)),
            ("expires_at", fmt.timestamp(response.expires_at)),
        ]
        _emit(fmt.fields(pairs))
    return 0


def _print_lease(lease: lease_pb2.Lease, args: argparse.Namespace) -> None:
    _emit(fmt.json_block(fmt.to_json(lease)) if args.json else fmt.lease_details(lease))


async def _release(client: TetherClient, args: argparse.Namespace) -> int:
    _print_lease(await client.release(args.lease_id, args.fencing_token), args)
    return 0


async def _revoke(client: TetherClient, args: argparse.Namespace) -> int:
    _print_lease(await client.revoke(args.lease_id, reason=args.reason), args)
    return 0


async def _get(client: TetherClient, args: argparse.Namespace) -> int:
    if args.lease_id is not None:
        lease = await client.get_lease(lease_id=args.lease_id)
    else:
        lease = await client.get_lease(key=args.key)
    _print_lease(lease, args)
    return 0


async def _list(client: TetherClient, args: argparse.Namespace) -> int:
    leases: list[lease_pb2.Lease] = []
    # The server's default page is 100; a smaller --limit needs no more than that.
    page_size = min(args.limit, 100) if args.limit else 0
    async for lease in client.iter_leases(
        key_prefix=args.prefix, holder=args.holder_filter, states=args.states, page_size=page_size
    ):
        leases.append(lease)
        if args.limit and len(leases) >= args.limit:
            break
    if args.json:
        _emit(fmt.json_block([fmt.to_json(lease) for lease in leases]))
    else:
        _emit(fmt.lease_table(leases))
    return 0


async def _watch(client: TetherClient, args: argparse.Namespace) -> int:
    # Ctrl-C or SIGTERM is the normal way to end a watch: stop quietly, status 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def stream() -> None:
        async for event in client.watch(key_prefix=args.prefix, start_revision=args.from_revision):
            _emit(fmt.json_line(fmt.to_json(event)) if args.json else fmt.event_line(event))

    streaming = asyncio.create_task(stream())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({streaming, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        streaming.cancel()
        stopping.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if streaming.done() and not streaming.cancelled():
        streaming.result()  # a failed watch raises here
    return 0


async def _run(client: TetherClient, args: argparse.Namespace) -> int:
    spec = RunSpec(
        key=args.key,
        argv=args.argv,
        ttl=args.ttl,
        wait=args.wait,
        lock_delay=args.lock_delay,
        grace=args.grace,
        labels=dict(args.labels),
    )
    return await Runner(spec).run(client)


def _run_holder() -> str:
    # Unique per invocation: two runs on one machine must exclude each other, and a holder
    # acquiring again gets its own live lease back.
    return f"{cli_holder()}/{os.getpid()}"


# --- the parser ---------------------------------------------------------------------------

LEASE_HELP = """\
Acquire, inspect and watch leases on a tether server, or run a command under one.

Connection options go after `tether lease` or after the command; on renew and release
`--token` is the fencing token, so a bearer token goes before the command there.
"""

RUN_HELP = f"""\
Acquire KEY, run COMMAND while the lease is renewed, then release it.

The command inherits stdin/stdout/stderr and gets TETHER_LEASE_KEY, TETHER_LEASE_ID,
TETHER_FENCING_TOKEN and TETHER_NAMESPACE in its environment, to fence its own writes.
If the lease is lost (revoked, expired, renewals unconfirmed) the command gets SIGTERM,
then SIGKILL after --grace; a lost lease is not released. SIGINT, SIGTERM and SIGHUP to
`tether lease run` are passed on to the command; it is waited for, then the lease released.

exit status:
  the command's own status (128+N if signal N killed it) when the lease was held throughout
  {EXIT_LEASE_LOST}   the lease was lost while the command ran (EX_TEMPFAIL), whatever it did;
       also when the release finds it was revoked or expired, and when a grant
       arrived already lost (nothing was run)
  1    the lease could not be acquired (held, lock-delay, --wait ran out); nothing was run
  2    usage error
  126  COMMAND could not be executed;  127  COMMAND not found
"""


def _leaf(
    commands: SubParsers,
    name: str,
    *,
    help: str,
    handler: Handler,
    json: bool = True,
    fencing_token: bool = False,
    taken: Collection[str] = (),
    description: str | None = None,
    usage: str | None = None,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=help,
        usage=usage,
        description=description or help,
        epilog=None if description else EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    if fencing_token:
        parser.add_argument(
            "--token",
            dest="fencing_token",
            type=_non_negative_int,
            required=True,
            help="the lease's fencing token (from acquire)",
        )
        taken = (*taken, "--token")
    _add_connection_options(parser, leaf=True, taken=taken)
    _add_verbose_option(parser, leaf=True)
    if json:
        _add_json_option(parser, leaf=True)
    return parser


OPERATOR_EXIT_CODES = """\
exit status:
  0    success
  1    the server refused the call or could not be reached
       (stderr: "tether: REASON: message", then the facts it sent)
  2    usage error
  130  interrupted (Ctrl-C)
"""


def _operator_group(
    commands: SubParsers,
    name: str,
    *,
    help: str,
    description: str,
    taken: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> SubParsers:
    """The group ``tether NAME`` (saga, object, sweep) with the connection, verbose and JSON
    options, and the subparsers its commands go in (``_operator_command``). ``taken``
    connection options are the commands' own; ``defaults`` stand in for them."""
    group = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=OPERATOR_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection_options(group, leaf=False, taken=taken)
    _add_verbose_option(group, leaf=False)
    _add_json_option(group, leaf=False)
    group.set_defaults(**(defaults or {}))
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _operator_command(
    sub: SubParsers,
    name: str,
    help: str,
    call: LeaseCall,
    *,
    report_error: Callable[[TetherError], None],
    taken: Collection[str] = (),
) -> argparse.ArgumentParser:
    """A command of an operator group: ``call`` with a client, errors by ``report_error``."""
    handler = _lease_handler(call, report_error=report_error)
    parser = _leaf(sub, name, help=help, handler=handler, taken=taken)
    parser.epilog = OPERATOR_EXIT_CODES
    return parser


def _add_acquire_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="KEY")
    parser.add_argument(
        "--ttl", type=_positive_duration, required=True, metavar="DURATION", help="e.g. 30s"
    )
    parser.add_argument(
        "--wait",
        type=_duration,
        default=0.0,
        metavar="DURATION",
        help="wait up to this long for the key to free up (default: fail at once)",
    )
    parser.add_argument(
        "--lock-delay",
        type=_duration,
        default=0.0,
        metavar="DURATION",
        help="keep the key unavailable this long after the lease expires or is revoked",
    )
    parser.add_argument(
        "--label",
        dest="labels",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label on the lease (repeatable)",
    )


def register_lease(commands: SubParsers) -> None:
    lease = commands.add_parser(
        "lease",
        help="acquire, inspect and watch leases; run a command under one",
        description=LEASE_HELP,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection_options(lease, leaf=False)
    _add_verbose_option(lease, leaf=False)
    _add_json_option(lease, leaf=False)
    sub = lease.add_subparsers(dest="lease_command", required=True, metavar="COMMAND")

    acquire = _leaf(
        sub,
        "acquire",
        help="acquire a lease; prints its id and fencing token",
        handler=_lease_handler(_acquire),
    )
    _add_acquire_options(acquire)

    renew = _leaf(
        sub,
        "renew",
        help="extend a live lease by its ttl",
        handler=_lease_handler(_renew),
        fencing_token=True,
    )
    renew.add_argument("lease_id", metavar="LEASE_ID")

    release = _leaf(
        sub,
        "release",
        help="end a lease as its holder",
        handler=_lease_handler(_release),
        fencing_token=True,
    )
    release.add_argument("lease_id", metavar="LEASE_ID")

    revoke = _leaf(
        sub, "revoke", help="end anyone's lease (admin)", handler=_lease_handler(_revoke)
    )
    revoke.add_argument("lease_id", metavar="LEASE_ID")
    revoke.add_argument("--reason", default="", help="why, for the server's log")

    get = _leaf(
        sub, "get", help="show a lease by id, or a key's latest lease", handler=_lease_handler(_get)
    )
    selector = get.add_mutually_exclusive_group(required=True)
    selector.add_argument("key", nargs="?", metavar="KEY", help="the key's latest lease")
    selector.add_argument("--id", dest="lease_id", metavar="LEASE_ID", help="a lease by id")

    listing = _leaf(
        sub,
        "list",
        help="list leases as a table (a JSON array with --json)",
        handler=_lease_handler(_list),
        taken=("--holder",),
    )
    listing.add_argument("--prefix", default="", help="only keys starting with this")
    listing.add_argument(
        "--holder",
        dest="holder_filter",
        default="",
        metavar="HOLDER",
        help="only leases of this holder",
    )
    listing.add_argument(
        "--state",
        dest="states",
        type=_states,
        action="extend",
        default=[],
        metavar="STATE[,STATE]",
        help=f"only these states (repeatable): {', '.join(fmt.STATES)}",
    )
    listing.add_argument("--limit", type=_positive_int, default=0, help="at most N leases")

    watch = _leaf(
        sub,
        "watch",
        help="stream lease events until Ctrl-C (JSON lines with --json)",
        handler=_lease_handler(_watch),
    )
    watch.add_argument("--prefix", default="", help="only keys starting with this")
    watch.add_argument(
        "--from-revision",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="replay events from revision N on (default: only new events)",
    )

    run = _leaf(
        sub,
        "run",
        help="run a command while holding a lease (stopped if the lease is lost)",
        description=RUN_HELP,
        usage="%(prog)s [options] KEY --ttl DURATION [--wait DURATION] -- COMMAND [ARGS...]",
        handler=_lease_handler(_run, holder=_run_holder),
        json=False,
    )
    _add_acquire_options(run)
    run.add_argument(
        "--grace",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="after a lost lease, SIGKILL the command this long after SIGTERM (default 10s)",
    )
    run.add_argument("argv", nargs="+", metavar="COMMAND", help="the command and its arguments")
