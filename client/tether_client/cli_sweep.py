"""``tether sweep ...``: run a sweep now and read the reports sweeps leave.

Same conventions as ``tether saga`` and ``tether object``: connection options after
``tether sweep`` or after the command, text for people (a ``name: value`` block and tables,
a table of reports), JSON with ``--json``; errors as ``tether: REASON: message`` on stderr
with exit status 1. A sweep's scope is its own ``--namespace`` on ``run`` (default: every
namespace); ``TETHER_NAMESPACE`` does not narrow it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from tether_client import cli_format as fmt
from tether_client.cli_args import positive_int
from tether_client.cli_common import Call, SubParsers, command, emit, group, page_size, take
from tether_client.client import TetherClient
from tether_client.errors import TetherError
from tether_client.pb import sweep_pb2

# Facts a person acts on, printed under the error line when the server sent them.
_FACTS = ("sweep_id", "namespace", "field")


# --- names --------------------------------------------------------------------------------


def _kebab(name: str, prefix: str) -> str:
    """``SWEEP_TRIGGER_ON_DEMAND`` → ``on-demand``."""
    return name.removeprefix(prefix).lower().replace("_", "-")


def trigger(value: sweep_pb2.SweepTrigger.ValueType) -> str:
    return _kebab(sweep_pb2.SweepTrigger.Name(value), "SWEEP_TRIGGER_")


def part(value: sweep_pb2.SweepPart.ValueType) -> str:
    return _kebab(sweep_pb2.SweepPart.Name(value), "SWEEP_PART_")


TRIGGERS: dict[str, sweep_pb2.SweepTrigger.ValueType] = {
    trigger(value): value
    for value in sweep_pb2.SweepTrigger.values()
    if value != sweep_pb2.SWEEP_TRIGGER_UNSPECIFIED
}
PARTS: dict[str, sweep_pb2.SweepPart.ValueType] = {
    part(value): value
    for value in sweep_pb2.SweepPart.values()
    if value != sweep_pb2.SWEEP_PART_UNSPECIFIED
}
# (report field, its short name in the one-line listing), in the order of the proto.
COUNTS = (
    ("leases_expired", "expired"),
    ("sagas_requeued", "requeued"),
    ("sagas_compensating", "compensating"),
    ("sagas_failed", "failed"),
    ("sagas_quarantined", "quarantined"),
    ("objects_collected", "collected"),
    ("objects_orphaned", "orphaned"),
)
# rows_purged kinds in the order sweep.proto lists them; any other kind follows, by name.
PURGED_KINDS = ("leases", "lease_requests", "lease_keys", "sagas", "events", "sweep_reports")


# --- text ---------------------------------------------------------------------------------


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _blocked(report: sweep_pb2.SweepReport) -> int:
    """How many objects the sweep found blocked (``blocked`` lists the oldest of them)."""
    return max(report.blocked_total, len(report.blocked))


def _purged(report: sweep_pb2.SweepReport) -> list[tuple[str, int]]:
    """The kinds with rows purged (or, in a dry run, to purge), in a stable order."""
    order = {kind: index for index, kind in enumerate(PURGED_KINDS)}
    kinds = sorted(report.rows_purged, key=lambda kind: (order.get(kind, len(order)), kind))
    return [(kind, report.rows_purged[kind]) for kind in kinds if report.rows_purged[kind]]


def short_counts(report: sweep_pb2.SweepReport) -> str:
    """``expired=3 collected=12 purged=40``: the non-zero counts; ``-`` when all are zero."""
    counts = [(short, getattr(report, name)) for name, short in COUNTS]
    counts += [
        ("blocked", _blocked(report)),
        ("purged", sum(count for _, count in _purged(report))),
        ("backlog", report.backlog),
        ("failures", len(report.failures)),
    ]
    return " ".join(f"{name}={count}" for name, count in counts if count) or "-"


def report_table(reports: Iterable[sweep_pb2.SweepReport]) -> str:
    header = ("SWEEP ID", "STARTED", "TRIGGER", "DRY RUN", "REPLICA", "DURATION", "COUNTS")
    rows = (
        (
            report.sweep_id,
            fmt.timestamp(report.started_at),
            trigger(report.trigger),
            _yes(report.dry_run),
            report.replica or "-",
            fmt.duration(report.duration),
            short_counts(report),
        )
        for report in reports
    )
    return fmt.table(header, rows)


def report_fields(report: sweep_pb2.SweepReport) -> list[tuple[str, str]]:
    dry_run = "yes (nothing was changed: the counts are what a sweep would do)"
    pairs = [
        ("sweep_id", report.sweep_id),
        ("trigger", trigger(report.trigger)),
        ("dry_run", dry_run if report.dry_run else "no"),
        ("namespace", report.namespace or "(every namespace)"),
        ("replica", report.replica or "-"),
        ("started_at", fmt.timestamp(report.started_at)),
        ("duration", fmt.duration(report.duration)),
        ("parts", ",".join(part(value) for value in report.parts) or "-"),
    ]
    pairs.extend((name, str(getattr(report, name))) for name, _ in COUNTS if getattr(report, name))
    if _blocked(report):
        pairs.append(("blocked_objects", str(_blocked(report))))
    if report.gc_queue_depth:
        pairs.append(("gc_queue_depth", str(report.gc_queue_depth)))
    pairs.append(("backlog", str(report.backlog)))
    return pairs


def _blocked_table(report: sweep_pb2.SweepReport) -> str:
    # The reason last: it is free text, with blanks.
    header = ("NAMESPACE", "KIND", "NAME", "UID", "AGE", "FINALIZERS", "REASON")
    rows = (
        (
            obj.namespace,
            obj.kind,
            obj.name,
            obj.uid,
            fmt.duration(obj.age),
            ",".join(obj.finalizers) or "-",
            obj.reason or "-",
        )
        for obj in report.blocked
    )
    text = fmt.table(header, rows)
    more = _blocked(report) - len(report.blocked)
    return f"{text}\n(and {more} more)" if more else text


def _collector_table(failures: Iterable[sweep_pb2.CollectorFailure]) -> str:
    header = ("NAMESPACE", "OWNER UID", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR")
    rows = (
        (
            failure.namespace,
            failure.owner_uid,
            str(failure.attempts),
            fmt.timestamp(failure.next_attempt_at),
            failure.last_error,
        )
        for failure in failures
    )
    return fmt.table(header, rows)


def report_details(report: sweep_pb2.SweepReport) -> str:
    """The report's fields and non-zero counts, then what it purged, the objects it found
    blocked, the owners the collector keeps failing on, and the parts that failed."""
    sections = [fmt.fields(report_fields(report))]
    purged = _purged(report)
    if purged:
        title = "rows to purge" if report.dry_run else "rows purged"
        rows = ((kind, str(count)) for kind, count in purged)
        sections.append(f"{title}:\n" + fmt.table(("KIND", "ROWS"), rows))
    if report.blocked:
        sections.append("blocked objects:\n" + _blocked_table(report))
    if report.collector_failures:
        sections.append("collector failures:\n" + _collector_table(report.collector_failures))
    if report.failures:
        sections.append("failures:\n" + "\n".join(report.failures))
    return "\n\n".join(sections)


def _print_report(report: sweep_pb2.SweepReport, args: argparse.Namespace) -> None:
    emit(fmt.json_block(fmt.to_json(report)) if args.json else report_details(report))


# --- commands -----------------------------------------------------------------------------


async def _run(client: TetherClient, args: argparse.Namespace) -> int:
    report = await client.sweeps.run(
        namespace=args.namespace, dry_run=args.dry_run, parts=list(dict.fromkeys(args.parts))
    )
    _print_report(report, args)
    return 0


async def _reports(client: TetherClient, args: argparse.Namespace) -> int:
    reports = await take(
        client.sweeps.reports(triggers=args.triggers, page_size=page_size(args.limit)),
        args.limit,
    )
    if args.json:
        emit(fmt.json_block([fmt.to_json(report) for report in reports]))
    else:
        emit(report_table(reports))
    return 0


async def _show(client: TetherClient, args: argparse.Namespace) -> int:
    _print_report(await client.sweeps.get(args.sweep_id), args)
    return 0


def report(error: TetherError) -> None:
    """``tether: REASON: message`` plus the facts the server sent, to stderr."""
    fmt.report(error, _FACTS)


# --- the parser ---------------------------------------------------------------------------

SWEEP_HELP = """\
Run a sweep on a tether server now, or read the reports of past sweeps (at start,
periodic, on demand): what crashes, expiries and deletions left behind, and what was
reclaimed or purged. `run --dry-run` reports what a sweep would do and changes nothing.

