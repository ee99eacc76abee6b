"""Error answers: clean statuses instead of 500s, short bodies that leak nothing, tracebacks in the log."""
from __future__ import annotations

import logging
import os
import re
import socket

import pytest

from gateway.vfs import UserFS
from gateway.webdav.provider import UserFSProvider
from tests.webdav.conftest import LOCK_BODY, DavClient, Response, read_until_closed

BAD_MTIMES = ["nan", "inf", "-inf", "1e300", "garbage", "-1", "4294967296", "0x10"]


@pytest.mark.parametrize("value", BAD_MTIMES)
def test_put_with_an_unusable_x_oc_mtime_answers_400_and_keeps_the_previous_version(dav, alice, value):
    assert alice.put("/m.txt", b"version 1").status == 201
    before = os.stat(dav.data / "alice" / "m.txt").st_mtime_ns
    reply = alice.put("/m.txt", b"version 2", **{"X-OC-Mtime": value})
    assert reply.status == 400
    assert alice.get("/m.txt").body == b"version 1"
    assert os.stat(dav.data / "alice" / "m.txt").st_mtime_ns == before
    assert alice.put("/new.txt", b"new", **{"X-OC-Mtime": value}).status == 400
    assert alice.get("/new.txt").status == 404


def test_unusable_x_oc_mtime_is_refused_before_the_body_is_read(dav, alice):
    sock = socket.create_connection(("127.0.0.1", dav.webdav_port), timeout=30)
    sock.sendall((f"PUT /big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {alice.auth}\r\n"
                  f"Content-Length: {100 * 1024 * 1024}\r\nExpect: 100-continue\r\n"
                  f"X-OC-Mtime: nan\r\n\r\n").encode())
    answer = read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"100 Continue" not in answer
    assert alice.get("/big.bin").status == 404


def test_x_oc_mtime_in_range_is_still_applied(dav, alice):
    reply = alice.put("/t.txt", b"t", **{"X-OC-Mtime": "4294967295"})
    assert reply.status == 201
    assert reply.header("X-OC-MTime") == "accepted"
    assert os.stat(dav.data / "alice" / "t.txt").st_mtime == 4294967295


def test_proppatch_of_a_time_out_of_range_is_refused_and_changes_nothing(dav, alice):
    alice.put("/p.txt", b"p")
    before = os.stat(dav.data / "alice" / "p.txt").st_mtime_ns
    body = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
            b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop>'
            b'<Z:Win32LastModifiedTime>Fri, 31 Dec 9999 23:59:59 GMT</Z:Win32LastModifiedTime>'
            b'</D:prop></D:set></D:propertyupdate>')
    reply = alice.proppatch("/p.txt", body)
    assert reply.status in (207, 400), reply
    assert b"500" not in reply.body and b"200 OK" not in reply.body
    assert os.stat(dav.data / "alice" / "p.txt").st_mtime_ns == before


def test_delete_of_the_root_answers_403_and_deletes_nothing(dav, alice):
    alice.put("/keep.txt", b"keep")
    reply = alice.request("DELETE", "/")
    assert reply.status == 403
    assert alice.get("/keep.txt").body == b"keep"


@pytest.mark.parametrize("method", ["COPY", "MOVE"])
@pytest.mark.parametrize("destination", ["/", "http://{host}/", "/sub/..", "//"])
def test_copy_or_move_onto_the_root_answers_403_and_changes_nothing(dav, alice, method, destination):
    destination = destination.format(host=f"127.0.0.1:{dav.webdav_port}")
    alice.put("/keep.txt", b"keep")
    alice.request("MKCOL", "/dir")
    alice.put("/dir/inner.txt", b"inner")
    for source in ("/keep.txt", "/dir/"):
        reply = alice.request(method, source, headers={"Destination": destination, "Overwrite": "T"})
        assert reply.status == 403, (source, reply)
    assert alice.get("/keep.txt").body == b"keep"
    assert alice.get("/dir/inner.txt").body == b"inner"


def _assert_short_and_silent(reply: Response) -> None:
    assert b"WsgiDAV" not in reply.body
    assert b"Source exception" not in reply.body and b"Traceback" not in reply.body
    assert not re.search(rb"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d", reply.body), reply.body
    assert len(reply.body) < 300, reply.body


