"""PROPFIND at Depth 0 and 1 (gateway/webdav/propfind.py) answers what wsgidav answers.

Each request is sent twice through the running gateway, once with the fast
path and once with wsgidav's own PROPFIND, and the parsed multistatus
answers must be equal; the values clients depend on are pinned as well.
"""
from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from lxml import etree

from gateway.webdav.provider import UserFSProvider
from tests.webdav.conftest import LOCK_BODY, DavClient, proppatch_body

ALLPROP = b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>'
PROPNAME = b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:propname/></D:propfind>'
# What Windows, davfs2, rclone and macOS ask for, plus a dead property and names nobody has.
NAMED = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" '
         b'xmlns:Z="urn:schemas-microsoft-com:" xmlns:T="urn:test:"><D:prop>'
         b'<D:getcontentlength/><D:getlastmodified/><D:resourcetype/><D:creationdate/><D:displayname/>'
         b'<D:getetag/><D:getcontenttype/><Z:Win32CreationTime/><Z:Win32LastAccessTime/>'
         b'<Z:Win32LastModifiedTime/><Z:Win32FileAttributes/><D:quota-used-bytes/>'
         b'<D:quota-available-bytes/><D:lockdiscovery/><D:supportedlock/><T:color/><D:nosuchprop/>'
         b'<nons/></D:prop></D:propfind>')
EMPTY_PROPFIND = b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"/>'
BODIES = {"allprop": ALLPROP, "propname": PROPNAME, "named": NAMED, "no body": None,
          "empty propfind": EMPTY_PROPFIND}
# Names that need quoting in an href or escaping in XML.
NAMES = ["plain.txt", "sp ace.txt", "per%cent.txt", "ha#sh.txt", "ünï €.txt", "a&b.txt", "q'(x).xml",
         "page.html"]


@pytest.fixture
def tree(dav) -> DavClient:
    """carol's /d: awkward names, dead properties on a file and folders, a locked file, a folder
    locked with everything in it, and a mount."""
    (dav.data / "carol" / "d").mkdir(parents=True)   # before the mount below makes /d a mount's parent
    dav.add_user("carol", mounts={"/d/mnt": ("local:/team", ["*"])})
    client = DavClient(dav.webdav_port, "carol")
    for name in NAMES:
        assert client.put("/d/" + quote(name), name.encode()).status == 201
    assert client.request("MKCOL", "/d/sub%20dir/").status == 201
    assert client.proppatch("/d/plain.txt", proppatch_body("color", "urn:test:", "blue &amp; green")).status == 207
    assert client.proppatch("/d/sub%20dir/", proppatch_body("color", "urn:test:", "red")).status == 207
    assert client.proppatch("/d/mnt/", proppatch_body("color", "urn:test:", "team")).status == 207
    assert client.put("/d/sub%20dir/inner.txt", b"inner").status == 201
    for locked, depth in (("/d/a%26b.txt", "0"), ("/d/sub%20dir/", "infinity")):
        reply = client.request("LOCK", locked, LOCK_BODY, {"Content-Type": "application/xml",
                                                           "Timeout": "Second-3600", "Depth": depth})
        assert reply.status == 200
    return client


def _canonical(element) -> tuple:
    """An element as comparable data: tag, text, children in order.

    Lock timeouts count down and the free space of a shared disk changes between two requests.
    """
    text = re.sub(r"Second-\d+", "Second-N", (element.text or "").strip())
    if element.tag == "{DAV:}quota-available-bytes" and text:
        text = "N"
    return element.tag, text, tuple(_canonical(child) for child in element)


def _parse(body: bytes) -> dict[str, dict[str, list[tuple]]]:
    """href -> status -> the properties in that propstat, in order."""
    root = etree.fromstring(body)
    assert root.tag == "{DAV:}multistatus"
    answer: dict[str, dict[str, list[tuple]]] = {}
    for response in root.findall("{DAV:}response"):
        href = response.findtext("{DAV:}href")
        assert href not in answer
        answer[href] = {propstat.findtext("{DAV:}status"): [_canonical(p) for p in propstat.find("{DAV:}prop")]
                        for propstat in response.findall("{DAV:}propstat")}
    return answer


