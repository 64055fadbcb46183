"""One contract for refusals, in three places that must agree: the server's error classes
(server/tether_server/domain/errors.py with the status table in services/errors.py), the
ErrorReason enum's comments in common.proto (what clients in every language read), and
docs/errors.md. The suite's refusal decoders check every refusal the server really sends
against common.proto (tests/support/error_contract.py); this file checks the three agree.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from tests.support.error_contract import published
from tether_client.pb import common_pb2, lease_pb2, saga_pb2
from tether_server.domain import errors
from tether_server.domain.lease import LeaseState
from tether_server.domain.saga import Purpose, SagaState
from tether_server.services.errors import code_for

ERRORS_DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def _server_errors() -> dict[str, type[errors.TetherError]]:
    found: dict[str, type[errors.TetherError]] = {}
    pending = list(errors.TetherError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        assert cls.reason not in found, f"two classes for {cls.reason}"
        found[cls.reason] = cls
    return found


def test_every_published_reason_is_a_server_error_and_back() -> None:
    enum_names = {
        name.removeprefix("ERROR_REASON_")
        for name in (value.name for value in common_pb2.ErrorReason.DESCRIPTOR.values)
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert set(published()) == enum_names
    assert set(_server_errors()) == enum_names


@pytest.mark.parametrize("reason", sorted(published()))
def test_server_error_matches_common_proto(reason: str) -> None:
    contract = published()[reason]
    cls = _server_errors()[reason]
    assert code_for(cls) == contract.code
    assert cls.keys == contract.keys, f"{reason}: always-sent keys differ from common.proto"
    assert cls.optional_keys == contract.optional_keys, f"{reason}: optional keys differ"


def test_a_construction_off_the_contract_is_refused() -> None:
    with pytest.raises(TypeError, match="missing"):
        errors.LeaseHeld("held", {"key": "k", "holder": "h"})
    with pytest.raises(TypeError, match="undeclared"):
        errors.LeaseNotFound("gone", {"namespace": "default", "lease": "x"})
    # Optional keys may be left out; the always-sent ones may not.
    errors.LeaseHeld("held", {"key": "k", "holder": "h", "expires_at": "2026-01-01T00:00:00Z"})


def _doc_table() -> dict[str, tuple[str, frozenset[str]]]:
    """``| `REASON` | CODE | `key`, `key`; `optional` | meaning |`` rows of docs/errors.md."""
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in ERRORS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"`[A-Z_]+`", cells[0]):
            continue
        keys = frozenset(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", cells[2])))
        rows[cells[0].strip("`")] = (cells[1], keys)
    return rows


def test_docs_list_every_reason_with_its_code_and_keys() -> None:
    table = _doc_table()
    assert set(table) == set(published()), "docs/errors.md and common.proto list other reasons"
    for reason, contract in published().items():
        code, keys = table[reason]
        assert code == contract.code.name, f"docs/errors.md gives {reason} the code {code}"
        assert keys == contract.keys | contract.optional_keys, f"docs/errors.md: {reason} keys"


def test_states_in_metadata_are_proto_value_names() -> None:
    assert {s.proto_name for s in LeaseState} <= set(lease_pb2.LeaseState.keys())
    assert {s.proto_name for s in SagaState} <= set(saga_pb2.SagaState.keys())
    assert {p.proto_name for p in Purpose} <= set(saga_pb2.ClaimPurpose.keys())


def test_status_codes_are_never_internal_or_unknown() -> None:
    for contract in published().values():
        assert contract.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