def _requests(alice: DavClient, anonymous: DavClient) -> list[tuple[int, Response]]:
    alice.put("/f.txt", b"f")
    alice.request("MKCOL", "/d")
    return [
        (401, anonymous.request("PROPFIND", "/", headers={"Depth": "0"})),
        (404, alice.get("/missing.txt")),
        (404, alice.request("HEAD", "/missing.txt")),
        (405, alice.request("MKCOL", "/d")),
        (409, alice.put("/no/such/parent.txt", b"x")),
        (412, alice.request("COPY", "/f.txt", headers={"Destination": "/d", "Overwrite": "F"})),
        (400, alice.put("/f.txt", b"x", **{"X-OC-Mtime": "nan"})),
        (403, alice.request("DELETE", "/")),
        (201, alice.request("MKCOL", "/e")),
        (201, alice.put("/g.txt", b"g")),
    ]


def test_error_and_status_bodies_are_short_and_name_no_version_time_or_exception(dav, alice):
    for expected, reply in _requests(alice, DavClient(dav.webdav_port, None)):
        assert reply.status == expected, reply
        _assert_short_and_silent(reply)
        if reply.body:
            assert reply.header("Content-Type") == "text/plain; charset=utf-8"
            assert reply.body.startswith(str(expected).encode())
    assert DavClient(dav.webdav_port, None).get("/").header("WWW-Authenticate") == 'Basic realm="gateway"'


def test_dav_error_conditions_keep_their_xml_bodies(dav, alice, bob):
    alice.put("/l.txt", b"l")
    assert alice.request("LOCK", "/l.txt", LOCK_BODY, {"Timeout": "Second-60"}).status == 200
    locked = alice.put("/l.txt", b"no token")
    assert locked.status == 423
    assert re.search(rb"<(\w+:)?error xmlns(:\w+)?=\"DAV:\">\s*<(\w+:)?no-conflicting-lock>\s*"
                     rb"<(\w+:)?href>/l.txt</", locked.body), locked.body
    assert locked.header("Content-Type").startswith("application/xml")
    infinite = alice.propfind("/", "infinity")
    assert infinite.status == 403
    assert b"propfind-finite-depth" in infinite.body
    for reply in (locked, infinite):
        _assert_short_and_silent(reply)


def test_unexpected_exception_answers_a_short_500_and_logs_the_traceback_with_the_request(
        dav, alice, monkeypatch, caplog):
    def broken(self, path):
        raise RuntimeError("secret detail /srv/internal")

    monkeypatch.setattr(UserFS, "list_dir", broken)
    with caplog.at_level(logging.ERROR):
        reply = alice.propfind("/", "1")
    assert reply.status == 500
    assert reply.body == b"500 Internal Server Error\n"
    records = [r for r in caplog.records if r.levelno == logging.ERROR and "PROPFIND /" in r.getMessage()]
    assert records, caplog.text
    assert "secret detail" in caplog.text and "Traceback" in caplog.text


def test_exception_wsgidav_catches_itself_answers_a_short_500_and_is_logged(dav, alice, monkeypatch,
                                                                             caplog):
    alice.request("MKCOL", "/d")

    def broken(self, path):
        raise RuntimeError("secret detail /srv/internal")

    monkeypatch.setattr(UserFS, "remove_tree", broken)
    with caplog.at_level(logging.ERROR):
        reply = alice.request("DELETE", "/d")
    assert reply.status == 500
    assert reply.body == b"500 Internal Server Error\n"
    assert any(r.levelno == logging.ERROR and "DELETE /d" in r.getMessage() for r in caplog.records), \
        caplog.text
    assert "secret detail" in caplog.text and "Traceback" in caplog.text


# A line that, written raw after a newline, would pass for one of the gateway's own.
FORGED = "2026-12-08 02:00:00,000 INFO gateway.audit: FORGED login of admin ok"


def test_a_newline_in_the_path_of_a_failing_request_does_not_forge_a_log_line(dav, alice, monkeypatch,
                                                                                caplog):
    def broken(self, environ):
        raise RuntimeError("fault before the path is checked")

    # A fault before the normalizer refuses the newline: the raw path reaches the log.
    monkeypatch.setattr(UserFSProvider, "fs_for", broken)
    with caplog.at_level(logging.ERROR):
        reply = alice.propfind("/report%0a" + FORGED.replace(" ", "%20"), "0")
    assert reply.status == 500
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR and "PROPFIND" in r.getMessage()]
    assert "\n" not in record.getMessage()
    assert r"/report\n2026-12-08" in record.getMessage()
    assert not [line for line in caplog.text.splitlines() if line.startswith("2026-12-08")]