def _both(client: DavClient, path: str, depth: str, body: bytes | None, monkeypatch):
    fast = client.propfind(path, depth, body)
    with monkeypatch.context() as patch:
        patch.setattr(UserFSProvider, "fast_propfind", False)
        slow = client.propfind(path, depth, body)
    return fast, slow


@pytest.mark.parametrize("path", ["/d/", "/d", "/d/plain.txt", "/d/sub%20dir/", "/"])
def test_propfind_answers_what_wsgidav_answers(tree, monkeypatch, path):
    for body in BODIES.values():
        for depth in ("0", "1"):
            fast, slow = _both(tree, path, depth, body, monkeypatch)
            assert (fast.status, fast.header("Content-Type")) == (slow.status, slow.header("Content-Type")) \
                == (207, "application/xml; charset=utf-8"), (depth, body)
            assert _parse(fast.body) == _parse(slow.body), (depth, body)


def test_propfind_depth_1_lists_every_child_with_its_quoted_href(tree):
    answer = _parse(tree.propfind("/d/", "1", ALLPROP).body)
    expected = {"/d/", "/d/sub%20dir/", "/d/mnt/"} | {"/d/" + quote(name).replace("%27", "'")
                                                      .replace("%28", "(").replace("%29", ")")
                                                      for name in NAMES}
    assert set(answer) == expected
    plain = dict((tag, (text, children)) for tag, text, children in answer["/d/plain.txt"]["HTTP/1.1 200 OK"])
    assert plain["{DAV:}getcontentlength"] == ("9", ())
    assert plain["{DAV:}displayname"] == ("plain.txt", ())
    assert plain["{urn:test:}color"] == ("blue & green", ())
    names = [tag for tag, _, _ in answer["/d/a%26b.txt"]["HTTP/1.1 200 OK"]]
    assert "{urn:test:}color" not in names
    folder = dict((tag, children) for tag, _, children in answer["/d/sub%20dir/"]["HTTP/1.1 200 OK"])
    assert folder["{DAV:}resourcetype"] == (("{DAV:}collection", "", ()),)
    assert dict((tag, text) for tag, text, _ in answer["/d/mnt/"]["HTTP/1.1 200 OK"])["{urn:test:}color"] == "team"


def test_propfind_depth_1_shows_a_childs_lock_and_none_on_the_others(tree):
    answer = _parse(tree.propfind("/d/", "1", NAMED).body)
    locked = dict((tag, children) for tag, _, children in answer["/d/a%26b.txt"]["HTTP/1.1 200 OK"])
    [activelock] = locked["{DAV:}lockdiscovery"]
    lockroot = dict((tag, children) for tag, _, children in activelock[2])["{DAV:}lockroot"]
    assert lockroot == (("{DAV:}href", "/d/a%26b.txt", ()),)
    plain = dict((tag, children) for tag, _, children in answer["/d/plain.txt"]["HTTP/1.1 200 OK"])
    assert plain["{DAV:}lockdiscovery"] == ()


def test_propfind_named_props_a_file_lacks_are_404_and_quota_is_empty(tree):
    answer = _parse(tree.propfind("/d/", "1", NAMED).body)["/d/plain.txt"]
    missing = {tag for tag, _, _ in answer["HTTP/1.1 404 Not Found"]}
    assert missing == {"{DAV:}creationdate", "{urn:schemas-microsoft-com:}Win32CreationTime",
                       "{urn:schemas-microsoft-com:}Win32LastAccessTime",
                       "{urn:schemas-microsoft-com:}Win32LastModifiedTime",
                       "{urn:schemas-microsoft-com:}Win32FileAttributes", "{DAV:}nosuchprop", "nons"}
    found = dict((tag, text) for tag, text, _ in answer["HTTP/1.1 200 OK"])
    assert found["{DAV:}quota-used-bytes"] == "" and found["{DAV:}getcontenttype"] == "text/plain; charset=utf-8"


def test_propfind_of_a_missing_name_is_404_at_depth_0_and_1(tree, monkeypatch):
    for depth in ("0", "1"):
        fast, slow = _both(tree, "/d/nothing.txt", depth, NAMED, monkeypatch)
        assert fast.status == slow.status == 404


