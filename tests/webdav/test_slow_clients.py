"""Clients that never finish their request headers: they hold no worker thread, no memory, no slot for long."""
from __future__ import annotations

import select
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import wait_for
from tests.test_serve import _listening_ports, config, start, wait_for_line
from tests.webdav.conftest import DavClient, read_head, read_until_closed

OTHER_ADDRESS = "127.0.0.2"


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the gateway on 127.0.0.1 from the loopback address `source`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def still_connected(sock: socket.socket) -> bool:
    """True while the server has neither closed nor reset the connection."""
    if not select.select([sock], [], [], 0)[0]:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


@contextmanager
def tricklers(port: int, count: int, source: str, interval: float = 0.5) -> Iterator[list[socket.socket]]:
    """`count` connections that send one more header line every `interval` seconds, never the end."""
    socks = [connect_from(source, port) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\n")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    with sending(socks, b"X-Slow: still coming\r\n", interval, "trickler"):
        yield socks


@contextmanager
def sending(socks: list[socket.socket], data: bytes, interval: float, name: str) -> Iterator[None]:
    """Send `data` on every socket every `interval` seconds while the block runs; then close them all."""
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.wait(interval):
            for sock in socks:
                try:
                    sock.send(data)
                except OSError:
                    pass

    thread = threading.Thread(target=keep_sending, name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for sock in socks:
            sock.close()


def test_header_tricklers_from_one_address_do_not_starve_another_address(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"header_timeout": 300}})
    running.add_user("alice")
    alice = DavClient(running.webdav_port, "alice")
    # More tricklers than worker threads (32): each used to hold one.
    with tricklers(running.webdav_port, 40, OTHER_ADDRESS) as socks:
        # The tricklers are ahead of this request in the listener's accept queue.
        assert alice.get("/").status == 200
        assert all(still_connected(sock) for sock in socks)


def test_a_client_that_trickles_headers_is_disconnected_after_header_timeout(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"header_timeout": 1}})
    with tricklers(running.webdav_port, 1, "127.0.0.1", interval=0.2) as (sock,):
        wait_for(lambda: not still_connected(sock), "the trickler disconnected")
    silent = connect_from("127.0.0.1", running.webdav_port)
    with silent:
        assert read_until_closed(silent) == b""
    wait_for(lambda: running.gateway.defender._total_connections == 0, "the slots given back")


def test_connections_over_the_per_address_limit_are_closed_at_accept(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"header_timeout": 300},
                                               "defender": {"max_connections_per_ip": 64}})
    running.add_user("alice")
    held = [connect_from(OTHER_ADDRESS, running.webdav_port) for _ in range(64)]
    try:
        wait_for(lambda: running.gateway.defender._connections.get(OTHER_ADDRESS) == 64,
                 "64 connections accepted")
        for _ in range(3):
            with connect_from(OTHER_ADDRESS, running.webdav_port) as extra:
                extra.sendall(b"OPTIONS / HTTP/1.1\r\nHost: gateway\r\n\r\n")
                assert read_until_closed(extra) == b""
        assert all(still_connected(sock) for sock in held)
        assert DavClient(running.webdav_port, "alice").get("/").status == 200
    finally:
        for sock in held:
            sock.close()


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_oversized_header_line_gets_431_and_costs_no_memory(tmp_path):
    proc = start(config(tmp_path, webdav=True))
    try:
        port = _listening_ports(wait_for_line(proc, "gateway ready"))["webdav"]
        before = _peak_rss_kib(proc.pid)
        line = b"X-Big: " + b"a" * (64 << 20) + b"\r\n\r\n"
        with connect_from("127.0.0.1", port) as sock:
            def send() -> None:
                try:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\n" + line)
                except OSError:
                    pass   # the server closes while the line is still arriving
            sender = threading.Thread(target=send, name="big-header")
            sender.start()
            answer = read_until_closed(sock)
            sender.join()
        # A reset may overtake the answer; whatever arrived is the 431.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
        grown_mib = (_peak_rss_kib(proc.pid) - before) / 1024
        assert grown_mib < 16, f"peak RSS grew by {grown_mib:.1f} MiB for one header line"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


# -- TLS: the handshake is waited for as the headers are -------------------------

