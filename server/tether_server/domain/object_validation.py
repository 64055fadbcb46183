"""Object input validation: kinds, names, finalizers, owner references, sizes. Pure."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tether_server.domain.errors import InvalidField
from tether_server.domain.objects import BUILTIN_OWNER_KINDS, SYSTEM_FINALIZERS, OwnerRef

# No slash: the built-in owner kinds (tether.v1/Lease) can never be an object's kind.
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_FINALIZER_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class ObjectLimits:
    max_spec_bytes: int = 256 * 1024
    max_status_bytes: int = 256 * 1024
    max_annotations_bytes: int = 256 * 1024
    max_owner_refs: int = 64
    max_finalizers: int = 32
    max_refusal_bytes: int = 1024
    max_graph_objects: int = 10_000
    default_graph_objects: int = 1000


def kind(value: str, field_name: str = "kind", *, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidField(field_name, "must not be empty")
        return value
    if not _KIND.fullmatch(value):
        raise InvalidField(
            field_name,
            "must be 1-63 of letters, digits, '_', '.', '-', starting with a letter",
        )
    return value


def name(value: str, field_name: str = "name") -> str:
    if not value:
        raise InvalidField(field_name, "must not be empty")
    if not _NAME.fullmatch(value):
        raise InvalidField(
            field_name,
            "must be 1-253 of letters, digits, '.', '_', '-', alphanumeric at both ends",
        )
    return value


def uid(value: str, field_name: str = "uid", *, required: bool = False) -> str:
    if not value:
        if required:
            raise InvalidField(field_name, "must not be empty")
        return value
    if len(value) > 256 or _CONTROL.search(value) or value != value.strip():
        raise InvalidField(field_name, "is not a uid")
    return value


def new_uid(now_ms: int) -> str:
    """A UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Objects
    created together get neighbouring uids, so the index pages a cascade deletes from are
    few and adjacent (random version-4 uids made it touch every page, several times slower
    on SQLite)."""
    value = (now_ms & (2**48 - 1)) << 80 | secrets.randbits(80)
    # Version 7 in bits 48-51 (from the top), the RFC 4122 variant in bits 64-65.
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return str(uuid.UUID(int=value))


def finalizer(value: str, field_name: str = "finalizer", *, system_ok: bool = False) -> str:
    """Qualified like a Kubernetes finalizer: ``example.com/worktree``."""
    if value in SYSTEM_FINALIZERS:
        if system_ok:
            return value
        raise InvalidField(field_name, f"{value!r} is managed by the server")
    prefix, slash, rest = value.partition("/")
    valid = (
        slash
        and len(prefix) <= 253
        and _DNS_SUBDOMAIN.fullmatch(prefix) is not None
        and _FINALIZER_NAME.fullmatch(rest) is not None
    )
    if not valid:
        raise InvalidField(
            field_name, f"{value!r} must be a qualified name like 'example.com/cleanup'"
        )
    return value


def finalizers(
    values: Sequence[str], limits: ObjectLimits, *, system_ok: bool = False
) -> tuple[str, ...]:
    if len(values) > limits.max_finalizers:
        raise InvalidField(
            "finalizers", f"has {len(values)} entries; at most {limits.max_finalizers}"
        )
    seen: list[str] = []
    for index, value in enumerate(values):
        finalizer(value, f"finalizers[{index}]", system_ok=system_ok)
        if value not in seen:
            seen.append(value)
    return tuple(seen)


def owner_refs(refs: Sequence[OwnerRef], limits: ObjectLimits) -> tuple[OwnerRef, ...]:
    if len(refs) > limits.max_owner_refs:
        raise InvalidField(
            "owner_references", f"has {len(refs)} entries; at most {limits.max_owner_refs}"
        )
    seen: set[str] = set()
    controllers = 0
    for index, ref in enumerate(refs):
        where = f"owner_references[{index}]"
        uid(ref.uid, f"{where}.uid", required=True)
        if ref.kind not in BUILTIN_OWNER_KINDS:
            kind(ref.kind, f"{where}.kind")
        if ref.uid in seen:
            raise InvalidField(f"{where}.uid", f"{ref.uid} is referenced twice")
        seen.add(ref.uid)
        controllers += ref.controller
        if controllers > 1:
            raise InvalidField(f"{where}.controller", "at most one owner can be the controller")
    return tuple(refs)


def annotation_map(value: Mapping[str, str], limits: ObjectLimits) -> dict[str, str]:
    size = 0
    for key, text in value.items():
        if not key or len(key) > 317 or _CONTROL.search(key) or key != key.strip():
            raise InvalidField(f"annotations[{key!r}]", "key must be a non-empty label-like key")
        size += len(key.encode()) + len(text.encode())
    if size > limits.max_annotations_bytes:
        raise InvalidField(
            "annotations", f"is {size} bytes; at most {limits.max_annotations_bytes}"
        )
    return dict(value)


def structured(value: Mapping[str, Any], field_name: str, max_bytes: int) -> dict[str, Any]:
    size = len(json.dumps(value, separators=(",", ":")))
    if size > max_bytes:
        raise InvalidField(field_name, f"is {size} bytes as JSON; at most {max_bytes}")
    return dict(value)


def refusal(value: str, limits: ObjectLimits) -> str:
    if len(value.encode()) > limits.max_refusal_bytes:
        raise InvalidField("refusal", f"is longer than {limits.max_refusal_bytes} bytes")
    if _CONTROL.sub("", value.replace("\n", "")) != value.replace("\n", ""):
        raise InvalidField("refusal", "must not contain control characters")
    return value


def max_objects(value: int, limits: ObjectLimits) -> int:
    if value < 0:
        raise InvalidField("max_objects", "must not be negative")
    if value == 0:
        return limits.default_graph_objects
    return min(value, limits.max_graph_objects)
