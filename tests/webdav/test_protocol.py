"""Status codes and headers of the WebDAV front-end, request by request."""
from __future__ import annotations

import os
import re

import pytest

from tests.webdav.conftest import DavClient

QUOTA_QUERY = (b'<D:propfind xmlns:D="DAV:"><D:prop><D:quota-used-bytes/>'
               b'<D:quota-available-bytes/></D:prop></D:propfind>')


def test_anonymous_options_on_root_answers_with_dav_classes(dav):
    reply = DavClient(dav.webdav_port, None).request("OPTIONS", "/")
    assert reply.status == 200
    assert reply.header("DAV") == "1,2"
    assert "PROPFIND" in reply.header("Allow")


def test_requests_without_credentials_get_a_basic_challenge(dav):
    reply = DavClient(dav.webdav_port, None).request("PROPFIND", "/", headers={"Depth": "0"})
    assert reply.status == 401
    assert reply.header("WWW-Authenticate") == 'Basic realm="gateway"'


def test_wrong_password_gets_401(dav):
    assert DavClient(dav.webdav_port, "alice", "nope").get("/").status == 401


def test_unreadable_basic_credentials_get_401_not_500(dav):
    client = DavClient(dav.webdav_port, None)
    for value in ("Basic !!!", "Basic " + "Zm9v", "Basic /w=="):
        assert client.request("GET", "/", headers={"Authorization": value}).status == 401


def test_put_new_then_overwrite_answers_201_then_204(alice):
    assert alice.put("/f.txt", b"one").status == 201
    assert alice.put("/f.txt", b"two").status == 204
    assert alice.get("/f.txt").body == b"two"


def test_put_into_missing_folder_answers_409(alice):
    assert alice.put("/missing/f.txt", b"x").status == 409


def test_mkcol_answers_201_then_405_and_409_without_parent(alice):
    assert alice.request("MKCOL", "/d").status == 201
    assert alice.request("MKCOL", "/d").status == 405
    assert alice.request("MKCOL", "/x/y").status == 409


def test_copy_with_overwrite_false_onto_existing_answers_412(alice):
    alice.put("/a.txt", b"a")
    alice.put("/b.txt", b"b")
    reply = alice.request("COPY", "/a.txt", headers={"Destination": "/b.txt", "Overwrite": "F"})
    assert reply.status == 412
    assert alice.get("/b.txt").body == b"b"


def test_copy_of_a_folder_with_depth_0_copies_only_the_folder(alice):
    alice.request("MKCOL", "/d")
    alice.put("/d/x.txt", b"x")
    assert alice.request("COPY", "/d", headers={"Destination": "/e", "Depth": "0"}).status == 201
    assert alice.propfind("/e", "0").status == 207
    assert alice.get("/e/x.txt").status == 404


def test_delete_of_a_non_empty_folder_removes_it_all(alice):
    alice.request("MKCOL", "/d")
    alice.put("/d/x.txt", b"x")
    assert alice.request("DELETE", "/d").status == 204
    assert alice.propfind("/d", "0").status == 404


def test_get_with_range_returns_206_and_the_slice(alice):
    alice.put("/r.bin", bytes(range(256)))
    reply = alice.get("/r.bin", Range="bytes=10-19")
    assert reply.status == 206
    assert reply.body == bytes(range(10, 20))
    assert reply.header("Content-Range") == "bytes 10-19/256"


def test_etag_and_last_modified_drive_304_and_412(alice):
    alice.put("/c.txt", b"cached")
    first = alice.get("/c.txt")
    etag = first.header("ETag")
    assert etag and first.header("Last-Modified")
    assert alice.get("/c.txt", **{"If-None-Match": etag}).status == 304
    assert alice.get("/c.txt", **{"If-Modified-Since": first.header("Last-Modified")}).status == 304
    assert alice.put("/c.txt", b"changed", **{"If-Match": '"not-the-etag"'}).status == 412
    assert alice.put("/c.txt", b"changed", **{"If-Match": etag}).status == 204


def test_propfind_depth_infinity_is_refused_with_finite_depth_condition(alice):
    reply = alice.propfind("/", "infinity")
    assert reply.status == 403
    assert b"propfind-finite-depth" in reply.body


def test_quota_properties_report_the_users_quota(dav):
    dav.add_user("carol", quota_bytes=1_000_000)
    carol = DavClient(dav.webdav_port, "carol")
    carol.put("/q.bin", b"q" * 1000)
    body = carol.propfind("/", "0", QUOTA_QUERY).body
    assert re.search(rb"<D:quota-used-bytes>1000</D:quota-used-bytes>", body), body
    assert re.search(rb"<D:quota-available-bytes>999000</D:quota-available-bytes>", body), body


def test_quota_properties_are_not_part_of_allprop(alice):
    assert b"quota-used-bytes" not in alice.propfind("/", "0").body


