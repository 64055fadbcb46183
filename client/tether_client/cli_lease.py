"""``tether lease ...``: lease calls from a shell, over :class:`TetherClient`.

Text for people (aligned tables, ``name: value`` blocks), JSON with ``--json``; errors as
``tether: REASON: message`` on stderr with exit status 1 (the statuses: ``EXIT_CODES``).
The options, the handler and the shape of a command are shared with the other groups
(:mod:`tether_client.cli_common`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Callable

from google.protobuf import duration_pb2, timestamp_pb2

from tether_client import cli_format as fmt
from tether_client.cli_args import (
    duration,
    label,
    non_negative_int,
    positive_duration,
    positive_int,
)
from tether_client.cli_common import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    Call,
    Handler,
    SubParsers,
    add_connection_options,
    add_json_option,
    add_verbose_option,
    cli_holder,
    command_handler,
    emit,
    leaf,
    page_size,
    take,
)
from tether_client.cli_run import EXIT_LEASE_LOST, Runner, RunSpec, acquiring
from tether_client.client import TetherClient
from tether_client.errors import LeaseHeld, LockDelay, TetherError, WaitTimeout
from tether_client.pb import lease_pb2


def report(error: TetherError) -> None:
    """``tether: REASON: message`` plus the facts a person acts on, to stderr."""
    names: tuple[str, ...] = ()
    if isinstance(error, LeaseHeld | WaitTimeout):
        names = ("holder", "expires_at")
    elif isinstance(error, LockDelay):
        names = ("available_at",)
    fmt.report(error, names)


def _handler(call: Call, *, holder: Callable[[], str]) -> Handler:
    return command_handler(call, report_error=report, holder=holder)


# --- lease commands -----------------------------------------------------------------------


async def _acquire(client: TetherClient, args: argparse.Namespace) -> int:
    holder = args.holder or cli_holder()
    acquired = await acquiring(
        client,
        client.leases.acquire(
            args.key,
            ttl=args.ttl,
            holder=holder,
            wait=args.wait,
            lock_delay=args.lock_delay,
            labels=dict(args.labels),
        ),
        args.key,
        wait=args.wait,
        holder=holder,
    )
    if args.json:
        response = lease_pb2.AcquireResponse(lease=acquired.lease, created=acquired.created)
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        pairs = fmt.lease_fields(acquired.lease)
        created = "yes" if acquired.created else "no (this holder already held it)"
        emit(fmt.fields([*pairs, ("created", created)]))
    return 0


async def _renew(client: TetherClient, args: argparse.Namespace) -> int:
    renewal = await client.leases.renew(args.lease_id, args.fencing_token)
    expires_at = timestamp_pb2.Timestamp()
    expires_at.FromDatetime(renewal.expires_at)
    ttl = duration_pb2.Duration()
    ttl.FromTimedelta(renewal.ttl)
    if args.json:
        response = lease_pb2.RenewResponse(
            lease_id=renewal.lease_id,
            fencing_token=renewal.fencing_token,
            expires_at=expires_at,
            ttl=ttl,
        )
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        pairs = [
            ("lease_id", renewal.lease_id),
            ("fencing_token", str(renewal.fencing_token)),
            ("ttl", fmt.duration(ttl)),
            ("expires_at", fmt.timestamp(expires_at)),
        ]
        emit(fmt.fields(pairs))
    return 0


def _print_lease(lease: lease_pb2.Lease, args: argparse.Namespace) -> None:
    emit(fmt.json_block(fmt.to_json(lease)) if args.json else fmt.lease_details(lease))


async def _release(client: TetherClient, args: argparse.Namespace) -> int:
    holder = args.holder or cli_holder()
    _print_lease(
        await client.leases.release(args.lease_id, args.fencing_token, holder=holder), args
    )
    return 0


async def _revoke(client: TetherClient, args: argparse.Namespace) -> int:
    _print_lease(await client.leases.revoke(args.lease_id, reason=args.reason), args)
    return 0


async def _get(client: TetherClient, args: argparse.Namespace) -> int:
    if args.lease_id is not None:
        lease = await client.leases.get(lease_id=args.lease_id)
    else:
        lease = await client.leases.get(args.key)
    _print_lease(lease, args)
    return 0


async def _list(client: TetherClient, args: argparse.Namespace) -> int:
    leases = await take(
        client.leases.list(
            key_prefix=args.prefix,
            holder=args.holder_filter,
            states=args.states,
            page_size=page_size(args.limit),
        ),
        args.limit,
    )
    if args.json:
        emit(fmt.json_block([fmt.to_json(lease) for lease in leases]))
    else:
        emit(fmt.lease_table(leases))
    return 0


async def _watch(client: TetherClient, args: argparse.Namespace) -> int:
    # Ctrl-C ends a watch with 130, as everywhere; SIGTERM is the way a supervisor stops it
    # and ends it with 0.
    stopped_by: list[int] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        stopped_by.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    async def stream() -> None:
        async for event in client.leases.watch(
            key_prefix=args.prefix, start_revision=args.from_revision
        ):
            emit(fmt.json_line(fmt.to_json(event)) if args.json else fmt.event_line(event))

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
    if stopped_by and stopped_by[0] == signal.SIGINT:
        return EXIT_INTERRUPTED
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
        holder=args.holder or _run_holder(),
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
With --wait, while the key is held it says once who holds it and until when.

exit status:
  the command's own status (128+N if signal N killed it) when the lease was held throughout
  {EXIT_LEASE_LOST}   the lease was lost while the command ran (EX_TEMPFAIL), whatever it did;
       also when the release finds it was revoked or expired, and when a grant
       arrived already lost (nothing was run)
  1    the lease could not be acquired (held, lock-delay, --wait ran out); nothing was run
  2    usage error (a mistyped option is named, with the closest match)
  {EXIT_UNAVAILABLE}   no connection within --timeout (EX_UNAVAILABLE); nothing was run
  126  COMMAND could not be executed;  127  COMMAND not found
"""

