"""Forged page tokens, on every list RPC that takes one: INVALID_PAGE_TOKEN, never INTERNAL.

Tokens are base64 JSON with a digest anyone can compute, so each test takes a real token
of a real second page, keeps its query digest, and swaps the position for a forged one: a
lone surrogate or a NUL in a string part (SQLite failed with UnicodeEncodeError, PostgreSQL
with CharacterNotInRepertoire), an overlong string, a huge or negative integer, or a part
of the wrong type. Each must be refused like the request field it stands for.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tether_client.pb import (
    common_pb2,
    lease_pb2,
    owner_ref_pb2,
    owner_ref_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    sweep_pb2,
    sweep_pb2_grpc,
)

from .conftest import WAIT_S, Harness, expect_error

Position = list[Any]
# A list call with this page token; returns the response.
Lister = Callable[[str], Awaitable[Any]]

OVERLONG = "x" * 10_000
BAD_STRINGS: list[Any] = ["\ud800", "a\udfffb", "a\x00b", "\x00", OVERLONG, "", 7, None, 1.5]
BAD_INTS: list[Any] = [2**63, 2**64, 10**40, -1, -(2**70), "1", None, 1.5, True]


def body(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    return decoded


def forge(position: Position, digest: str) -> str:
    raw = json.dumps({"p": position, "q": digest}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def forgeries(real: Position) -> list[Position]:
    """Every slot of the real position replaced by each bad value of its kind, plus the
    wrong lengths."""
    out: list[Position] = [[], real[:1], [*real, real[-1]]]
    for index, part in enumerate(real):
        for bad in BAD_INTS if isinstance(part, int) else BAD_STRINGS:
            forged = list(real)
            forged[index] = bad
            out.append(forged)
    return out


@dataclass
class Case:
    lister: Lister
    # A real page token (there is a second page).
    token: str


async def _check(case: Case) -> None:
    real = body(case.token)
    # The forging itself is sound: the real position, re-encoded, still pages.
    await case.lister(forge(real["p"], real["q"]))
    for position in forgeries(real["p"]):
        await expect_error(
            case.lister(forge(position, real["q"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )


async def _first_token(lister: Lister) -> str:
    response = await lister("")
    assert response.next_page_token, "the test needs a second page"
    return str(response.next_page_token)


# ---- one case per list RPC -------------------------------------------------------------


async def leases_case(tether: Harness) -> Case:
    for key in ("jobs/a", "jobs/b"):
        await tether.acquire(key=key)

    async def lister(token: str) -> Any:
        return await tether.stub.ListLeases(
            lease_pb2.ListLeasesRequest(key_prefix="jobs/", page_size=1, page_token=token),
            timeout=WAIT_S,
        )

    return Case(lister, await _first_token(lister))


async def sagas_case(tether: Harness) -> Case:
    stub = saga_pb2_grpc.SagaServiceStub(tether.channel)
    for saga_id in ("s-1", "s-2"):
        await stub.CreateSaga(saga_pb2.CreateSagaRequest(saga_id=saga_id, kind="k"), timeout=WAIT_S)

    async def lister(token: str) -> Any:
        return await stub.ListSagas(
            saga_pb2.ListSagasRequest(page_size=1, page_token=token), timeout=WAIT_S
        )

    return Case(lister, await _first_token(lister))


async def _objects(tether: Harness) -> tuple[owner_ref_pb2_grpc.OwnerRefServiceStub, str]:
    """A root with two dependents; returns the stub and the root's uid."""
    stub = owner_ref_pb2_grpc.OwnerRefServiceStub(tether.channel)
    root = await stub.CreateObject(
        owner_ref_pb2.CreateObjectRequest(object=owner_ref_pb2.Object(kind="Thing", name="root")),
        timeout=WAIT_S,
    )
    uid = root.object.uid
    for name in ("a", "b"):
        owner = common_pb2.OwnerReference(kind="Thing", name="root", uid=uid)
        await stub.CreateObject(
            owner_ref_pb2.CreateObjectRequest(
                object=owner_ref_pb2.Object(kind="Thing", name=name, owner_references=[owner])
            ),
            timeout=WAIT_S,
        )
    return stub, uid


async def objects_case(tether: Harness) -> Case:
    stub, _uid = await _objects(tether)

    async def lister(token: str) -> Any:
        return await stub.ListObjects(
            owner_ref_pb2.ListObjectsRequest(kind="Thing", page_size=1, page_token=token),
            timeout=WAIT_S,
        )

    return Case(lister, await _first_token(lister))


async def dependents_case(tether: Harness) -> Case:
    stub, uid = await _objects(tether)

    async def lister(token: str) -> Any:
        return await stub.ListDependents(
            owner_ref_pb2.ListDependentsRequest(
                owner_uid=uid, recursive=True, page_size=1, page_token=token
            ),
            timeout=WAIT_S,
        )

    return Case(lister, await _first_token(lister))


async def sweep_reports_case(tether: Harness) -> Case:
    stub = sweep_pb2_grpc.SweepServiceStub(tether.channel)
    for _ in range(2):
        await stub.RunSweep(sweep_pb2.RunSweepRequest(dry_run=True), timeout=WAIT_S)

    async def lister(token: str) -> Any:
        return await stub.ListSweepReports(
            sweep_pb2.ListSweepReportsRequest(page_size=1, page_token=token), timeout=WAIT_S
        )

    return Case(lister, await _first_token(lister))


CASES = {
    "ListLeases": leases_case,
    "ListSagas": sagas_case,
    "ListObjects": objects_case,
    "ListDependents": dependents_case,
    "ListSweepReports": sweep_reports_case,
}


@pytest.mark.parametrize("rpc", sorted(CASES))
async def test_forged_positions_are_invalid_page_tokens(tether: Harness, rpc: str) -> None:
    await _check(await CASES[rpc](tether))


@pytest.mark.parametrize("rpc", sorted(CASES))
async def test_positions_out_of_their_fields_bounds_are_refused(tether: Harness, rpc: str) -> None:
    """Strings that are plain text but not what the field they stand for accepts (an id
    with a space, a name too long for names yet short for the generic bound)."""
    case = await CASES[rpc](tether)
    real = body(case.token)
    for index, part in enumerate(real["p"]):
        if not isinstance(part, str):
            continue
        for bad in (" padded ", "é" * 300, "line\nbreak"):
            forged = list(real["p"])
            forged[index] = bad
            await expect_error(
                case.lister(forge(forged, real["q"])),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_PAGE_TOKEN",
            )
