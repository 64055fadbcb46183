"""Client authentication: TLS and mutual-TLS credentials, bearer tokens, and the rule that a
token never goes in plaintext to another host unless the caller says so.

The first tests need no server (target parsing, credential files, CLI option checks). The
rest run a real ``tether serve`` process over TLS or mutual TLS on each backend, with the
test certificates of ``test_pki`` and a tokens file written here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.cli_support import CLI_ENV
from tests.support.certs import (
    CLIENT_CN,
    CLIENT_URI,
    TestPki,
    TlsServerProcess,
    channel_credentials,
    server_tls_args,
)
from tether_client import TetherClient, tls_credentials
from tether_client.cli import main as cli_main
from tether_client.connection import Connection, is_loopback_target
from tether_client.errors import (
    CredentialsRequired,
    InvalidCredentials,
    TokenOverPlaintext,
    Unavailable,
)
from tether_client.retry import RetryPolicy

ALICE_TOKEN = "alice-token-0123456789abcdef"  # stored hashed in the tokens file
BOB_TOKEN = "bob-token-0123456789abcdef"  # stored as is
TOKENS = f"""\
# CREDENTIAL PRINCIPAL ROLES NAMESPACES
sha256:{hashlib.sha256(ALICE_TOKEN.encode()).hexdigest()}  alice  worker  default
token:{BOB_TOKEN}  bob  worker  default
cert  {CLIENT_URI}  worker  default
cert  {CLIENT_CN}  worker  default
"""
# Refusals by a real server come fast; a call that is retried stops within this.
SHORT = RetryPolicy(default_timeout=3.0, attempt_timeout=2.0)


# --- which targets are on this host -----------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "127.8.9.10:50051",
        "localhost:50051",
        "LocalHost",
        "[::1]:50051",
        "::1",
        "[::ffff:127.0.0.1]:50051",
        "unix:/run/tether.sock",
        "unix:///run/tether.sock",
        "unix-abstract:tether",
        "dns:///localhost:50051",
        "dns://8.8.8.8/127.0.0.1:50051",  # the authority is only the resolver to ask
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        "ipv6:[::1]:50051",
    ],
)
def test_loopback_targets(target: str) -> None:
    assert is_loopback_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "10.0.0.7:50051",
        "0.0.0.0:50051",
        "tether.example.com:50051",
        "localhost.example.com:50051",  # a name that merely starts with localhost
        "[2001:db8::1]:50051",
        "[fe80::1%eth0]:50051",
        "dns:///tether.example.com:50051",
        "ipv4:127.0.0.1:1,10.0.0.1:2",  # one remote address is enough
        "xds:///localhost:50051",  # a scheme whose destination nothing here can know
        "vsock:3:50051",
        "",
    ],
)
def test_remote_targets(target: str) -> None:
    assert not is_loopback_target(target)


# --- a token over plaintext ---------------------------------------------------------------


def test_a_token_is_refused_over_plaintext_to_another_host() -> None:
    with pytest.raises(TokenOverPlaintext, match=r"unencrypted to 10\.0\.0\.7:50051") as info:
        TetherClient("10.0.0.7:50051", token="s3cret-token-value")
    assert isinstance(info.value, ValueError)  # a bad argument, not a server's answer
    assert "insecure_token=True" in str(info.value)


def test_a_token_function_is_refused_too() -> None:
    with pytest.raises(TokenOverPlaintext):
        Connection("tether.example.com:50051", token=lambda: "rotating")


def test_one_remote_target_in_a_fail_over_list_refuses_the_token() -> None:
    with pytest.raises(TokenOverPlaintext, match=r"to 10\.0\.0\.8:1$|to 10\.0\.0\.8:1:"):
        Connection("127.0.0.1:1,10.0.0.8:1", token="s3cret-token-value")


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:1,[::1]:2", "unix:/x.sock"])
async def test_a_token_goes_over_plaintext_on_this_host(target: str) -> None:
    client = TetherClient(target, token="s3cret-token-value")
    assert client._transport.connection.metadata() == (
        ("authorization", "Bearer s3cret-token-value"),
    )
    await client.close()


async def test_insecure_token_lets_the_token_go_over_plaintext() -> None:
    client = TetherClient("10.0.0.7:50051", token="s3cret-token-value", insecure_token=True)
    assert client._transport.connection.metadata() == (
        ("authorization", "Bearer s3cret-token-value"),
    )
    await client.close()


async def test_a_token_over_tls_goes_anywhere(test_pki: TestPki) -> None:
    credentials = tls_credentials(ca_file=test_pki.ca)
    client = TetherClient("10.0.0.7:50051", credentials=credentials, token="s3cret-token-value")
    assert client._transport.connection.metadata() == (
        ("authorization", "Bearer s3cret-token-value"),
    )
    await client.close()


async def test_without_a_token_plaintext_to_another_host_is_allowed() -> None:
    client = TetherClient("10.0.0.7:50051")
    assert client._transport.connection.metadata() == ()
    await client.close()


# --- credentials from files ---------------------------------------------------------------


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_tls_credentials_from_files(test_pki: TestPki, mtls: bool) -> None:
    pair = test_pki.client_uri if mtls else None
    credentials = tls_credentials(
        test_pki.ca, pair.cert if pair else None, str(pair.key) if pair else None
    )
    assert isinstance(credentials, grpc.ChannelCredentials)


def test_tls_credentials_with_the_system_roots() -> None:
    assert isinstance(tls_credentials(), grpc.ChannelCredentials)


@pytest.mark.parametrize("given", ["cert_file", "key_file"])
def test_a_client_certificate_needs_its_key(test_pki: TestPki, given: str) -> None:
    files = {"cert_file": test_pki.client_cn.cert, "key_file": test_pki.client_cn.key}
    with pytest.raises(ValueError, match="give both cert_file and key_file"):
        tls_credentials(ca_file=test_pki.ca, **{given: files[given]})


def test_a_missing_file_is_named(test_pki: TestPki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError) as info:
        tls_credentials(ca_file=missing)
    assert info.value.filename == str(missing)


def test_files_swapped_or_not_pem_are_refused(test_pki: TestPki, tmp_path: Path) -> None:
    pair = test_pki.client_cn
    with pytest.raises(ValueError, match=r"cert_file .*client-cn\.key holds no PEM CERTIFICATE"):
        tls_credentials(cert_file=pair.key, key_file=pair.cert)  # swapped
    with pytest.raises(ValueError, match=r"key_file .*client-cn\.pem holds no PEM PRIVATE KEY"):
        tls_credentials(cert_file=pair.cert, key_file=pair.cert)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"ca_file .*junk\.pem holds no PEM CERTIFICATE"):
        tls_credentials(ca_file=junk)
    with pytest.raises(ValueError, match=r"cert_file .*junk\.pem holds no PEM CERTIFICATE"):
        tls_credentials(cert_file=junk, key_file=pair.key)


def test_an_encrypted_key_is_refused(test_pki: TestPki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ValueError, match="is encrypted"):
        tls_credentials(cert_file=test_pki.client_cn.cert, key_file=encrypted)


# --- the CLI's connection options, refused before any connection --------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """``cli(*argv) -> (exit status, stderr)`` of ``tether`` run in this process."""
    for name in CLI_ENV:
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, str]:
        try:
            status = cli_main(list(argv))
        except SystemExit as exc:  # argparse and our usage errors
            status = int(exc.code or 0)
        return status, capsys.readouterr().err

    return run


REMOTE = ("lease", "--target", "10.0.0.7:50051", "--timeout", "1s")


def test_cli_refuses_a_token_over_plaintext_to_another_host(cli: Callable[..., Any]) -> None:
    status, err = cli(*REMOTE, "--token", "s3cret-token-value", "get", "k")
    assert status == 2
    assert "usage: tether lease get" in err
    assert "the token would go unencrypted to 10.0.0.7:50051" in err
    assert "--insecure-token" in err


def test_cli_refuses_a_token_from_the_environment_too(
    cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_TOKEN", "s3cret-token-value")
    status, err = cli(*REMOTE, "get", "k")
    assert status == 2
    assert "unencrypted" in err


def test_cli_cert_and_key_go_together(cli: Callable[..., Any], test_pki: TestPki) -> None:
    for flag, path in (("--cert", test_pki.client_cn.cert), ("--key", test_pki.client_cn.key)):
        status, err = cli(*REMOTE, flag, str(path), "get", "k")
        assert status == 2, err
        assert "--cert and --key go together" in err


def test_cli_token_and_token_file_exclude_each_other(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-value\n")
    status, err = cli(*REMOTE, "--tls", "--token", "a", "--token-file", str(token_file), "get", "k")
    assert status == 2
    assert "give --token or --token-file, not both" in err


def test_cli_token_file_is_read_and_checked(cli: Callable[..., Any], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-value\n")
    # Read (the refusal names the plaintext target, so the file gave a token).
    status, err = cli(*REMOTE, "--token-file", str(token_file), "get", "k")
    assert (status, "unencrypted" in err) == (2, True)
    token_file.write_text("\n")
    status, err = cli(*REMOTE, "--token-file", str(token_file), "get", "k")
    assert status == 1
    assert f"--token-file: no token in {token_file}" in err
    status, err = cli(*REMOTE, "--token-file", str(tmp_path / "missing"), "get", "k")
    assert status == 1
    assert "--token-file: No such file or directory" in err


def test_cli_refuses_a_token_grpc_could_not_send(cli: Callable[..., Any]) -> None:
    status, err = cli(*REMOTE, "--tls", "--token", "two words", "get", "k")
    assert status == 2
    assert "printable ASCII without spaces" in err


def test_cli_names_an_unusable_tls_file(
    cli: Callable[..., Any], test_pki: TestPki, tmp_path: Path
) -> None:
    status, err = cli(*REMOTE, "--ca-file", str(tmp_path / "missing.pem"), "get", "k")
    assert status == 1
    assert f"tether: No such file or directory: {tmp_path / 'missing.pem'}" in err
    status, err = cli(
        *REMOTE,
        "--cert",
        str(test_pki.client_cn.key),
        "--key",
        str(test_pki.client_cn.key),
        "get",
        "k",
    )
    assert status == 1
    assert "holds no PEM CERTIFICATE" in err


# --- against a real server over TLS and mutual TLS ----------------------------------------

ServerStarter = Callable[..., TlsServerProcess]


@pytest.fixture
def tls_server(db_url: str, test_pki: TestPki, tmp_path: Path) -> Iterator[ServerStarter]:
    """``tls_server(mtls=False)``: a server on TLS with the tokens file (and mutual TLS)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    servers: list[TlsServerProcess] = []

    def start(*, mtls: bool = False) -> TlsServerProcess:
        server = TlsServerProcess(
            db_url,
            # Health is open to every caller with a good handshake; mTLS needs a certificate.
            health_credentials=channel_credentials(test_pki, test_pki.client_cn if mtls else None),
            extra_args=[*server_tls_args(test_pki, mtls=mtls), "--auth-tokens", str(tokens)],
            log_dir=tmp_path / "logs",
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.terminate()


def client(target: str, credentials: grpc.ChannelCredentials, **kwargs: Any) -> TetherClient:
    return TetherClient(target, credentials=credentials, retry=SHORT, **kwargs)


async def test_tokens_over_tls(tls_server: ServerStarter, test_pki: TestPki) -> None:
    server = tls_server()
    credentials = tls_credentials(ca_file=test_pki.ca)
    for token, principal in ((ALICE_TOKEN, "alice"), (BOB_TOKEN, "bob")):
        async with client(server.target, credentials, token=token) as c:
            acquired = await c.leases.acquire(f"tls/{principal}", ttl=30)
            assert acquired.lease.principal == principal
    async with client(server.target, credentials, token="not-a-token-of-this-server") as c:
        with pytest.raises(InvalidCredentials):
            await c.leases.acquire("tls/wrong", ttl=30)
    async with client(server.target, credentials) as c:
        with pytest.raises(CredentialsRequired):
            await c.leases.acquire("tls/nobody", ttl=30)
    # Nothing was granted to the refused callers.
    async with client(server.target, credentials, token=ALICE_TOKEN) as c:
        keys = [lease.key async for lease in c.leases.list()]
    assert sorted(keys) == ["tls/alice", "tls/bob"]


async def test_tls_needs_a_trusted_server_certificate(
    tls_server: ServerStarter, test_pki: TestPki
) -> None:
    server = tls_server()
    credentials = tls_credentials(ca_file=test_pki.other_ca)
    async with client(server.target, credentials, token=ALICE_TOKEN) as c:
        with pytest.raises(Unavailable):
            await c.leases.acquire("tls/untrusted", ttl=30)


async def test_mutual_tls_principal_is_the_certificate(
    tls_server: ServerStarter, test_pki: TestPki
) -> None:
    server = tls_server(mtls=True)
    for pair, principal in ((test_pki.client_uri, CLIENT_URI), (test_pki.client_cn, CLIENT_CN)):
        credentials = tls_credentials(test_pki.ca, pair.cert, pair.key)
        async with client(server.target, credentials) as c:
            acquired = await c.leases.acquire(f"mtls/{pair.cert.stem}", ttl=30)
            # The URI SAN wins over the certificate's CN (CLIENT_URI_CN) when it has one.
            assert acquired.lease.principal == principal


async def test_mutual_tls_refuses_other_certificates(
    tls_server: ServerStarter, test_pki: TestPki
) -> None:
    server = tls_server(mtls=True)
    stranger = tls_credentials(test_pki.ca, test_pki.stranger.cert, test_pki.stranger.key)
    no_certificate = tls_credentials(test_pki.ca)
    for credentials in (stranger, no_certificate):
        # A token does not stand in for the certificate the handshake needs.
        async with client(server.target, credentials, token=ALICE_TOKEN) as c:
            with pytest.raises(Unavailable):
                await c.leases.acquire("mtls/stranger", ttl=30)
    pair = test_pki.client_cn
    async with client(server.target, tls_credentials(test_pki.ca, pair.cert, pair.key)) as c:
        assert [lease async for lease in c.leases.list()] == []
