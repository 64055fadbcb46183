"""Typed errors: every reason the protocol defines has its class, with the server's code,
and a refused call surfaces as that one exception (the gRPC error kept as ``rpc_error``, no
chain of gRPC or retry frames)."""

from __future__ import annotations

import asyncio
import re
import traceback
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import tether_client
from tests.client.conftest import (
    ClientFactory,
    Clocks,
    InProcessServer,
    advance_until,
    wait_until,
)
from tests.support.ports import free_port
from tether_client import errors
from tether_client.convert import to_datetime
from tether_client.pb import common_pb2
from tether_server.services.errors import _CODES as SERVER_CODES

COMMON_PROTO = Path(__file__).parents[2] / "protos" / "tether" / "v1" / "common.proto"
PREFIX = "ERROR_REASON_"
REASONS = [
    value.name.removeprefix(PREFIX)
    for value in common_pb2.ErrorReason.DESCRIPTOR.values
    if value.number != common_pb2.ERROR_REASON_UNSPECIFIED
]


def documented_codes() -> dict[str, grpc.StatusCode]:
    """reason → the status code common.proto documents for it (``// CODE: …`` opening the
    comment above it, which may go on over more lines)."""
    text = COMMON_PROTO.read_text()
    found = re.findall(
        r"//\s*([A-Z_]+):[^\n]*\n(?:\s*//[^\n]*\n)*\s*" + PREFIX + r"([A-Z_]+)\s*=", text
    )
    return {reason: grpc.StatusCode[code] for code, reason in found}


def rpc_error(
    code: grpc.StatusCode, *, info: error_details_pb2.ErrorInfo | None = None, raw: bytes = b""
) -> grpc.aio.AioRpcError:
    trailers: list[tuple[str, str | bytes]] = []
    if info is not None:
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=code.value[0], message="refused", details=[detail])
        raw = status.SerializeToString()
    if raw:
        trailers.append((errors.STATUS_DETAILS_KEY, raw))
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "refused", ""
    )


def proto_reasons() -> list[str]:
    """The ErrorReason values as common.proto spells them (not the generated code)."""
    text = COMMON_PROTO.read_text()
    block = re.search(r"enum ErrorReason \{(.*?)\n\}", text, re.S)
    assert block is not None, "no ErrorReason enum in common.proto"
    return [
        name
        for name in re.findall(PREFIX + r"([A-Z_]+)\s*=\s*\d+\s*;", block.group(1))
        if name != "UNSPECIFIED"
    ]


# What most callers catch: importable from the package itself.
COMMON_ERRORS = [
    "TetherError",
    "LeaseHeld",
    "LockDelay",
    "LeaseLost",
    "LeaseNotHeld",
    "LeaseExpired",
    "LeaseRevoked",
    "StaleFencingToken",
    "WaitTimeout",
    "SagaTerminal",
    "SagaAlreadyEnded",
    "SagaClaimed",
    "SagaNotFound",
    "NothingClaimable",
    "ObjectNotFound",
    "RevisionCompacted",
    "Unavailable",
    "DeadlineExceeded",
    "InvalidArgument",
    "PermissionDenied",
    "Unauthenticated",
]


def test_the_reason_list_and_its_documentation_agree() -> None:
    assert len(REASONS) >= 25
    assert proto_reasons() == REASONS
    assert set(documented_codes()) == set(REASONS)


@pytest.mark.parametrize("reason", proto_reasons())
def test_every_reason_of_the_proto_has_a_public_class_in_errors(reason: str) -> None:
    cls = errors.BY_REASON[reason]
    assert cls.reason == reason
    assert cls.__name__ in errors.__all__, f"{cls.__name__} is not in tether_client.errors"
    assert getattr(errors, cls.__name__) is cls


@pytest.mark.parametrize("name", COMMON_ERRORS)
def test_the_common_errors_come_from_the_package(name: str) -> None:
    assert name in tether_client.__all__
    assert getattr(tether_client, name) is getattr(errors, name)
    assert issubclass(getattr(tether_client, name), errors.TetherError)


def test_every_reason_has_its_own_class_with_the_servers_code() -> None:
    documented = documented_codes()
    server = {cls.reason: code for cls, code in SERVER_CODES.items()}
    classes = [errors.BY_REASON[reason] for reason in REASONS]
    assert len(set(classes)) == len(classes), "two reasons share a class"
    for reason, cls in zip(REASONS, classes, strict=True):
        assert cls.reason == reason
        assert cls.code == documented[reason], reason
        if reason in server:
            assert cls.code == server[reason], reason
        # Reason classes are also their code's class: `except Unavailable` catches them.
        assert issubclass(cls, errors.BY_CODE[cls.code])
    # The server maps no reason the client would not recognise.
    assert set(server) <= set(REASONS)


