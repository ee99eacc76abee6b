"""Locks and properties through the Explorer-like sequence: what the store is asked, and what two processes see.

Windows Explorer copies a file as PROPFIND (404), LOCK, PUT, PROPPATCH,
UNLOCK. The lock requests read the shared store on every request (no cache:
a lock taken by another process must hold at once), so the number of
statements each one runs is what they cost; the tests below pin the
statements and the behaviour the fast paths keep.
"""
from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
import tomllib
from sqlalchemy import event

from gateway.vfs import UserFS
from tests.conftest import wait_for
from tests.webdav.conftest import LOCK_BODY, DavClient, proppatch_body

REPO = Path(__file__).resolve().parents[2]
XML = {"Content-Type": 'text/xml; charset="utf-8"'}
WIN32_TIMES = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
               b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop>'
               b'<Z:Win32CreationTime>Thu, 26 Nov 2026 10:00:00 GMT</Z:Win32CreationTime>'
               b'<Z:Win32LastModifiedTime>Thu, 26 Nov 2026 10:00:00 GMT</Z:Win32LastModifiedTime>'
               b'<Z:Win32FileAttributes>00000020</Z:Win32FileAttributes>'
               b'</D:prop></D:set></D:propertyupdate>')


class StatementLog:
    """Every SQL statement the gateway's SQLite store runs, by request (sqlite3 trace callback)."""

    def __init__(self, engine) -> None:
        self.statements: list[str] = []
        self._engine = engine
        event.listen(engine, "checkout", self._trace)

    def _trace(self, dbapi_conn, _record, _proxy) -> None:
        dbapi_conn.set_trace_callback(self.statements.append)

    @contextlib.contextmanager
    def during(self) -> Iterator[list[str]]:
        self.statements.clear()
        seen: list[str] = []
        try:
            yield seen
        finally:
            seen.extend(self.statements)

    def close(self) -> None:
        event.remove(self._engine, "checkout", self._trace)


@pytest.fixture
def traced(make_gateway):
    running = make_gateway(webdav=True)
    running.add_user("alice")
    log = StatementLog(running.gateway.store._engine)
    yield DavClient(running.webdav_port, "alice"), log
    log.close()


def _writes(statements: list[str]) -> int:
    return sum(1 for s in statements if s.startswith("BEGIN IMMEDIATE"))


def _on_locks(statements: list[str]) -> list[str]:
    # Only the lock table: the connection's own checks (defender, sessions) are not the lock's cost.
    return [s for s in statements if re.search(r"\b(FROM|INTO) locks\b", s)]


def test_lock_of_a_new_file_takes_one_write_transaction_and_reads_no_lock_twice(traced):
    alice, log = traced
    with log.during() as seen:
        lock = alice.request("LOCK", "/new.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"})
    assert lock.status == 201
    assert _writes(seen) == 1, seen
    # wsgidav's conflict check (the path and its ancestors, then the children),
    # the store's own check-and-insert; the LOCK answer reuses what was read.
    assert len(_on_locks(seen)) <= 5, seen


def test_unlock_reads_its_token_once_and_deletes_in_one_transaction(traced):
    alice, log = traced
    token = alice.request("LOCK", "/doc.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"}).header("Lock-Token")
    with log.during() as seen:
        assert alice.request("UNLOCK", "/doc.txt", headers={"Lock-Token": token}).status == 204
    by_token = [s for s in seen if s.startswith("SELECT") and "token =" in s]
    assert len(by_token) == 1, seen
    assert _writes(seen) == 1, seen


def test_put_and_proppatch_under_a_lock_read_the_locks_once_each(traced):
    alice, log = traced
    token = alice.request("LOCK", "/doc.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"}).header("Lock-Token")
    with log.during() as seen:
        assert alice.put("/doc.txt", b"x" * 4096, If=f"({token})").status in (200, 201, 204)
    assert len(_on_locks(seen)) == 1 and _writes(seen) == 0, seen
    with log.during() as seen:
        patched = alice.request("PROPPATCH", "/doc.txt", WIN32_TIMES, {**XML, "If": f"({token})"})
    assert patched.status == 207
    # The Win32 times go to the file (its mtime) or nowhere: no property row is written.
    assert len(_on_locks(seen)) == 1 and _writes(seen) == 0, seen


@pytest.fixture
def stats(alice, monkeypatch) -> list[str]:
    """The paths UserFS.stat is asked for, from now on."""
    seen: list[str] = []
    original = UserFS.stat
    monkeypatch.setattr(UserFS, "stat", lambda self, path: seen.append(path) or original(self, path))
    return seen


def test_propfind_on_a_missing_name_stats_it_once(alice, stats):
    reply = alice.request("PROPFIND", "/missing.txt", None, {**XML, "Depth": "0"})
    assert reply.status == 404
    assert stats == ["/missing.txt"]


def test_unlock_and_proppatch_stat_their_file_once(alice, stats):
    token = alice.request("LOCK", "/doc.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"}).header("Lock-Token")
    stats.clear()
    assert alice.request("PROPPATCH", "/doc.txt", proppatch_body("tag", "urn:test:", "x")).status == 423
    assert stats == ["/doc.txt"]
    stats.clear()
    assert alice.request("UNLOCK", "/doc.txt", headers={"Lock-Token": token}).status == 204
    assert stats == ["/doc.txt"]


def test_get_and_head_on_a_folder_still_answer_the_listing(alice):
    alice.request("MKCOL", "/d")
    alice.put("/d/x.txt", b"x")
    page = alice.get("/d/")
    assert page.status == 200 and page.header("Content-Type").startswith("text/html")
    assert b"x.txt" in page.body
    assert alice.request("HEAD", "/d/").status == 200


