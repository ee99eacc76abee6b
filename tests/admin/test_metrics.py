"""/metrics after real transfers and logins over SFTP (paramiko) and WebDAV (http.client)."""
from __future__ import annotations

import base64
import http.client
import os

import paramiko
import pytest

from tests.admin.helpers import scrape
from tests.conftest import PASSWORD, wait_for
from tests.sftp.helpers import sftp_client

MiB = 1024 * 1024


def webdav(port: int, method: str, path: str, body: bytes | None = None, user: str = "alice",
           password: str = PASSWORD) -> tuple[int, bytes]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Basic {token}"}
        if method == "PROPFIND":
            headers["Depth"] = "1"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_uploads_and_downloads_move_bytes_and_operations_by_protocol(full_gateway):
    running = full_gateway
    payload = os.urandom(MiB)
    before = scrape(running.admin_port)
    with sftp_client(running.sftp_port) as sftp:
        with sftp.open("/via-sftp.bin", "wb") as f:
            f.write(payload)
        with sftp.open("/via-sftp.bin", "rb") as f:
            assert f.read() == payload
    assert webdav(running.webdav_port, "PUT", "/via-webdav.bin", payload)[0] == 201
    status, body = webdav(running.webdav_port, "GET", "/via-webdav.bin")
    assert status == 200 and body == payload
    # The server closes a download's stream just after it sent the last byte.
    wait_for(lambda: scrape(running.admin_port).value("gateway_transfer_bytes_total", protocol="webdav",
                                                      direction="out")
             >= before.value("gateway_transfer_bytes_total", protocol="webdav", direction="out") + MiB,
             "the WebDAV download to be counted")
    after = scrape(running.admin_port)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    for protocol in ("sftp", "webdav"):
        assert moved("gateway_transfer_bytes_total", protocol=protocol, direction="in") == MiB
        assert moved("gateway_transfer_bytes_total", protocol=protocol, direction="out") == MiB
        assert moved("gateway_operations_total", protocol=protocol, op="upload", result="ok") == 1
        assert moved("gateway_operations_total", protocol=protocol, op="download", result="ok") == 1
        for direction in ("in", "out"):
            assert moved("gateway_transfer_duration_seconds_count", protocol=protocol,
                         direction=direction) == 1
        assert moved("gateway_uploads_in_flight", protocol=protocol) == 0
    # Every backend call is timed under the backend's name.
    for op in ("open_write", "commit", "open_read", "stat"):
        assert moved("gateway_backend_request_duration_seconds_count", backend="local", op=op) >= 2, op


def test_a_failed_operation_is_counted_with_its_error(full_gateway):
    running = full_gateway
    (running.data / "reader").mkdir()
    (running.data / "reader" / "keep.txt").write_bytes(b"kept")
    before = scrape(running.admin_port)
    assert webdav(running.webdav_port, "DELETE", "/keep.txt", user="reader")[0] == 403
    with sftp_client(running.sftp_port, user="reader") as sftp:
        with pytest.raises(PermissionError):
            sftp.remove("/keep.txt")
    with sftp_client(running.sftp_port) as sftp:
        with pytest.raises(FileNotFoundError):
            sftp.remove("/missing.txt")
    after = scrape(running.admin_port)

    def moved(**labels: str) -> float:
        return after.value("gateway_operations_total", **labels) - \
            before.value("gateway_operations_total", **labels)

    for protocol in ("sftp", "webdav"):
        assert moved(protocol=protocol, op="delete", result="permission_denied") == 1, protocol
    assert moved(protocol="sftp", op="delete", result="not_found") == 1
    assert (running.data / "reader" / "keep.txt").read_bytes() == b"kept"


def test_wrong_passwords_count_failed_logins_and_a_key_an_ok_one(full_gateway, client_key):
    running = full_gateway
    before = scrape(running.admin_port)
    assert webdav(running.webdav_port, "PROPFIND", "/", password="wrong password")[0] == 401
    with pytest.raises(paramiko.AuthenticationException):
        with sftp_client(running.sftp_port, password="wrong password"):
            pass
    with sftp_client(running.sftp_port, pkey=client_key.pkey()) as sftp:
        sftp.listdir("/")
    # A cached WebDAV credential is one login however many requests carry it.
    for _ in range(3):
        assert webdav(running.webdav_port, "PROPFIND", "/")[0] == 207
    after = scrape(running.admin_port)

    def moved(**labels: str) -> float:
        return after.value("gateway_logins_total", **labels) - before.value("gateway_logins_total", **labels)

    assert moved(protocol="webdav", method="basic", result="failed") == 1
    assert moved(protocol="sftp", method="password", result="failed") == 1
    assert moved(protocol="sftp", method="publickey", result="ok") == 1
    assert moved(protocol="sftp", method="publickey", result="failed") == 0
    assert moved(protocol="webdav", method="basic", result="ok") == 1


def test_open_connections_and_uploads_in_flight_are_gauges(full_gateway):
    running = full_gateway
    base = scrape(running.admin_port)
    accepted = base.value("gateway_connections_total", protocol="sftp")
    with sftp_client(running.sftp_port) as sftp:
        wait_for(lambda: scrape(running.admin_port).value("gateway_connections_open", protocol="sftp")
                 == base.value("gateway_connections_open", protocol="sftp") + 1, "an open connection")
        f = sftp.open("/pending.bin", "wb")
        f.write(b"x" * 1000)
        f.flush()
        in_flight = base.value("gateway_uploads_in_flight", protocol="sftp")
        wait_for(lambda: scrape(running.admin_port).value("gateway_uploads_in_flight", protocol="sftp")
                 == in_flight + 1, "an upload in flight")
        f.close()
        assert scrape(running.admin_port).value("gateway_uploads_in_flight", protocol="sftp") == in_flight
    wait_for(lambda: scrape(running.admin_port).value("gateway_connections_open", protocol="sftp")
             == base.value("gateway_connections_open", protocol="sftp"), "the connection to close")
    assert scrape(running.admin_port).value("gateway_connections_total", protocol="sftp") == accepted + 1


def test_webdav_connections_are_counted(full_gateway):
    running = full_gateway
    base = scrape(running.admin_port)
    before = base.value("gateway_connections_total", protocol="webdav")
    for _ in range(2):
        assert webdav(running.webdav_port, "PROPFIND", "/")[0] == 207
    wait_for(lambda: scrape(running.admin_port).value("gateway_connections_total", protocol="webdav")
             == before + 2, "two accepted connections")
    wait_for(lambda: scrape(running.admin_port).value("gateway_connections_open", protocol="webdav")
             == base.value("gateway_connections_open", protocol="webdav"),
             "closed connections to leave the gauge")


def test_a_ban_is_counted(make_gateway):
    running = make_gateway(webdav=True, admin=True, extra={"defender": {"max_failures": 2}})
    running.add_user("alice")
    before = scrape(running.admin_port).value("gateway_bans_total")
    for _ in range(2):
        assert webdav(running.webdav_port, "PROPFIND", "/", password="wrong password")[0] == 401
    assert webdav(running.webdav_port, "PROPFIND", "/")[0] == 403
    assert scrape(running.admin_port).value("gateway_bans_total") >= before + 1