def _tls_gateway(make_gateway, tmp_path, **webdav):
    import ssl

    from tests.webdav.test_tls import self_signed
    cert, key = self_signed(tmp_path)
    running = make_gateway(webdav=True, extra={"webdav": {"tls_cert": str(cert), "tls_key": str(key), **webdav}})
    running.add_user("alice")
    return running, ssl.create_default_context(cafile=str(cert))


def _https_propfind(port: int, context, conn=None) -> int:
    import base64
    import http.client

    from tests.conftest import PASSWORD
    conn = conn or http.client.HTTPSConnection("localhost", port, context=context, timeout=20)
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    conn.request("PROPFIND", "/", headers={"Authorization": f"Basic {token}", "Depth": "0"})
    response = conn.getresponse()
    response.read()
    return response.status


def test_stalled_tls_handshakes_hold_up_no_other_client(make_gateway, tmp_path):
    # The socket timeout (60 s) is far above the clients' (20 s): a handshake
    # done blocking in the selector thread would hold every client past it.
    running, context = _tls_gateway(make_gateway, tmp_path, header_timeout=300)
    import http.client
    kept = http.client.HTTPSConnection("localhost", running.webdav_port, context=context, timeout=20)
    try:
        assert _https_propfind(running.webdav_port, context, kept) == 207
        stalled = [connect_from(OTHER_ADDRESS, running.webdav_port) for _ in range(3)]
        try:
            for sock in stalled:
                sock.sendall(b"\x16\x03\x01\x00")     # the start of a TLS record, then nothing
            wait_for(lambda: running.gateway.defender._connections.get(OTHER_ADDRESS) == 3,
                     "the stalled connections accepted")
            assert _https_propfind(running.webdav_port, context) == 207
            assert _https_propfind(running.webdav_port, context, kept) == 207
            assert all(still_connected(sock) for sock in stalled)
        finally:
            for sock in stalled:
                sock.close()
    finally:
        kept.close()


def test_a_tls_handshake_not_finished_within_header_timeout_is_closed(make_gateway, tmp_path):
    running, context = _tls_gateway(make_gateway, tmp_path, header_timeout=1)
    with connect_from("127.0.0.1", running.webdav_port) as sock:
        sock.sendall(b"\x16\x03\x01\x00")
        assert read_until_closed(sock) == b""
    wait_for(lambda: running.gateway.defender._total_connections == 0, "the slot given back")
    assert _https_propfind(running.webdav_port, context) == 207


def test_plain_http_on_the_tls_port_gets_a_plain_400(make_gateway, tmp_path):
    running, _ = _tls_gateway(make_gateway, tmp_path)
    with connect_from("127.0.0.1", running.webdav_port) as sock:
        sock.sendall(b"OPTIONS / HTTP/1.1\r\nHost: gateway\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request"), reply[:200]
    assert b"HTTPS" in reply


# -- bodies and responses: one address or user holds only its share of the threads ----------

def _basic(user: str) -> str:
    import base64

    from tests.conftest import PASSWORD
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


def _accepted() -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("gateway_connections_total", {"protocol": "webdav"}) or 0.0


