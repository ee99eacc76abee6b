"""LOCK on a name that does not exist yet creates an empty file (RFC 4918 7.3).

Windows Explorer copies each file as PROPFIND (404), LOCK, PUT, PROPPATCH,
UNLOCK: the LOCK creates the file in one backend step (UserFS.create_file),
with the same permission gate, quota, audit line and lock as before.
"""
from __future__ import annotations

import json
import logging
import pprint

from gateway.storage.local import LocalBackend
from tests.webdav.conftest import LOCK_BODY, DavClient

XML = {"Content-Type": 'text/xml; charset="utf-8"', "Timeout": "Second-600"}


def test_lock_on_a_new_name_creates_an_empty_file_the_token_then_writes(dav, alice):
    lock = alice.request("LOCK", "/new.txt", LOCK_BODY, XML)
    assert lock.status == 201, lock.body
    token = lock.header("Lock-Token")
    # RFC 4918 9.10.1: the answer's lockdiscovery holds the new lock (some clients read it there).
    assert token.strip("<>").encode() in lock.body, lock.body
    created = dav.data / "alice" / "new.txt"
    assert created.is_file() and created.read_bytes() == b""
    assert alice.put("/new.txt", b"locked out").status == 423
    assert alice.put("/new.txt", b"content", If=f"({token})").status == 204
    assert alice.request("UNLOCK", "/new.txt", headers={"Lock-Token": token}).status == 204
    assert alice.get("/new.txt").body == b"content"


def test_lock_on_a_new_name_never_starts_an_upload(dav, alice, monkeypatch):
    # No temp file, no upload in flight: the backend creates the file in one step.
    uploads: list[str] = []
    original = LocalBackend.open_write
    monkeypatch.setattr(LocalBackend, "open_write",
                        lambda self, path, **kw: uploads.append(path) or original(self, path, **kw))
    assert alice.request("LOCK", "/new.txt", LOCK_BODY, XML).status == 201
    assert uploads == []
    assert (dav.data / "alice" / "new.txt").read_bytes() == b""


def test_lock_on_a_new_name_counts_against_a_quota_in_files(dav):
    dav.add_user("carol", quota_files=2)
    carol = DavClient(dav.webdav_port, "carol")
    assert carol.put("/one.txt", b"1").status == 201
    assert carol.request("LOCK", "/two.txt", LOCK_BODY, XML).status == 201
    refused = carol.request("LOCK", "/three.txt", LOCK_BODY, XML)
    assert refused.status == 507, refused.body
    assert not (dav.data / "carol" / "three.txt").exists()
    assert sorted(p.name for p in (dav.data / "carol").iterdir()) == ["one.txt", "two.txt"]


def test_lock_on_a_new_name_needs_upload(dav):
    dav.add_user("reader", perms={"/": ["list", "download", "overwrite"]})
    reader = DavClient(dav.webdav_port, "reader")
    reply = reader.request("LOCK", "/new.txt", LOCK_BODY, XML)
    assert reply.status == 403, reply.body
    assert b"upload" in reply.body
    assert not (dav.data / "reader" / "new.txt").exists()


def test_lock_on_a_new_name_is_audited_as_an_upload_of_nothing(alice, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        assert alice.request("LOCK", "/new.txt", LOCK_BODY, XML).status == 201
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    (line,) = [x for x in lines if x["op"] == "upload"]
    assert (line["path"], line["result"], line["bytes"], line["protocol"]) == ("/new.txt", "ok", 0, "webdav")


def test_lock_on_an_existing_file_keeps_its_content(dav, alice):
    assert alice.put("/kept.txt", b"keep").status == 201
    lock = alice.request("LOCK", "/kept.txt", LOCK_BODY, XML)
    assert lock.status == 200
    assert (dav.data / "alice" / "kept.txt").read_bytes() == b"keep"


def test_lock_on_an_existing_file_answers_its_lock_in_lockdiscovery(alice):
    assert alice.put("/doc.txt", b"x").status == 201
    lock = alice.request("LOCK", "/doc.txt", LOCK_BODY, XML)
    assert lock.status == 200
    assert lock.header("Lock-Token").strip("<>").encode() in lock.body, lock.body
    assert b"<D:owner>tests</D:owner>" in lock.body


def test_requests_with_an_if_header_format_no_debug_line_while_debug_is_off(alice, monkeypatch):
    # wsgidav's If parser pprint-formats its debug line at any log level (lazy_debug.py).
    formatted: list[object] = []
    original = pprint.PrettyPrinter.pformat
    monkeypatch.setattr(pprint.PrettyPrinter, "pformat",
                        lambda self, obj: formatted.append(obj) or original(self, obj))
    token = alice.request("LOCK", "/doc.txt", LOCK_BODY, XML).header("Lock-Token")
    assert alice.put("/doc.txt", b"x", If=f"({token})").status == 204
    assert alice.request("UNLOCK", "/doc.txt", headers={"Lock-Token": token}).status == 204
    assert formatted == []


def _big_owner_lock() -> bytes:
    return LOCK_BODY.replace(b"<D:owner>tests</D:owner>", b"<D:owner>" + b"x" * 8192 + b"</D:owner>")


def test_a_refused_lock_on_a_new_name_leaves_no_empty_file(dav, alice):
    # The file is created before the lock is tried; a refusal must take it back.
    assert alice.request("LOCK", "/new.txt", _big_owner_lock(), XML).status == 400
    assert not (dav.data / "alice" / "new.txt").exists()
    assert alice.get("/new.txt").status == 404


def test_a_refused_lock_is_taken_back_for_a_user_who_may_upload_but_not_delete(dav):
    dav.add_user("dropper", perms={"/": ["list", "download", "upload"]})
    dropper = DavClient(dav.webdav_port, "dropper")
    assert dropper.request("LOCK", "/new.txt", _big_owner_lock(), XML).status == 400
    assert not (dav.data / "dropper" / "new.txt").exists()


def test_a_conflicting_lock_on_an_existing_file_removes_nothing(dav, alice, bob):
    assert alice.put("/kept.txt", b"").status == 201
    assert alice.request("LOCK", "/kept.txt", LOCK_BODY, XML).status == 200
    assert alice.request("LOCK", "/kept.txt", LOCK_BODY, XML).status == 423
    assert (dav.data / "alice" / "kept.txt").exists()
