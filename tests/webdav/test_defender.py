"""The shared defender at the WebDAV door: bans and per-address connection limits."""
from __future__ import annotations

import base64
import http.client
import time

from tests.conftest import PASSWORD
from tests.webdav.conftest import DavClient


def test_repeated_wrong_passwords_ban_the_address_even_for_the_right_one(make_gateway):
    running = make_gateway(webdav=True, extra={"defender": {"max_failures": 3, "ban_time": 600}})
    running.add_user("alice")
    right, wrong = DavClient(running.webdav_port, "alice"), DavClient(running.webdav_port, "alice", "nope")
    assert right.request("PROPFIND", "/", headers={"Depth": "0"}).status == 207
    for _ in range(3):
        assert wrong.request("PROPFIND", "/", headers={"Depth": "0"}).status == 401
    banned = right.request("PROPFIND", "/", headers={"Depth": "0"})
    assert banned.status == 403 and b"too many failed logins" in banned.body


def test_connections_per_address_are_capped_and_given_back(make_gateway):
    running = make_gateway(webdav=True, extra={"defender": {"max_connections_per_ip": 1}})
    running.add_user("alice")
    client = DavClient(running.webdav_port, "alice")
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    slow = http.client.HTTPConnection("127.0.0.1", running.webdav_port, timeout=30)
    try:
        # A PUT whose body is still arriving holds the address's only slot.
        slow.putrequest("PUT", "/slow.bin")
        slow.putheader("Authorization", f"Basic {token}")
        slow.putheader("Content-Length", "10")
        slow.endheaders()
        slow.send(b"12345")
        home = running.data / "alice"
        deadline = time.monotonic() + 30
        while not (home.exists() and any(p.name.startswith(".gw-upload-") for p in home.iterdir())):
            assert time.monotonic() < deadline, "the slow PUT never started its upload"
            time.sleep(0.02)
        refused = client.get("/")
        assert refused.status == 503 and refused.header("Retry-After") == "10"
        slow.send(b"67890")
        assert slow.getresponse().status == 201
    finally:
        slow.close()
    # The slot comes back once the server has closed the response, just after the client saw it.
    for _ in range(100):
        done = client.get("/slow.bin")
        if done.status != 503:
            break
        time.sleep(0.05)
    assert done.body == b"1234567890"
