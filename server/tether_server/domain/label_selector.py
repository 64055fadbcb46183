"""Kubernetes label selectors: ``app=agent,tier!=cache,env in (a,b),env notin (c),gpu,!legacy``.

Parsed once into requirements; ``matches`` judges a label map in Python (watch filters)
and the object store renders the same requirements as SQL (list filters). Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from tether_server.domain.errors import InvalidField

_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_VALUE = re.compile(r"[^\s,()!=]*")
_MAX_SELECTOR_BYTES = 4096
# One requirement: a key, then an operator and its value(s), or nothing (exists).
_TOKEN = re.compile(
    r"\s*(?P<not>!)?\s*(?P<key>[^\s!=,()]+)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[^\s,()]*)"
    r"|\s(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?\s*(?:,|$)"
)


class Op(Enum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op is Op.EXISTS:
            return value is not None
        if self.op is Op.NOT_EXISTS:
            return value is None
        if self.op in (Op.EQUALS, Op.IN):
            return value is not None and value in self.values
        # != and notin match objects without the label too (as in Kubernetes).
        return value is None or value not in self.values


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


def parse(text: str, field_name: str = "label_selector") -> Selector:
    if len(text.encode()) > _MAX_SELECTOR_BYTES:
        raise InvalidField(field_name, f"is longer than {_MAX_SELECTOR_BYTES} bytes")
    if not text.strip():
        return Selector()
    requirements: list[Requirement] = []
    position = 0
    while position < len(text):
        found = _TOKEN.match(text, position)
        if found is None or found.end() == position:
            raise InvalidField(field_name, f"cannot parse the requirement at offset {position}")
        requirements.append(_requirement(found, field_name))
        position = found.end()
        if text[found.end() - 1 : found.end()] == "," and position == len(text):
            raise InvalidField(field_name, "ends with a comma")
    return Selector(tuple(requirements))


def _requirement(found: re.Match[str], field_name: str) -> Requirement:
    key = found["key"]
    if not _KEY.fullmatch(key) or len(key) > 317:
        raise InvalidField(field_name, f"{key!r} is not a label key")
    negated = found["not"] is not None
    if negated and (found["op"] or found["set"]):
        raise InvalidField(field_name, f"'!{key}' takes no operator")
    if negated:
        return Requirement(key, Op.NOT_EXISTS)
    if found["op"]:
        value = found["value"]
        _check_value(value, field_name)
        op = Op.NOT_EQUALS if found["op"] == "!=" else Op.EQUALS
        return Requirement(key, op, (value,))
    if found["set"]:
        values = tuple(v.strip() for v in found["values"].split(","))
        if values == ("",):
            raise InvalidField(field_name, f"'{key} {found['set']} ()' needs values")
        for value in values:
            _check_value(value, field_name)
        return Requirement(key, Op.IN if found["set"] == "in" else Op.NOT_IN, values)
    return Requirement(key, Op.EXISTS)


def _check_value(value: str, field_name: str) -> None:
    if len(value.encode()) > 256 or not _VALUE.fullmatch(value):
        raise InvalidField(field_name, f"{value!r} is not a label value")
