"""The wsgidav and cheroot traps from STACK-NOTES.md, each shown closed."""
from __future__ import annotations

import base64
import re
import socket

from gateway.vfs import UserFS
from tests.conftest import PASSWORD
from tests.webdav.conftest import LOCK_BODY, DavClient, proppatch_body, read_head, read_until_closed


def _auth_header(user: str, password: str = PASSWORD) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() + "\r\n"


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _leftovers(home) -> list[str]:
    return [p.name for p in home.iterdir() if p.name.startswith(".gw-upload-")]


def test_put_cut_short_commits_nothing_and_keeps_the_previous_version(dav, alice):
    assert alice.put("/a.txt", b"previous version\n").status == 201
    sock = _connect(dav.webdav_port)
    head = (f"PUT /a.txt HTTP/1.1\r\nHost: x\r\n{_auth_header('alice')}"
            f"Content-Length: 100000\r\n\r\n").encode()
    sock.sendall(head + b"x" * 1000)
    sock.shutdown(socket.SHUT_WR)       # the client goes away cleanly mid-body
    reply = read_until_closed(sock)
    sock.close()
    assert not reply.startswith((b"HTTP/1.1 201", b"HTTP/1.1 204")), reply
    home = dav.data / "alice"
    assert (home / "a.txt").read_bytes() == b"previous version\n"
    assert _leftovers(home) == []


def test_put_cut_short_of_a_new_file_leaves_no_file(dav, alice):
    sock = _connect(dav.webdav_port)
    sock.sendall((f"PUT /new.bin HTTP/1.1\r\nHost: x\r\n{_auth_header('alice')}"
                  f"Content-Length: 5000\r\n\r\n").encode() + b"y" * 10)
    sock.shutdown(socket.SHUT_WR)
    read_until_closed(sock)
    sock.close()
    assert alice.get("/new.bin").status == 404
    assert _leftovers(dav.data / "alice") == []


def test_unauthenticated_big_put_is_refused_without_100_continue_or_reading_the_body(dav):
    sock = _connect(dav.webdav_port)
    # 10 GiB announced, nothing sent: a server that reads the body (or sends
    # 100 Continue first) never answers 401 here.
    sock.sendall(b"PUT /big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"connection: close" in head.lower()
    assert read_until_closed(sock) is not None   # the server closes; no body is awaited
    sock.close()
    assert not (dav.data / "alice" / "big.bin").exists()


def test_wrong_password_big_put_without_expect_is_refused_and_the_connection_closed(dav):
    sock = _connect(dav.webdav_port)
    sock.sendall((f"PUT /big.bin HTTP/1.1\r\nHost: x\r\n{_auth_header('alice', 'wrong')}"
                  "Content-Length: 10737418240\r\n\r\n").encode() + b"z" * 65536)
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 401"), head
    sock.close()


def test_unauthorized_put_is_refused_before_the_body_with_403(dav):
    dav.add_user("reader", perms={"/": ["list", "download"]})
    sock = _connect(dav.webdav_port)
    sock.sendall((f"PUT /big.bin HTTP/1.1\r\nHost: x\r\n{_auth_header('reader')}"
                  "Content-Length: 10737418240\r\nExpect: 100-continue\r\n\r\n").encode())
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 403"), head
    sock.close()


def test_authorized_put_with_expect_gets_100_continue_when_the_body_is_wanted(dav, alice):
    sock = _connect(dav.webdav_port)
    sock.sendall((f"PUT /e.txt HTTP/1.1\r\nHost: x\r\n{_auth_header('alice')}"
                  "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode())
    assert read_head(sock).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(b"hello")
    assert read_head(sock).startswith(b"HTTP/1.1 201")
    sock.close()
    assert alice.get("/e.txt").body == b"hello"


def test_lock_of_one_user_does_not_block_another_users_same_path(alice, bob):
    assert alice.put("/a.txt", b"alice").status == 201
    assert bob.put("/a.txt", b"bob").status == 201
    lock = alice.request("LOCK", "/a.txt", LOCK_BODY, {"Timeout": "Second-600"})
    assert lock.status == 200
    refused = alice.put("/a.txt", b"alice again")
    assert refused.status == 423
    # The conflicting lock is named by the client's own URL, not the internal per-user key.
    assert b"href>/a.txt</" in refused.body and b"~alice" not in refused.body
    assert bob.put("/a.txt", b"bob again").status == 204
    assert b"<D:lockdiscovery/>" in bob.propfind("/a.txt", "0").body
    # The lock root is reported as the client's own URL, not the internal key.
    assert re.search(rb"<D:lockroot><D:href>/a\.txt</D:href>", alice.propfind("/a.txt", "0").body)


def test_dead_property_of_one_user_is_invisible_to_another(alice, bob):
    alice.put("/a.txt", b"alice")
    bob.put("/a.txt", b"bob")
    body = proppatch_body("colour", "urn:test:", "blue")
    assert alice.proppatch("/a.txt", body).status == 207
    query = b'<D:propfind xmlns:D="DAV:" xmlns:Z="urn:test:"><D:prop><Z:colour/></D:prop></D:propfind>'
    assert b"blue" in alice.propfind("/a.txt", "0", query).body
    theirs = bob.propfind("/a.txt", "0", query).body
    assert b"blue" not in theirs and b"404 Not Found" in theirs


def test_move_of_a_single_file_works_and_carries_its_properties(alice):
    alice.put("/a.txt", b"content")
    alice.proppatch("/a.txt", proppatch_body("colour", "urn:test:", "green"))
    moved = alice.request("MOVE", "/a.txt", headers={"Destination": "/b.txt"})
    assert moved.status == 201
    assert alice.get("/a.txt").status == 404
    assert alice.get("/b.txt").body == b"content"
    query = b'<D:propfind xmlns:D="DAV:" xmlns:Z="urn:test:"><D:prop><Z:colour/></D:prop></D:propfind>'
    assert b"green" in alice.propfind("/b.txt", "0", query).body


def test_move_of_a_file_over_an_existing_one_answers_204(alice):
    alice.put("/a.txt", b"new")
    alice.put("/b.txt", b"old")
    assert alice.request("MOVE", "/a.txt", headers={"Destination": "/b.txt"}).status == 204
    assert alice.get("/b.txt").body == b"new"


def test_move_of_a_folder_is_one_rename(alice, monkeypatch):
    alice.request("MKCOL", "/d")
    alice.put("/d/x.txt", b"x")
    calls = []
    original = UserFS.rename
    monkeypatch.setattr(UserFS, "rename", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    assert alice.request("MOVE", "/d", headers={"Destination": "/e"}).status == 201
    assert calls == [("/d", "/e")]
    assert alice.get("/e/x.txt").body == b"x"


def test_propfind_of_a_folder_builds_members_from_one_listing(alice, monkeypatch):
    alice.request("MKCOL", "/many")
    for i in range(20):
        alice.put(f"/many/f{i}.txt", b"x")
    stats = []
    original = UserFS.stat
    monkeypatch.setattr(UserFS, "stat", lambda self, path: stats.append(path) or original(self, path))
    reply = alice.propfind("/many", "1")
    assert reply.status == 207
    assert reply.body.count(b"<D:response>") == 21
    assert stats and all(path == "/many" for path in stats)  # no child was stat'ed


def test_client_fixture_sees_its_own_tree_only(dav, alice, bob):
    alice.put("/secret.txt", b"alice only")
    assert bob.get("/secret.txt").status == 404
    assert DavClient(dav.webdav_port, "bob").get("/../alice/secret.txt").status in (400, 404)
