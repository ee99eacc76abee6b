"""The shared defender at the WebDAV door: bans and per-address connection limits."""
from __future__ import annotations

import http.client
import socket

from tests.conftest import wait_for
from tests.webdav.conftest import DavClient, read_until_closed


def test_repeated_wrong_passwords_ban_the_address_even_for_the_right_one(make_gateway):
    running = make_gateway(webdav=True, extra={"defender": {"max_failures": 3, "ban_time": 600}})
    running.add_user("alice")
    right, wrong = DavClient(running.webdav_port, "alice"), DavClient(running.webdav_port, "alice", "nope")
    assert right.request("PROPFIND", "/", headers={"Depth": "0"}).status == 207
    for _ in range(3):
        assert wrong.request("PROPFIND", "/", headers={"Depth": "0"}).status == 401
    banned = right.request("PROPFIND", "/", headers={"Depth": "0"})
    assert banned.status == 403 and b"too many failed logins" in banned.body


def test_connections_per_address_are_capped_at_accept_and_given_back(make_gateway):
    running = make_gateway(webdav=True, extra={"defender": {"max_connections_per_ip": 1},
                                               "webdav": {"header_timeout": 120}})
    running.add_user("alice")
    client = DavClient(running.webdav_port, "alice")
    # A connection that has sent nothing yet already holds the address's only slot.
    holder = socket.create_connection(("127.0.0.1", running.webdav_port), timeout=30)
    try:
        wait_for(lambda: running.gateway.defender._total_connections == 1, "the first connection counted")
        extra = socket.create_connection(("127.0.0.1", running.webdav_port), timeout=30)
        with extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_closed(extra) == b""
    finally:
        holder.close()
    # The slot comes back when the server closes the first connection.
    wait_for(lambda: status_or_none(client) == 200, "a request after the first connection closed")


def status_or_none(client: DavClient) -> int | None:
    """The status of GET /, or None when the server closed the connection at accept."""
    try:
        return client.get("/").status
    except (ConnectionError, http.client.RemoteDisconnected):
        return None
