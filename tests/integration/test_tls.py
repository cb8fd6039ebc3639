"""
TLS on both sides, for real: the gateway listening with an ssl: endpoint,
and an https:// backend whose certificate is checked (a test CA that the
gateway trusts through SSL_CERT_FILE, or not).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import REPO, Process

pytestmark = pytest.mark.integration


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A test CA, and a server certificate it signed for localhost and 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("txgateway test CA")).issuer_name(_name("txgateway test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], key)
    return paths


@pytest.fixture(scope="module")
def tls_backend(certificates, tmp_path_factory):
    process = Process(
        [sys.executable, str(REPO / "tests" / "backends.py"), "0", str(certificates["cert"]), str(certificates["key"])],
        tmp_path_factory.mktemp("tls-backend"),
    )
    port = int(process.wait_for(lambda line: line.startswith("listening")).split()[1])
    yield port
    process.stop()


def tls_ini(certificates, backend_port: int) -> str:
    return (
        f"[gateway]\nlisten = ssl:{{port}}:interface=127.0.0.1:privateKey={certificates['key']}:certKey={certificates['cert']}\n"
        "[logging]\nfile = logs/combined.log\n"
        f"[service:secure]\nurl = https://localhost:{backend_port}\nretries = 0\n"
    )


def https_request(port: int, ca: Path, method: str, path: str) -> tuple[int, dict, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_an_ssl_listener_and_a_checked_https_backend(start_gateway, certificates, tls_backend):
    # The gateway trusts the test CA the way OpenSSL lets any program: SSL_CERT_FILE.
    gateway = start_gateway(tls_ini(certificates, tls_backend), env={"SSL_CERT_FILE": str(certificates["ca"])})
    status, headers, body = https_request(gateway.port, certificates["ca"], "GET", "/api/secure/echo")
    assert status == 200
    import json

    echoed = json.loads(body)
    assert echoed["headers"]["x-forwarded-proto"] == ["https"]  # the client came over TLS
    assert echoed["headers"]["host"] == [f"localhost:{tls_backend}"]
    status, _, body = https_request(gateway.port, certificates["ca"], "GET", "/health/live")
    assert status == 200


def test_a_backend_certificate_nobody_vouches_for_is_refused(start_gateway, certificates, tls_backend):
    gateway = start_gateway(tls_ini(certificates, tls_backend), env={"SSL_CERT_FILE": str(certificates["cert"].parent / "none.pem")})
    status, headers, body = https_request(gateway.port, certificates["ca"], "GET", "/api/secure/echo")
    assert status == 502
    import json

    error = json.loads(body)["error"]
    assert error["type"] == "upstream_unavailable"
    assert "certificate" in error["message"].lower() or "verify" in error["message"].lower()


def test_a_refusal_over_tls_is_the_json_shape(start_gateway, certificates, tls_backend):
    import json
    import socket

    gateway = start_gateway(tls_ini(certificates, tls_backend), env={"SSL_CERT_FILE": str(certificates["ca"])})
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except (ssl.SSLError, OSError):
                pass
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert json.loads(body)["error"]["type"] == "bad_request"
