"""litmus, the WebDAV conformance suite, against the real gateway with authentication."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PASSWORD

SUITES = ("basic", "copymove", "props", "locks", "http")
_SUMMARY = re.compile(r"<- summary for `(\w+)': of (\d+) tests run: (\d+) passed, (\d+) failed")

pytestmark = pytest.mark.client

needs_litmus = pytest.mark.tools("litmus")


def assert_litmus_passes(port: int, user: str, workdir: Path, password: str = PASSWORD) -> None:
    """Run every litmus suite against http://127.0.0.1:port/ as `user`; fail on any failure or warning."""
    env = {"PATH": "/usr/bin:/bin", "TESTS": " ".join(SUITES), "HOME": str(workdir)}
    result = subprocess.run(["litmus", f"http://127.0.0.1:{port}/", user, password], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=600)
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


@needs_litmus
def test_litmus_passes_every_suite_with_authentication(dav, tmp_path):
    assert_litmus_passes(dav.webdav_port, "alice", tmp_path)
