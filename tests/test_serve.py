"""`gateway serve` as a process: first-run user, clean shutdown on signals."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

REPO = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, webdav: bool = False, sftp: bool = False) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": "state", "users_file": "users.toml"},
        "webdav": {"enabled": webdav, "listen": "127.0.0.1:0"},
        "sftp": {"enabled": sftp, "listen": "127.0.0.1:0"},
        "backends": {"local": {"type": "local", "root": "data"}},
    }))
    return path


def start(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 30) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not printed; got {lines!r}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_run_creates_a_user_once_and_signals_stop_cleanly(tmp_path, sig):
    path = config(tmp_path)
    proc = start(path)
    try:
        lines = wait_for_line(proc, "Created user 'admin' with password: ")
        password = lines[-1].rsplit(": ", 1)[1].strip()
        assert len(password) >= 16
        stored = tomllib.loads((tmp_path / "users.toml").read_text())["users"]["admin"]
        assert stored["password"].startswith("$argon2id$") and password not in str(stored)
        wait_for_line(proc, "gateway ready")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    # A second run finds the user and prints no password.
    proc = start(path)
    lines = wait_for_line(proc, "gateway ready")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "password" not in "".join(lines) + out
