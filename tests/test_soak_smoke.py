"""bench/soak.py runs end to end with a small load and a cheap fault: a smoke test, never a timing check.

The soak is run as a user runs it (a subprocess starting a real gateway with
two workers); the test checks that its correctness checks ran (writes were
acknowledged and read back) and found nothing lost, corrupt or left over.
`--smoke` leaves out the harness's own timed acceptance (recovery time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMALL = ["--duration", "6", "--webdav", "4", "--sftp", "2", "--fault-seconds", "2", "--node-timeout", "2",
         "--sweep-interval", "1", "--client-timeout", "20", "--smoke"]


def run_soak(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "bench/soak.py", *SMALL, *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=150)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert done.returncode == (0 if result["passed"] else 1), done.stderr[-3000:]
    return result


def assert_every_acknowledged_write_read_back(result: dict) -> None:
    readback = result["readback"]
    assert readback["acknowledged_writes"] > 0 and readback["checked"] > 0
    assert (readback["lost"], readback["corrupt"], readback["unreadable"]) == ([], [], [])
    assert result["read_mismatches"] == []
    assert result["failures"] == [], result["failures"]


def test_a_killed_worker_loses_no_acknowledged_write_and_leaves_nothing_behind(tmp_path):
    result = run_soak(tmp_path, "--fault", "worker-kill")
    assert result["fault"]["log"] and "killed" in result["fault"]["log"][0]
    assert_every_acknowledged_write_read_back(result)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root (CI runs as root)")
def test_a_full_local_disk_loses_no_acknowledged_write_and_answers_with_clear_statuses(tmp_path):
    result = run_soak(tmp_path, "--fault", "tmpfs-full", "--tmpfs-mib", "64")
    assert "filled" in result["fault"]["log"][0]
    assert_every_acknowledged_write_read_back(result)
