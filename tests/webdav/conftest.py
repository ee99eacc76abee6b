"""WebDAV fixtures: a running gateway with WebDAV on, and a small HTTP client for it."""
from __future__ import annotations

import base64
import http.client
import socket
import ssl
from dataclasses import dataclass

import pytest

from tests.conftest import PASSWORD, RunningGateway
from tests.webdav.test_tls import self_signed


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class DavClient:
    """One user's HTTP client (http.client, a fresh connection per request)."""

    def __init__(self, port: int, user: str | None, password: str = PASSWORD) -> None:
        self.port = port
        self.auth = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.auth = f"Basic {token}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            all_headers = dict(headers or {})
            if self.auth and "Authorization" not in all_headers:
                all_headers["Authorization"] = self.auth
            conn.request(method, path, body=body, headers=all_headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def put(self, path: str, data: bytes, **headers: str) -> Response:
        return self.request("PUT", path, data, headers)

    def get(self, path: str, **headers: str) -> Response:
        return self.request("GET", path, None, headers)

    def propfind(self, path: str, depth: str = "1", body: bytes | None = None) -> Response:
        return self.request("PROPFIND", path, body, {"Depth": depth,
                                                     "Content-Type": "application/xml"})

    def proppatch(self, path: str, body: bytes) -> Response:
        return self.request("PROPPATCH", path, body, {"Content-Type": "application/xml"})


@pytest.fixture
def dav(make_gateway):
    """A gateway with WebDAV only and users alice and bob (full rights in their homes)."""
    running: RunningGateway = make_gateway(webdav=True)
    running.add_user("alice")
    running.add_user("bob")
    return running


@pytest.fixture
def alice(dav) -> DavClient:
    return DavClient(dav.webdav_port, "alice")


@pytest.fixture
def bob(dav) -> DavClient:
    return DavClient(dav.webdav_port, "bob")


LOCK_BODY = (b'<?xml version="1.0" encoding="utf-8"?>'
             b'<D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
             b'<D:locktype><D:write/></D:locktype><D:owner>tests</D:owner></D:lockinfo>')


def proppatch_body(name: str, ns: str, value: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="{ns}">'
            f'<D:set><D:prop><Z:{name}>{value}</Z:{name}></D:prop></D:set></D:propertyupdate>').encode()


def read_head(sock: socket.socket) -> bytes:
    """A response's status line and headers, read from a raw socket (what arrives until the blank line)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_until_closed(sock) -> bytes:
    """Everything a raw socket receives until the server closes (or resets) it."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.fixture
def tls_dav(make_gateway, tmp_path):
    """A gateway serving WebDAV over TLS only, user alice, and a client context trusting it."""
    cert, key = self_signed(tmp_path)
    running = make_gateway(webdav=True, extra={"webdav": {"tls_cert": str(cert), "tls_key": str(key)}})
    running.add_user("alice")
    running.context = ssl.create_default_context(cafile=str(cert))
    return running


def tls_socket(running) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", running.webdav_port), timeout=60)
    return running.context.wrap_socket(raw, server_hostname="localhost")


def tls_read_until_closed(sock: ssl.SSLSocket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ssl.SSLError, ConnectionError):
        pass
    return b"".join(chunks)
