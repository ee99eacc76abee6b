"""The gateway behind HAProxy (send-proxy-v2): the client's own address reaches bans, audit lines and sessions.

Clients connect from 127.0.0.2, HAProxy reaches the gateway from 127.0.0.1,
and only 127.0.0.1 is a trusted proxy: whatever the gateway records as
127.0.0.2 it can only have read from the PROXY header.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from gateway.config import Listen, load_config
from gateway.server import Gateway
from tests.admin.helpers import admin_request, api_request
from tests.conftest import PASSWORD, RunningGateway, wait_for, write_config
from tests.haproxy import CLIENT_IP, HAProxy, connect_from, needs_haproxy, run_example, run_haproxy
from tests.sftp.helpers import OpenSSH, copy_host_keys, known_hosts
from tests.test_proxy_protocol import v2_header
from tests.webdav.conftest import read_until_closed
from tests.webdav.test_litmus import assert_litmus_passes
from tests.webdav.test_tls import self_signed

REPO = Path(__file__).resolve().parent.parent
PROXY = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}


@dataclass
class Proxied:
    """A gateway that takes PROXY headers from 127.0.0.1, and HAProxy in front of it."""

    gateway: RunningGateway
    haproxy: HAProxy

    @property
    def webdav_port(self) -> int:
        return self.haproxy.ports["webdav"]

    @property
    def sftp_port(self) -> int:
        return self.haproxy.ports["sftp"]


@contextmanager
def proxied_gateway(tmp: Path, host_key_dir: Path, **webdav: object) -> Iterator[RunningGateway]:
    """A gateway serving WebDAV and SFTP with proxy_protocol on, banning after 3 failed logins."""
    path = write_config(tmp, extra={"webdav": {**PROXY, **webdav}, "sftp": PROXY,
                                    "defender": {"max_failures": 3, "ban_time": 600}})
    copy_host_keys(host_key_dir, tmp / "state")
    gateway = Gateway(load_config(path))
    gateway.start()
    try:
        running = RunningGateway(gateway, path, tmp / "data")
        for frontend in gateway.frontends:
            running.ports[frontend.name] = frontend.address[1]
        running.add_user("alice")
        yield running
    finally:
        gateway.stop()


@pytest.fixture
def gateway(tmp_path, host_key_dir) -> Iterator[RunningGateway]:
    with proxied_gateway(tmp_path, host_key_dir) as running:
        yield running


@pytest.fixture
def proxied(gateway, tmp_path) -> Iterator[Proxied]:
    with run_haproxy(tmp_path / "haproxy", {"webdav": [gateway.webdav_port],
                                            "sftp": [gateway.sftp_port]}) as haproxy:
        yield Proxied(gateway, haproxy)


def dav_request(port: int, method: str, path: str, *, source: str = CLIENT_IP, body: bytes | None = None,
                user: str = "alice", password: str = PASSWORD) -> int:
    """One request from `source` (alice by default); returns the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Basic {token}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@contextmanager
def ssh_from(source: str, port: int, user: str = "alice",
             password: str = PASSWORD) -> Iterator[paramiko.SFTPClient]:
    """A paramiko SFTP session over a socket bound to `source`."""
    transport = paramiko.Transport(connect_from(source, port))
    try:
        transport.connect(username=user, password=password)
        client = paramiko.SFTPClient.from_transport(transport)
        try:
            yield client
        finally:
            client.close()
    finally:
        transport.close()


def audit_lines(caplog, op: str) -> list[dict]:
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    return [record for record in records if record["op"] == op]


