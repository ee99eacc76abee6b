"""gateway.metrics: one process's registry, and the sum over processes sharing a multiprocess dir."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from gateway import metrics
from tests.admin.helpers import Scrape

REPO = Path(__file__).resolve().parent.parent

WRITER = """
import sys
from gateway import metrics
metrics.TRANSFER_BYTES.labels("sftp", "in").inc(1000)
metrics.OPERATIONS.labels("sftp", "upload", "ok").inc()
metrics.CONNECTIONS_OPEN.labels("sftp").inc()
metrics.BACKEND_SECONDS.labels("local", "stat").observe(0.002)
print("ready", flush=True)
sys.stdin.read()
"""


def read(registry) -> Scrape:
    return Scrape(generate_latest(registry).decode())


def test_without_a_multiprocess_dir_the_registry_is_this_process(monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    before = read(metrics.registry()).value("gateway_bans_total")
    metrics.BANS.inc()
    assert read(metrics.registry()).value("gateway_bans_total") == before + 1


def test_two_processes_writing_one_dir_add_up(tmp_path):
    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER], cwd=REPO, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "ready"
        both = read(metrics.registry(tmp_path))
        assert both.value("gateway_transfer_bytes_total", protocol="sftp", direction="in") == 2000
        assert both.value("gateway_operations_total", protocol="sftp", op="upload", result="ok") == 2
        assert both.value("gateway_connections_open", protocol="sftp") == 2
        assert both.value("gateway_backend_request_duration_seconds_count", backend="local", op="stat") == 2
        # One worker exits: its open connections go, what it counted stays.
        first = writers[0]
        first.stdin.close()
        first.wait(timeout=60)
        metrics.forget_process(first.pid, tmp_path)
        one = read(metrics.registry(tmp_path))
        assert one.value("gateway_connections_open", protocol="sftp") == 1
        assert one.value("gateway_transfer_bytes_total", protocol="sftp", direction="in") == 2000
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.stdin.close()
                writer.wait(timeout=60)
            writer.stdout.close()