Connection options go after `tether sweep` or after the command; --namespace is run's own.
"""


def _command(sub: SubParsers, name: str, help: str, call: Call) -> argparse.ArgumentParser:
    # A sweep's namespace is a scope, not the connection's default: `run` has its own.
    return command(sub, name, help, call, report_error=report, taken=("--namespace",))


def register_sweep(commands: SubParsers) -> None:
    sub = group(
        commands,
        "sweep",
        help="run a sweep now (admin); list and show sweep reports",
        description=SWEEP_HELP,
        taken=("--namespace",),
        defaults={"namespace": ""},
    )

    run = _command(sub, "run", "run a sweep now (admin) and print its report", _run)
    run.add_argument(
        "--dry-run", action="store_true", help="report what the sweep would do; change nothing"
    )
    run.add_argument(
        "--namespace",
        default="",
        metavar="NS",
        help="sweep only this namespace (default: every namespace); events and reports "
        "are global, so a namespaced sweep does not purge them",
    )
    run.add_argument(
        "--part",
        dest="parts",
        type=fmt.name_list(PARTS, "part"),
        action="extend",
        default=[],
        metavar="PART[,PART]",
        help=f"run only these parts (repeatable; default: all): {', '.join(PARTS)}",
    )

    reports = _command(
        sub, "reports", "list sweep reports, one line each (a JSON array with --json)", _reports
    )
    reports.add_argument(
        "--trigger",
        dest="triggers",
        type=fmt.name_list(TRIGGERS, "trigger"),
        action="extend",
        default=[],
        metavar="TRIGGER[,TRIGGER]",
        help=f"only sweeps run so (repeatable): {', '.join(TRIGGERS)}",
    )
    reports.add_argument("--limit", type=positive_int, default=0, help="at most N reports")

    show = _command(sub, "show", "show one sweep report in full", _show)
    show.add_argument("sweep_id", metavar="SWEEP_ID")