@pytest.mark.parametrize("reason", REASONS)
def test_a_refusal_becomes_its_reason_class(reason: str) -> None:
    cls = errors.BY_REASON[reason]
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain=errors.ERROR_DOMAIN, metadata={"k": "v"}
    )
    error = errors.from_rpc_error(rpc_error(cls.code, info=info))
    assert type(error) is cls
    assert error.reason == reason
    assert error.status_code == cls.code
    assert error.metadata == {"k": "v"}
    assert error.message == "refused"


def test_an_unknown_reason_falls_back_to_the_code_and_keeps_the_reason() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="SOMETHING_NEWER", domain=errors.ERROR_DOMAIN, metadata={"holder": "w1"}
    )
    error = errors.from_rpc_error(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, info=info))
    assert type(error) is errors.FailedPrecondition
    assert error.metadata == {"holder": "w1", "reason": "SOMETHING_NEWER"}
    assert error.status_code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_known_reason_with_another_code_goes_by_the_code() -> None:
    error = errors.error_for(grpc.StatusCode.INTERNAL, "LEASE_HELD", "odd", {})
    assert type(error) is errors.Internal
    assert error.metadata["reason"] == "LEASE_HELD"


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c not in (grpc.StatusCode.OK,)], ids=lambda c: c.name
)
def test_a_status_without_error_info_maps_by_code(code: grpc.StatusCode) -> None:
    error = errors.from_rpc_error(rpc_error(code))
    # Every code has its own class, except DATA_LOSS, which tether never sends.
    if code == grpc.StatusCode.DATA_LOSS:
        assert type(error) is errors.Unknown
    else:
        assert type(error).code == code
        assert not type(error).reason
    assert error.reason == ""
    assert error.status_code == code
    assert isinstance(error.rpc_error, grpc.aio.AioRpcError)
    assert error.rpc_error.code() == code
    # Kept, not chained: raised, the typed error is the only one shown.
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_error_info_of_another_domain_or_garbage_details_map_by_code() -> None:
    foreign = error_details_pb2.ErrorInfo(reason="LEASE_HELD", domain="example.com")
    error = errors.from_rpc_error(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, info=foreign))
    assert type(error) is errors.FailedPrecondition
    garbage = errors.from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, raw=b"\xff\x00junk"))
    assert type(garbage) is errors.Unavailable


def test_invalid_field_names_the_field() -> None:
    error = errors.error_for(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "ttl: too short", {"field": "ttl"}
    )
    assert isinstance(error, errors.InvalidField)
    assert error.field == "ttl"
    assert errors.InvalidField("no field").field == ""


def test_wait_timeout_reads_holder_and_deadline() -> None:
    error = errors.error_for(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "WAIT_TIMEOUT",
        "gave up",
        {"holder": "w1", "expires_at": "2026-01-02T03:04:05.000006Z"},
    )
    assert isinstance(error, errors.WaitTimeout)
    assert isinstance(error, errors.DeadlineExceeded)
    assert error.holder == "w1"
    assert error.expires_at == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    unreadable = errors.WaitTimeout("x", metadata={"expires_at": "soon"})
    assert unreadable.expires_at is None


# --- from a real server (both backends) ----------------------------------------------


