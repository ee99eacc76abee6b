"""What changes a resource without a PUT: dead properties, locks, COPY/MOVE onto
mounts, moves into a home with a quota, and names the gateway keeps for itself."""
from __future__ import annotations

import re

import pytest

from tests.webdav.conftest import LOCK_BODY, DavClient, proppatch_body

READ_ONLY = {"/": ["list", "download"]}


def _unlock(client: DavClient, path: str, token: str) -> int:
    return client.request("UNLOCK", path, headers={"Lock-Token": f"<{token}>"}).status


@pytest.fixture
def shared(make_gateway):
    """alice and bob, each with a home, and one folder mounted into both at /shared."""
    running = make_gateway(webdav=True)
    team = running.data / "team"
    team.mkdir()
    (team / "f.txt").write_bytes(b"team file\n")
    for name in ("alice", "bob"):
        running.add_user(name, mounts={"/shared": ("local:/team", ["*"])})
    return running


@pytest.fixture
def reader(dav) -> DavClient:
    home = dav.data / "reader"
    home.mkdir()
    (home / "f.txt").write_bytes(b"read me\n")
    dav.add_user("reader", perms=READ_ONLY)
    return DavClient(dav.webdav_port, "reader")


# -- dead properties and locks need the right to write ---------------------------

def test_read_only_user_cannot_store_dead_properties(dav, reader):
    reply = reader.proppatch("/f.txt", proppatch_body("note", "urn:test:", "x" * 1000))
    assert reply.status == 207
    assert b"403 Forbidden" in reply.body and b"overwrite" in reply.body
    assert b"urn:test:" not in reader.propfind("/f.txt", "0").body
    remove = (b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:test:">'
              b'<D:remove><D:prop><Z:note/></D:prop></D:remove></D:propertyupdate>')
    assert b"403 Forbidden" in reader.proppatch("/f.txt", remove).body


def test_read_only_user_cannot_lock(dav, reader):
    reply = reader.request("LOCK", "/f.txt", LOCK_BODY, {"Timeout": "Second-600"})
    assert reply.status == 403, reply.body
    assert b"overwrite" in reply.body
    # Creating a file by LOCK needs upload, which a reader has not either.
    assert reader.request("LOCK", "/new.txt", LOCK_BODY).status == 403
    assert not (dav.data / "reader" / "new.txt").exists()
    assert reader.get("/f.txt").status == 200


def test_user_with_overwrite_can_lock_and_set_properties(alice):
    alice.put("/f.txt", b"mine")
    assert b"200 OK" in alice.proppatch("/f.txt", proppatch_body("note", "urn:test:", "ok")).body
    lock = alice.request("LOCK", "/f.txt", LOCK_BODY, {"Timeout": "Second-600"})
    assert lock.status == 200
    assert _unlock(alice, "/f.txt", lock.header("Lock-Token").strip("<>")) == 204


def test_a_property_over_the_size_limit_is_refused_with_507(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"max_property_bytes": 1000}})
    running.add_user("alice")
    alice = DavClient(running.webdav_port, "alice")
    alice.put("/f.txt", b"f")
    reply = alice.proppatch("/f.txt", proppatch_body("big", "urn:test:", "x" * 2000))
    assert reply.status == 207
    assert b"HTTP/1.1 507" in reply.body and b"1000 bytes" in reply.body
    assert b"xxxx" not in alice.propfind("/f.txt", "0").body
    assert b"200 OK" in alice.proppatch("/f.txt", proppatch_body("small", "urn:test:", "x" * 500)).body


def test_properties_past_the_count_limit_are_refused_with_507_and_none_is_stored(make_gateway):
    running = make_gateway(webdav=True, extra={"webdav": {"max_properties": 3}})
    running.add_user("alice")
    alice = DavClient(running.webdav_port, "alice")
    alice.put("/f.txt", b"f")
    for name in ("p1", "p2"):
        assert b"200 OK" in alice.proppatch("/f.txt", proppatch_body(name, "urn:test:", name)).body
    two_more = (b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:test:">'
                b'<D:set><D:prop><Z:p3>v</Z:p3><Z:p4>v</Z:p4></D:prop></D:set></D:propertyupdate>')
    reply = alice.proppatch("/f.txt", two_more)
    assert b"HTTP/1.1 507" in reply.body and b"at most 3" in reply.body
    # All or nothing: p3 fits alone but fails with the request (424).
    assert b"424 Failed Dependency" in reply.body
    assert b"p3" not in alice.propfind("/f.txt", "0").body
    # Replacing a stored property does not count twice.
    assert b"200 OK" in alice.proppatch("/f.txt", proppatch_body("p1", "urn:test:", "new")).body
    assert b"200 OK" in alice.proppatch("/f.txt", proppatch_body("p3", "urn:test:", "v")).body


# -- locks and properties belong to the storage location -------------------------

