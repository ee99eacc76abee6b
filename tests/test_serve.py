"""`gateway serve` as a process: first-run user, clean shutdown on signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from gateway.store import open_store

REPO = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, webdav: bool = False, sftp: bool = False) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": "state"},
        "webdav": {"enabled": webdav, "listen": "127.0.0.1:0"},
        "sftp": {"enabled": sftp, "listen": "127.0.0.1:0"},
        "admin": {"enabled": False},
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
        store = open_store("sqlite:///gateway.db", tmp_path / "state")
        try:
            (stored,) = store.list_users()
        finally:
            store.close()
        assert stored.name == "admin"
        assert stored.password_hash.startswith("$argon2id$") and password not in str(stored)
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


def test_processes_starting_at_once_on_an_empty_store_print_one_password(tmp_path):
    path = config(tmp_path)
    procs = [start(path) for _ in range(3)]
    printed = []
    try:
        for proc in procs:
            printed += wait_for_line(proc, "gateway ready", timeout=120)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            printed += out.splitlines()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert len([line for line in printed if "Created user 'admin' with password" in line]) == 1, printed
    store = open_store("sqlite:///gateway.db", tmp_path / "state")
    try:
        assert [user.name for user in store.list_users()] == ["admin"]
    finally:
        store.close()


def _listening_ports(lines: list[str]) -> dict[str, int]:
    ports = {}
    for line in lines:
        if " listening on " in line:
            name, _, address = line.strip().partition(" listening on ")
            ports[name] = int(address.rsplit(":", 1)[1])
    return ports


def test_shutdown_with_uploads_in_flight_leaves_old_versions_and_no_partial_files(tmp_path):
    import http.client
    import base64
    import paramiko
    path = config(tmp_path, webdav=True, sftp=True)
    subprocess.run([sys.executable, "-m", "gateway", "user", "add", "alice", "--password-stdin",
                    "--config", str(path)], input="alice-password\n", text=True, check=True, cwd=REPO,
                   capture_output=True)
    home = tmp_path / "data" / "alice"
    home.mkdir(parents=True)
    (home / "via-sftp.bin").write_bytes(b"old sftp version")
    (home / "via-webdav.bin").write_bytes(b"old webdav version")
    proc = start(path)
    try:
        ports = _listening_ports(wait_for_line(proc, "gateway ready"))
        transport = paramiko.Transport(("127.0.0.1", ports["sftp"]))
        transport.connect(username="alice", password="alice-password")
        sftp = paramiko.SFTPClient.from_transport(transport)
        handle = sftp.open("/via-sftp.bin", "wb")
        handle.write(b"n" * 300_000)
        handle.flush()
        dav = http.client.HTTPConnection("127.0.0.1", ports["webdav"], timeout=30)
        auth = base64.b64encode(b"alice:alice-password").decode()
        dav.putrequest("PUT", "/via-webdav.bin")
        dav.putheader("Authorization", f"Basic {auth}")
        dav.putheader("Content-Length", str(10_000_000))
        dav.endheaders()
        dav.send(b"w" * 300_000)
        # Both uploads are in flight once their temp files exist.
        deadline = time.monotonic() + 30
        while len([n for n in os.listdir(home) if n.startswith(".gw-upload-")]) < 2:
            assert time.monotonic() < deadline, os.listdir(home)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        transport.close()
        dav.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert sorted(os.listdir(home)) == ["via-sftp.bin", "via-webdav.bin"]
    assert (home / "via-sftp.bin").read_bytes() == b"old sftp version"
    assert (home / "via-webdav.bin").read_bytes() == b"old webdav version"
