"""``tether saga ...``: inspect sagas and act on them as an operator; run one from a shell
script (the commands of :mod:`tether_client.cli_saga_flow`).

Same conventions as ``tether lease``: connection options after ``tether saga`` or after the
command, text for people (tables, ``name: value`` blocks), JSON with ``--json``; errors as
``tether: REASON: message`` on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from tether_client import cli_format as fmt
from tether_client.cli_args import attribute, int32, label, positive_int
from tether_client.cli_common import (
    OPERATOR_EXIT_CODES,
    Call,
    SubParsers,
    command,
    emit,
    group,
    page_size,
    take,
)
from tether_client.client import TetherClient
from tether_client.errors import TetherError
from tether_client.pb import common_pb2, saga_pb2
from tether_client.values import from_struct, from_value

# Facts a person acts on, printed under the error line when the server sent them.
FACTS = (
    "saga_id",
    "state",
    "holder",
    "expires_at",
    "step_index",
    "step",
    "next_step_index",
    "lease_id",
    "presented_token",
    "current_token",
    "not_before",
    "field",
)


# --- names --------------------------------------------------------------------------------


def _short(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def state(value: saga_pb2.SagaState.ValueType) -> str:
    """``SAGA_STATE_RUNNING`` → ``running``."""
    return _short(saga_pb2.SagaState.Name(value), "SAGA_STATE_")


STATES: dict[str, saga_pb2.SagaState.ValueType] = {
    state(value): value
    for value in saga_pb2.SagaState.values()
    if value != saga_pb2.SAGA_STATE_UNSPECIFIED
}
MODES: dict[str, saga_pb2.RedriveMode.ValueType] = {
    "retry-compensations": saga_pb2.REDRIVE_MODE_RETRY_COMPENSATIONS,
    "resume": saga_pb2.REDRIVE_MODE_RESUME,
}


# ``running`` or ``running,compensating``.
_states = fmt.name_list(STATES, "state")
# Step indexes are int32 on the wire.
step_index = int32("step index")


# --- text ---------------------------------------------------------------------------------


def _flags(saga: saga_pb2.Saga) -> str:
    flags = [name for name, on in (("stale", saga.stale), ("overdue", saga.overdue)) if on]
    return ",".join(flags) or "-"


def saga_table(sagas: Iterable[saga_pb2.Saga]) -> str:
    header = ("SAGA ID", "KIND", "STATE", "ATTEMPT", "FLAGS", "HOLDER", "UPDATED")
    rows = (
        (
            saga.saga_id,
            saga.kind,
            state(saga.state),
            str(saga.attempt),
            _flags(saga),
            saga.holder or "-",
            fmt.timestamp(saga.updated_at),
        )
        for saga in sagas
    )
    return fmt.table(header, rows)


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def saga_fields(saga: saga_pb2.Saga) -> list[tuple[str, str]]:
    pairs = [
        ("saga_id", saga.saga_id),
        ("kind", saga.kind),
        ("namespace", saga.namespace),
        ("state", state(saga.state)),
        ("attempt", f"{saga.attempt} of {saga.max_attempts}"),
    ]
    if saga.stale or saga.overdue:
        pairs.append(("flags", _flags(saga)))
    if saga.holder:
        pairs.append(("holder", saga.holder))
    if saga.HasField("claim") and saga.claim.lease_id:
        pairs.append(("claim", f"lease {saga.claim.lease_id} token {saga.claim.fencing_token}"))
    on_stale = saga_pb2.OnStalePolicy.Name(saga.on_stale)
    pairs.append(("on_stale", _short(on_stale, "ON_STALE_POLICY_")))
    if saga.labels:
        pairs.append(("labels", ",".join(f"{k}={v}" for k, v in sorted(saga.labels.items()))))
    if saga.failure_reason:
        pairs.append(("failure_reason", saga.failure_reason))
    pairs.append(("input", json_text(from_struct(saga.input))))
    if saga.HasField("output"):
        pairs.append(("output", json_text(from_struct(saga.output))))
    if saga.progress:
        pairs.append(("progress", f"{len(saga.progress)} bytes"))
    for name in ("created_at", "updated_at", "not_before", "deadline", "ended_at"):
        if saga.HasField(name):
            pairs.append((name, fmt.timestamp(getattr(saga, name))))
    return pairs


def _step_table(steps: Iterable[saga_pb2.SagaStep]) -> str:
    header = ("STEP", "NAME", "STATUS", "ATTEMPT", "COMPENSATION", "OUTPUT / ERROR")
    rows = (
        (
            str(step.index),
            step.name,
            _short(saga_pb2.StepStatus.Name(step.status), "STEP_STATUS_"),
            str(step.attempt),
            step.compensation.name or "-",
            step.error or (json_text(from_value(step.output)) if step.HasField("output") else ""),
        )
        for step in steps
    )
    return fmt.table(header, rows)


def _compensation_table(records: Iterable[saga_pb2.CompensationRecord]) -> str:
    header = ("STEP", "NAME", "STATUS", "ATTEMPTS", "ERROR / MARKED BY")
    rows = (
        (
            str(record.step_index),
            record.name,
            _short(saga_pb2.CompensationStatus.Name(record.status), "COMPENSATION_STATUS_"),
            f"{record.attempts}/{record.max_attempts}",
            record.error or record.marked_by,
        )
        for record in records
    )
    return fmt.table(header, rows)


def annotation_line(annotation: common_pb2.Annotation) -> str:
    attributes = " ".join(f"{k}={v}" for k, v in sorted(annotation.attributes.items()))
    line = f"{fmt.timestamp(annotation.created_at)}  {annotation.author}  {annotation.text}"
    return f"{line}  {attributes}" if attributes else line


def saga_details(saga: saga_pb2.Saga) -> str:
    """The saga's fields, then its step log, compensations and annotations when it has any."""
    sections = [fmt.fields(saga_fields(saga))]
    if saga.steps:
        sections.append("steps:\n" + _step_table(saga.steps))
    if saga.compensations:
        sections.append("compensations:\n" + _compensation_table(saga.compensations))
    if saga.annotations:
        lines = (annotation_line(annotation) for annotation in saga.annotations)
        sections.append("annotations:\n" + "\n".join(lines))
    return "\n\n".join(sections)


