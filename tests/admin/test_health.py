"""The admin listener over real HTTP: /healthz, /readyz with failing backends, 404 and 405."""
from __future__ import annotations

import socket
import ssl

from gateway.config import load_config
from gateway.server import Gateway
from tests.admin.helpers import admin_request
from tests.conftest import write_config
from tests.s3_server import start_s3_server
from tests.webdav.test_tls import self_signed


def test_healthz_answers_200_while_the_gateway_serves(make_gateway):
    running = make_gateway(admin=True)
    answer = admin_request(running.admin_port, "GET", "/healthz")
    assert answer.status == 200
    assert answer.json() == {"status": "ok"}
    assert answer.headers["Content-Type"] == "application/json"


def test_head_of_healthz_answers_200_without_a_body(make_gateway):
    running = make_gateway(admin=True)
    answer = admin_request(running.admin_port, "HEAD", "/healthz")
    assert answer.status == 200 and answer.body == b""


def test_unknown_path_answers_404_json(make_gateway):
    running = make_gateway(admin=True)
    answer = admin_request(running.admin_port, "GET", "/nothing/here")
    assert answer.status == 404
    assert "/nothing/here" in answer.json()["error"]


def test_wrong_method_answers_405_with_allow(make_gateway):
    running = make_gateway(admin=True)
    for path in ("/healthz", "/readyz", "/metrics"):
        answer = admin_request(running.admin_port, "POST", path)
        assert answer.status == 405, path
        assert answer.headers["Allow"] == "GET, HEAD"
        assert answer.json()["allowed"] == ["GET", "HEAD"]


def test_readyz_answers_200_when_every_backend_answers(make_gateway):
    running = make_gateway(admin=True, backends={"spare": {"type": "memory"}})
    answer = admin_request(running.admin_port, "GET", "/readyz")
    assert answer.status == 200, answer.body
    assert answer.json() == {"status": "ready"}


def test_readyz_answers_503_naming_an_s3_backend_whose_server_stopped(make_gateway):
    server = start_s3_server("readyz-bucket")
    stopped = False
    try:
        table = server.backend_table(max_attempts=1, connect_timeout=2.0, read_timeout=5.0)
        running = make_gateway(admin=True, backends={"archive": table})
        assert admin_request(running.admin_port, "GET", "/readyz").status == 200
        server.stop()
        stopped = True
        answer = admin_request(running.admin_port, "GET", "/readyz")
        assert answer.status == 503, answer.body
        body = answer.json()
        assert body["status"] == "not ready"
        assert len(body["reasons"]) == 1
        assert body["reasons"][0].startswith("backend 'archive': ")
        # /healthz only says the process serves.
        assert admin_request(running.admin_port, "GET", "/healthz").status == 200
    finally:
        if not stopped:
            server.stop()


def test_readyz_answers_503_when_the_local_root_was_replaced(make_gateway):
    running = make_gateway(admin=True)
    assert admin_request(running.admin_port, "GET", "/readyz").status == 200
    # An unmounted or re-created root: the gateway still holds the old directory open.
    running.data.rename(running.data.with_name("data-moved"))
    running.data.mkdir()
    answer = admin_request(running.admin_port, "GET", "/readyz")
    assert answer.status == 503, answer.body
    (reason,) = answer.json()["reasons"]
    assert reason.startswith("backend 'local': ") and "restart the gateway" in reason
    running.data.rmdir()
    assert not running.data.exists()
    answer = admin_request(running.admin_port, "GET", "/readyz")
    assert answer.status == 503 and "cannot be reached" in answer.json()["reasons"][0]


def test_admin_listener_serves_https_with_its_certificate(make_gateway, tmp_path):
    cert, key = self_signed(tmp_path)
    running = make_gateway(admin=True, extra={"admin": {"tls_cert": str(cert), "tls_key": str(key)}})
    context = ssl.create_default_context(cafile=str(cert))
    answer = admin_request(running.admin_port, "GET", "/healthz", context=context, host="localhost")
    assert answer.status == 200


def test_stalled_tls_handshakes_do_not_hold_up_health_checks(make_gateway, tmp_path):
    # A load balancer's health check must not wait behind clients that never
    # finish their handshake (cheroot would do each one blocking, 10 s apiece).
    cert, key = self_signed(tmp_path)
    running = make_gateway(admin=True, extra={"admin": {"tls_cert": str(cert), "tls_key": str(key)}})
    context = ssl.create_default_context(cafile=str(cert))
    stalled = [socket.create_connection(("127.0.0.1", running.admin_port), timeout=30) for _ in range(3)]
    try:
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01\x00")      # the start of a TLS record, then nothing
        answer = admin_request(running.admin_port, "GET", "/healthz", context=context, host="localhost",
                               timeout=8)
        assert answer.status == 200
    finally:
        for sock in stalled:
            sock.close()


def test_admin_listener_can_be_disabled(make_gateway):
    running = make_gateway(webdav=True, admin=False)
    assert "admin" not in running.ports


def test_admin_listen_port_in_use_fails_with_the_key(tmp_path, make_gateway):
    first = make_gateway(admin=True)
    second = tmp_path / "second"
    second.mkdir()
    path = write_config(second, webdav=False, sftp=False, admin=True,
                        extra={"admin": {"listen": f"127.0.0.1:{first.admin_port}"}})
    gateway = Gateway(load_config(path))
    try:
        gateway.start()
    except Exception as exc:
        assert "[admin] listen" in str(exc)
    else:
        gateway.stop()
        raise AssertionError("a second admin listener bound a port in use")


def test_readyz_answers_503_naming_the_store_when_it_cannot_be_reached(make_gateway, postgres):
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    running = make_gateway(admin=True, extra={"store": {"url": url}})
    assert admin_request(running.admin_port, "GET", "/readyz").status == 200
    with postgres.admin() as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (database,))
    try:
        answer = admin_request(running.admin_port, "GET", "/readyz")
        assert answer.status == 503, answer.body
        assert [r for r in answer.json()["reasons"] if r.startswith("store: ")]
    finally:
        with postgres.admin() as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