WATCH_HELP = """\
Stream lease events (JSON lines with --json) until Ctrl-C, which exits 130; SIGTERM
ends the watch with 0. A broken stream is resumed from the next revision.
"""


def _command(
    sub: SubParsers,
    name: str,
    *,
    help: str,
    call: Call,
    json: bool = True,
    fencing_token: bool = False,
    taken: tuple[str, ...] = (),
    description: str | None = None,
    epilog: str | None = EXIT_CODES,
    usage: str | None = None,
    holder: Callable[[], str] = cli_holder,
) -> argparse.ArgumentParser:
    if fencing_token:
        taken = (*taken, "--token")
    parser = leaf(
        sub,
        name,
        help=help,
        handler=_handler(call, holder=holder),
        json=json,
        taken=taken,
        description=description,
        epilog=epilog,
        usage=usage,
    )
    if fencing_token:
        parser.add_argument(
            "--token",
            dest="fencing_token",
            type=non_negative_int,
            required=True,
            help="the lease's fencing token (from acquire)",
        )
    return parser


def _add_acquire_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="KEY")
    parser.add_argument(
        "--ttl", type=positive_duration, required=True, metavar="DURATION", help="e.g. 30s"
    )
    parser.add_argument(
        "--wait",
        type=duration,
        default=0.0,
        metavar="DURATION",
        help="wait up to this long for the key to free up, saying who holds it "
        "(default: fail at once)",
    )
    parser.add_argument(
        "--lock-delay",
        type=duration,
        default=0.0,
        metavar="DURATION",
        help="keep the key unavailable this long after the lease expires or is revoked",
    )
    parser.add_argument(
        "--label",
        dest="labels",
        type=label,
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
    add_connection_options(lease, leaf=False)
    add_verbose_option(lease, leaf=False)
    add_json_option(lease, leaf=False)
    sub = lease.add_subparsers(dest="lease_command", required=True, metavar="COMMAND")

    acquire = _command(
        sub, "acquire", help="acquire a lease; prints its id and fencing token", call=_acquire
    )
    _add_acquire_options(acquire)

    renew = _command(
        sub, "renew", help="extend a live lease by its ttl", call=_renew, fencing_token=True
    )
    renew.add_argument("lease_id", metavar="LEASE_ID")

    release = _command(
        sub, "release", help="end a lease as its holder", call=_release, fencing_token=True
    )
    release.add_argument("lease_id", metavar="LEASE_ID")

    revoke = _command(sub, "revoke", help="end anyone's lease (admin)", call=_revoke)
    revoke.add_argument("lease_id", metavar="LEASE_ID")
    revoke.add_argument("--reason", default="", help="why, for the server's log")

    get = _command(sub, "get", help="show a lease by id, or a key's latest lease", call=_get)
    selector = get.add_mutually_exclusive_group(required=True)
    selector.add_argument("key", nargs="?", metavar="KEY", help="the key's latest lease")
    selector.add_argument("--id", dest="lease_id", metavar="LEASE_ID", help="a lease by id")

    listing = _command(
        sub,
        "list",
        help="list leases as a table (a JSON array with --json)",
        call=_list,
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
        type=fmt.name_list(fmt.STATES, "state"),
        action="extend",
        default=[],
        metavar="STATE[,STATE]",
        help=f"only these states (repeatable): {', '.join(fmt.STATES)}",
    )
    listing.add_argument("--limit", type=positive_int, default=0, help="at most N leases")

    watch = _command(
        sub,
        "watch",
        help="stream lease events until Ctrl-C (JSON lines with --json)",
        description=WATCH_HELP,
        call=_watch,
    )
    watch.add_argument("--prefix", default="", help="only keys starting with this")
    watch.add_argument(
        "--from-revision",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="replay events from revision N on (default: only new events)",
    )

    run = _command(
        sub,
        "run",
        help="run a command while holding a lease (stopped if the lease is lost)",
        description=RUN_HELP,
        epilog=None,
        usage="%(prog)s [options] KEY --ttl DURATION [--wait DURATION] -- COMMAND [ARGS...]",
        call=_run,
        holder=_run_holder,
        json=False,
    )
    _add_acquire_options(run)
    run.add_argument(
        "--grace",
        type=duration,
        default=10.0,
        metavar="DURATION",
        help="after a lost lease, SIGKILL the command this long after SIGTERM (default 10s)",
    )
    run.add_argument("argv", nargs="+", metavar="COMMAND", help="the command and its arguments")
