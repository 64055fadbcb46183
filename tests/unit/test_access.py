"""The tokens file and the role rules (pure: no server)."""

from __future__ import annotations

import hashlib

import pytest

from tether_server.auth import AuthConfig, is_loopback_listen
from tether_server.credentials import CredentialsError, parse_credentials
from tether_server.domain import errors
from tether_server.domain.access import RULES, Role, Rule, Scope, authorize, call_namespace

TOKEN = "a-token-of-sixteen-or-more"


def test_a_file_grants_roles_per_namespace_and_hashes_tokens() -> None:
    digest = hashlib.sha256(b"hashed-token-0000000").hexdigest()
    creds = parse_credentials(
        f"""
        # comment line
        token:{TOKEN}   alice   worker,operator   team-a,team-b   # trailing comment
        sha256:{digest} bob     admin             *
        cert            spiffe://x/y worker       team-a
        token:another-token-00000000 alice worker team-c
        """
    )
    assert creds.principal_of_token(TOKEN) == "alice"
    assert creds.principal_of_token("hashed-token-0000000") == "bob"
    assert creds.principal_of_token("unknown-token-000000") is None
    # Only digests are kept: the plain token is nowhere in what was parsed.
    assert TOKEN.encode() not in b"".join(creds.tokens)
    assert creds.grants_of("alice") == {
        "team-a": {Role.WORKER, Role.OPERATOR},
        "team-b": {Role.WORKER, Role.OPERATOR},
        "team-c": {Role.WORKER},
    }
    assert creds.grants_of("bob") == {"*": {Role.ADMIN}}
    assert creds.grants_of("spiffe://x/y") == {"team-a": {Role.WORKER}}
    assert creds.grants_of("nobody") == {}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (f"token:{TOKEN} alice worker", "expected 4 fields"),
        (f"token:{TOKEN} alice wizard team-a", "unknown role"),
        (f"token:{TOKEN} alice worker Team_A", "namespace"),
        ("token:short alice worker team-a", "16-4096"),
        ("sha256:abc alice worker team-a", "CREDENTIAL must be"),
        ("password:x alice worker team-a", "CREDENTIAL must be"),
        (f"token:{TOKEN} alice , team-a", "no role"),
        (f"token:{TOKEN} alice worker ,", "no namespace"),
        (f"token:{TOKEN} alice worker a\ntoken:{TOKEN} bob worker a", "already belongs"),
    ],
)
def test_a_bad_file_is_refused_with_its_line(line: str, complaint: str) -> None:
    with pytest.raises(CredentialsError) as caught:
        parse_credentials(f"# header\n{line}\n", "tokens")
    assert complaint in str(caught.value)
    # The line it is about: the last one of the snippet (after a header line).
    assert f"tokens:{1 + line.count(chr(10)) + 1}:" in str(caught.value)


def test_roles_are_ranked_and_namespaced() -> None:
    worker = {"team-a": frozenset({Role.WORKER})}
    operator_everywhere = {"*": frozenset({Role.OPERATOR})}
    authorize(
        "w",
        worker,
        "/tether.v1.LeaseService/Acquire",
        RULES.get("/tether.v1.LeaseService/Acquire"),
        "team-a",
    )
    with pytest.raises(errors.NamespaceForbidden):
        authorize(
            "w",
            worker,
            "/tether.v1.LeaseService/Acquire",
            RULES.get("/tether.v1.LeaseService/Acquire"),
            "team-b",
        )
    with pytest.raises(errors.RoleRequired) as caught:
        authorize(
            "w",
            worker,
            "/tether.v1.SagaService/RedriveSaga",
            RULES.get("/tether.v1.SagaService/RedriveSaga"),
            "team-a",
        )
    assert caught.value.metadata["required_role"] == "operator"
    with pytest.raises(errors.AdminRequired):
        authorize(
            "w",
            worker,
            "/tether.v1.LeaseService/Revoke",
            RULES.get("/tether.v1.LeaseService/Revoke"),
            "team-a",
        )
    # A deployment-wide call needs the role in "*".
    with pytest.raises(errors.NamespaceForbidden):
        authorize(
            "w",
            worker,
            "/tether.v1.SweepService/ListSweepReports",
            RULES.get("/tether.v1.SweepService/ListSweepReports"),
            None,
        )
    authorize(
        "o",
        operator_everywhere,
        "/tether.v1.SweepService/ListSweepReports",
        RULES.get("/tether.v1.SweepService/ListSweepReports"),
        None,
    )
    authorize(
        "o",
        operator_everywhere,
        "/tether.v1.SagaService/CreateSaga",
        RULES.get("/tether.v1.SagaService/CreateSaga"),
        "any-namespace",
    )
    with pytest.raises(errors.RoleRequired):
        authorize(
            "x",
            worker,
            "/tether.v1.LeaseService/NoSuchMethod",
            RULES.get("/tether.v1.LeaseService/NoSuchMethod"),
            "team-a",
        )


def test_which_namespace_a_call_is_judged_in() -> None:
    assert call_namespace(Rule(Role.WORKER), "", "default") == "default"
    assert call_namespace(Rule(Role.WORKER), "team-a", "default") == "team-a"
    assert call_namespace(Rule(Role.ADMIN, Scope.GLOBAL), "team-a", "default") is None
    either = Rule(Role.ADMIN, Scope.NAMESPACE_OR_GLOBAL)
    assert call_namespace(either, "", "default") is None
    assert call_namespace(either, "team-a", "default") == "team-a"
    assert RULES["/tether.v1.SweepService/RunSweep"] == either


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/tether.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:50051", False),
        ("tether.example.com:443", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback_listen(listen) is loopback


def test_anonymous_serving_is_loopback_only_unless_asked() -> None:
    AuthConfig().check("127.0.0.1:50051")
    with pytest.raises(ValueError, match="refusing to serve anonymous callers"):
        AuthConfig().check("0.0.0.0:50051")
    AuthConfig(insecure_allow_anonymous=True).check("0.0.0.0:50051")
    AuthConfig(tokens_file="tokens").check("0.0.0.0:50051")
    with pytest.raises(ValueError, match="go together"):
        AuthConfig(tls_cert="c.pem").check("127.0.0.1:1")
    with pytest.raises(ValueError, match="needs --tls-cert"):
        AuthConfig(tls_client_ca="ca.pem").check("127.0.0.1:1")
