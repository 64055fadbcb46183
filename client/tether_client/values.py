"""JSON values as protobuf ``Value`` / ``Struct``: saga inputs, step outputs, compensation
payloads, object specs and statuses.

Values that travel are JSON: ``None``, ``bool``, numbers, ``str``, lists and ``str``-keyed
dicts. Numbers come back as ``int`` when they are whole (JSON has one number type).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

# Integers beyond this are not exact as JSON numbers (doubles).
_MAX_EXACT_INT = 2**53


def to_value(obj: object) -> struct_pb2.Value:
    """A JSON-compatible Python value as a ``google.protobuf.Value``."""
    value = struct_pb2.Value()
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int):
        if abs(obj) > _MAX_EXACT_INT:
            raise ValueError(f"{obj} is not exact as a JSON number; pass it as a string")
        value.number_value = obj
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{obj} is not a JSON number")
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, Mapping):
        value.struct_value.CopyFrom(to_struct(obj))
    elif isinstance(obj, list | tuple):
        value.list_value.values.extend(to_value(item) for item in obj)
    else:
        raise TypeError(f"not a JSON value: {type(obj).__name__} {obj!r}")
    return value


def to_struct(mapping: Mapping[str, object]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"JSON object keys are strings, not {type(key).__name__} {key!r}")
        struct.fields[key].CopyFrom(to_value(item))
    return struct


def from_value(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as Python (an unset value is ``None``)."""
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        number = value.number_value
        # JSON has one number type: give back the int a step most likely returned.
        if number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: from_value(item) for key, item in struct.fields.items()}


__all__ = ["from_struct", "from_value", "to_struct", "to_value"]