def test_propfind_without_list_permission_is_403_as_before(dav, monkeypatch):
    (dav.data / "dora" / "closed").mkdir(parents=True)
    (dav.data / "dora" / "closed" / "f.txt").write_bytes(b"f")
    dav.add_user("dora", perms={"/": ["*"], "/closed": ["download"]})
    client = DavClient(dav.webdav_port, "dora")
    fast, slow = _both(client, "/closed/", "1", ALLPROP, monkeypatch)
    assert fast.status == slow.status == 403


@pytest.mark.parametrize("depth", ["infinity", "2"])
def test_propfind_other_depths_answer_as_before(tree, depth):
    # wsgidav answers these: infinity is refused (403), anything else is a bad request.
    assert tree.propfind("/d/", depth, ALLPROP).status == (403 if depth == "infinity" else 400)


@pytest.mark.parametrize("body", [b"<not-xml", b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"/>',
                                  b'<D:propfind xmlns:D="DAV:"><D:allprop/><D:prop><D:displayname/></D:prop></D:propfind>'])
def test_propfind_bad_body_is_400_as_before(tree, monkeypatch, body):
    fast, slow = _both(tree, "/d/", "1", body, monkeypatch)
    assert fast.status == slow.status == 400


def test_a_name_no_path_can_carry_is_left_out_of_the_listing_and_logged_once(dav, monkeypatch, caplog):
    # Made outside the gateway (an S3 tool, another process): no request path can
    # carry a control character or a backslash, so no href can either. The rest
    # of the folder stays listable, for its owner and for whoever mounts it.
    (dav.data / "erin" / "odd").mkdir(parents=True)
    for name in ("bad\x01name.txt", "back\\slash.txt", "good.txt"):
        (dav.data / "erin" / "odd" / name).write_bytes(b"x")
    dav.add_user("erin")
    dav.add_user("finn", mounts={"/shared": ("local:/erin/odd", ["list", "download"])})
    caplog.set_level("WARNING", logger="gateway.webdav.provider")
    for client, path in ((DavClient(dav.webdav_port, "erin"), "/odd/"),
                         (DavClient(dav.webdav_port, "finn"), "/shared/")):
        fast, slow = _both(client, path, "1", ALLPROP, monkeypatch)
        assert fast.status == slow.status == 207
        assert _parse(fast.body) == _parse(slow.body)
        assert sorted(_parse(fast.body)) == [path, path + "good.txt"]
    skipped = [r for r in caplog.records if "leave out" in r.getMessage()]
    assert len(skipped) == 2, [r.getMessage() for r in skipped]   # one line per odd name, not per request


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "wsgidav"])
def test_propname_lists_every_property_name_without_values(tree, monkeypatch, fast):
    """RFC 4918 9.1: <D:propname/> asks for the names of all properties, values left out."""
    monkeypatch.setattr(UserFSProvider, "fast_propfind", fast)
    for depth in ("0", "1"):
        reply = tree.propfind("/d/", depth, PROPNAME)
        assert reply.status == 207
        answer = _parse(reply.body)
        assert len(answer) == (1 if depth == "0" else 2 + len(NAMES) + 1)
        names = {tag: (text, children) for tag, text, children in answer["/d/plain.txt" if depth == "1" else "/d/"]
                 ["HTTP/1.1 200 OK"]}
        assert {"{DAV:}getlastmodified", "{DAV:}resourcetype", "{DAV:}displayname"} <= set(names)
        if depth == "1":
            assert {"{DAV:}getcontentlength", "{urn:test:}color"} <= set(names)
        assert all(value == ("", ()) for value in names.values()), names


def test_propname_with_a_condition_goes_to_wsgidav_and_still_lists_names(tree):
    reply = tree.request("PROPFIND", "/d/plain.txt", PROPNAME,
                         {"Depth": "0", "Content-Type": "application/xml", "If-Modified-Since":
                          "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert reply.status == 207, reply.body[:300]
    names = {tag for tag, _, _ in _parse(reply.body)["/d/plain.txt"]["HTTP/1.1 200 OK"]}
    assert {"{DAV:}getcontentlength", "{urn:test:}color"} <= names
