"""Small PUT and GET: the exact answers the per-request shortcuts must keep, and the work they save.

The shortcuts: a response's headers and small body leave in one write; a PUT
skips the folder browser's lookup and a GET or HEAD looks its path up once;
lock checks are read once per request; a user's Policy is built once per record.
"""
from __future__ import annotations

import threading

import pytest
from cheroot import makefile

from gateway import metrics
from gateway.permissions import parse_perms
from tests.webdav.conftest import LOCK_BODY


@pytest.fixture
def writes(monkeypatch):
    """Every write cheroot makes to a client socket, in order (the gateway runs in this process)."""
    seen: list[bytes] = []
    lock = threading.Lock()
    original = makefile.StreamWriter.write

    def recording(self, data, *args, **kwargs):
        with lock:
            seen.append(bytes(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(makefile.StreamWriter, "write", recording)
    return seen


def _stats() -> float:
    """Backend stat calls so far, from the gateway's own metrics."""
    for family in metrics.BACKEND_SECONDS.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels.get("op") == "stat":
                return sample.value
    return 0.0


def test_put_new_file_answers_201_with_its_exact_headers_and_body(alice):
    reply = alice.put("/new.txt", b"hello")
    assert reply.status == 201
    assert reply.body == b"201 Created\n"
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.header("Content-Length") == str(len(reply.body))
    assert reply.header("X-Content-Type-Options") == "nosniff"
    assert reply.header("Date") and reply.header("Server") == "gateway"
    assert reply.header("ETag")


def test_put_over_a_file_answers_204_without_a_body(alice):
    alice.put("/again.txt", b"one")
    reply = alice.put("/again.txt", b"two")
    assert reply.status == 204
    assert reply.body == b""
    assert alice.get("/again.txt").body == b"two"


def test_put_onto_a_folder_answers_405_and_into_a_missing_folder_409(alice):
    assert alice.request("MKCOL", "/box/").status == 201
    assert alice.put("/box", b"x").status == 405
    assert alice.put("/nowhere/f.txt", b"x").status == 409


def test_small_response_leaves_in_one_write_with_its_headers(alice, writes):
    writes.clear()
    assert alice.put("/one.txt", b"x" * 4096).status == 201
    responses = [w for w in writes if w.startswith(b"HTTP/1.1 201")]
    assert len(responses) == 1
    assert responses[0].endswith(b"\r\n\r\n201 Created\n")
    writes.clear()
    reply = alice.get("/one.txt")
    assert reply.status == 200 and reply.body == b"x" * 4096
    answer = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    assert len(answer) == 1 and answer[0].endswith(b"\r\n\r\n" + b"x" * 4096)


def test_put_stats_its_path_and_parent_once_each(alice):
    assert alice.request("MKCOL", "/d/").status == 201
    before = _stats()
    assert alice.put("/d/f.txt", b"data").status == 201
    # wsgidav's lookups of the target (missing) and its parent, and the upload's
    # look at what it replaces: the folder browser's own lookup is gone.
    assert _stats() - before == 3


def test_get_stats_its_path_once(alice):
    alice.put("/g.txt", b"data")
    before = _stats()
    assert alice.get("/g.txt").body == b"data"
    assert _stats() - before == 1


def test_get_and_head_of_a_folder_still_get_the_browser_page(alice):
    assert alice.request("MKCOL", "/shown/").status == 201
    alice.put("/shown/inside.txt", b"x")
    page = alice.get("/shown/")
    assert page.status == 200
    assert page.header("Content-Type").startswith("text/html")
    assert b"inside.txt" in page.body
    head = alice.request("HEAD", "/shown/")
    assert head.status == 200 and head.body == b""


def test_put_under_a_depth_infinity_locked_folder_needs_the_token(alice):
    assert alice.request("MKCOL", "/locked/").status == 201
    assert alice.request("MKCOL", "/locked/sub/").status == 201
    lock = alice.request("LOCK", "/locked/", LOCK_BODY, {"Depth": "infinity", "Timeout": "Second-60"})
    assert lock.status == 200
    token = lock.header("Lock-Token")
    assert alice.put("/locked/sub/f.txt", b"x").status == 423
    assert alice.put("/locked/sub/f.txt", b"x", If=f"({token})").status == 201
    assert alice.put("/locked/sub/f.txt", b"y", If=f"({token})").status == 204
    assert alice.put("/locked/sub/f.txt", b"z").status == 423
    assert alice.get("/locked/sub/f.txt").body == b"y"
    assert alice.request("UNLOCK", "/locked/", headers={"Lock-Token": token}).status == 204
    assert alice.put("/locked/sub/f.txt", b"z").status == 204


def test_a_changed_rule_applies_to_the_next_request(dav, alice):
    assert alice.put("/ro.txt", b"x").status == 201
    assert alice.put("/ro.txt", b"y").status == 204
    dav.gateway.users.update("alice", permissions={"/": parse_perms(["list", "download"])})
    assert alice.put("/ro.txt", b"z").status == 403
    assert alice.get("/ro.txt").body == b"y"