def propfind_from(source: str, port: int, user: str) -> bytes:
    """The status line of a PROPFIND / by `user` from the loopback address `source`.

    Bounded by 30 s, half the server's socket timeout: a client starved of
    threads until stalled transfers time out gets no answer, not a late one.
    """
    with connect_from(source, port) as sock:
        sock.settimeout(30)
        sock.sendall(f"PROPFIND / HTTP/1.1\r\nHost: gateway\r\nDepth: 0\r\nAuthorization: {_basic(user)}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        return read_until_closed(sock).split(b"\r\n", 1)[0]


def send_requests(port: int, sources: list[str], request: bytes, receive_buffer: int = 0) -> list[socket.socket]:
    """One connection per entry of `sources` that sends `request`; returns once the gateway accepted all."""
    before = _accepted()
    socks = []
    try:
        for source in sources:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            if receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(60)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
        # Accepted connections whose headers are all there are queued for a
        # thread in accept order: a later connection comes after these.
        wait_for(lambda: _accepted() >= before + len(sources), "every connection accepted")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


@contextmanager
def drip_puts(port: int, user: str, sources: list[str], interval: float = 1.0) -> Iterator[list[socket.socket]]:
    """One PUT per entry of `sources` whose 1 MB body arrives one byte every `interval` seconds."""
    request = (f"PUT /drip HTTP/1.1\r\nHost: gateway\r\nAuthorization: {_basic(user)}\r\n"
               f"Content-Length: 1000000\r\n\r\nx").encode()
    socks = send_requests(port, sources, request)
    with sending(socks, b"x", interval, "dripper"):
        yield socks


def refused_with_503(socks: list[socket.socket]) -> int:
    """How many of `socks` were answered 503 with Retry-After (each read until the server closes it)."""
    count = 0
    for sock in socks:
        if select.select([sock], [], [], 0)[0]:
            answer = read_until_closed(sock)
            if answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in answer:
                count += 1
    return count


def _without_rate_minimum(**webdav) -> dict:
    # The drips are far under the default minimum rate, which would end them
    # within its window: these tests are about the shares of the threads alone.
    return {"webdav": {"min_rate": 0, **webdav}}


def test_drip_uploads_from_one_address_leave_threads_for_another_address(make_gateway):
    running = make_gateway(webdav=True, extra=_without_rate_minimum())
    running.add_user("alice")
    running.add_user("bob")
    assert propfind_from("127.0.0.1", running.webdav_port, "alice").startswith(b"HTTP/1.1 207")
    # One more slow upload than there are worker threads (32).
    with drip_puts(running.webdav_port, "alice", ["127.0.0.1"] * 33) as socks:
        assert propfind_from(OTHER_ADDRESS, running.webdav_port, "bob") == b"HTTP/1.1 207 Multi-Status"
        # Half the threads (16) are the address's share; it borrowed idle ones
        # until a quarter (8) were left for others, and the rest were refused at once.
        assert refused_with_503(socks) == 33 - 24


def test_drip_uploads_of_one_user_from_two_addresses_leave_threads_for_another_user(make_gateway):
    running = make_gateway(webdav=True, extra=_without_rate_minimum())
    running.add_user("alice")
    running.add_user("bob")
    assert propfind_from("127.0.0.1", running.webdav_port, "alice").startswith(b"HTTP/1.1 207")
    # Each address stays within its share (16); together they are over the threads.
    with drip_puts(running.webdav_port, "alice", ["127.0.0.3"] * 16 + ["127.0.0.4"] * 17) as socks:
        assert propfind_from(OTHER_ADDRESS, running.webdav_port, "bob") == b"HTTP/1.1 207 Multi-Status"
        # Her share (16), and idle threads borrowed until a quarter (8) were left.
        assert refused_with_503(socks) >= 33 - 24
        (webdav,) = [f for f in running.gateway.frontends if f.name == "webdav"]
        assert webdav.inflight.held(user="alice") <= 24


def test_unread_downloads_from_one_address_leave_threads_for_another_address(make_gateway):
    running = make_gateway(webdav=True, extra=_without_rate_minimum())
    running.add_user("alice")
    running.add_user("bob")
    (running.data / "alice").mkdir(exist_ok=True)
    (running.data / "alice" / "big").write_bytes(bytes(20 << 20))
    request = f"GET /big HTTP/1.1\r\nHost: gateway\r\nAuthorization: {_basic('alice')}\r\n\r\n".encode()
    # A small receive buffer and no reading: every response stalls in its send.
    socks = send_requests(running.webdav_port, ["127.0.0.1"] * 33, request, receive_buffer=4096)
    try:
        assert propfind_from(OTHER_ADDRESS, running.webdav_port, "bob") == b"HTTP/1.1 207 Multi-Status"
    finally:
        for sock in socks:
            sock.close()


# -- bodies and responses: a minimum transfer rate ----------------------------------------

SLOW_ADDRESS = "127.0.0.5"


def _rate(min_rate: int, window: int) -> dict:
    return {"webdav": {"min_rate": min_rate, "min_rate_window": window}}


def test_an_upload_dripping_under_the_minimum_rate_is_ended_and_leaves_no_file(make_gateway):
    running = make_gateway(webdav=True, extra=_rate(1000, 2))
    running.add_user("alice")
    with drip_puts(running.webdav_port, "alice", [SLOW_ADDRESS], interval=0.5) as (sock,):
        sock.settimeout(30)
        read_until_closed(sock)
    wait_for(lambda: running.gateway.defender._connections.get(SLOW_ADDRESS) is None, "the slot given back")
    assert DavClient(running.webdav_port, "alice").get("/drip").status == 404


def test_a_download_the_client_stops_reading_is_ended_within_the_rate_window(make_gateway):
    running = make_gateway(webdav=True, extra=_rate(1000, 2))
    running.add_user("alice")
    (running.data / "alice").mkdir(exist_ok=True)
    (running.data / "alice" / "big").write_bytes(bytes(20 << 20))
    request = f"GET /big HTTP/1.1\r\nHost: gateway\r\nAuthorization: {_basic('alice')}\r\n\r\n".encode()
    (sock,) = send_requests(running.webdav_port, [SLOW_ADDRESS], request, receive_buffer=4096)
    with sock:
        # Far below the server's socket timeout (60 s): only the rate ends it this soon.
        wait_for(lambda: running.gateway.defender._connections.get(SLOW_ADDRESS) is None,
                 "the stalled download ended", limit=30)
        assert len(read_until_closed(sock)) < 20 << 20


def test_a_slow_upload_above_the_minimum_rate_completes(make_gateway):
    running = make_gateway(webdav=True, extra=_rate(1000, 1))
    running.add_user("alice")
    body = bytes(range(256)) * 80           # 20 KiB at about 5 KiB/s
    with connect_from(SLOW_ADDRESS, running.webdav_port) as sock:
        sock.sendall(f"PUT /steady HTTP/1.1\r\nHost: gateway\r\nAuthorization: {_basic('alice')}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        for start in range(0, len(body), 1024):
            sock.sendall(body[start:start + 1024])
            threading.Event().wait(0.2)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 201 ")
    assert (running.data / "alice" / "steady").read_bytes() == body


# -- PROXY headers behind a load balancer: read as they arrive, never waited for ----------

PROXIED_CLIENT = "203.0.113.7"
PROXY_LINE = f"PROXY TCP4 {PROXIED_CLIENT} 127.0.0.1 5000 8080\r\n".encode()
OPTIONS = b"OPTIONS / HTTP/1.1\r\nHost: gateway\r\n\r\n"


def _behind_a_proxy(make_gateway, **webdav):
    return make_gateway(webdav=True, extra={"webdav": {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"],
                                                       **webdav}})


def status_line(sock: socket.socket) -> bytes:
    """The status line of the next response on `sock` (its headers read, its empty body too)."""
    return read_head(sock).split(b"\r\n", 1)[0]


def test_silent_connections_of_a_trusted_proxy_hold_up_no_other_request(make_gateway):
    running = _behind_a_proxy(make_gateway)
    kept = connect_from("127.0.0.1", running.webdav_port)
    silent = []
    try:
        kept.settimeout(20)
        kept.sendall(PROXY_LINE + OPTIONS)
        assert status_line(kept) == b"HTTP/1.1 200 OK"
        # Each of these used to hold the accept path for 5 s, one after the other.
        silent = [connect_from("127.0.0.1", running.webdav_port) for _ in range(10)]
        with connect_from("127.0.0.1", running.webdav_port) as fresh:
            fresh.settimeout(20)
            fresh.sendall(PROXY_LINE + OPTIONS)
            assert status_line(fresh) == b"HTTP/1.1 200 OK"
        kept.sendall(OPTIONS)
        assert status_line(kept) == b"HTTP/1.1 200 OK"
        # The connection counts as the client the header named.
        assert running.gateway.defender._connections.get(PROXIED_CLIENT) == 1
    finally:
        kept.close()
        for sock in silent:
            sock.close()


def test_a_trusted_proxy_that_sends_no_header_is_closed_and_an_untrusted_peer_at_once(make_gateway):
    running = _behind_a_proxy(make_gateway, header_timeout=1)
    for source in ("127.0.0.1", OTHER_ADDRESS):
        with connect_from(source, running.webdav_port) as sock:
            sock.settimeout(20)
            assert read_until_closed(sock) == b""
    with connect_from("127.0.0.1", running.webdav_port) as sock:
        sock.settimeout(20)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")   # no PROXY header first
        assert read_until_closed(sock) == b""
    assert running.gateway.defender._total_connections == 0


def test_a_proxy_header_before_a_tls_handshake_names_the_client(make_gateway, tmp_path):
    running, context = _tls_gateway(make_gateway, tmp_path, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    raw = connect_from("127.0.0.1", running.webdav_port)
    raw.settimeout(20)
    raw.sendall(PROXY_LINE)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(OPTIONS)
        assert status_line(sock) == b"HTTP/1.1 200 OK"
        assert running.gateway.defender._connections.get(PROXIED_CLIENT) == 1