# -- two processes on one store ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_processes(make_gateway, tmp_path):
    """The in-process gateway and a `python -m gateway serve` on the same config, state dir and data."""
    running = make_gateway(webdav=True)
    running.add_user("alice")
    running.add_user("bob")
    config = tomllib.loads(running.config_path.read_text())
    config["server"]["state_dir"] = str((tmp_path / config["server"]["state_dir"]).resolve())
    config["backends"]["local"]["root"] = str((tmp_path / config["backends"]["local"]["root"]).resolve())
    port = _free_port()
    config["webdav"]["listen"] = f"127.0.0.1:{port}"
    config["sftp"]["enabled"] = False
    other_config = tmp_path / "other.toml"
    other_config.write_text(tomli_w.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(other_config)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return True
            assert proc.poll() is None, "the second gateway process exited"
            return False

        wait_for(listening, "the second gateway process")
        yield running.webdav_port, port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_lock_taken_through_one_process_holds_at_once_for_a_put_through_another(two_processes):
    one, two = two_processes
    alice_one, alice_two = DavClient(one, "alice"), DavClient(two, "alice")
    assert alice_one.request("PROPFIND", "/e.txt", None, {**XML, "Depth": "0"}).status == 404
    lock = alice_one.request("LOCK", "/e.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"})
    assert lock.status == 201
    token = lock.header("Lock-Token")
    # No wait: a cached "no lock here" in the other process would let this through.
    refused = alice_two.put("/e.txt", b"theirs")
    assert refused.status == 423
    assert b"/e.txt" in refused.body
    assert alice_two.put("/e.txt", b"mine", If=f"({token})").status in (200, 204)
    assert alice_two.request("PROPPATCH", "/e.txt", WIN32_TIMES, {**XML, "If": f"({token})"}).status == 207
    assert alice_two.request("UNLOCK", "/e.txt", headers={"Lock-Token": token}).status == 204
    # Released through process two: process one lets a plain PUT through at once.
    assert alice_one.put("/e.txt", b"next").status == 204
    assert alice_two.get("/e.txt").body == b"next"


def test_a_lock_released_through_one_process_no_longer_holds_in_the_other(two_processes):
    one, two = two_processes
    alice_one, alice_two = DavClient(one, "alice"), DavClient(two, "alice")
    assert alice_one.put("/doc.txt", b"v1").status == 201
    for _ in range(3):
        token = alice_two.request("LOCK", "/doc.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"}) \
            .header("Lock-Token")
        assert alice_one.put("/doc.txt", b"refused").status == 423
        assert alice_one.request("UNLOCK", "/doc.txt", headers={"Lock-Token": token}).status == 204
        assert alice_two.put("/doc.txt", b"free").status == 204
    assert alice_one.get("/doc.txt").body == b"free"


def test_a_dead_property_set_through_one_process_is_read_through_the_other(two_processes):
    one, two = two_processes
    alice_one, alice_two = DavClient(one, "alice"), DavClient(two, "alice")
    assert alice_one.put("/paper.txt", b"text").status == 201
    assert alice_one.proppatch("/paper.txt", proppatch_body("author", "urn:test:", "Ada")).status == 207
    assert re.search(rb"<[^>]*author[^>]*>Ada<", alice_two.propfind("/paper.txt", "0").body)
    assert alice_two.proppatch("/paper.txt", proppatch_body("author", "urn:test:", "Grace")).status == 207
    body = alice_one.propfind("/paper.txt", "0").body
    assert re.search(rb"<[^>]*author[^>]*>Grace<", body), body
    remove = (b'<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" xmlns:t="urn:test:">'
              b'<D:remove><D:prop><t:author/></D:prop></D:remove></D:propertyupdate>')
    assert alice_two.proppatch("/paper.txt", remove).status == 207
    assert b"Grace" not in alice_one.propfind("/paper.txt", "0").body


def test_unlock_with_a_token_that_is_not_the_callers_is_refused(two_processes):
    one, two = two_processes
    alice, bob = DavClient(one, "alice"), DavClient(two, "bob")
    # Each user has a home of their own: bob cannot name alice's file, so he
    # tries her token on a file of his own, and on a token that never existed.
    token = alice.request("LOCK", "/a.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"}).header("Lock-Token")
    assert bob.put("/b.txt", b"b").status == 201
    assert bob.request("UNLOCK", "/b.txt", headers={"Lock-Token": token}).status == 409
    unknown = "<opaquelocktoken:0x" + "0" * 64 + ">"
    assert alice.request("UNLOCK", "/a.txt", headers={"Lock-Token": unknown}).status == 409
    # alice's lock is intact: a PUT without it is refused, her UNLOCK works.
    assert alice.put("/a.txt", b"x").status == 423
    assert DavClient(two, "alice").request("UNLOCK", "/a.txt", headers={"Lock-Token": token}).status == 204


def test_unlock_of_another_users_lock_on_a_shared_folder_is_forbidden(make_gateway, tmp_path):
    running = make_gateway(webdav=True)
    shared = tmp_path / "data" / "shared"
    shared.mkdir(parents=True)
    for name in ("alice", "bob"):
        running.add_user(name, home="local:/shared")
    alice, bob = DavClient(running.webdav_port, "alice"), DavClient(running.webdav_port, "bob")
    token = alice.request("LOCK", "/f.txt", LOCK_BODY, {**XML, "Timeout": "Second-600"}).header("Lock-Token")
    assert bob.request("UNLOCK", "/f.txt", headers={"Lock-Token": token}).status == 403
    assert bob.put("/f.txt", b"bob").status == 423
    assert alice.request("UNLOCK", "/f.txt", headers={"Lock-Token": token}).status == 204
    assert bob.put("/f.txt", b"bob").status == 204
