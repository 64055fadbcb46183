"""Authentication and authorization at the RPC boundary, over TLS and mutual TLS.

The matrix: every RPC of tether.v1 x {no credentials, wrong token, worker of another
namespace, worker, operator, admin, operator of every namespace}, each answered as
domain/access.py's rules say, and nothing stored changes when a call is refused. The
requests are minimal: a call that is let in is answered by the handler (often
INVALID_ARGUMENT for the empty fields), which is all the matrix needs to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service.conftest import WAIT_S, dur, error_info, make_test_config
from tests.service.sweep_support import table_contents
from tests.support.certs import CLIENT_CN, CLIENT_URI, TestPki, channel_credentials
from tether_client.pb import lease_pb2, lease_pb2_grpc, owner_ref_pb2, saga_pb2, sweep_pb2
from tether_server.app import TetherServer
from tether_server.auth import AuthConfig
from tether_server.clock import FakeClock
from tether_server.domain.access import RULES, Role, Scope

NAMESPACE = "team-a"
TOKENS = {
    "worker-a": "worker-a-token-0000000001",
    "worker-b": "worker-b-token-0000000002",
    "operator-a": "operator-a-token-00000003",
    "admin": "admin-token-00000000000004",
    "operator-all": "operator-all-token-000005",
}
TOKENS_FILE = f"""
# the principals of these tests
token:{TOKENS["worker-a"]}      worker-a      worker    {NAMESPACE}
token:{TOKENS["worker-b"]}      worker-b      worker    team-b
token:{TOKENS["operator-a"]}    operator-a    operator  {NAMESPACE},team-c
token:{TOKENS["admin"]}         admin         admin     *
token:{TOKENS["operator-all"]}  operator-all  operator  *
cert                            {CLIENT_URI}  worker    {NAMESPACE}
cert                            {CLIENT_CN}   operator  {NAMESPACE}
"""
SERVICES = [
    pb.DESCRIPTOR.services_by_name[name]
    for pb, name in (
        (lease_pb2, "LeaseService"),
        (saga_pb2, "SagaService"),
        (owner_ref_pb2, "OwnerRefService"),
        (sweep_pb2, "SweepService"),
    )
]
METHODS = [(service, method) for service in SERVICES for method in service.methods]
AUTH_REASONS = {
    "CREDENTIALS_REQUIRED",
    "INVALID_CREDENTIALS",
    "NAMESPACE_FORBIDDEN",
    "ROLE_REQUIRED",
    "ADMIN_REQUIRED",
}


@dataclass(frozen=True)
class Identity:
    name: str
    token: str | None = None
    # The client certificate (mutual TLS only): "uri", "cn" or None.
    cert: str | None = None
    # Roles by namespace, as the tokens file grants them (None: not authenticated).
    grants: dict[str, Role] | None = None
    refusal: str = ""


TLS_IDENTITIES = [
    Identity("no credentials", refusal="CREDENTIALS_REQUIRED"),
    Identity("wrong token", token="not-a-token-of-this-server", refusal="INVALID_CREDENTIALS"),
    Identity("worker of another namespace", TOKENS["worker-b"], grants={"team-b": Role.WORKER}),
    Identity("worker", TOKENS["worker-a"], grants={NAMESPACE: Role.WORKER}),
    Identity("operator", TOKENS["operator-a"], grants={NAMESPACE: Role.OPERATOR}),
    Identity("admin", TOKENS["admin"], grants={"*": Role.ADMIN}),
    Identity("operator everywhere", TOKENS["operator-all"], grants={"*": Role.OPERATOR}),
]
# With mutual TLS every connection has a verified certificate: a token, when sent, decides.
MTLS_IDENTITIES = [
    Identity("wrong token", "not-a-token-of-this-server", "cn", refusal="INVALID_CREDENTIALS"),
    Identity("worker of another namespace", TOKENS["worker-b"], "cn", {"team-b": Role.WORKER}),
    Identity("worker (certificate URI)", None, "uri", {NAMESPACE: Role.WORKER}),
    Identity("operator (certificate CN)", None, "cn", {NAMESPACE: Role.OPERATOR}),
    Identity("admin", TOKENS["admin"], "uri", {"*": Role.ADMIN}),
]


def expected_refusal(identity: Identity, path: str) -> str:
    """The reason the rules give for this identity calling ``path`` in NAMESPACE ("" = let
    in)."""
    if identity.refusal:
        return identity.refusal
    assert identity.grants is not None
    rule = RULES[path]
    global_call = rule.scope is Scope.GLOBAL
    held = [identity.grants.get("*")] + ([] if global_call else [identity.grants.get(NAMESPACE)])
    roles = [role for role in held if role is not None]
    if not roles:
        return "NAMESPACE_FORBIDDEN"
    if max(roles) < rule.role:
        return "ADMIN_REQUIRED" if rule.role is Role.ADMIN else "ROLE_REQUIRED"
    return ""


def request_for(method: Any) -> Any:
    cls = message_factory.GetMessageClass(method.input_type)
    request = cls()
    fields = method.input_type.fields_by_name
    if "namespace" in fields and method.name != "RunSweep":
        request.namespace = NAMESPACE
    if method.name == "RunSweep":
        request.namespace = NAMESPACE
        request.dry_run = True
    if "start_revision" in fields:
        # Let-in watches answer INVALID_ARGUMENT at once instead of staying open.
        request.start_revision = -1
    return request


async def outcome(channel: grpc.aio.Channel, service: Any, method: Any, token: str | None) -> Any:
    """(code, reason) of one call: ("OK", "") when it answered normally."""
    path = f"/{service.full_name}/{method.name}"
    response_cls = message_factory.GetMessageClass(method.output_type)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    request = request_for(method)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_cls.FromString,
    }
    try:
        if method.client_streaming:
            call = channel.stream_stream(path, **kwargs)(metadata=metadata, timeout=WAIT_S)
            await call.write(lease_pb2.KeepAliveRequest(namespace=NAMESPACE, sequence=1))
            await call.read()
            call.cancel()
        elif method.server_streaming:
            stream = channel.unary_stream(path, **kwargs)(
                request, metadata=metadata, timeout=WAIT_S
            )
            await stream.read()
            stream.cancel()
        else:
            await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=WAIT_S)
    except grpc.aio.AioRpcError as exc:
        info = error_info(exc)
        return exc.code().name, info[1] if info else ""
    return "OK", ""


@dataclass
class AuthServer:
    server: TetherServer
    target: str
    pki: TestPki
    mtls: bool

    def channel(self, cert: str | None = None) -> grpc.aio.Channel:
        client = {"uri": self.pki.client_uri, "cn": self.pki.client_cn, None: None}[cert]
        return grpc.aio.secure_channel(self.target, channel_credentials(self.pki, client))


@contextlib.asynccontextmanager
async def serving(
    db_url: str, clock: FakeClock, pki: TestPki, tmp_path: Path, *, mtls: bool
) -> AsyncIterator[AuthServer]:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE)
    config = dataclasses.replace(
        make_test_config(db_url),
        auth=AuthConfig(
            tls_cert=str(pki.server.cert),
            tls_key=str(pki.server.key),
            tls_client_ca=str(pki.ca) if mtls else "",
            tokens_file=str(tokens),
        ),
    )
    server = TetherServer(config, clock)
    port = await server.start()
    await server.expiry.stop()
    try:
        yield AuthServer(server, f"127.0.0.1:{port}", pki, mtls)
    finally:
        await server.stop(0)


@pytest.fixture(params=["tls", "mtls"])
async def auth_server(
    request: pytest.FixtureRequest,
    db_url: str,
    fake_clock: FakeClock,
    test_pki: TestPki,
    tmp_path: Path,
) -> AsyncIterator[AuthServer]:
    async with serving(
        db_url, fake_clock, test_pki, tmp_path, mtls=request.param == "mtls"
    ) as server:
        yield server


@pytest.fixture
async def tls_server(
    db_url: str, fake_clock: FakeClock, test_pki: TestPki, tmp_path: Path
) -> AsyncIterator[AuthServer]:
    async with serving(db_url, fake_clock, test_pki, tmp_path, mtls=False) as server:
        yield server


@pytest.fixture
async def mtls_server(
    db_url: str, fake_clock: FakeClock, test_pki: TestPki, tmp_path: Path
) -> AsyncIterator[AuthServer]:
    async with serving(db_url, fake_clock, test_pki, tmp_path, mtls=True) as server:
        yield server


def test_every_served_method_has_a_rule() -> None:
    paths = {f"/{service.full_name}/{method.name}" for service, method in METHODS}
    assert paths == set(RULES)


async def test_the_matrix(auth_server: AuthServer) -> None:
    identities = MTLS_IDENTITIES if auth_server.mtls else TLS_IDENTITIES
    before = await table_contents(auth_server.server, skip=("replicas",))
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    wrong: list[str] = []
    # Refused callers first: then nothing at all may have changed.
    ordered = sorted(identities, key=lambda i: i.grants is not None and i.refusal == "")
    for identity in ordered:
        channel = auth_server.channel(identity.cert)
        try:
            for service, method in METHODS:
                path = f"/{service.full_name}/{method.name}"
                code, reason = await outcome(channel, service, method, identity.token)
                seen[identity.name, path] = (code, reason)
                expected = expected_refusal(identity, path)
                if expected:
                    good = reason == expected and code in {"UNAUTHENTICATED", "PERMISSION_DENIED"}
                else:
                    good = reason not in AUTH_REASONS and code != "UNAUTHENTICATED"
                if not good:
                    wrong.append(f"{identity.name} {path}: got {code}/{reason}, rule {expected!r}")
        finally:
            await channel.close()
        if identity.refusal or all(
            expected_refusal(identity, f"/{s.full_name}/{m.name}") for s, m in METHODS
        ):
            assert await table_contents(auth_server.server, skip=("replicas",)) == before
    assert not wrong, "\n".join(wrong)
    # The matrix saw every kind of answer it is about.
    reasons = {reason for _, reason in seen.values()}
    assert {"NAMESPACE_FORBIDDEN", "INVALID_CREDENTIALS", "ADMIN_REQUIRED"} <= reasons


async def test_mtls_refuses_a_connection_without_a_trusted_certificate(
    mtls_server: AuthServer,
) -> None:
    auth_server = mtls_server
    for credentials in (
        channel_credentials(auth_server.pki),
        channel_credentials(auth_server.pki, auth_server.pki.stranger),
    ):
        async with grpc.aio.secure_channel(auth_server.target, credentials) as channel:
            stub = lease_pb2_grpc.LeaseServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLease(
                    lease_pb2.GetLeaseRequest(namespace=NAMESPACE, key="k"), timeout=WAIT_S
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_and_reflection_stay_open(auth_server: AuthServer) -> None:
    # Mutual TLS still needs a certificate to connect; no token is needed either way.
    async with auth_server.channel("cn" if auth_server.mtls else None) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT_S
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "tether.v1.LeaseService" in names
        # Reflection v1 has the same messages on the wire; it is as open as v1alpha.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        v1_responses = v1(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT_S
        )
        v1_names = [s.name async for r in v1_responses for s in r.list_services_response.service]
        assert sorted(v1_names) == sorted(names)


async def acquire_as(
    channel: grpc.aio.Channel, token: str | None, key: str = "jobs/x"
) -> lease_pb2.Lease:
    stub = lease_pb2_grpc.LeaseServiceStub(channel)
    response = await stub.Acquire(
        lease_pb2.AcquireRequest(namespace=NAMESPACE, key=key, holder="h", ttl=dur(30)),
        metadata=_bearer(token),
        timeout=WAIT_S,
    )
    return response.lease


def _bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


async def test_a_lease_belongs_to_the_principal_that_acquired_it(auth_server: AuthServer) -> None:
    """Another principal of the same namespace knows the lease id and token, and still
    cannot renew, keep alive or release it."""
    owner = TOKENS["worker-a"] if not auth_server.mtls else None
    other = TOKENS["operator-a"]
    async with auth_server.channel("uri" if auth_server.mtls else None) as channel:
        lease = await acquire_as(channel, owner)
        assert lease.principal == (CLIENT_URI if auth_server.mtls else "worker-a")
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        calls: list[Callable[[], Any]] = [
            lambda: stub.Renew(
                lease_pb2.RenewRequest(
                    namespace=NAMESPACE, lease_id=lease.lease_id, fencing_token=lease.fencing_token
                ),
                metadata=_bearer(other),
                timeout=WAIT_S,
            ),
            lambda: stub.Release(
                lease_pb2.ReleaseRequest(
                    namespace=NAMESPACE,
                    lease_id=lease.lease_id,
                    fencing_token=lease.fencing_token,
                    holder=lease.holder,
                ),
                metadata=_bearer(other),
                timeout=WAIT_S,
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_info(caught.value)[1] == "NOT_LEASE_HOLDER"
        stream = stub.KeepAlive(metadata=_bearer(other), timeout=WAIT_S)
        await stream.write(
            lease_pb2.KeepAliveRequest(
                namespace=NAMESPACE,
                sequence=7,
                renewals=[
                    lease_pb2.KeepAliveRenewal(
                        lease_id=lease.lease_id, fencing_token=lease.fencing_token
                    )
                ],
            )
        )
        answer = await stream.read()
        stream.cancel()
        assert [r.error.reason for r in answer.results] == ["NOT_LEASE_HOLDER"]
        # The owner still holds it, unchanged.
        got = await stub.GetLease(
            lease_pb2.GetLeaseRequest(namespace=NAMESPACE, lease_id=lease.lease_id),
            metadata=_bearer(owner),
            timeout=WAIT_S,
        )
        assert got.lease.state == lease_pb2.LEASE_STATE_ACTIVE
        assert got.lease.renewed_at == lease.renewed_at


async def test_a_reloaded_tokens_file_takes_effect_and_a_bad_one_is_not_taken(
    tls_server: AuthServer,
) -> None:
    auth_server = tls_server
    tokens = Path(auth_server.server.config.auth.tokens_file)
    new_token = "a-new-token-000000000000000"
    async with auth_server.channel() as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        lease = await acquire_as(channel, TOKENS["worker-a"], "jobs/reload")
        stream = stub.KeepAlive(metadata=_bearer(TOKENS["worker-a"]), timeout=WAIT_S)
        renewal = lease_pb2.KeepAliveRenewal(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token
        )
        await stream.write(
            lease_pb2.KeepAliveRequest(namespace=NAMESPACE, sequence=1, renewals=[renewal])
        )
        assert not (await stream.read()).results[0].HasField("error")
        await asyncio.to_thread(
            tokens.write_text, f"token:{new_token} worker-a worker {NAMESPACE}\n"
        )
        assert auth_server.server.reload_credentials()
        # The old token is gone, the new one works, the stream opened before goes on.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await acquire_as(channel, TOKENS["worker-a"], "jobs/other")
        assert error_info(caught.value)[1] == "INVALID_CREDENTIALS"
        await acquire_as(channel, new_token, "jobs/other")
        await stream.write(
            lease_pb2.KeepAliveRequest(namespace=NAMESPACE, sequence=2, renewals=[renewal])
        )
        answer = await stream.read()
        assert not answer.results[0].HasField("error")
        stream.cancel()
        # A broken file is not taken: the new token still works.
        await asyncio.to_thread(tokens.write_text, "this line is not a grant\n")
        assert not auth_server.server.reload_credentials()
        await acquire_as(channel, new_token, "jobs/third")


async def test_calls_during_recovery_hear_server_starting(
    db_url: str, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port answers while the start-up recovery runs: UNAVAILABLE / SERVER_STARTING
    with retry advice, health NOT_SERVING; then SERVING and calls go through."""
    server = TetherServer(make_test_config(db_url), fake_clock)
    recovering = asyncio.Event()
    finish = asyncio.Event()
    recover = server._recover

    async def held_recovery() -> None:
        recovering.set()
        await finish.wait()
        await recover()

    monkeypatch.setattr(server, "_recover", held_recovery)
    starting = asyncio.ensure_future(server.start())
    try:
        await asyncio.wait_for(recovering.wait(), WAIT_S)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = lease_pb2_grpc.LeaseServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLease(lease_pb2.GetLeaseRequest(key="k"), timeout=WAIT_S)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value)[1] == "SERVER_STARTING"
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            finish.set()
            await asyncio.wait_for(starting, WAIT_S)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLease(lease_pb2.GetLeaseRequest(key="k"), timeout=WAIT_S)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        finish.set()
        await asyncio.gather(starting, return_exceptions=True)
        await server.stop(0)


