"""``tether lease ...`` with ``--tls``, ``--ca-file``, ``--cert``/``--key`` and ``--token``
against a real server over TLS and mutual TLS, on both backends.

The server is started with the test certificates (``test_pki``) and a tokens file written
here; the CLI runs as ``python -m tether_client.cli``, with none of the developer's
``TETHER_*`` settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cli_support import Cli
from tests.support.certs import (
    CLIENT_URI,
    TestPki,
    TlsServerProcess,
    channel_credentials,
    server_tls_args,
)

pytestmark = pytest.mark.e2e

TOKEN = "ci-runner-token-0123456789"
TOKENS = f"""\
sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}  ci-runner  worker  default
cert  {CLIENT_URI}  worker  default
"""
# `tether lease ...` in a clean environment (cli_support.CLI_ENV dropped), plus ``env=``.
LEASE = Cli("lease")
EXIT_UNAVAILABLE = 69


def start_server(
    db_url: str, pki: TestPki, tmp_path: Path, *, mtls: bool
) -> Iterator[TlsServerProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    server = TlsServerProcess(
        db_url,
        health_credentials=channel_credentials(pki, pki.client_uri if mtls else None),
        extra_args=[*server_tls_args(pki, mtls=mtls), "--auth-tokens", str(tokens)],
        log_dir=tmp_path / "logs",
    )
    with server:
        yield server


@pytest.fixture
def tls_server(db_url: str, test_pki: TestPki, tmp_path: Path) -> Iterator[TlsServerProcess]:
    yield from start_server(db_url, test_pki, tmp_path, mtls=False)


@pytest.fixture
def mtls_server(db_url: str, test_pki: TestPki, tmp_path: Path) -> Iterator[TlsServerProcess]:
    yield from start_server(db_url, test_pki, tmp_path, mtls=True)


def test_acquire_and_renew_with_tls_and_a_token(
    tls_server: TlsServerProcess, test_pki: TestPki
) -> None:
    tls = ("--tls", "--ca-file", str(test_pki.ca), "--token", TOKEN)
    acquired = LEASE.ok_json(tls_server.target, *tls, "acquire", "ci/build", "--ttl", "30s")
    lease = acquired["lease"]
    assert lease["principal"] == "ci-runner"
    # renew's own --token is the fencing token; the bearer token is the group's.
    renewed = LEASE.ok_json(
        tls_server.target,
        *tls,
        "renew",
        lease["lease_id"],
        "--token",
        str(lease["fencing_token"]),
    )
    assert renewed["lease_id"] == lease["lease_id"]


def test_connection_options_after_the_command_and_from_files(
    tls_server: TlsServerProcess, test_pki: TestPki, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    acquired = LEASE.ok_json(
        tls_server.target,
        "acquire",
        "ci/files",
        "--ttl",
        "30s",
        "--ca-file",  # implies --tls
        str(test_pki.ca),
        "--token-file",
        str(token_file),
    )
    assert acquired["lease"]["principal"] == "ci-runner"
    env = {"TETHER_TLS": "1", "TETHER_CA_FILE": str(test_pki.ca), "TETHER_TOKEN": TOKEN}
    got = LEASE.ok_json(tls_server.target, "get", "ci/files", env=env)
    assert got["lease_id"] == acquired["lease"]["lease_id"]


def test_a_wrong_or_missing_token_is_refused(
    tls_server: TlsServerProcess, test_pki: TestPki
) -> None:
    tls = ("--ca-file", str(test_pki.ca))
    wrong = LEASE(tls_server.target, *tls, "--token", "wrong-token-0123456789", "list")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("tether: INVALID_CREDENTIALS: "), wrong.stderr
    missing = LEASE(tls_server.target, *tls, "list")
    assert missing.returncode == 1
    assert missing.stderr.startswith("tether: CREDENTIALS_REQUIRED: "), missing.stderr


def test_plaintext_to_a_tls_port_fails(tls_server: TlsServerProcess) -> None:
    # Loopback: the token may go in plaintext, but the TLS port does not speak it. No
    # connection within --timeout: exit 69, and a hint.
    result = LEASE(tls_server.target, "--timeout", "2s", "--token", TOKEN, "list")
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    lines = result.stderr.splitlines()
    failure = f"tether: UNAVAILABLE: no connection to {tls_server.target} within 2s: "
    assert failure in result.stderr
    assert lines[-1].startswith("hint: the server may expect TLS: add --tls"), result.stderr


def test_mutual_tls_with_a_client_certificate(
    mtls_server: TlsServerProcess, test_pki: TestPki
) -> None:
    pair = test_pki.client_uri
    mtls = ("--ca-file", str(test_pki.ca), "--cert", str(pair.cert), "--key", str(pair.key))
    acquired = LEASE.ok_json(mtls_server.target, *mtls, "acquire", "agents/a", "--ttl", "30s")
    assert acquired["lease"]["principal"] == CLIENT_URI
    stranger = test_pki.stranger
    refused = LEASE(
        mtls_server.target,
        "--timeout",
        "2s",
        "--ca-file",
        str(test_pki.ca),
        "--cert",
        str(stranger.cert),
        "--key",
        str(stranger.key),
        "list",
    )
    # The server ends the handshake: no connection, exit 69, and what to suspect.
    assert refused.returncode == EXIT_UNAVAILABLE, refused.stderr
    assert "tether: UNAVAILABLE: no connection to " in refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "hint: the server ended the TLS handshake: it may not trust the client certificate "
        f"in {stranger.cert}"
    )