def print_saga(saga: saga_pb2.Saga, args: argparse.Namespace) -> None:
    emit(fmt.json_block(fmt.to_json(saga)) if args.json else saga_details(saga))


# --- commands -----------------------------------------------------------------------------


async def _list(client: TetherClient, args: argparse.Namespace) -> int:
    sagas = await take(
        client.sagas.list(
            kind=args.kind,
            states=args.states,
            labels=dict(args.labels),
            stale_only=args.stale,
            overdue_only=args.overdue,
            page_size=page_size(args.limit),
        ),
        args.limit,
    )
    if args.json:
        emit(fmt.json_block([fmt.to_json(saga) for saga in sagas]))
    else:
        emit(saga_table(sagas))
    return 0


async def _get(client: TetherClient, args: argparse.Namespace) -> int:
    print_saga(await client.sagas.get(args.saga_id), args)
    return 0


async def _annotate(client: TetherClient, args: argparse.Namespace) -> int:
    annotation = await client.sagas.annotate(
        args.saga_id, args.text, attributes=dict(args.attributes)
    )
    emit(fmt.json_block(fmt.to_json(annotation)) if args.json else annotation_line(annotation))
    return 0


async def _cancel(client: TetherClient, args: argparse.Namespace) -> int:
    print_saga(await client.sagas.cancel(args.saga_id, reason=args.reason), args)
    return 0


async def _quarantine(client: TetherClient, args: argparse.Namespace) -> int:
    print_saga(await client.sagas.quarantine(args.saga_id, reason=args.reason), args)
    return 0


async def _redrive(client: TetherClient, args: argparse.Namespace) -> int:
    saga = await client.sagas.redrive(args.saga_id, mode=MODES[args.mode], reason=args.reason)
    print_saga(saga, args)
    return 0


async def _mark_compensated(client: TetherClient, args: argparse.Namespace) -> int:
    saga = await client.sagas.mark_step_compensated(
        args.saga_id, args.step_index, reason=args.reason
    )
    print_saga(saga, args)
    return 0


def report(error: TetherError) -> None:
    """``tether: REASON: message`` plus the facts the server sent, to stderr."""
    fmt.report(error, FACTS)


# --- the parser ---------------------------------------------------------------------------