async def test_lease_held_from_the_server_names_holder_and_deadline(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    first = client_factory(tether.target, holder="w1")
    second = client_factory(tether.target, holder="w2")
    held = await first.leases.acquire("jobs/a", ttl=30)
    with pytest.raises(errors.LeaseHeld) as caught:
        await second.leases.acquire("jobs/a", ttl=30)
    assert caught.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.holder == "w1"
    assert caught.value.expires_at == to_datetime(held.lease.expires_at)


async def test_wait_timeout_from_the_server(
    tether: InProcessServer, client_factory: ClientFactory, clocks: Clocks
) -> None:
    first = client_factory(tether.target, holder="w1")
    second = client_factory(tether.target, holder="w2")
    held = await first.leases.acquire("jobs/a", ttl=3600)
    waiter = asyncio.ensure_future(second.leases.acquire("jobs/a", ttl=10, wait=5))
    # Parked on the server, its wait counting from the server's clock...
    await wait_until(lambda: tether.waits_for_key("jobs/a"), "the parked Acquire")
    assert not waiter.done()
    # ...which moves past the end of it: the server gives up.
    clocks.advance(6)
    await wait_until(waiter.done, "the refusal")
    with pytest.raises(errors.WaitTimeout) as caught:
        waiter.result()
    assert caught.value.holder == "w1"
    assert caught.value.expires_at == to_datetime(held.lease.expires_at)


async def test_invalid_field_from_the_server(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    client = client_factory(tether.target)
    with pytest.raises(errors.InvalidField) as caught:
        await client.leases.acquire("jobs/a", ttl=0)
    assert caught.value.field == "ttl"


def test_saga_refusals_read_their_facts() -> None:
    failed = grpc.StatusCode.FAILED_PRECONDITION
    state = errors.error_for(
        failed, "INVALID_SAGA_STATE", "no", {"state": "SAGA_STATE_COMPENSATING"}
    )
    assert isinstance(state, errors.InvalidSagaState)
    assert state.state == "SAGA_STATE_COMPENSATING"
    conflict = errors.error_for(failed, "STEP_CONFLICT", "no", {"step_index": "2"})
    assert isinstance(conflict, errors.StepConflict)
    assert conflict.step_index == 2
    missing = errors.error_for(grpc.StatusCode.NOT_FOUND, "STEP_NOT_FOUND", "no", {})
    assert isinstance(missing, errors.StepNotFound)
    assert missing.step_index is None
    order = errors.error_for(failed, "COMPENSATION_OUT_OF_ORDER", "no", {"next_step_index": "4"})
    assert isinstance(order, errors.CompensationOutOfOrder)
    assert order.next_step_index == 4
    claimed = errors.error_for(failed, "SAGA_CLAIMED", "no", {"holder": "w1"})
    assert isinstance(claimed, errors.SagaClaimed)
    assert claimed.holder == "w1"


# --- a refusal is one exception ------------------------------------------------------


def assert_one_exception(error: errors.TetherError, code: grpc.StatusCode) -> None:
    """``error`` as raised by a refused call: the typed error alone, the gRPC error kept as
    ``rpc_error``, and a traceback of the caller's frames down to the one place it was
    raised (the retry loop's ``invoke``), nothing of gRPC or of earlier attempts."""
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert isinstance(error.rpc_error, grpc.aio.AioRpcError)
    assert error.rpc_error.code() == code
    formatted = "".join(traceback.format_exception(error))
    assert formatted.count("Traceback (most recent call last)") == 1, formatted
    assert "During handling of the above exception" not in formatted
    assert "direct cause" not in formatted
    assert "tenacity" not in formatted
    frames = traceback.extract_tb(error.__traceback__)
    retry_frames = [f.name for f in frames if Path(f.filename).name == "retry.py"]
    assert retry_frames == ["invoke"], formatted
    assert frames[-1].name == "invoke"
    assert not [f for f in frames if f"{Path('grpc')}" in Path(f.filename).parts], formatted


async def test_a_refusal_is_raised_as_one_exception(
    tether: InProcessServer, client_factory: ClientFactory
) -> None:
    first = client_factory(tether.target, holder="w1")
    second = client_factory(tether.target, holder="w2")
    await first.leases.acquire("jobs/a", ttl=30)
    with pytest.raises(errors.LeaseHeld) as caught:
        await second.leases.acquire("jobs/a", ttl=30)
    assert_one_exception(caught.value, grpc.StatusCode.FAILED_PRECONDITION)
    assert caught.value.holder == "w1"


async def test_a_call_retried_then_refused_is_raised_as_one_exception(
    tether: InProcessServer, clocks: Clocks, client_factory: ClientFactory
) -> None:
    """The first attempt goes to a closed port (unavailable: retried on the next target
    after a backoff on the client's clock), the second is refused: only the refusal shows,
    not the failed attempt before it."""
    first = client_factory(tether.target, holder="w1")
    await first.leases.acquire("jobs/a", ttl=30)
    second = client_factory([f"127.0.0.1:{free_port()}", tether.target], holder="w2")
    acquiring = asyncio.ensure_future(second.leases.acquire("jobs/a", ttl=30))
    await advance_until(clocks.advance, acquiring.done, step=0.05)
    with pytest.raises(errors.LeaseHeld) as caught:
        await acquiring
    assert second._transport.connection.fail_overs == 1
    assert_one_exception(caught.value, grpc.StatusCode.FAILED_PRECONDITION)
    assert "Unavailable" not in "".join(traceback.format_exception(caught.value))