async def test_a_message_over_the_limit_is_refused_with_the_limit(
    db_url: str, fake_clock: FakeClock
) -> None:
    config = dataclasses.replace(make_test_config(db_url), max_message_bytes=64 * 1024)
    server = TetherServer(config, fake_clock)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = lease_pb2_grpc.LeaseServiceStub(channel)
            big = lease_pb2.AcquireRequest(key="k", holder="h", ttl=dur(10))
            big.labels["blob"] = "x" * 100_000
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Acquire(big, timeout=WAIT_S)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _, reason, metadata = error_info(caught.value)
            assert reason == "MESSAGE_TOO_LARGE"
            assert metadata["limit_bytes"] == str(64 * 1024)
            assert int(metadata["size_bytes"]) > 100_000
    finally:
        await server.stop(0)


async def test_a_refusal_for_a_malformed_namespace_is_bad_input(tls_server: AuthServer) -> None:
    """A refusal echoes the namespace in its trailers; a huge malformed one is answered
    INVALID_ARGUMENT instead, so the client is not left with a trailer-size error."""
    async with tls_server.channel() as channel:
        stub = lease_pb2_grpc.LeaseServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Revoke(
                lease_pb2.RevokeRequest(namespace="é" * 5000, lease_id="x"),
                metadata=_bearer(TOKENS["worker-a"]),
                timeout=WAIT_S,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[1:] == ("INVALID_FIELD", {"field": "namespace"})
