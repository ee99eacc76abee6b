"""Uploads in flight are recorded in the store under this process's node, and swept when their node dies.

A short local upload is never recorded (see gateway.uploads.RECORD_AFTER):
the tests that need a record ask the gateway to record its uploads at once,
as its keeper does after RECORD_AFTER seconds.
"""
from __future__ import annotations

import gc
import os
import time

from gateway import uploads
from gateway.node import node_id
from gateway.storage.base import TEMP_PREFIX
from gateway.store import InFlightUpload, open_store
from tests.conftest import wait_for


def test_a_short_upload_writes_nothing_to_the_store(make_gateway):
    running = make_gateway()
    running.add_user("alice")
    store, fs = running.gateway.store, running.fs("alice")
    upload = fs.open_write("/a.txt")
    upload.write(b"data")
    assert store.list_uploads() == []
    upload.commit()
    assert store.list_uploads() == []
    assert (running.data / "alice" / "a.txt").read_bytes() == b"data"


def test_an_upload_is_recorded_under_this_node_once_due_until_it_ends(make_gateway):
    running = make_gateway()
    running.add_user("alice")
    store, fs = running.gateway.store, running.fs("alice")
    assert running.gateway.node == node_id()
    for end in ("commit", "abort"):
        upload = fs.open_write("/a.txt")
        upload.write(b"data")
        assert running.gateway.uploads.record_due(age=0) == 1
        [record] = store.list_uploads()
        assert (record.node, record.backend, record.path) == (running.gateway.node, "local", "/alice/a.txt")
        assert record.upload_id.startswith(TEMP_PREFIX)
        assert (running.data / "alice" / record.upload_id).exists()
        getattr(upload, end)()
        assert store.list_uploads() == []


def test_the_sweep_removes_a_dead_nodes_temp_file_and_keeps_a_live_nodes(make_gateway):
    running = make_gateway()
    running.add_user("alice")
    fs = running.fs("alice")
    with fs.open_write("/doc.txt") as upload:
        upload.write(b"old version")
    live = fs.open_write("/live.txt")
    live.write(b"in flight")
    running.gateway.uploads.record_due(age=0)
    # What a node killed mid-upload leaves: its temp file and its record, no heartbeat.
    leftover = running.data / "alice" / f"{TEMP_PREFIX}0123456789abcdef"
    leftover.write_bytes(b"half a new version")
    store = running.gateway.store
    store.add_upload(InFlightUpload("dead-1", "dead-host:1:00000000", "local", "/alice/doc.txt",
                                    leftover.name, time.time()))
    assert running.gateway.keeper.sweep() == 1
    assert not leftover.exists()
    assert [u.node for u in store.list_uploads()] == [running.gateway.node]
    assert (running.data / "alice" / "doc.txt").read_bytes() == b"old version"
    live.commit()
    assert (running.data / "alice" / "live.txt").read_bytes() == b"in flight"


def test_an_upload_dropped_without_commit_or_abort_drops_its_record(make_gateway):
    running = make_gateway()
    running.add_user("alice")
    upload = running.fs("alice").open_write("/a.txt")
    upload.write(b"never committed")
    running.gateway.uploads.record_due(age=0)
    assert len(running.gateway.store.list_uploads()) == 1
    del upload
    gc.collect()
    assert running.gateway.store.list_uploads() == []
    assert [p.name for p in (running.data / "alice").iterdir()] == []


def test_a_stopped_gateway_closes_its_store_and_leaves_no_heartbeat_and_no_upload(make_gateway):
    running = make_gateway()
    running.add_user("alice")
    upload = running.fs("alice").open_write("/a.txt")
    upload.write(b"never committed")
    running.gateway.uploads.record_due(age=0)
    running.gateway.stop()
    store_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [f for f in store_files if "gateway.db" in f], "the stopped gateway's store is still open"
    store = open_store("sqlite:///gateway.db", running.gateway.state_dir)
    try:
        assert store.list_uploads() == []
        assert store.stale_uploads(0) == []
    finally:
        store.close()


def test_the_keeper_records_an_upload_that_runs_for_a_while(make_gateway, monkeypatch):
    monkeypatch.setattr(uploads, "RECORD_AFTER", 0.2)
    running = make_gateway()
    running.add_user("alice")
    upload = running.fs("alice").open_write("/slow.txt")
    upload.write(b"first bytes")
    # The keeper beats every heartbeat_interval (at most RECORD_AFTER): the limit only stops a hung test.
    wait_for(lambda: len(running.gateway.store.list_uploads()) == 1, "the keeper to record the upload")
    upload.commit()
    assert running.gateway.store.list_uploads() == []


def test_an_upload_is_recorded_at_once_when_it_grows_past_record_bytes(make_gateway, monkeypatch):
    monkeypatch.setattr(uploads, "RECORD_BYTES", 1024)
    running = make_gateway()
    running.add_user("alice")
    upload = running.fs("alice").open_write("/big.bin")
    upload.write(b"x" * 1000)
    assert running.gateway.store.list_uploads() == []
    upload.write(b"x" * 1000)
    [record] = running.gateway.store.list_uploads()
    assert record.path == "/alice/big.bin"
    upload.abort()
    assert running.gateway.store.list_uploads() == []
