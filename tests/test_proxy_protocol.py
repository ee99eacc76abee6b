"""PROXY protocol headers read off real sockets: what is accepted, what is refused, and what is left unread."""
from __future__ import annotations

import ipaddress
import logging
import socket
import struct

import pytest

from gateway.proxy_protocol import (V2_SIGNATURE, ProxiedListener, ProxyHeaderError, ProxyProtocol,
                                    parse_networks, read_header)

AFTER = b"SSH-2.0-OpenSSH_9.2\r\n"


def v2_header(source: str, port: int, *, command: int = 1, dest: str | None = None,
              tlvs: bytes = b"", transport: int = 1) -> bytes:
    """A PROXY v2 header as HAProxy's send-proxy-v2 writes it."""
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address(dest or ("127.0.0.1" if src.version == 4 else "::1"))
    family = 1 if src.version == 4 else 2
    block = src.packed + dst.packed + struct.pack("!HH", port, 443) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | transport]) + struct.pack("!H", len(block)) + block


@pytest.fixture
def pair():
    """(server side, client side) of a connected socket pair, closed after the test."""
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def left_in(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    return sock.recv(4096)


def test_v2_header_names_the_client_and_leaves_the_rest_unread(pair):
    server, client = pair
    client.sendall(v2_header("203.0.113.7", 50123) + AFTER)
    assert read_header(server) == ("203.0.113.7", 50123)
    assert left_in(server) == AFTER


def test_v2_header_with_tlvs_is_read_whole(pair):
    server, client = pair
    tlv = b"\x05" + struct.pack("!H", 8) + b"uniqueid"
    client.sendall(v2_header("203.0.113.7", 1, tlvs=tlv) + AFTER)
    assert read_header(server) == ("203.0.113.7", 1)
    assert left_in(server) == AFTER


def test_v2_ipv6_client(pair):
    server, client = pair
    client.sendall(v2_header("2001:db8::5", 4000) + AFTER)
    assert read_header(server) == ("2001:db8::5", 4000)
    assert left_in(server) == AFTER


def test_v2_ipv4_mapped_client_is_named_as_ipv4(pair):
    server, client = pair
    client.sendall(v2_header("::ffff:198.51.100.9", 4000) + AFTER)
    assert read_header(server) == ("198.51.100.9", 4000)


def test_v2_local_command_names_no_client(pair):
    server, client = pair
    client.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00" + AFTER)
    assert read_header(server) is None
    assert left_in(server) == AFTER


def test_v2_header_sent_byte_by_byte_is_assembled(pair):
    server, client = pair
    for byte in v2_header("203.0.113.7", 7):
        client.send(bytes([byte]))
    client.sendall(AFTER)
    assert read_header(server) == ("203.0.113.7", 7)
    assert left_in(server) == AFTER


def test_v1_line_names_the_client_and_leaves_the_rest_unread(pair):
    server, client = pair
    client.sendall(b"PROXY TCP4 198.51.100.22 10.0.0.1 35646 80\r\n" + AFTER)
    assert read_header(server) == ("198.51.100.22", 35646)
    assert left_in(server) == AFTER


def test_v1_tcp6_line(pair):
    server, client = pair
    client.sendall(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    assert read_header(server) == ("2001:db8::1", 1)


def test_v1_unknown_names_no_client(pair):
    server, client = pair
    client.sendall(b"PROXY UNKNOWN\r\n" + AFTER)
    assert read_header(server) is None
    assert left_in(server) == AFTER


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"PROXY TCP4 198.51.100.22 10.0.0.1 35646\r\n",
    b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 198.51.100.22 10.0.0.1 99999 80\r\n",
    b"PROXY TCP4 198.51.100.22 10.0.0.1 035 80\r\n",
    b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
    b"PROXY UDP4 198.51.100.22 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12),
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),          # version 1 in a v2 header
    V2_SIGNATURE + b"\x23\x11\x00\x0c" + bytes(12),          # command 3
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),           # address block too short
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),          # datagram transport
    V2_SIGNATURE + b"\x21\x11\xff\xff",                      # 64 KiB block: over the limit
], ids=lambda d: repr(d[:24]))
def test_malformed_header_raises(pair, data):
    server, client = pair
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyHeaderError):
        read_header(server)


def test_header_cut_short_raises(pair):
    server, client = pair
    client.sendall(v2_header("203.0.113.7", 1)[:20])
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyHeaderError, match="closed"):
        read_header(server)


def test_silent_peer_runs_into_the_deadline(pair):
    server, client = pair
    client.sendall(b"PROXY TCP4 198.51.100.22")
    with pytest.raises(ProxyHeaderError, match="in time"):
        read_header(server, timeout=0.3)


