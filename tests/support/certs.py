"""Test certificates for the TLS and mutual-TLS tests, made with ``cryptography``.

:func:`make_test_pki` writes into a directory:

- ``ca.pem``: a CA that signs everything below except the stranger;
- ``server.pem`` / ``server.key``: the server's certificate, for ``localhost`` and the IP
  SAN ``127.0.0.1`` (test servers listen on ``127.0.0.1``);
- ``client-cn.pem`` / ``.key``: a client certificate with only a subject CN
  (``CLIENT_CN``), so the server's principal is that CN;
- ``client-uri.pem`` / ``.key``: a client certificate with a URI SAN (``CLIENT_URI``)
  and a CN too, so the server's principal is the URI (it wins over the CN);
- ``other-ca.pem``, ``stranger.pem`` / ``.key``: a client certificate signed by a
  different CA, which a server trusting ``ca.pem`` must refuse.

EC P-256 keys: the whole set takes a few milliseconds. Names and validity are fixed;
keys and serials are random (nothing here depends on them).

:class:`TlsServerProcess` is a :class:`ServerProcess` whose readiness check connects with
TLS (and a client certificate for mutual TLS): the plain one's plaintext check never hears
``SERVING`` from a TLS port.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.server_process import ServerProcess

CLIENT_CN = "worker-cn"
CLIENT_URI = "spiffe://tether.test/worker-a"
# The URI client's CN, which the principal must NOT be (the URI SAN wins).
CLIENT_URI_CN = "worker-uri-cn"
STRANGER_CN = "stranger"
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)

# Back-dated a day so a host clock slightly behind does not find them not yet valid.
_NOT_BEFORE = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
_NOT_AFTER = _NOT_BEFORE + datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TestPki:
    """Paths of the files :func:`make_test_pki` wrote (all PEM)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    directory: Path
    ca: Path
    server: CertPair
    client_cn: CertPair
    client_uri: CertPair
    other_ca: Path
    stranger: CertPair


@dataclass(frozen=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tether tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _builder(
    subject: x509.Name, issuer: _Issuer, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(path: Path, cn: str) -> _Issuer:
    key = _key()
    issuer = _Issuer(_name(cn), key)
    cert = (
        _builder(issuer.name, issuer, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_cert(path, cert)
    return issuer


def _make_leaf(
    directory: Path,
    stem: str,
    issuer: _Issuer,
    *,
    cn: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> CertPair:
    key = _key()
    builder = (
        _builder(_name(cn), issuer, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    _write_cert(pair.cert, builder.sign(issuer.key, hashes.SHA256()))
    _write_key(pair.key, key)
    return pair


def make_test_pki(directory: Path) -> TestPki:
    """Write the CA, server and client certificates into ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, other_ca_path = directory / "ca.pem", directory / "other-ca.pem"
    ca = _make_ca(ca_path, "tether test CA")
    other = _make_ca(other_ca_path, "another CA")
    server_sans: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVER_NAMES]
    server_sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    server = _make_leaf(
        directory,
        "server",
        ca,
        cn="localhost",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=server_sans,
    )
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    return TestPki(
        directory=directory,
        ca=ca_path,
        server=server,
        client_cn=_make_leaf(directory, "client-cn", ca, cn=CLIENT_CN, usage=client, sans=[]),
        client_uri=_make_leaf(
            directory,
            "client-uri",
            ca,
            cn=CLIENT_URI_CN,
            usage=client,
            sans=[x509.UniformResourceIdentifier(CLIENT_URI)],
        ),
        other_ca=other_ca_path,
        stranger=_make_leaf(directory, "stranger", other, cn=STRANGER_CN, usage=client, sans=[]),
    )


# --- servers that speak TLS -----------------------------------------------------------------


def channel_credentials(
    pki: TestPki, client: CertPair | None = None, *, ca: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials trusting ``ca`` (default: the test CA), presenting ``client`` if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


def server_tls_args(pki: TestPki, *, mtls: bool = False) -> list[str]:
    """``tether serve`` flags for TLS with the test server certificate (and mutual TLS)."""
    args = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    if mtls:
        args += ["--tls-client-ca", str(pki.ca)]
    return args


class TlsServerProcess(ServerProcess):
    """A server process whose readiness check connects with ``health_credentials``."""

    def __init__(
        self, db_url: str, *, health_credentials: grpc.ChannelCredentials, **kwargs: Any
    ) -> None:
        super().__init__(db_url, health_credentials=health_credentials, **kwargs)
