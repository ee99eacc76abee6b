"""MOVE with Overwrite: T of a file onto a file is one atomic rename.

wsgidav DELETEs the destination before it moves; found by the soak harness:
a MOVE that then failed (PostgreSQL restarting, a worker killed) had lost
the destination's acknowledged version.
"""
from __future__ import annotations

from gateway.errors import BackendUnavailable
from tests.webdav.conftest import proppatch_body

NS = "urn:test:"


def _prop(alice, path: str) -> bytes:
    body = (f'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:Z="{NS}">'
            f'<D:prop><Z:tag/></D:prop></D:propfind>').encode()
    return alice.request("PROPFIND", path, body, {"Depth": "0", "Content-Type": "application/xml"}).body


def test_a_move_over_a_file_that_fails_keeps_the_destination(dav, alice, monkeypatch):
    assert alice.put("/dst.txt", b"acknowledged destination").status == 201
    assert alice.put("/src.txt", b"source").status == 201

    def unreachable(*args, **kwargs):
        raise BackendUnavailable("/alice/dst.txt")

    monkeypatch.setattr(dav.gateway.backends["local"], "rename", unreachable)
    reply = alice.request("MOVE", "/src.txt", headers={"Destination": "/dst.txt", "Overwrite": "T"})
    assert reply.status == 503
    monkeypatch.undo()
    assert alice.get("/dst.txt").body == b"acknowledged destination"
    assert alice.get("/src.txt").body == b"source"


def test_a_move_over_a_file_replaces_it_and_carries_the_sources_properties(alice):
    alice.put("/dst.txt", b"old")
    alice.put("/src.txt", b"new")
    assert alice.proppatch("/dst.txt", proppatch_body("tag", NS, "of-the-old")).status == 207
    assert alice.proppatch("/src.txt", proppatch_body("tag", NS, "of-the-new")).status == 207
    reply = alice.request("MOVE", "/src.txt", headers={"Destination": "/dst.txt", "Overwrite": "T"})
    assert reply.status == 204
    assert alice.get("/dst.txt").body == b"new"
    assert alice.get("/src.txt").status == 404
    assert b"of-the-new" in _prop(alice, "/dst.txt")
    assert b"of-the-old" not in _prop(alice, "/dst.txt")


def test_a_move_over_a_file_without_overwrite_is_still_412(alice):
    alice.put("/dst.txt", b"old")
    alice.put("/src.txt", b"new")
    reply = alice.request("MOVE", "/src.txt", headers={"Destination": "/dst.txt", "Overwrite": "F"})
    assert reply.status == 412
    assert alice.get("/dst.txt").body == b"old"