def test_parse_networks_accepts_addresses_and_networks():
    assert [str(n) for n in parse_networks(["10.0.0.5", "10.1.0.0/16", "::1"])] == \
        ["10.0.0.5/32", "10.1.0.0/16", "::1/128"]


@pytest.mark.parametrize("value", ["10.0.0.1/8", "haproxy.local", "10.0.0.0/33", ""])
def test_parse_networks_names_the_bad_entry(value):
    with pytest.raises(ValueError, match=rf"\[1\]: '{value}'"):
        parse_networks(["127.0.0.1", value])


def test_policy_trusts_listed_networks_and_mapped_addresses():
    proxy = ProxyProtocol(["10.1.0.0/16", "127.0.0.1"], "test")
    assert proxy.trusts("10.1.200.3")
    assert proxy.trusts("::ffff:127.0.0.1")
    assert not proxy.trusts("10.2.0.1")
    assert not proxy.trusts("127.0.0.2")
    assert not proxy.trusts("garbage")


def test_untrusted_peer_is_closed_unread_and_warned_about_once(pair, caplog):
    server, client = pair
    proxy = ProxyProtocol(["10.0.0.1"], "sftp")
    client.sendall(v2_header("203.0.113.7", 1))
    with caplog.at_level(logging.DEBUG, logger="gateway.proxy_protocol"):
        assert proxy.client_address(server, ("192.0.2.50", 4444)) is None
        other, other_client = socket.socketpair()
        with other_client:
            assert proxy.client_address(other, ("192.0.2.50", 4445)) is None
    assert server.fileno() == -1 and other.fileno() == -1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "192.0.2.50" in warnings[0].getMessage()
    assert "trusted_proxies" in warnings[0].getMessage()


def test_trusted_peer_without_header_is_closed(pair, caplog):
    server, client = pair
    proxy = ProxyProtocol(["127.0.0.1"], "webdav")
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with caplog.at_level(logging.WARNING, logger="gateway.proxy_protocol"):
        assert proxy.client_address(server, ("127.0.0.1", 4444)) is None
    assert server.fileno() == -1
    assert "no valid header" in caplog.text


def test_trusted_peer_local_command_keeps_the_peer_address(pair):
    server, client = pair
    proxy = ProxyProtocol(["127.0.0.0/8"], "sftp")
    client.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00")
    assert proxy.client_address(server, ("127.0.0.9", 4444)) == ("127.0.0.9", 4444)


def test_client_address_restores_the_socket_timeout(pair):
    server, client = pair
    server.settimeout(None)
    client.sendall(v2_header("203.0.113.7", 1))
    assert ProxyProtocol(["127.0.0.1"], "t").client_address(server, ("127.0.0.1", 1)) == ("203.0.113.7", 1)
    assert server.gettimeout() is None


def test_proxied_listener_answers_accept_with_the_client_from_the_header():
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listener = ProxiedListener(listening, ProxyProtocol(["127.0.0.1"], "t"))
        assert listener.getsockname() == listening.getsockname()
        with socket.create_connection(listening.getsockname()) as client:
            client.sendall(v2_header("203.0.113.7", 999) + b"GET")
            conn, addr = listener.accept()
            with conn:
                assert addr == ("203.0.113.7", 999)
                assert left_in(conn) == b"GET"


def test_proxied_listener_turns_a_refusal_into_an_accept_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listener = ProxiedListener(listening, ProxyProtocol(["10.9.9.9"], "t"))
        with socket.create_connection(listening.getsockname()) as client:
            with pytest.raises(TimeoutError):
                listener.accept()
            client.settimeout(5)
            assert client.recv(10) == b""


# -- SFTP behind a load balancer: a silent proxy connection holds up no other --------------

def test_silent_connections_of_a_trusted_proxy_delay_no_sftp_banner(make_gateway):
    running = make_gateway(sftp=True, extra={"sftp": {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}})
    # Each of these used to hold the accept loop for 5 s, one after the other.
    silent = [socket.create_connection(("127.0.0.1", running.sftp_port)) for _ in range(10)]
    try:
        with socket.create_connection(("127.0.0.1", running.sftp_port), timeout=20) as client:
            client.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 2022\r\n")
            assert client.makefile("rb").readline().startswith(b"SSH-2.0-")
            (sftp,) = [f for f in running.gateway.frontends if f.name == "sftp"]
            assert sftp._unauthenticated.get("203.0.113.7") == 1
    finally:
        for sock in silent:
            sock.close()