def test_put_over_quota_answers_507_and_stores_nothing(dav):
    dav.add_user("dave", quota_bytes=1000)
    dave = DavClient(dav.webdav_port, "dave")
    assert dave.put("/big.bin", b"b" * 5000).status == 507
    assert dave.get("/big.bin").status == 404


def test_browser_get_on_a_folder_shows_an_html_listing(alice):
    alice.put("/listed.txt", b"x")
    reply = alice.get("/")
    assert reply.status == 200
    assert reply.header("Content-Type").startswith("text/html")
    assert b"listed.txt" in reply.body


def test_x_oc_mtime_on_put_sets_the_modification_time(dav, alice):
    reply = alice.put("/m.txt", b"m", **{"X-OC-Mtime": "1000000000"})
    assert reply.status == 201
    assert reply.header("X-OC-MTime") == "accepted"
    assert int(os.stat(dav.data / "alice" / "m.txt").st_mtime) == 1_000_000_000


def test_win32_last_modified_proppatch_sets_the_modification_time(dav, alice):
    alice.put("/w.txt", b"w")
    body = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
            b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop>'
            b'<Z:Win32CreationTime>Sun, 09 Sep 2001 01:46:40 GMT</Z:Win32CreationTime>'
            b'<Z:Win32LastAccessTime>Sun, 09 Sep 2001 01:46:40 GMT</Z:Win32LastAccessTime>'
            b'<Z:Win32LastModifiedTime>Sun, 09 Sep 2001 01:46:40 GMT</Z:Win32LastModifiedTime>'
            b'<Z:Win32FileAttributes>00000020</Z:Win32FileAttributes>'
            b'</D:prop></D:set></D:propertyupdate>')
    reply = alice.proppatch("/w.txt", body)
    assert reply.status == 207
    assert b"HTTP/1.1 200 OK" in reply.body and b"403" not in reply.body
    assert int(os.stat(dav.data / "alice" / "w.txt").st_mtime) == 1_000_000_000


def test_proppatch_is_all_or_nothing_when_the_time_is_refused(make_gateway):
    from tests.webdav.conftest import DavClient
    running = make_gateway(webdav=True)
    running.add_user("carol", perms={"/": ["list", "download", "upload", "overwrite"]})
    carol = DavClient(running.webdav_port, "carol")
    assert carol.put("/c.txt", b"c").status == 201
    before = os.stat(running.data / "carol" / "c.txt").st_mtime
    body = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
            b'xmlns:Z="urn:schemas-microsoft-com:" xmlns:X="urn:example:"><D:set><D:prop>'
            b'<X:color>blue</X:color>'
            b'<Z:Win32LastModifiedTime>Sun, 09 Sep 2001 01:46:40 GMT</Z:Win32LastModifiedTime>'
            b'</D:prop></D:set></D:propertyupdate>')
    reply = carol.proppatch("/c.txt", body)
    assert reply.status == 207
    assert b"403" in reply.body and b"424" in reply.body   # refused, and the rest not applied
    assert os.stat(running.data / "carol" / "c.txt").st_mtime == before
    found = carol.propfind("/c.txt", depth="0",
                           body=b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:X="urn:example:">'
                                b'<D:prop><X:color/></D:prop></D:propfind>')
    assert b"blue" not in found.body


def test_chunked_put_with_expected_entity_length_is_stored(dav, alice):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=30)
    data = [b"a" * 70000, b"b" * 30000]
    conn.request("PUT", "/finder.bin", body=iter(data), encode_chunked=True,
                 headers={"Authorization": alice.auth, "Transfer-Encoding": "chunked",
                          "X-Expected-Entity-Length": "100000"})
    assert conn.getresponse().status == 201
    conn.close()
    assert alice.get("/finder.bin").body == b"".join(data)


def test_chunked_put_shorter_than_expected_entity_length_commits_nothing(dav, alice):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=30)
    conn.request("PUT", "/finder.bin", body=iter([b"a" * 10]), encode_chunked=True,
                 headers={"Authorization": alice.auth, "Transfer-Encoding": "chunked",
                          "X-Expected-Entity-Length": "100000"})
    assert conn.getresponse().status == 400
    conn.close()
    assert alice.get("/finder.bin").status == 404


@pytest.mark.parametrize("policy", ["hide", "refuse"])
def test_macos_metadata_files_are_hidden_or_refused(make_gateway, policy):
    running = make_gateway(webdav=True, extra={"webdav": {"macos_files": policy}})
    running.add_user("mac")
    mac = DavClient(running.webdav_port, "mac")
    put = mac.put("/._photo.jpg", b"resource fork")
    mac.put("/photo.jpg", b"jpeg")
    listing = mac.propfind("/", "1").body
    assert b"photo.jpg" in listing and b"._photo.jpg" not in listing
    if policy == "refuse":
        assert put.status == 403
        assert mac.put("/.DS_Store", b"x").status == 403
        assert mac.request("MOVE", "/photo.jpg", headers={"Destination": "/._p"}).status == 403
    else:
        assert put.status == 201
        assert mac.get("/._photo.jpg").body == b"resource fork"