def test_a_lock_on_a_shared_mount_holds_for_every_user_of_it(shared):
    alice = DavClient(shared.webdav_port, "alice")
    bob = DavClient(shared.webdav_port, "bob")
    lock = alice.request("LOCK", "/shared/f.txt", LOCK_BODY, {"Timeout": "Second-600"})
    assert lock.status == 200
    token = lock.header("Lock-Token").strip("<>")
    refused = bob.put("/shared/f.txt", b"bob's version\n")
    assert refused.status == 423
    # The conflicting lock is named by bob's own URL, not by the storage key.
    assert re.search(rb"href>/shared/f.txt</", refused.body), refused.body
    assert b"team" not in refused.body
    assert bob.request("DELETE", "/shared/f.txt").status == 423
    assert token.encode() in bob.propfind("/shared/f.txt", "0").body
    assert (shared.data / "team" / "f.txt").read_bytes() == b"team file\n"
    assert alice.put("/shared/f.txt", b"alice's version\n", If=f"(<{token}>)").status == 204
    assert _unlock(alice, "/shared/f.txt", token) == 204
    assert bob.put("/shared/f.txt", b"bob's version\n").status == 204
    assert bob.request("DELETE", "/shared/f.txt").status == 204


def test_a_lock_on_the_mounted_folder_names_the_mount_point_for_every_user(make_gateway):
    running = make_gateway(webdav=True)
    (running.data / "team" / "docs").mkdir(parents=True)
    running.add_user("alice", mounts={"/team": ("local:/team", ["*"])})
    running.add_user("bob", mounts={"/docs": ("local:/team/docs", ["*"])})
    alice = DavClient(running.webdav_port, "alice")
    bob = DavClient(running.webdav_port, "bob")
    lock = alice.request("LOCK", "/team", LOCK_BODY, {"Timeout": "Second-600", "Depth": "infinity"})
    assert lock.status == 200
    refused = bob.put("/docs/new.txt", b"b")
    assert refused.status == 423
    # The lock root is above what bob sees: he is told the nearest folder he sees.
    assert re.search(rb"href>/docs/?</", refused.body), refused.body


def test_dead_properties_on_a_shared_mount_are_shared(shared):
    alice = DavClient(shared.webdav_port, "alice")
    bob = DavClient(shared.webdav_port, "bob")
    assert b"200 OK" in alice.proppatch("/shared/f.txt", proppatch_body("tag", "urn:test:", "seen")).body
    assert b"seen" in bob.propfind("/shared/f.txt", "0").body


# -- COPY and MOVE never replace a mount -------------------------------------------

@pytest.mark.parametrize("method", ["COPY", "MOVE"])
@pytest.mark.parametrize("destination", ["/shared", "/deep", "/deep/mnt"])
def test_copy_or_move_onto_a_mount_is_refused_and_empties_nothing(make_gateway, method, destination):
    running = make_gateway(webdav=True)
    for folder in ("team", "other"):
        (running.data / folder).mkdir()
        (running.data / folder / "keep.txt").write_bytes(b"keep\n")
    running.add_user("alice", mounts={"/shared": ("local:/team", ["*"]),
                                      "/deep/mnt": ("local:/other", ["*"])})
    alice = DavClient(running.webdav_port, "alice")
    assert alice.request("MKCOL", "/src").status == 201
    assert alice.put("/src/a.txt", b"a").status == 201
    reply = alice.request(method, "/src", headers={"Destination": destination, "Overwrite": "T"})
    assert reply.status == 403, reply.body
    assert (running.data / "team" / "keep.txt").read_bytes() == b"keep\n"
    assert (running.data / "other" / "keep.txt").read_bytes() == b"keep\n"
    assert alice.get("/src/a.txt").status == 200


# -- moves into the home are held to the quota -------------------------------------

def test_move_from_a_mount_on_the_same_backend_into_the_home_respects_the_quota(make_gateway):
    running = make_gateway(webdav=True)
    (running.data / "team").mkdir()
    running.add_user("alice", quota_bytes=1_000_000, mounts={"/team": ("local:/team", ["*"])})
    alice = DavClient(running.webdav_port, "alice")
    assert alice.put("/team/big.bin", b"b" * 1_500_000).status == 201
    reply = alice.request("MOVE", "/team/big.bin", headers={"Destination": "/big.bin"})
    assert reply.status == 507, reply.body
    assert (running.data / "team" / "big.bin").stat().st_size == 1_500_000
    assert not (running.data / "alice" / "big.bin").exists()


# -- the gateway's temp names are not client names ----------------------------------

@pytest.mark.parametrize("method", ["PUT", "MKCOL", "PROPFIND", "GET"])
def test_paths_with_the_reserved_temp_prefix_are_refused(dav, alice, method):
    reply = alice.request(method, "/.gw-upload-0123456789abcdef", b"x" if method == "PUT" else None)
    assert reply.status == 400, reply.body
    assert b"reserved" in reply.body
    assert not (dav.data / "alice" / ".gw-upload-0123456789abcdef").exists()
    moved = alice.put("/a.txt", b"a")
    assert moved.status in (201, 204)
    reply = alice.request("MOVE", "/a.txt", headers={"Destination": "/d/.gw-upload-x"})
    assert reply.status == 400
