"""Locks and dead properties live in the state dir and survive a restart."""
from __future__ import annotations

import json
import re
import sqlite3
import time

from gateway.config import load_config
from gateway.server import Gateway
from tests.webdav.conftest import LOCK_BODY, DavClient, proppatch_body


def _restart(running) -> DavClient:
    running.gateway.stop()
    again = Gateway(load_config(running.config_path))
    again.start()
    running.gateway = again
    return DavClient(again.frontends[0].address[1], "alice")


def test_a_restart_keeps_locks_and_dead_properties(make_gateway):
    running = make_gateway(webdav=True)
    running.add_user("alice")
    alice = DavClient(running.webdav_port, "alice")
    alice.put("/doc.txt", b"v1")
    assert alice.proppatch("/doc.txt", proppatch_body("author", "urn:test:", "Ada")).status == 207
    lock = alice.request("LOCK", "/doc.txt", LOCK_BODY, {"Timeout": "Second-3600"})
    assert lock.status == 200
    token = lock.header("Lock-Token").strip("<>")
    try:
        alice = _restart(running)
        assert alice.put("/doc.txt", b"v2").status == 423
        assert alice.put("/doc.txt", b"v2", If=f"(<{token}>)").status == 204
        body = alice.propfind("/doc.txt", "0").body
        assert token.encode() in body
        assert re.search(rb"<[^>]*author[^>]*>Ada<", body), body
        assert alice.request("UNLOCK", "/doc.txt", headers={"Lock-Token": f"<{token}>"}).status == 204
        assert alice.put("/doc.txt", b"v3").status == 204
    finally:
        running.gateway.stop()


def test_delete_drops_the_properties_of_everything_below(alice):
    alice.request("MKCOL", "/d")
    alice.put("/d/x.txt", b"x")
    alice.proppatch("/d/x.txt", proppatch_body("tag", "urn:test:", "old"))
    assert alice.request("DELETE", "/d").status == 204
    alice.request("MKCOL", "/d")
    alice.put("/d/x.txt", b"x")
    assert b"urn:test:" not in alice.propfind("/d/x.txt", "0").body


def test_copy_carries_dead_properties_to_the_copy(alice):
    alice.put("/a.txt", b"a")
    alice.proppatch("/a.txt", proppatch_body("tag", "urn:test:", "kept"))
    assert alice.request("COPY", "/a.txt", headers={"Destination": "/b.txt"}).status == 201
    assert b"kept" in alice.propfind("/b.txt", "0").body


def test_an_old_state_file_is_imported_into_the_store_once_with_per_user_keys_moved(make_gateway):
    running = make_gateway(webdav=True, start=False)
    running.add_user("alice")
    (running.data / "alice").mkdir()
    (running.data / "alice" / "doc.txt").write_bytes(b"v1")
    state = running.gateway.state_dir
    state.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state / "webdav.sqlite")
    conn.executescript("CREATE TABLE properties (url TEXT NOT NULL, name TEXT NOT NULL, "
                       "value BLOB NOT NULL, PRIMARY KEY (url, name));"
                       "CREATE TABLE locks (token TEXT PRIMARY KEY, root TEXT NOT NULL, "
                       "expire REAL NOT NULL, owner BLOB NOT NULL, data TEXT NOT NULL);")
    conn.execute("INSERT INTO properties VALUES ('/~alice/doc.txt', '{urn:test:}author', ?)",
                 (b'<ns0:author xmlns:ns0="urn:test:">Ada</ns0:author>',))
    conn.execute("INSERT INTO properties VALUES ('/~nobody/x', '{urn:test:}author', ?)",
                 (b'<ns0:author xmlns:ns0="urn:test:">gone</ns0:author>',))
    # Keyed by storage location already (the state file of the release before the store).
    conn.execute("INSERT INTO properties VALUES ('/local/alice/doc.txt', '{urn:test:}year', ?)",
                 (b'<ns0:year xmlns:ns0="urn:test:">1843</ns0:year>',))
    lock = {"root": "/~alice/doc.txt", "type": "write", "scope": "exclusive", "depth": "0",
            "timeout": 3600, "expire": time.time() + 3600, "principal": "alice",
            "token": "opaquelocktoken:old-style"}
    conn.execute("INSERT INTO locks VALUES (?, ?, ?, ?, ?)",
                 (lock["token"], lock["root"], lock["expire"], b"", json.dumps(lock)))
    conn.commit()
    conn.close()
    running.gateway.start()
    try:
        alice = DavClient(running.gateway.frontends[0].address[1], "alice")
        body = alice.propfind("/doc.txt", "0").body
        assert re.search(rb"<[^>]*author[^>]*>Ada<", body), body
        assert b"opaquelocktoken:old-style" in body
        assert re.search(rb"<[^>]*year[^>]*>1843<", body), body
        assert alice.put("/doc.txt", b"v2").status == 423
        assert not (state / "webdav.sqlite").exists()
        assert (state / "webdav.sqlite.imported").exists()
        store = running.gateway.store
        assert store.property_names("local:/alice/doc.txt") == ["{urn:test:}author", "{urn:test:}year"]
        assert [lock.token for lock in store.find_locks("local:/alice/doc.txt")] == ["opaquelocktoken:old-style"]
    finally:
        running.gateway.stop()
