"""Bulk SFTP packets make room for WebDAV requests in one process (gateway/fairness.py)."""
from __future__ import annotations

import base64
import hashlib
import http.client
import os
import threading

import pytest

from gateway import fairness as fairness_module
from gateway.fairness import Fairness
from tests.conftest import PASSWORD
from tests.sftp.helpers import sftp_client, start_gateway


def _inside_bulk_together(gate: Fairness) -> bool:
    """Whether two threads can be inside `bulk()` at the same time."""
    barrier = threading.Barrier(2, timeout=2)
    together = []

    def packet() -> None:
        with gate.bulk():
            try:
                barrier.wait()
                together.append(True)
            except threading.BrokenBarrierError:
                together.append(False)

    threads = [threading.Thread(target=packet) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return all(together)


def test_bulk_packets_run_side_by_side_when_no_request_is_waiting():
    gate = Fairness(0.4)
    assert not gate.contended()
    assert _inside_bulk_together(gate)


def test_bulk_packets_pass_one_at_a_time_while_requests_keep_coming():
    gate = Fairness(0.4)
    gate.begin_interactive()
    try:
        assert gate.contended()
        assert not _inside_bulk_together(gate)
    finally:
        gate.end_interactive()
    assert gate.interactive == 0 and not gate.contended()


def test_a_lone_long_request_stops_rationing_bulk_work(monkeypatch):
    """A WebDAV upload trickling in for an hour must not slow SFTP for that hour."""
    monkeypatch.setattr(fairness_module, "RECENT", 0.05)
    gate = Fairness(0.4)
    gate.begin_interactive()
    try:
        threading.Event().wait(0.2)
        assert gate.interactive == 1 and not gate.contended()
        assert _inside_bulk_together(gate)
    finally:
        gate.end_interactive()


def test_share_one_turns_the_gate_off():
    gate = Fairness(1)
    gate.begin_interactive()
    try:
        assert _inside_bulk_together(gate)
    finally:
        gate.end_interactive()


@pytest.mark.parametrize("share", [0, -0.5, 1.01])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError):
        Fairness(share)


def test_sftp_transfers_stay_whole_while_webdav_requests_keep_coming(tmp_path, host_key_dir):
    """The rationed path under real load: every byte arrives, both ways, and WebDAV keeps answering."""
    running = start_gateway(tmp_path, host_key_dir)
    try:
        running.add_user("alice")
        auth = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}
        stop = threading.Event()
        answers: list[int] = []
        contended: list[bool] = []

        def webdav() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", running.webdav_port, timeout=60)
            try:
                while not stop.is_set():
                    conn.request("PUT", "/small.txt", body=b"x" * 4096, headers=auth)
                    response = conn.getresponse()
                    response.read()
                    answers.append(response.status)
                    contended.append(running.gateway.fairness.contended())
            finally:
                conn.close()

        clients = [threading.Thread(target=webdav) for _ in range(2)]
        for client in clients:
            client.start()
        payload = os.urandom(4 << 20)
        try:
            with sftp_client(running.sftp_port) as sftp:
                with sftp.open("/big.bin", "wb") as fh:
                    fh.set_pipelined(True)
                    for offset in range(0, len(payload), 32768):
                        fh.write(payload[offset:offset + 32768])
                with sftp.open("/big.bin", "rb") as fh:
                    back = fh.read(len(payload))
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        assert (running.data / "alice" / "big.bin").read_bytes() == payload
        assert answers and set(answers) <= {201, 204}, set(answers)
        assert any(contended), "the WebDAV requests never made the gate ration SFTP"
    finally:
        running.gateway.stop()


def test_only_transfers_past_the_bulk_threshold_are_rationed(tmp_path, host_key_dir, monkeypatch):
    """A small file's packets stay interactive: rationing them made p99 of 64 mixed clients 6.5 s."""
    running = start_gateway(tmp_path, host_key_dir, webdav=False)
    try:
        running.add_user("alice")
        gate = running.gateway.fairness
        rationed: list[int] = []
        original = gate.bulk

        def counting_bulk():
            rationed.append(1)
            return original()

        monkeypatch.setattr(gate, "bulk", counting_bulk)
        small = os.urandom(fairness_module.BULK_AFTER // 2)
        large = os.urandom(fairness_module.BULK_AFTER * 3)
        with sftp_client(running.sftp_port) as sftp:
            with sftp.open("/small.bin", "wb") as fh:
                fh.write(small)
            assert sftp.open("/small.bin").read() == small
            assert rationed == []
            with sftp.open("/large.bin", "wb") as fh:
                fh.write(large)
            assert rationed, "the large upload's packets past the threshold never met the gate"
            written = len(rationed)
            assert sftp.open("/large.bin").read() == large
            assert len(rationed) > written
    finally:
        running.gateway.stop()
