"""bench/run.py runs end to end with tiny sizes in both modes: a smoke test, never a timing check.

The bench is run as a user runs it (a subprocess, real servers: the gateway,
OpenSSH sshd, rclone serve, nginx); the test only checks that it finishes and
prints a table with a reference and ratios for each workload it was asked for.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.tools("sshd", "nginx", "rclone", "curl", "sftp")

TINY = ["--repeat", "1", "--sftp-mb", "1", "--dav-mb", "1", "--small", "5", "--explorer", "50",
        "--listing", "60", "--clients", "4", "--duration", "1", "--workers", "1"]


@pytest.mark.parametrize("mode, workloads", [
    ("ram", ["sftp-upload", "dav-put", "explorer", "list-dav"]),
    ("disk", ["small-put", "list-sftp", "concurrent-http"]),
])
def test_bench_completes_and_prints_ratios(mode, workloads):
    done = subprocess.run([sys.executable, "bench/run.py", "--mode", mode, "--workloads", ",".join(workloads),
                           *TINY], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"{mode} mode" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    ratios = [line for line in rows if re.search(r"\| \d+\.\d\dx \|$", line)]
    references = [line for line in rows if line.endswith("| reference |")]
    assert len(references) == len(workloads)
    assert len(ratios) >= len(workloads)
    assert "| gateway" in out and "peak RSS" in out
