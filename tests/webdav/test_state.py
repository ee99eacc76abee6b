"""Locks and dead properties live in the state dir and survive a restart."""
from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest

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


def _lock_body(owner: str, scope: str = "shared") -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:{scope}/>'
            f'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner>{owner}</D:owner></D:lockinfo>').encode()


def _lock(client: DavClient, path: str, body: bytes, timeout: str = "Second-600"):
    return client.request("LOCK", path, body, {"Content-Type": "application/xml", "Timeout": timeout, "Depth": "0"})


def test_a_lock_owner_over_the_limit_is_refused_with_400_and_nothing_is_kept(dav, alice):
    alice.put("/doc.txt", b"v1")
    assert _lock(alice, "/doc.txt", _lock_body("x" * 5000)).status == 400
    assert dav.gateway.store.find_locks("local:/alice/doc.txt") == []
    assert _lock(alice, "/doc.txt", _lock_body("x" * 4000)).status == 200


@pytest.mark.parametrize("asked", ["Infinite", "Second-4100000000", "Second-2419200", "Infinite, Second-600"])
def test_a_timeout_above_the_maximum_is_shortened_to_one_day_and_the_answer_says_so(dav, alice, asked):
    alice.put("/doc.txt", b"v1")
    reply = _lock(alice, "/doc.txt", _lock_body("me", "exclusive"), asked)
    assert reply.status == 200
    granted = int(re.search(rb"<D:timeout>Second-(\d+)</D:timeout>", reply.body).group(1))
    assert 86400 - 60 <= granted <= 86400
    [held] = dav.gateway.store.find_locks("local:/alice/doc.txt")
    assert held.timeout == 86400 and held.expire <= time.time() + 86400
    # A refresh asking for more is shortened the same way.
    token = reply.header("Lock-Token")
    refreshed = alice.request("LOCK", "/doc.txt", None, {"If": f"({token})", "Timeout": "Infinite"})
    assert refreshed.status == 200
    [held] = dav.gateway.store.find_locks("local:/alice/doc.txt")
    assert held.timeout == 86400


def test_shared_locks_on_one_resource_stop_at_the_limit_and_keep_propfind_of_the_folder_bounded(dav, alice):
    # Issue 15: 30 shared locks with a 900 KB owner each made the parent's PROPFIND 27 MB,
    # for every user who sees the folder (carl through a read-only mount here).
    alice.request("MKCOL", "/team")
    alice.put("/team/doc.txt", b"v1")
    dav.add_user("carl", mounts={"/alice-team": ("local:/alice/team", ["list", "download"])})
    carl = DavClient(dav.webdav_port, "carl")
    statuses = [_lock(alice, "/team/doc.txt", _lock_body("o" * 4000), "Infinite").status for _ in range(20)]
    assert statuses == [200] * 16 + [423] * 4
    assert len(dav.gateway.store.find_locks("local:/alice/team/doc.txt")) == 16
    for client, folder in ((alice, "/team/"), (carl, "/alice-team/")):
        reply = client.propfind(folder, "1")
        assert reply.status == 207
        # 16 locks of at most 4 KiB of owner each, plus the rest of each activelock.
        assert len(reply.body) < 16 * (4096 + 1024) + 4096, len(reply.body)


def test_a_user_holding_the_most_locks_gets_507_and_others_still_lock(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"max_locks_per_user": 2}})
    running.add_user("alice")
    running.add_user("bob")
    alice, bob = DavClient(running.webdav_port, "alice"), DavClient(running.webdav_port, "bob")
    for name in ("a", "b", "c"):
        alice.put(f"/{name}.txt", b"x")
        bob.put(f"/{name}.txt", b"x")
    assert [_lock(alice, f"/{n}.txt", _lock_body("me", "exclusive")).status for n in "abc"] == [200, 200, 507]
    assert _lock(bob, "/a.txt", _lock_body("me", "exclusive")).status == 200
    # Released locks make room again; expired ones are gone before the count.
    token = _lock(bob, "/b.txt", _lock_body("me", "exclusive")).header("Lock-Token")
    assert bob.request("UNLOCK", "/b.txt", headers={"Lock-Token": token}).status == 204
    assert _lock(bob, "/c.txt", _lock_body("me", "exclusive")).status == 200


