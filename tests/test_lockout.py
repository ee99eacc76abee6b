"""Failed logins ban the address they come from, never the user.

The gateway listens on 127.0.0.1; clients bind their socket's source address
to another loopback address (Linux accepts any 127.x source) to play a second
machine.
"""
from __future__ import annotations

import base64
import http.client
import socket
from collections.abc import Iterator

import paramiko
import pytest

from tests.conftest import PASSWORD, RunningGateway
from tests.sftp.helpers import start_gateway

ATTACKER = "127.0.0.2"


@pytest.fixture
def both(tmp_path, host_key_dir, client_key) -> Iterator[RunningGateway]:
    # A tiny failure delay: the slow-down runs, the test does not wait seconds for it.
    running = start_gateway(tmp_path, host_key_dir,
                            extra={"defender": {"failure_delay": 0.01, "failure_delay_max": 0.05}})
    try:
        running.add_user("alice", keys=(client_key.public_line,))
        yield running
    finally:
        running.gateway.stop()


def webdav_status(port: int, password: str, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        token = base64.b64encode(f"alice:{password}".encode()).decode()
        conn.request("PROPFIND", "/", headers={"Depth": "0", "Authorization": f"Basic {token}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def sftp_login(port: int, *, source: str = "127.0.0.1", password: str | None = None,
               pkey: paramiko.PKey | None = None) -> list[str]:
    """Log in as alice and list her home; raises paramiko's error when refused."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    transport = paramiko.Transport(sock)
    try:
        transport.connect(username="alice", password=password, pkey=pkey)
        client = paramiko.SFTPClient.from_transport(transport)
        try:
            return client.listdir("/")
        finally:
            client.close()
    finally:
        transport.close()
        sock.close()


def test_failures_from_one_address_ban_it_on_both_protocols_but_never_lock_alice_out(both, client_key):
    limit = both.gateway.config.defender.max_failures
    for i in range(limit // 2):
        assert webdav_status(both.webdav_port, f"wrong {i}", ATTACKER) == 401
    for i in range(limit - limit // 2):
        with pytest.raises(paramiko.AuthenticationException):
            sftp_login(both.sftp_port, source=ATTACKER, password=f"wrong again {i}")

    # The attacker's address is banned everywhere, even with the right password.
    assert webdav_status(both.webdav_port, PASSWORD, ATTACKER) == 403
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        sftp_login(both.sftp_port, source=ATTACKER, password=PASSWORD)

    # Alice, from her own clean address, logs in every way.
    assert webdav_status(both.webdav_port, PASSWORD) == 207
    assert sftp_login(both.sftp_port, password=PASSWORD) == []
    assert sftp_login(both.sftp_port, pkey=client_key.pkey()) == []


def test_a_key_login_is_never_refused_for_a_users_failed_passwords(both, client_key):
    # Another address that failed once (not banned) still logs in with alice's key
    # although alice has more failures than the ban limit.
    for i in range(both.gateway.config.defender.max_failures + 2):
        both.gateway.auth.record_failure("alice", f"10.9.0.{i}")
    assert webdav_status(both.webdav_port, "wrong", "127.0.0.3") == 401
    assert sftp_login(both.sftp_port, source="127.0.0.3", pkey=client_key.pkey()) == []
