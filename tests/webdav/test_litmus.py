"""litmus, the WebDAV conformance suite, against the real gateway with authentication."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import PASSWORD

SUITES = ("basic", "copymove", "props", "locks", "http")
_SUMMARY = re.compile(r"<- summary for `(\w+)': of (\d+) tests run: (\d+) passed, (\d+) failed")

pytestmark = pytest.mark.client


@pytest.mark.skipif(shutil.which("litmus") is None, reason="litmus is not installed (Debian package litmus)")
def test_litmus_passes_every_suite_with_authentication(dav, tmp_path):
    url = f"http://127.0.0.1:{dav.webdav_port}/"
    env = {"PATH": "/usr/bin:/bin", "TESTS": " ".join(SUITES), "HOME": str(tmp_path)}
    result = subprocess.run(["litmus", url, "alice", PASSWORD], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    summaries = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
                 for m in _SUMMARY.finditer(output)}
    assert set(summaries) == set(SUITES), output
    failed = {suite: s for suite, s in summaries.items() if s[2] or s[0] != s[1]}
    assert not failed, output
    # Every warning litmus prints is a real interoperability problem for some client.
    warnings = [line for line in output.splitlines() if "WARNING" in line or "FAIL" in line]
    assert not warnings, output
    assert result.returncode == 0, output