def _props_body(values: dict[str, int]) -> bytes:
    props = "".join(f"<Z:{name}>{'v' * size}</Z:{name}>" for name, size in values.items())
    return (f'<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:test:">'
            f'<D:set><D:prop>{props}</D:prop></D:set></D:propertyupdate>').encode()


def _statuses(reply) -> dict[str, str]:
    """Property local name -> the status PROPPATCH answered for it."""
    found = {}
    for propstat in re.findall(rb"<D:propstat>(.*?)</D:propstat>", reply.body, re.S):
        status = re.search(rb"<D:status>HTTP/1.1 (\d+)", propstat).group(1).decode()
        for name in re.findall(rb"<\w+:(\w+)/>", propstat):
            found[name.decode()] = status
    return found


def test_one_users_dead_properties_stop_at_their_budget_with_507_in_the_multistatus(make_gateway):
    # Issue 15: folders with 100 x 60 KB properties each grew the shared store by 47 MB per run.
    running = make_gateway(webdav=True, extra={"webdav": {"max_property_bytes_per_user": 200_000}})
    running.add_user("alice")
    alice = DavClient(running.webdav_port, "alice")
    for n in range(3):
        assert alice.request("MKCOL", f"/d{n}").status == 201
    # All or nothing: the request that does not fit names its property 507, the rest 424.
    reply = alice.proppatch("/d0", _props_body({f"p{i}": 60_000 for i in range(4)}))
    assert reply.status == 207
    assert sorted(_statuses(reply).values()) == ["424", "424", "424", "507"], reply.body[-600:]
    assert running.gateway.store.property_names("local:/alice/d0") == []
    # One by one, over several folders: the budget is the user's, not the folder's.
    answers = [_statuses(alice.proppatch(f"/d{n}", _props_body({"big": 60_000}))) for n in range(3)]
    answers.append(_statuses(alice.proppatch("/d0", _props_body({"more": 60_000}))))
    assert answers == [{"big": "200"}] * 3 + [{"more": "507"}]
    # Replacing a value counts the new one instead of the old.
    assert _statuses(alice.proppatch("/d0", _props_body({"big": 60_000}))) == {"big": "200"}
    assert running.gateway.store.property_bytes("alice") <= 200_000


def test_a_users_quota_bytes_bounds_their_dead_properties_too(make_gateway):
    running = make_gateway(webdav=True)
    running.add_user("alice", quota_bytes=100_000, quota_files=3)
    alice = DavClient(running.webdav_port, "alice")
    assert alice.request("MKCOL", "/d").status == 201
    assert _statuses(alice.proppatch("/d", _props_body({"a": 60_000}))) == {"a": "200"}
    assert _statuses(alice.proppatch("/d", _props_body({"b": 60_000}))) == {"b": "507"}


def test_a_copy_past_the_budget_copies_the_content_without_its_properties(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"max_property_bytes_per_user": 100_000}})
    running.add_user("alice")
    alice = DavClient(running.webdav_port, "alice")
    alice.put("/a.txt", b"a")
    assert _statuses(alice.proppatch("/a.txt", _props_body({"tag": 60_000}))) == {"tag": "200"}
    assert alice.request("COPY", "/a.txt", headers={"Destination": "/b.txt"}).status == 201
    assert alice.get("/b.txt").body == b"a"
    assert running.gateway.store.property_names("local:/alice/b.txt") == []
    assert running.gateway.store.property_bytes("alice") <= 100_000


def test_mkcol_past_quota_files_is_507_and_the_stored_count_matches_a_scan(make_gateway):
    # Issue 15: a user with quota_files = 3 made 8 folders (folders were not counted).
    running = make_gateway(webdav=True)
    running.add_user("alice", quota_bytes=100_000, quota_files=3)
    alice = DavClient(running.webdav_port, "alice")
    assert [alice.request("MKCOL", f"/f{n}").status for n in range(5)] == [201, 201, 201, 507, 507]
    assert alice.put("/f0/a.txt", b"a").status == 507
    assert alice.request("DELETE", "/f2").status == 204
    assert alice.put("/f0/a.txt", b"a").status == 201
    stored = running.gateway.store.get_usage("alice")
    scanned = running.gateway.backends["local"].usage("/alice")
    assert (stored.bytes, stored.files) == (scanned.used_bytes, scanned.used_files) == (1, 3)