SAGA_HELP = """\
Inspect sagas on a tether server and act on them as an operator: annotate, cancel,
quarantine, redrive, or mark a step's compensation done by hand.

Or run a saga from a shell script: create it, claim it (the claim's fence comes out as
`export` lines, as `lease run` gives its command TETHER_LEASE_ID and TETHER_FENCING_TOKEN),
then record its steps and complete or fail it; those commands read the fence from the
environment. A step that succeeded in an earlier attempt is not run again: `step` prints
its recorded output instead.

  tether saga create deploy-42 --kind deploy --input '{"app": "web"}'
  claim=$(tether saga claim deploy-42 --ttl 10m) || exit; eval "$claim"
  image=$(tether saga step 0 build -- ./build.sh web)   # run as step 0, skipped if done
  tether saga step 1 push --compensation unpush --payload "\\"$image\\"" -- ./push.sh "$image" ||
    { tether saga fail --reason "push failed" --hand-off; exit 1; }
  tether saga complete --output "{\\"image\\": \\"$image\\"}"

Connection options go after `tether saga` or after the command.
"""

SAGA_EXIT_CODES = (
    OPERATOR_EXIT_CODES.removesuffix("  130  interrupted (Ctrl-C)\n")
    + """\
  75   step -- COMMAND: the claim was lost while the command ran (EX_TEMPFAIL)
  130  interrupted (Ctrl-C)
  step -- COMMAND otherwise exits with the command's own status (128+N if signal N killed it;
  126 when it could not be executed, 127 when it was not found)
"""
)


def _add_reason(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--reason", default="", required=required, help="why, recorded on the saga")


def _command(sub: SubParsers, name: str, help: str, call: Call) -> argparse.ArgumentParser:
    return command(sub, name, help, call, report_error=report, epilog=SAGA_EXIT_CODES)


def register_saga(commands: SubParsers) -> None:
    from tether_client.cli_saga_flow import register_flow

    sub = group(
        commands,
        "saga",
        help="inspect sagas and act on them; run one from a shell script",
        description=SAGA_HELP,
        epilog=SAGA_EXIT_CODES,
    )

    listing = _command(sub, "list", "list sagas as a table (a JSON array with --json)", _list)
    listing.add_argument("--kind", default="", help="only sagas of this kind")
    listing.add_argument(
        "--state",
        dest="states",
        type=_states,
        action="extend",
        default=[],
        metavar="STATE[,STATE]",
        help=f"only these states (repeatable): {', '.join(STATES)}",
    )
    listing.add_argument(
        "--label",
        dest="labels",
        type=label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only sagas with this label (repeatable)",
    )
    listing.add_argument("--stale", action="store_true", help="only sagas whose claim went stale")
    listing.add_argument("--overdue", action="store_true", help="only sagas past their deadline")
    listing.add_argument("--limit", type=positive_int, default=0, help="at most N sagas")

    get = _command(sub, "get", "show a saga with its steps, compensations and annotations", _get)
    get.add_argument("saga_id", metavar="SAGA_ID")

    annotate = _command(
        sub, "annotate", "add an audit entry to a saga (terminal ones too)", _annotate
    )
    annotate.add_argument("saga_id", metavar="SAGA_ID")
    annotate.add_argument("text", metavar="TEXT")
    annotate.add_argument(
        "--attr",
        dest="attributes",
        type=attribute,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attribute of the entry (repeatable)",
    )

    cancel = _command(
        sub, "cancel", "cancel a saga (one that has run compensates instead)", _cancel
    )
    cancel.add_argument("saga_id", metavar="SAGA_ID")
    _add_reason(cancel)

    quarantine = _command(
        sub, "quarantine", "stop a saga for an operator: QUARANTINED", _quarantine
    )
    quarantine.add_argument("saga_id", metavar="SAGA_ID")
    _add_reason(quarantine)

    redrive = _command(
        sub, "redrive", "retry a QUARANTINED saga's compensations, or resume it forward", _redrive
    )
    redrive.add_argument("saga_id", metavar="SAGA_ID")
    redrive.add_argument(
        "--mode",
        choices=list(MODES),
        default="retry-compensations",
        help="retry-compensations (default): fresh attempts for every compensation not "
        "done; resume: back to PLANNED (refused once a compensation has run)",
    )
    _add_reason(redrive)

    mark = _command(
        sub,
        "mark-compensated",
        "record that a step's compensation was done by hand",
        _mark_compensated,
    )
    mark.add_argument("saga_id", metavar="SAGA_ID")
    mark.add_argument("step_index", type=step_index, metavar="STEP_INDEX")
    _add_reason(mark, required=True)

    register_flow(sub, report_error=report, epilog=SAGA_EXIT_CODES)
