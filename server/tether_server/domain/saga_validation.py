"""Saga input bounds and shapes, each failure naming its field. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tether_server.domain.errors import InvalidField

_SAGA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}")
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OWNER_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


@dataclass(frozen=True)
class SagaLimits:
    max_input_bytes: int = 256 * 1024
    max_output_bytes: int = 64 * 1024
    max_steps: int = 1000
    max_step_name_bytes: int = 256
    max_error_bytes: int = 8 * 1024
    max_attempts: int = 100
    max_compensation_attempts: int = 100
    max_annotation_bytes: int = 8 * 1024
    max_attributes: int = 32


def saga_id(value: str, field_name: str = "saga_id") -> str:
    if not value:
        raise InvalidField(field_name, "must not be empty")
    if not _SAGA_ID.fullmatch(value):
        raise InvalidField(
            field_name, "must be 1-256 of A-Z a-z 0-9 . _ : / -, starting alphanumeric"
        )
    return value


def kind(value: str, field_name: str = "kind", *, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidField(field_name, "must not be empty")
        return value
    if not _KIND.fullmatch(value):
        raise InvalidField(field_name, "must be 1-128 of A-Z a-z 0-9 . _ -, starting alphanumeric")
    return value


def step_name(value: str, limits: SagaLimits, field_name: str = "name") -> str:
    if not value:
        raise InvalidField(field_name, "must not be empty")
    if len(value.encode()) > limits.max_step_name_bytes or not value.isprintable():
        raise InvalidField(
            field_name, f"must be printable and at most {limits.max_step_name_bytes} bytes"
        )
    return value


def index(value: int, limits: SagaLimits, field_name: str = "index") -> int:
    if not 0 <= value < limits.max_steps:
        raise InvalidField(field_name, f"must be between 0 and {limits.max_steps - 1}")
    return value


def attempts(value: int, default: int, maximum: int, field_name: str) -> int:
    if value == 0:
        return default
    if not 0 < value <= maximum:
        raise InvalidField(field_name, f"must be between 1 and {maximum} (0 for {default})")
    return value


def text(value: str, max_bytes: int, field_name: str) -> str:
    # PostgreSQL text cannot hold U+0000; refused on both backends alike.
    if "\x00" in value:
        raise InvalidField(field_name, "must not contain NUL characters")
    if len(value.encode()) > max_bytes:
        raise InvalidField(field_name, f"is {len(value.encode())} bytes; at most {max_bytes}")
    return value


def attributes(value: Mapping[str, str], limits: SagaLimits) -> dict[str, str]:
    if len(value) > limits.max_attributes:
        raise InvalidField(
            "attributes", f"has {len(value)} entries; at most {limits.max_attributes}"
        )
    for key, item in value.items():
        if not key or len(key) > 63 or len(item.encode()) > 1024:
            raise InvalidField(f"attributes[{key!r}]", "key 1-63 characters, value at most 1 KiB")
    return dict(value)


def owner(kind_: str, name: str, uid: str) -> None:
    if not _OWNER_KIND.fullmatch(kind_):
        raise InvalidField("owner.kind", "must name the owner's kind, e.g. tether.v1/Lease")
    if not (name or uid):
        raise InvalidField("owner", "needs a name or a uid")
    for field_name, item in (("owner.name", name), ("owner.uid", uid)):
        if len(item.encode()) > 256 or not item.isprintable():
            raise InvalidField(field_name, "must be printable and at most 256 bytes")
