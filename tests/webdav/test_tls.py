"""WebDAV over TLS from [webdav] tls_cert/tls_key, and the warning for Basic auth in clear text."""
from __future__ import annotations

import base64
import datetime
import http.client
import logging
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import PASSWORD


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_webdav_serves_https_with_the_configured_certificate(make_gateway, tmp_path):
    cert, key = self_signed(tmp_path)
    running = make_gateway(webdav=True, extra={"webdav": {"tls_cert": str(cert), "tls_key": str(key)}})
    running.add_user("alice")
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("localhost", running.webdav_port, context=context, timeout=30)
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    try:
        conn.request("PUT", "/secret.txt", body=b"over tls", headers={"Authorization": f"Basic {token}"})
        assert conn.getresponse().status == 201
        peer = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    assert peer == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert (running.data / "alice" / "secret.txt").read_bytes() == b"over tls"
    # Plain HTTP on the TLS port gets no WebDAV answer.
    plain = http.client.HTTPConnection("127.0.0.1", running.webdav_port, timeout=30)
    try:
        plain.request("GET", "/", headers={"Authorization": f"Basic {token}"})
        status = plain.getresponse().status
    except (http.client.HTTPException, ConnectionError):
        status = None
    finally:
        plain.close()
    assert status != 200


def test_basic_auth_without_tls_on_loopback_is_not_warned_about(make_gateway, caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.webdav"):
        make_gateway(webdav=True)
    assert "without TLS" not in caplog.text


def test_basic_auth_without_tls_off_loopback_is_warned_about(make_gateway, caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.webdav"):
        make_gateway(webdav=True, extra={"webdav": {"listen": "0.0.0.0:0"}})
    assert "without TLS" in caplog.text
