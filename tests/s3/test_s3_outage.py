"""S3 outages under a running gateway: a cut TCP path and a frozen server.

Every request that meets the outage gets a clear answer (WebDAV 503, SFTP
FAILURE with a message) within a bounded wait, is audited and counted as
failed, and leaves no session behind; when S3 is back the same gateway serves
again without a restart.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.audit import setup_audit_log
from tests.conftest import RunningGateway, wait_for
from tests.s3_server import TcpForwarder, start_s3_server_process
from tests.sftp.helpers import sftp_client, start_sftp_gateway
from tests.webdav.conftest import DavClient

LOCK_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:">'
             b"<D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype>"
             b"<D:owner>tester</D:owner></D:lockinfo>")
# Short enough for a test, as a deployment would set them for its S3.
FAST_FAILING = {"connect_timeout": 2, "read_timeout": 3, "max_attempts": 1}


@pytest.fixture
def audit_file(tmp_path) -> Iterator[Path]:
    path = tmp_path / "audit.jsonl"
    setup_audit_log(str(path))
    yield path
    setup_audit_log(None)


def failed_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line["result"] == "backend_unavailable"]


def failed_operations(protocol: str) -> float:
    """gateway_operations_total{result="backend_unavailable"} of `protocol`, over every op."""
    return sum(sample.value for metric in REGISTRY.collect() if metric.name == "gateway_operations"
               for sample in metric.samples
               if sample.name == "gateway_operations_total" and sample.labels["protocol"] == protocol
               and sample.labels["result"] == "backend_unavailable")


def requests_during_the_outage(alice: DavClient) -> dict[str, int]:
    return {
        "PROPFIND": alice.propfind("/").status,
        "PUT": alice.put("/a.txt", b"new").status,
        "GET": alice.get("/a.txt").status,
        "MKCOL": alice.request("MKCOL", "/folder").status,
        "LOCK": alice.request("LOCK", "/locked.txt", LOCK_BODY,
                              {"Content-Type": "application/xml", "Timeout": "Second-600"}).status,
        "MOVE": alice.request("MOVE", "/a.txt", None, {"Destination": "/b.txt"}).status,
        "DELETE": alice.request("DELETE", "/a.txt").status,
    }


@pytest.fixture
def s3_via_path(make_gateway, s3_path: TcpForwarder, s3_backend_table) -> RunningGateway:
    """WebDAV with alice's home on S3 reached through a TCP path the test can cut."""
    running = make_gateway(webdav=True, backends={
        "s3": {**s3_backend_table, "endpoint_url": s3_path.url, **FAST_FAILING}})
    running.add_user("alice", home="s3:/alice")
    return running


def test_a_cut_to_s3_before_a_home_was_checked_answers_503_audits_each_failure_and_leaves_no_session(
        s3_via_path, s3_path, audit_file):
    running = s3_via_path
    alice = DavClient(running.webdav_port, "alice")
    failed_before = failed_operations("webdav")
    # This process has not checked alice's home yet: her first request does.
    s3_path.cut()
    statuses = requests_during_the_outage(alice)
    assert statuses == {method: 503 for method in statuses}
    # One audit line and one count per failed request, whatever operation failed.
    assert len(failed_lines(audit_file)) == len(statuses)
    assert failed_operations("webdav") - failed_before == len(statuses)
    wait_for(lambda: not running.gateway.sessions.list(), "the requests' sessions to close", 10)

    s3_path.restore()
    assert alice.put("/a.txt", b"back").status == 201
    assert alice.get("/a.txt").body == b"back"
    assert alice.propfind("/", depth="1").status == 207
    # The LOCK that answered 503 holds nothing: the name can be locked now.
    assert running.gateway.store.find_locks("s3:/alice/locked.txt") == []
    assert alice.request("LOCK", "/locked.txt", LOCK_BODY,
                         {"Content-Type": "application/xml"}).status == 201


def test_a_cut_to_s3_after_the_home_was_checked_answers_503_and_recovers(s3_via_path, s3_path, audit_file):
    running = s3_via_path
    alice = DavClient(running.webdav_port, "alice")
    assert alice.put("/a.txt", b"kept").status == 201
    s3_path.cut()
    statuses = requests_during_the_outage(alice)
    assert statuses == {method: 503 for method in statuses}
    assert len(failed_lines(audit_file)) == len(statuses)
    wait_for(lambda: not running.gateway.sessions.list(), "the requests' sessions to close", 10)
    s3_path.restore()
    assert alice.get("/a.txt").body == b"kept"
    assert running.gateway.store.find_locks("s3:/alice/locked.txt") == []