@needs_haproxy
def test_webdav_upload_through_haproxy_is_audited_with_the_client_address(proxied, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        assert dav_request(proxied.webdav_port, "PUT", "/via-haproxy.txt", body=b"hello") == 201
    (line,) = audit_lines(caplog, "upload")
    assert line["ip"] == "127.0.0.2"
    assert (proxied.gateway.data / "alice" / "via-haproxy.txt").read_bytes() == b"hello"


@needs_haproxy
def test_https_passes_through_haproxy_and_the_gateway_reads_the_header_before_tls(tmp_path, host_key_dir, caplog):
    cert, key = self_signed(tmp_path)
    (tmp_path / "node").mkdir()
    with proxied_gateway(tmp_path / "node", host_key_dir, tls_cert=str(cert), tls_key=str(key)) as node, \
            run_haproxy(tmp_path / "haproxy", {"webdav": [node.webdav_port]}) as haproxy:
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("localhost", haproxy.ports["webdav"], context=context, timeout=30,
                                           source_address=(CLIENT_IP, 0))
        token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        try:
            with caplog.at_level(logging.INFO, logger="gateway.audit"):
                conn.request("PUT", "/tls.txt", body=b"tls end to end", headers={"Authorization": f"Basic {token}"})
                assert conn.getresponse().status == 201
        finally:
            conn.close()
        assert (node.data / "alice" / "tls.txt").read_bytes() == b"tls end to end"
    (line,) = audit_lines(caplog, "upload")
    assert line["ip"] == "127.0.0.2"


@needs_haproxy
def test_failed_webdav_logins_through_haproxy_ban_the_client_not_the_proxy(proxied):
    defender = proxied.gateway.gateway.defender
    for _ in range(3):
        assert dav_request(proxied.webdav_port, "PROPFIND", "/", user="mallory", password="guess") == 401
    assert defender.is_banned(CLIENT_IP)
    assert not defender.is_banned("127.0.0.1")
    assert dav_request(proxied.webdav_port, "PUT", "/x.txt", body=b"x") == 403
    # Everyone else behind the same proxy still gets in.
    assert dav_request(proxied.webdav_port, "PUT", "/x.txt", body=b"x", source="127.0.0.1") == 201


@needs_haproxy
def test_failed_sftp_logins_through_haproxy_ban_the_client_not_the_proxy(proxied):
    for _ in range(3):
        with pytest.raises(paramiko.AuthenticationException):
            with ssh_from(CLIENT_IP, proxied.sftp_port, user="mallory", password="guess"):
                pass
    assert proxied.gateway.gateway.defender.is_banned(CLIENT_IP)
    with pytest.raises(paramiko.SSHException):
        with ssh_from(CLIENT_IP, proxied.sftp_port):
            pass
    with ssh_from("127.0.0.1", proxied.sftp_port) as sftp:
        assert sftp.listdir("/") == []


@needs_haproxy
def test_sftp_session_through_haproxy_names_the_client_address(proxied, caplog):
    sftp_frontend = next(f for f in proxied.gateway.gateway.frontends if f.name == "sftp")
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        with ssh_from(CLIENT_IP, proxied.sftp_port) as sftp:
            with sftp.open("/paramiko.txt", "wb") as handle:
                handle.write(b"through haproxy")
            assert [login.ip for login in sftp_frontend._connections] == [CLIENT_IP]
    (line,) = audit_lines(caplog, "upload")
    assert line["protocol"] == "sftp" and line["ip"] == "127.0.0.2"
    assert (proxied.gateway.data / "alice" / "paramiko.txt").read_bytes() == b"through haproxy"


@needs_haproxy
@pytest.mark.tools("sftp")
def test_openssh_sftp_through_haproxy_uploads_and_is_audited_with_the_client_address(
        proxied, tmp_path, host_key_dir, client_key, caplog):
    proxied.gateway.gateway.users.remove("alice")
    proxied.gateway.add_user("alice", keys=(client_key.public_line,))
    port = proxied.sftp_port
    openssh = OpenSSH(port, tmp_path, known_hosts(tmp_path, port, host_key_dir), client_key)
    source = tmp_path / "openssh.txt"
    source.write_text("uploaded with OpenSSH sftp\n")
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        result = openssh.sftp_batch(f"put {source} /openssh.txt\n", extra=("-o", f"BindAddress={CLIENT_IP}"))
    assert result.returncode == 0, result.stderr
    assert (proxied.gateway.data / "alice" / "openssh.txt").read_text() == "uploaded with OpenSSH sftp\n"
    (line,) = audit_lines(caplog, "upload")
    assert line["ip"] == "127.0.0.2"


@needs_haproxy
@pytest.mark.tools("litmus")
@pytest.mark.client
def test_litmus_through_haproxy_passes_every_suite(proxied, tmp_path):
    assert_litmus_passes(proxied.webdav_port, "alice", tmp_path)


@pytest.mark.parametrize("protocol", ["webdav", "sftp"])
def test_direct_connection_from_an_untrusted_address_is_refused(gateway, protocol, caplog):
    hello = b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n" if protocol == "webdav" else b"SSH-2.0-OpenSSH_9.2\r\n"
    with caplog.at_level(logging.WARNING, logger="gateway.proxy_protocol"):
        with connect_from(CLIENT_IP, gateway.ports[protocol]) as sock:
            sock.sendall(hello)
            assert read_until_closed(sock) == b""
    assert f"{protocol} connection from 127.0.0.2 refused" in caplog.text


@pytest.mark.parametrize("protocol", ["webdav", "sftp"])
def test_forged_proxy_header_from_an_untrusted_peer_is_refused(gateway, protocol, caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.proxy_protocol"):
        with connect_from(CLIENT_IP, gateway.ports[protocol]) as sock:
            sock.sendall(v2_header("198.51.100.1", 4000) + b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_closed(sock) == b""
    assert "127.0.0.2" in caplog.text and "trusted_proxies" in caplog.text


def test_trusted_peer_sets_the_address_that_failed_logins_count_against(gateway):
    # The same header from the trusted proxy is believed: the named address gets banned.
    request = (b"PROPFIND / HTTP/1.1\r\nHost: x\r\nDepth: 0\r\nConnection: close\r\n"
               b"Authorization: Basic " + base64.b64encode(b"alice:wrong") + b"\r\n\r\n")
    for _ in range(3):
        with connect_from("127.0.0.1", gateway.webdav_port) as sock:
            sock.sendall(v2_header("198.51.100.1", 4000) + request)
            assert read_until_closed(sock).startswith(b"HTTP/1.1 401")
    assert gateway.gateway.defender.is_banned("198.51.100.1")
    assert not gateway.gateway.defender.is_banned("127.0.0.1")


def test_trusted_peer_without_a_header_is_refused(gateway):
    with connect_from("127.0.0.1", gateway.webdav_port) as sock:
        sock.sendall(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(sock) == b""


class ReadyStub(ThreadingHTTPServer):
    """Stands in for a node's admin listener: GET /readyz answers 200 while `ready`, else 503."""

    ready = True

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/readyz" and self.server.ready
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass


@contextmanager
def ready_stub() -> Iterator[ReadyStub]:
    server = ReadyStub(("127.0.0.1", 0), ReadyStub.Handler)
    thread = threading.Thread(target=server.serve_forever, name="readyz-stub")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dav_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(CLIENT_IP, 0))
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    try:
        conn.request("GET", path, headers={"Authorization": f"Basic {token}"})
        return conn.getresponse().read()
    finally:
        conn.close()


@needs_haproxy
def test_example_config_spreads_two_nodes_and_takes_out_one_not_ready(tmp_path, host_key_dir):
    with ExitStack() as stack:
        nodes, stubs = [], []
        for number in (1, 2):
            (tmp_path / f"node{number}").mkdir()
            node = stack.enter_context(proxied_gateway(tmp_path / f"node{number}", host_key_dir))
            (node.data / "alice").mkdir(parents=True, exist_ok=True)
            (node.data / "alice" / "node.txt").write_text(f"node{number}")
            nodes.append(node)
            stubs.append(stack.enter_context(ready_stub()))
        haproxy = stack.enter_context(run_example(tmp_path / "haproxy", [
            {"webdav": node.webdav_port, "sftp": node.sftp_port, "admin": stub.server_address[1]}
            for node, stub in zip(nodes, stubs)]))
        sftp_port, webdav_port = haproxy.ports["sftp"], haproxy.ports["webdav"]
        # leastconn: a second session while the first is open goes to the other node.
        with ssh_from(CLIENT_IP, sftp_port) as first, ssh_from(CLIENT_IP, sftp_port) as second:
            seen = sorted(client.open("/node.txt").read() for client in (first, second))
        assert seen == [b"node1", b"node2"]
        for node in nodes:
            assert not node.gateway.defender.is_banned(CLIENT_IP)
        stubs[0].ready = False
        wait_for(lambda: all(dav_get(webdav_port, "/node.txt") == b"node2" for _ in range(4)),
                 "haproxy to take node1 out after its /readyz fails")
        with ssh_from(CLIENT_IP, sftp_port) as first, ssh_from(CLIENT_IP, sftp_port) as second:
            assert [client.open("/node.txt").read() for client in (first, second)] == [b"node2", b"node2"]


@needs_haproxy
def test_example_haproxy_config_is_valid():
    result = subprocess.run(["haproxy", "-c", "-f", str(REPO / "config" / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def example_node_config() -> dict:
    """The node config that config/haproxy.cfg's header comment gives, as TOML."""
    lines = (REPO / "config" / "haproxy.cfg").read_text().split("On every node:\n", 1)[1].splitlines()
    toml = []
    for line in lines:
        if line.startswith("#   "):
            toml.append(line[4:])
        elif line == "#":
            toml.append("")
        else:
            break   # the prose after the block
    return tomllib.loads("\n".join(toml))


def test_the_example_node_config_keeps_the_admin_api_off_the_network_in_plain_text(make_gateway):
    admin = example_node_config()["admin"]
    if "tls_cert" not in admin and not Listen.parse(admin["listen"]).is_loopback:
        assert admin.get("api", True) is False, admin
    # The example's [admin] as a node runs it (on a free loopback port): HAProxy's check
    # answers, the REST API does not exist.
    running = make_gateway(admin=True, extra={"admin": {**admin, "listen": "127.0.0.1:0"}})
    token = running.gateway.store.create_token("provisioning")
    assert admin_request(running.admin_port, "GET", "/readyz").status == 200
    assert api_request(running.admin_port, "GET", "/users", token=token).status == 404
