"""Hostile input: XML tricks, oversized bodies, broken encodings and traversal attempts."""
from __future__ import annotations

import socket

import pytest

from tests.webdav.conftest import DavClient

XXE = (b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<D:propfind xmlns:D="DAV:"><D:prop><D:displayname>&x;</D:displayname></D:prop></D:propfind>')
BOMB = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'.encode() for i in range(9))
        + b']><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop><Z:x xmlns:Z="urn:z">&j;</Z:x>'
        b'</D:prop></D:set></D:propertyupdate>')
NOT_UTF8 = b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop><Z:\xff\xfe xmlns:Z="u"/></D:prop></D:propfind>'


@pytest.mark.parametrize("method,body", [("PROPFIND", XXE), ("PROPPATCH", BOMB), ("LOCK", XXE),
                                         ("PROPFIND", NOT_UTF8)],
                         ids=["xxe-propfind", "bomb-proppatch", "xxe-lock", "invalid-utf8"])
def test_hostile_xml_bodies_get_400_and_change_nothing(dav, alice, method, body):
    alice.put("/t.txt", b"t")
    reply = alice.request(method, "/t.txt", body, {"Depth": "0", "Content-Type": "application/xml"})
    assert reply.status == 400
    assert b"root:" not in reply.body
    assert b"lockdiscovery/>" in alice.propfind("/t.txt", "0").body   # no lock was taken
    assert b"urn:z" not in alice.propfind("/t.txt", "0").body
    assert alice.get("/t.txt").status == 200   # still serving


XXE_TEXT = XXE.decode()


@pytest.mark.parametrize("body", [
    XXE_TEXT.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>').encode("utf-16"),
    XXE_TEXT.encode("utf-16-le"),
    XXE_TEXT.encode("utf-16-be"),
    XXE_TEXT.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-32"?>').encode("utf-32"),
    b'<?xml version="1.0" encoding="UTF-7"?>+ADw-!DOCTYPE p +AFs-+ADw-!ENTITY x SYSTEM '
    b'+ACI-file:///etc/passwd+ACI-+AD4-+AF0-+AD4-<D:propfind xmlns:D="DAV:"><D:prop>'
    b'<D:displayname>+ACY-x;</D:displayname></D:prop></D:propfind>',
], ids=["utf-16-bom", "utf-16le", "utf-16be", "utf-32", "utf-7"])
def test_xml_body_in_another_encoding_is_refused_so_no_dtd_hides(dav, alice, body):
    alice.put("/t.txt", b"t")
    for method in ("PROPFIND", "PROPPATCH", "LOCK"):
        reply = alice.request(method, "/t.txt", body, {"Depth": "0",
                                                       "Content-Type": "application/xml; charset=utf-16"})
        assert reply.status == 400, (method, reply)
        assert b"root:" not in reply.body
    assert b"lockdiscovery/>" in alice.propfind("/t.txt", "0").body


def test_utf8_xml_bodies_with_and_without_bom_still_work(dav, alice):
    query = ('<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:">'
             '<D:prop><D:displayname/></D:prop></D:propfind>').encode()
    alice.put("/gr%C3%BC%C3%9Fe.txt", b"t")
    for body in (query, b"\xef\xbb\xbf" + query, query.replace(b' encoding="utf-8"', b"")):
        reply = alice.propfind("/gr%C3%BC%C3%9Fe.txt", "0", body)
        assert reply.status == 207, reply
        assert "grüße.txt".encode() in reply.body


def test_ten_megabyte_xml_body_gets_413_without_being_read(dav, alice):
    sock = socket.create_connection(("127.0.0.1", dav.webdav_port), timeout=30)
    sock.sendall((f"PROPFIND / HTTP/1.1\r\nHost: x\r\nAuthorization: {alice.auth}\r\nDepth: 0\r\n"
                  f"Content-Length: {10 * 1024 * 1024}\r\n\r\n").encode() + b"<" * 1000)
    head = sock.recv(4096)
    sock.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert alice.propfind("/", "0").status == 207


def test_chunked_xml_body_over_the_limit_gets_413(dav, alice):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=30)
    chunks = [b"<" * 65536] * 20   # 1.25 MiB, over the 1 MiB default
    conn.request("PROPPATCH", "/", body=iter(chunks), encode_chunked=True,
                 headers={"Authorization": alice.auth, "Transfer-Encoding": "chunked"})
    try:
        status = conn.getresponse().status
    except (ConnectionResetError, BrokenPipeError):
        status = 413  # the server may close while the client still sends
    conn.close()
    assert status == 413


@pytest.mark.parametrize("raw_path", [
    "/%2e%2e/alice-secret.txt",
    "/sub/%2e%2e/%2e%2e/alice-secret.txt",
    "/..%2falice-secret.txt",
    "/%252e%252e/alice-secret.txt",
    "/..%5calice-secret.txt",
    "/sub/..\\..\\alice-secret.txt",
    "/%c0%ae%c0%ae/alice-secret.txt",
    "/%e0%80%ae%e0%80%ae/alice-secret.txt",
])
def test_encoded_traversal_never_leaves_the_users_tree(dav, raw_path):
    (dav.data / "alice-secret.txt").write_bytes(b"outside every home")
    dav.add_user("eve")
    eve = DavClient(dav.webdav_port, "eve")
    eve.request("MKCOL", "/sub")
    reply = eve.request("GET", raw_path)
    assert reply.status in (400, 404), reply
    assert b"outside every home" not in reply.body
    put = eve.put(raw_path, b"planted")
    planted = [p for p in dav.data.rglob("*") if p.is_file() and p.read_bytes() == b"planted"]
    if put.status == 201:
        # cheroot keeps %2F literal: the odd name is a file inside eve's own home.
        assert [p.parent for p in planted] == [dav.data / "eve"], planted
    else:
        assert put.status in (400, 404, 409) and planted == [], put
    assert (dav.data / "alice-secret.txt").read_bytes() == b"outside every home"
    assert eve.get("/").status == 200


def test_destination_outside_the_tree_is_refused(dav, alice):
    alice.put("/a.txt", b"a")
    reply = alice.request("MOVE", "/a.txt", headers={"Destination": "/../../escaped.txt"})
    assert reply.status in (400, 403, 502)
    assert not (dav.data / "escaped.txt").exists()
    assert alice.get("/a.txt").body == b"a"
