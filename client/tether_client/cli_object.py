"""``tether object ...``: inspect objects, their owners and finalizers; delete them.

Same conventions as ``tether lease`` and ``tether saga``: connection options after
``tether object`` or after the command, text for people (tables, ``name: value`` blocks, an
indented owner tree), JSON with ``--json``; errors as ``tether: REASON: message`` on stderr
with exit status 1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator

from tether_client import cli_format as fmt
from tether_client.cli_args import non_negative_int, positive_int
from tether_client.cli_common import Call, SubParsers, command, emit, group, page_size, take
from tether_client.cli_saga import annotation_line, json_text
from tether_client.client import TetherClient
from tether_client.errors import TetherError
from tether_client.pb import owner_ref_pb2
from tether_client.results import OwnerGraph
from tether_client.values import from_struct

# Facts a person acts on, printed under the error line when the server sent them.
_FACTS = (
    "uid",
    "expected_uid",
    "terminating",
    "deletion_timestamp",
    "owner_kind",
    "owner_uid",
    "field",
)
PROPAGATION: dict[str, owner_ref_pb2.PropagationPolicy.ValueType] = {
    "background": owner_ref_pb2.PROPAGATION_POLICY_BACKGROUND,
    "foreground": owner_ref_pb2.PROPAGATION_POLICY_FOREGROUND,
    "orphan": owner_ref_pb2.PROPAGATION_POLICY_ORPHAN,
}


# --- text ---------------------------------------------------------------------------------


def _terminating(obj: owner_ref_pb2.Object) -> bool:
    return obj.HasField("deletion_timestamp")


def _age(obj: owner_ref_pb2.Object, now: float | None = None) -> str:
    """``40s``, ``12m``, ``5h``, ``3d`` since creation (by this machine's clock)."""
    if not obj.HasField("created_at"):
        return "-"
    elapsed = max(0, int((time.time() if now is None else now) - obj.created_at.seconds))
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if elapsed >= size:
            return f"{elapsed // size}{unit}"
    return f"{elapsed}s"


def _ref(kind: str, name: str) -> str:
    return f"{kind}/{name}" if name else kind


def _pairs(mapping: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(mapping))


def object_table(objects: Iterable[owner_ref_pb2.Object]) -> str:
    header = ("KIND", "NAME", "UID", "AGE", "STATE", "FINALIZERS")
    rows = (
        (
            obj.kind,
            obj.name,
            obj.uid,
            _age(obj),
            "terminating" if _terminating(obj) else "active",
            ",".join(obj.finalizers) or "-",
        )
        for obj in objects
    )
    return fmt.table(header, rows)


def object_fields(obj: owner_ref_pb2.Object) -> list[tuple[str, str]]:
    pairs = [
        ("kind", obj.kind),
        ("name", obj.name),
        ("namespace", obj.namespace),
        ("uid", obj.uid),
        ("state", "terminating" if _terminating(obj) else "active"),
        ("resource_version", str(obj.resource_version)),
        ("created_at", fmt.timestamp(obj.created_at)),
    ]
    if _terminating(obj):
        pairs.append(("deletion_timestamp", fmt.timestamp(obj.deletion_timestamp)))
    if obj.finalizers:
        pairs.append(("finalizers", ",".join(obj.finalizers)))
    if obj.labels:
        pairs.append(("labels", _pairs(obj.labels.items())))
    if obj.annotations:
        pairs.append(("annotations", _pairs(obj.annotations.items())))
    if obj.spec.fields:
        pairs.append(("spec", json_text(from_struct(obj.spec))))
    if obj.status.fields:
        pairs.append(("status", json_text(from_struct(obj.status))))
    return pairs


def _termination_fields(termination: owner_ref_pb2.TerminationStatus) -> list[tuple[str, str]]:
    pairs = [("pending_finalizers", ",".join(termination.pending_finalizers) or "-")]
    blocking = str(termination.blocking_dependents)
    if termination.blocking_examples:
        examples = ", ".join(_ref(ref.kind, ref.name) for ref in termination.blocking_examples)
        more = termination.blocking_dependents - len(termination.blocking_examples)
        blocking += f" ({examples}{', …' if more > 0 else ''})"
    pairs.append(("blocking_dependents", blocking))
    return pairs


def _owner_table(obj: owner_ref_pb2.Object) -> str:
    header = ("KIND", "NAME", "UID", "CONTROLLER", "BLOCKS")
    rows = (
        (
            ref.kind,
            ref.name or "-",
            ref.uid,
            "yes" if ref.controller else "no",
            "yes" if ref.block_owner_deletion else "no",
        )
        for ref in obj.owner_references
    )
    return fmt.table(header, rows)


def _refusal_table(termination: owner_ref_pb2.TerminationStatus) -> str:
    # The reason last: it is free text, with blanks.
    header = ("FINALIZER", "RECORDED", "BY", "REASON")
    rows = (
        (
            refusal.finalizer,
            fmt.timestamp(refusal.recorded_at),
            refusal.recorded_by or "-",
            refusal.reason,
        )
        for refusal in termination.refusals
    )
    return fmt.table(header, rows)


def object_details(obj: owner_ref_pb2.Object) -> str:
    """The object's fields, then its owners, why it is still terminating, and its history."""
    sections = [fmt.fields(object_fields(obj))]
    if obj.owner_references:
        sections.append("owners:\n" + _owner_table(obj))
    if obj.HasField("termination"):
        sections.append("termination:\n" + fmt.fields(_termination_fields(obj.termination)))
        if obj.termination.refusals:
            sections.append("refusals:\n" + _refusal_table(obj.termination))
    if obj.history:
        sections.append("history:\n" + "\n".join(annotation_line(a) for a in obj.history))
    return "\n\n".join(sections)


def _node_line(node: owner_ref_pb2.OwnerGraphNode, indent: int, *, this: bool) -> str:
    marks = []
    if node.HasField("deletion_timestamp"):
        marks.append("terminating")
    if node.finalizers:
        marks.append("finalizers=" + ",".join(node.finalizers))
    line = f"{'* ' if this else '  '}{'  ' * indent}{_ref(node.ref.kind, node.ref.name)}"
    return "  ".join([line, node.ref.uid, *marks])


def owner_tree(graph: OwnerGraph | owner_ref_pb2.GetOwnerGraphResponse) -> str:
    """The graph as an indented tree: owners above the object (less indented, each owner's
    own owners above it), dependents below it (more indented). The object is marked ``*``;
    a node reached a second time is shown once more as ``(see above)``."""
    nodes = {node.ref.uid: node for node in graph.nodes}
    owners: dict[str, list[str]] = {}
    dependents: dict[str, list[str]] = {}
    for edge in graph.edges:
        owners.setdefault(edge.dependent_uid, []).append(edge.owner_uid)
        dependents.setdefault(edge.owner_uid, []).append(edge.dependent_uid)
    roots = [node for node in graph.nodes if node.depth == 0]
    if not roots:
        return "(no nodes)"
    root = roots[0].ref.uid
    shown: set[str] = set()

    def up(uid: str, level: int) -> Iterator[tuple[str, int]]:
        # Post-order: an owner's own owners come out before it.
        for owner in owners.get(uid, []):
            if owner in nodes and owner not in shown:
                shown.add(owner)
                yield from up(owner, level + 1)
                yield owner, level + 1

    def down(uid: str, level: int) -> Iterator[tuple[str, int, bool]]:
        for dependent in dependents.get(uid, []):
            if dependent not in nodes:
                continue
            seen = dependent in shown
            shown.add(dependent)
            yield dependent, level + 1, seen
            if not seen:
                yield from down(dependent, level + 1)

    shown.add(root)
    above = list(up(root, 0))
    top = max((level for _, level in above), default=0)
    lines = [_node_line(nodes[uid], top - level, this=False) for uid, level in above]
    lines.append(_node_line(nodes[root], top, this=True))
    for uid, level, seen in down(root, 0):
        node = nodes[uid]
        if seen:
            ref = _ref(node.ref.kind, node.ref.name)
            lines.append(f"  {'  ' * (top + level)}{ref}  {uid}  (see above)")
        else:
            lines.append(_node_line(node, top + level, this=False))
    # Nodes no edge led to from the object (should not happen): still shown, by depth.
    rest = sorted((n for n in graph.nodes if n.ref.uid not in shown), key=lambda n: n.depth)
    lines.extend(_node_line(node, max(0, top + node.depth), this=False) for node in rest)
    if graph.truncated:
        lines.append("(truncated)")
    return "\n".join(lines)


def _print_object(obj: owner_ref_pb2.Object, args: argparse.Namespace) -> None:
    emit(fmt.json_block(fmt.to_json(obj)) if args.json else object_details(obj))


# --- commands -----------------------------------------------------------------------------


async def _get(client: TetherClient, args: argparse.Namespace) -> int:
    if args.uid is not None:
        obj = await client.objects.get(args.kind, "", uid=args.uid)
    else:
        obj = await client.objects.get(args.kind, args.name)
    _print_object(obj, args)
    return 0


async def _list(client: TetherClient, args: argparse.Namespace) -> int:
    objects = await take(
        client.objects.list(
            kind=args.kind,
            owner_uid=args.owner,
            label_selector=args.selector,
            terminating_only=args.terminating,
            page_size=page_size(args.limit),
        ),
        args.limit,
    )
    if args.json:
        emit(fmt.json_block([fmt.to_json(obj) for obj in objects]))
    else:
        emit(object_table(objects))
    return 0


async def _delete(client: TetherClient, args: argparse.Namespace) -> int:
    written = await client.objects.delete(
        args.kind,
        args.name,
        propagation=args.propagation,
        uid=args.uid or None,
        resource_version=args.resource_version or None,
    )
    if args.json:
        response = owner_ref_pb2.DeleteObjectResponse(deleted=written.deleted)
        if not written.deleted:
            response.object.CopyFrom(written.object)
        emit(fmt.json_block(fmt.to_json(response)))
    elif written.deleted:
        emit(f"deleted {_ref(args.kind, args.name)}")
    else:
        emit(object_details(written.object))
    return 0


async def _tree(client: TetherClient, args: argparse.Namespace) -> int:
    if args.uid is not None:
        graph = await client.objects.owner_graph(
            args.kind, "", uid=args.uid, max_objects=args.max_objects
        )
    else:
        graph = await client.objects.owner_graph(args.kind, args.name, max_objects=args.max_objects)
    if args.json:
        response = owner_ref_pb2.GetOwnerGraphResponse(
            nodes=graph.nodes, edges=graph.edges, truncated=graph.truncated
        )
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        emit(owner_tree(graph))
    return 0


async def _force_remove_finalizers(client: TetherClient, args: argparse.Namespace) -> int:
    forced = await client.objects.force_remove_finalizers(
        args.kind, args.name, finalizers=args.finalizers, reason=args.reason, uid=args.uid
    )
    if args.json:
        response = owner_ref_pb2.ForceRemoveFinalizersResponse(
            deleted=forced.deleted, removed=forced.removed
        )
        if not forced.deleted:
            response.object.CopyFrom(forced.object)
        emit(fmt.json_block(fmt.to_json(response)))
        return 0
    removed = ",".join(forced.removed) or "none"
    if forced.deleted:
        emit(f"removed: {removed}\ndeleted {_ref(args.kind, args.name)}")
    else:
        emit(f"removed: {removed}\n\n{object_details(forced.object)}")
    return 0


def report(error: TetherError) -> None:
    """``tether: REASON: message`` plus the facts the server sent, to stderr."""
    fmt.report(error, _FACTS)


# --- the parser ---------------------------------------------------------------------------

OBJECT_HELP = """\
Inspect objects on a tether server: what owns what, why a deletion is stuck (pending
finalizers, blocking dependents, refusals); delete objects, or force their finalizers off.

Connection options go after `tether object` or after the command.
"""


def _command(sub: SubParsers, name: str, help: str, call: Call) -> argparse.ArgumentParser:
    return command(sub, name, help, call, report_error=report)


def _add_selector(parser: argparse.ArgumentParser) -> None:
    """``KIND NAME`` or ``KIND --uid UID``."""
    parser.add_argument("kind", metavar="KIND")
    selector = parser.add_mutually_exclusive_group(required=True)
    selector.add_argument("name", nargs="?", metavar="NAME", help="the object by name")
    selector.add_argument("--uid", metavar="UID", help="the object by uid")


def _add_name(parser: argparse.ArgumentParser, *, uid_help: str) -> None:
    parser.add_argument("kind", metavar="KIND")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--uid", default="", metavar="UID", help=uid_help)


def register_object(commands: SubParsers) -> None:
    sub = group(
        commands,
        "object",
        help="inspect objects, owners and finalizers; delete objects",
        description=OBJECT_HELP,
    )

    get = _command(
        sub, "get", "show an object, with why it is still terminating and its history", _get
    )
    _add_selector(get)

    listing = _command(sub, "list", "list objects as a table (a JSON array with --json)", _list)
    listing.add_argument("--kind", default="", help="only objects of this kind")
    listing.add_argument(
        "-l",
        "--selector",
        default="",
        metavar="SELECTOR",
        help="label selector, e.g. 'app=agent,tier!=cache,env in (a,b),!legacy'",
    )
    listing.add_argument(
        "--terminating", action="store_true", help="only objects waiting to be deleted"
    )
    listing.add_argument("--owner", default="", metavar="UID", help="only dependents of this uid")
    listing.add_argument("--limit", type=positive_int, default=0, help="at most N objects")

    delete = _command(
        sub, "delete", "delete an object (it waits for its finalizers, if any)", _delete
    )
    _add_name(delete, uid_help="only if the object has this uid")
    delete.add_argument(
        "--propagation",
        choices=list(PROPAGATION),
        default="background",
        help="background (default): dependents are collected after; foreground: the object "
        "stays until its blocking dependents are gone; orphan: dependents are kept",
    )
    delete.add_argument(
        "--resource-version",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="only if the object is at this resource version",
    )

    tree = _command(
        sub, "tree", "show an object's owners above it and its dependents below it", _tree
    )
    _add_selector(tree)
    tree.add_argument(
        "--max-objects",
        type=positive_int,
        default=0,
        metavar="N",
        help="at most N nodes (the server's default: 1000)",
    )

    force = _command(
        sub,
        "force-remove-finalizers",
        "remove finalizers whatever their handlers say (admin; recorded with the reason)",
        _force_remove_finalizers,
    )
    _add_name(force, uid_help="only if the object has this uid")
    force.add_argument(
        "--finalizer",
        dest="finalizers",
        action="append",
        default=[],
        metavar="FINALIZER",
        help="this finalizer (repeatable; default: all of them)",
    )
    force.add_argument("--reason", required=True, help="why, recorded on the object")
