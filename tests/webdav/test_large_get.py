"""Large GETs of local files: after the first block the body goes out with sendfile on plain HTTP,
exact for whole files and ranges, counted, and never more than its Content-Length."""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess

import pytest
from prometheus_client import REGISTRY

from tests.conftest import PASSWORD
from tests.webdav.conftest import tls_read_until_closed, tls_socket
from tests.webdav.test_large_put import MiB, _auth

# Not a multiple of the 1 MiB block, so the last sendfile step is a short one.
SIZE = 20 * MiB + 4321


@pytest.fixture
def sendfile_bytes(monkeypatch) -> list[int]:
    """What os.sendfile sent, call by call, in this process (the gateway runs in it)."""
    sent: list[int] = []
    original = os.sendfile

    def counting(*args, **kwargs):
        count = original(*args, **kwargs)
        sent.append(count)
        return count

    monkeypatch.setattr(os, "sendfile", counting)
    return sent


def _bytes_out() -> float:
    return REGISTRY.get_sample_value("gateway_transfer_bytes_total",
                                     {"protocol": "webdav", "direction": "out"}) or 0.0


def _store(dav, name: str, data: bytes) -> None:
    home = dav.data / "alice"
    home.mkdir(exist_ok=True)
    (home / name).write_bytes(data)


def test_large_get_sends_the_rest_with_sendfile_exactly_and_counts_it(dav, sendfile_bytes):
    data = os.urandom(SIZE)
    _store(dav, "big.bin", data)
    before = _bytes_out()
    conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=60)
    try:
        conn.request("GET", "/big.bin", headers={"Authorization": _auth()})
        response = conn.getresponse()
        assert response.status == 200
        body = response.read()
        # The connection stays usable: nothing was sent past the Content-Length.
        conn.request("GET", "/big.bin", headers={"Authorization": _auth(), "Range": "bytes=0-9"})
        second = conn.getresponse()
        assert second.status == 206 and second.read() == data[:10]
    finally:
        conn.close()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    # All but the first 1 MiB block went through sendfile.
    assert sum(sendfile_bytes) == SIZE - MiB
    # Counted as a download of the whole file (metrics and audit come from the same count).
    assert _bytes_out() - before == SIZE + 10


def test_a_range_of_a_large_file_sends_exactly_that_range(dav, sendfile_bytes):
    data = os.urandom(SIZE)
    _store(dav, "big.bin", data)
    first, last = 3 * MiB + 17, 15 * MiB + 99
    conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=60)
    try:
        conn.request("GET", "/big.bin", headers={"Authorization": _auth(), "Range": f"bytes={first}-{last}"})
        response = conn.getresponse()
        assert response.status == 206
        assert response.getheader("Content-Range") == f"bytes {first}-{last}/{SIZE}"
        assert response.read() == data[first:last + 1]
        # wsgidav's read loop goes on after sendfile: it must find the stream at its end,
        # or the bytes after the range would reach the client as the next response.
        conn.request("GET", "/big.bin", headers={"Authorization": _auth(), "Range": "bytes=-5"})
        tail = conn.getresponse()
        assert tail.status == 206 and tail.read() == data[-5:]
    finally:
        conn.close()
    assert sum(sendfile_bytes) == (last + 1 - first) - MiB


def test_a_file_that_shrinks_during_a_large_get_ends_the_connection(dav):
    data = os.urandom(64 * MiB)
    _store(dav, "shrinking.bin", data)
    sock = socket.create_connection(("127.0.0.1", dav.webdav_port), timeout=60)
    try:
        sock.sendall(f"GET /shrinking.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth()}\r\n\r\n".encode())
        received = sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        # 64 MiB is more than the socket buffers hold: the server is still sending.
        with open(dav.data / "alice" / "shrinking.bin", "r+b") as handle:
            handle.truncate(2 * MiB)
        while chunk := sock.recv(1 << 20):
            received += chunk
    finally:
        sock.close()
    # The client sees a short body and a closed connection, never a next response made of stale bytes.
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Content-Length: 67108864" in head
    assert len(body) < 64 * MiB
    assert body == data[:len(body)]
    # The gateway serves on.
    conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=60)
    try:
        conn.request("GET", "/shrinking.bin", headers={"Authorization": _auth()})
        response = conn.getresponse()
        assert response.status == 200 and response.read() == data[:2 * MiB]
    finally:
        conn.close()


def test_tls_large_get_stays_in_python_and_is_exact(tls_dav, sendfile_bytes):
    data = os.urandom(SIZE)
    _store(tls_dav, "big.bin", data)
    with tls_socket(tls_dav) as sock:
        sock.sendall(f"GET /big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth()}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        reply = tls_read_until_closed(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert sendfile_bytes == []


def test_a_file_that_shrinks_during_a_tls_get_ends_the_connection(tls_dav):
    # The same on the path that reads through Python (TLS): before, the
    # connection stayed open and the client waited for bytes that never came.
    data = os.urandom(64 * MiB)
    _store(tls_dav, "shrinking.bin", data)
    with tls_socket(tls_dav) as sock:
        sock.sendall(f"GET /shrinking.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth()}\r\n\r\n".encode())
        received = sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        with open(tls_dav.data / "alice" / "shrinking.bin", "r+b") as handle:
            handle.truncate(2 * MiB)
        received += tls_read_until_closed(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert len(body) < 64 * MiB
    assert body == data[:len(body)]


@pytest.mark.tools("curl")
def test_curl_downloads_a_large_file_and_a_resumed_tail_exactly(dav, tmp_path, sendfile_bytes):
    # The client the bench times: a whole download, then `curl -C` resuming from the middle
    # (a Range request), both on one connection each, checked byte for byte.
    data = os.urandom(SIZE)
    _store(dav, "big.bin", data)
    url = f"http://127.0.0.1:{dav.webdav_port}/big.bin"
    whole = tmp_path / "whole.bin"
    subprocess.run(["curl", "-sSf", "-u", f"alice:{PASSWORD}", "-o", str(whole), url], check=True, timeout=60)
    assert hashlib.sha256(whole.read_bytes()).digest() == hashlib.sha256(data).digest()
    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[:7 * MiB + 3])
    subprocess.run(["curl", "-sSf", "-u", f"alice:{PASSWORD}", "-C", "-", "-o", str(partial), url],
                   check=True, timeout=60)
    assert hashlib.sha256(partial.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sum(sendfile_bytes) == (SIZE - MiB) + (SIZE - 7 * MiB - 3 - MiB)