class _CutAfterCreate:
    """A backend whose path to S3 is cut right after it creates a file: the race a LOCK can lose."""

    def __init__(self, inner, path: TcpForwarder) -> None:
        self._inner = inner
        self._path = path

    def create_file(self, path: str):
        entry = self._inner.create_file(path)
        self._path.cut()
        return entry

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_a_lock_that_answers_503_after_it_was_stored_is_dropped(s3_via_path, s3_path):
    running = s3_via_path
    alice = DavClient(running.webdav_port, "alice")
    assert alice.propfind("/", depth="0").status == 207
    backends = running.gateway.backends
    backends["s3"] = _CutAfterCreate(backends["s3"], s3_path)
    # LOCK on a new name creates the file, stores the lock, then looks the
    # lock's root up again for the answer: S3 is gone by then.
    answer = alice.request("LOCK", "/new.txt", LOCK_BODY, {"Content-Type": "application/xml"})
    assert answer.status == 503
    backends["s3"] = backends["s3"]._inner
    s3_path.restore()
    assert running.gateway.store.find_locks("s3:/alice/new.txt") == []
    assert alice.request("LOCK", "/new.txt", LOCK_BODY, {"Content-Type": "application/xml"}).status == 200


def test_sftp_answers_failure_with_a_message_while_s3_is_cut_and_works_again_after(
        tmp_path, host_key_dir, s3_path, s3_backend_table):
    running = start_sftp_gateway(tmp_path, host_key_dir, backends={
        "s3": {**s3_backend_table, "endpoint_url": s3_path.url, **FAST_FAILING}})
    try:
        running.add_user("alice", home="s3:/alice")
        s3_path.cut()
        with sftp_client(running.sftp_port) as sftp:
            for attempt in (lambda: sftp.listdir("/"), lambda: sftp.stat("/a.txt"),
                            lambda: sftp.mkdir("/folder")):
                with pytest.raises(IOError) as failed:
                    attempt()
                assert "S3" in str(failed.value)
            s3_path.restore()
            # The same session works once S3 is back.
            with sftp.open("/a.txt", "wb") as handle:
                handle.write(b"after")
            assert sftp.listdir("/") == ["a.txt"]
        wait_for(lambda: not running.gateway.sessions.list(), "the SFTP session to close", 10)
    finally:
        running.gateway.stop()


@pytest.fixture
def s3_process() -> Iterator:
    """moto in a child process of its own, which the test can freeze (SIGSTOP) and thaw."""
    server = start_s3_server_process()
    yield server
    os.kill(server.pid, signal.SIGCONT)
    server.stop()


def test_a_frozen_s3_fails_requests_over_to_503_after_a_bounded_wait_and_frees_the_threads(
        make_gateway, s3_process):
    # Default timeouts: a frozen server must not need tuning to be survived.
    running = make_gateway(webdav=True, backends={"s3": s3_process.backend_table(prefix="frozen/")},
                           # Both users come from 127.0.0.1: the address's share of threads would
                           # refuse bob with a 503 of its own; the per-user share still holds.
                           extra={"webdav": {"threads": 4, "max_requests_per_ip": 0}})
    running.add_user("alice", home="s3:/alice")
    running.add_user("bob", home="local:/bob", mounts={"/archive": ("s3:/bob", ["*"])})
    alice, bob = DavClient(running.webdav_port, "alice"), DavClient(running.webdav_port, "bob")
    assert alice.put("/a.txt", b"on s3").status == 201
    assert bob.propfind("/", depth="1").status == 207

    os.kill(s3_process.pid, signal.SIGSTOP)
    try:
        # More requests for S3 than the server has threads. Each fails within the
        # client's timeout (30 s): botocore's own would wait 3 x 30 s per request.
        statuses: list[int] = []
        workers = [threading.Thread(target=lambda: statuses.append(alice.propfind("/", depth="1").status))
                   for _ in range(8)]
        for worker in workers:
            worker.start()
        # Bob's home is on local disk: his requests get a thread and an answer.
        assert bob.put("/b.txt", b"local").status == 201
        assert bob.propfind("/", depth="1").status == 207
        for worker in workers:
            worker.join(timeout=60)
        assert statuses == [503] * 8
        assert alice.get("/a.txt").status == 503
    finally:
        os.kill(s3_process.pid, signal.SIGCONT)
    wait_for(lambda: alice.get("/a.txt").status == 200, "S3 to answer again through the same gateway")
    assert alice.get("/a.txt").body == b"on s3"
