"""``tether saga ...``: inspect sagas and act on them as an operator, over :class:`TetherClient`.

Same conventions as ``tether lease``: connection options after ``tether saga`` or after the
command, text for people (tables, ``name: value`` blocks), JSON with ``--json``; errors as
``tether: REASON: message`` on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tether_client import cli_format as fmt
from tether_client.cli_lease import (
    SubParsers,
    _emit,
    _label,
    _operator_command,
    _operator_group,
    _positive_int,
)
from tether_client.client import TetherClient
from tether_client.convert import parse_int
from tether_client.errors import TetherError
from tether_client.pb import common_pb2, saga_pb2
from tether_client.saga import from_struct, from_value

SagaCall = Callable[[TetherClient, argparse.Namespace], Awaitable[int]]
# Facts a person acts on, printed under the error line when the server sent them.
_FACTS = ("saga_id", "state", "holder", "expires_at", "step_index", "next_step_index", "field")


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


def _non_negative_index(text: str) -> int:
    # Step indexes are int32 on the wire.
    try:
        return parse_int(text, maximum=2**31 - 1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"step index: {exc}") from None


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


def _json_text(value: Any) -> str:
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
    pairs.append(("input", _json_text(from_struct(saga.input))))
    if saga.HasField("output"):
        pairs.append(("output", _json_text(from_struct(saga.output))))
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
            step.error or (_json_text(from_value(step.output)) if step.HasField("output") else ""),
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


def _annotation_line(annotation: common_pb2.Annotation) -> str:
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
        lines = (_annotation_line(annotation) for annotation in saga.annotations)
        sections.append("annotations:\n" + "\n".join(lines))
    return "\n\n".join(sections)


def _print_saga(saga: saga_pb2.Saga, args: argparse.Namespace) -> None:
    _emit(fmt.json_block(fmt.to_json(saga)) if args.json else saga_details(saga))


# --- commands -----------------------------------------------------------------------------


async def _list(client: TetherClient, args: argparse.Namespace) -> int:
    async def page(size: int, token: str) -> tuple[Iterable[saga_pb2.Saga], str]:
        response = await client.sagas.list_sagas(
            saga_pb2.ListSagasRequest(
                states=args.states,
                kind=args.kind,
                labels=dict(args.labels),
                stale_only=args.stale,
                overdue_only=args.overdue,
                page_size=size,
                page_token=token,
            )
        )
        return response.sagas, response.next_page_token

    sagas = await fmt.collect(page, args.limit)
    if args.json:
        _emit(fmt.json_block([fmt.to_json(saga) for saga in sagas]))
    else:
        _emit(saga_table(sagas))
    return 0


async def _get(client: TetherClient, args: argparse.Namespace) -> int:
    response = await client.sagas.get_saga(saga_pb2.GetSagaRequest(saga_id=args.saga_id))
    _print_saga(response.saga, args)
    return 0


async def _annotate(client: TetherClient, args: argparse.Namespace) -> int:
    response = await client.sagas.annotate_saga(
        saga_pb2.AnnotateSagaRequest(
            saga_id=args.saga_id, text=args.text, attributes=dict(args.attributes)
        )
    )
    if args.json:
        _emit(fmt.json_block(fmt.to_json(response)))
    else:
        _emit(_annotation_line(response.annotation))
    return 0


async def _cancel(client: TetherClient, args: argparse.Namespace) -> int:
    request = saga_pb2.CancelSagaRequest(saga_id=args.saga_id, reason=args.reason)
    _print_saga((await client.sagas.cancel_saga(request)).saga, args)
    return 0


async def _quarantine(client: TetherClient, args: argparse.Namespace) -> int:
    request = saga_pb2.QuarantineSagaRequest(saga_id=args.saga_id, reason=args.reason)
    _print_saga((await client.sagas.quarantine_saga(request)).saga, args)
    return 0


async def _redrive(client: TetherClient, args: argparse.Namespace) -> int:
    request = saga_pb2.RedriveSagaRequest(
        saga_id=args.saga_id, mode=MODES[args.mode], reason=args.reason
    )
    _print_saga((await client.sagas.redrive_saga(request)).saga, args)
    return 0


async def _mark_compensated(client: TetherClient, args: argparse.Namespace) -> int:
    request = saga_pb2.MarkStepCompensatedRequest(
        saga_id=args.saga_id, step_index=args.step_index, reason=args.reason
    )
    _print_saga((await client.sagas.mark_step_compensated(request)).saga, args)
    return 0


def report(error: TetherError) -> None:
    """``tether: REASON: message`` plus the facts the server sent, to stderr."""
    fmt.report(error, _FACTS)


# --- the parser ---------------------------------------------------------------------------

SAGA_HELP = """\
Inspect sagas on a tether server and act on them as an operator: annotate, cancel,
quarantine, redrive, or mark a step's compensation done by hand.

Connection options go after `tether saga` or after the command.
"""


def _add_reason(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--reason", default="", required=required, help="why, recorded on the saga")


def _command(sub: SubParsers, name: str, help: str, call: SagaCall) -> argparse.ArgumentParser:
    return _operator_command(sub, name, help, call, report_error=report)


def register_saga(commands: SubParsers) -> None:
    sub = _operator_group(
        commands,
        "saga",
        help="inspect sagas; annotate, cancel, quarantine or redrive them",
        description=SAGA_HELP,
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
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only sagas with this label (repeatable)",
    )
    listing.add_argument("--stale", action="store_true", help="only sagas whose claim went stale")
    listing.add_argument("--overdue", action="store_true", help="only sagas past their deadline")
    listing.add_argument("--limit", type=_positive_int, default=0, help="at most N sagas")

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
        type=_label,
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
    mark.add_argument("step_index", type=_non_negative_index, metavar="STEP_INDEX")
    _add_reason(mark, required=True)
