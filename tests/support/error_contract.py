"""The ErrorInfo contract as protos/tether/v1/common.proto publishes it to every language.

Each ``ErrorReason`` value's comment starts with the gRPC status code the reason comes with
and has a ``Metadata:`` sentence: the keys always carried, then after a ";" the keys carried
only in some cases. Text in parentheses explains and is not a key. The test helpers that
decode refusals (tests/service/conftest.py, tests/e2e, the fuzz run) check every refusal
they see against it, so the whole suite checks what the server really sends.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

COMMON_PROTO = Path(__file__).resolve().parents[2] / "protos" / "tether" / "v1" / "common.proto"
_VALUE = re.compile(r"^\s*ERROR_REASON_(\w+)\s*=\s*\d+;")
_KEY = re.compile(r'"([a-z_]+)"')


@dataclass(frozen=True)
class ReasonContract:
    reason: str
    code: grpc.StatusCode
    keys: frozenset[str]
    optional_keys: frozenset[str]


@functools.cache
def published() -> dict[str, ReasonContract]:
    """Every reason of the ErrorReason enum but UNSPECIFIED, read from common.proto."""
    text = COMMON_PROTO.read_text()
    block = text[text.index("enum ErrorReason {") :]
    block = block[: block.index("\n}")]
    found: dict[str, ReasonContract] = {}
    comment: list[str] = []
    for line in block.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped.removeprefix("//").strip())
            continue
        value = _VALUE.match(line)
        if value is None:
            comment = []
            continue
        reason, words = value.group(1), " ".join(comment)
        comment = []
        if reason == "UNSPECIFIED":
            continue
        code_name, _, rest = words.partition(":")
        assert "Metadata:" in rest, f"{reason}: its comment has no 'Metadata:' sentence"
        metadata = re.sub(r"\([^)]*\)", "", rest.split("Metadata:", 1)[1])
        always, _, sometimes = metadata.partition(";")
        found[reason] = ReasonContract(
            reason=reason,
            code=grpc.StatusCode[code_name.strip()],
            keys=frozenset(_KEY.findall(always)),
            optional_keys=frozenset(_KEY.findall(sometimes)),
        )
    return found


def check(code: grpc.StatusCode, reason: str, metadata: Mapping[str, str]) -> None:
    """Assert a refusal the server sent keeps the published contract of its reason."""
    contract = published().get(reason)
    assert contract is not None, f"reason {reason!r} is not in common.proto's ErrorReason"
    assert code == contract.code, f"{reason} came with {code.name}, published {contract.code.name}"
    given = set(metadata)
    missing = contract.keys - given
    undeclared = given - contract.keys - contract.optional_keys
    assert not missing, f"{reason} lacks metadata {sorted(missing)} that common.proto promises"
    assert not undeclared, f"{reason} sent metadata {sorted(undeclared)} common.proto omits"
