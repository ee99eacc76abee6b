"""The audit log: JSON lines for operations, failures and logins, and SIGHUP reopening the file."""
from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import tomli_w

from gateway.audit import setup_audit_log
from tests.admin.conftest import start_gateway
from tests.conftest import PASSWORD, wait_for
from tests.sftp.helpers import sftp_client
from tests.test_serve import REPO, _listening_ports, wait_for_line

KEYS = {"time", "user", "protocol", "ip", "session", "op", "path", "bytes", "result", "duration_ms"}


def put(port: int, path: str, body: bytes, user: str = "alice", password: str = PASSWORD) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("PUT", path, body=body, headers={"Authorization": f"Basic {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    setup_audit_log(str(path))
    yield path
    setup_audit_log(None)


def test_operations_failures_and_logins_are_json_lines(tmp_path, host_key_dir, audit_file):
    running = start_gateway(tmp_path, host_key_dir)
    try:
        running.add_user("alice")
        running.add_user("reader", perms={"/": ["list", "download"]})
        (running.data / "reader").mkdir()
        (running.data / "reader" / "keep.txt").write_bytes(b"kept")
        assert put(running.webdav_port, "/report.txt", b"x" * 1234) == 201
        assert put(running.webdav_port, "/nope.txt", b"x", password="wrong password") == 401
        with sftp_client(running.sftp_port, user="reader") as sftp:
            with pytest.raises(PermissionError):
                sftp.remove("/keep.txt")
        with sftp_client(running.sftp_port) as sftp:
            sftp.rename("/report.txt", "/final.txt")
    finally:
        running.gateway.stop()
    lines = read_lines(audit_file)
    for line in lines:
        assert KEYS <= set(line) and set(line) - KEYS <= {"to", "method"}, line
        assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).tzinfo is not None
    ops = [(l["protocol"], l["user"], l["op"], l["result"]) for l in lines]
    assert ops == [
        ("webdav", "alice", "login", "ok"),
        ("webdav", "alice", "upload", "ok"),
        ("webdav", "alice", "login", "failed"),
        ("sftp", "reader", "login", "ok"),
        ("sftp", "reader", "delete", "permission_denied"),
        ("sftp", "alice", "login", "ok"),
        ("sftp", "alice", "rename", "ok"),
    ]
    upload = lines[1]
    assert (upload["path"], upload["bytes"], upload["ip"]) == ("/report.txt", 1234, "127.0.0.1")
    assert upload["duration_ms"] >= 0
    assert [l["method"] for l in lines if l["op"] == "login"] == ["basic", "basic", "password", "password"]
    assert lines[4]["path"] == "/keep.txt"
    assert (lines[6]["path"], lines[6]["to"]) == ("/report.txt", "/final.txt")


def write_serve_config(tmp_path: Path, audit_log: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": "state", "audit_log": audit_log,
                   "log_level": "warning"},
        "webdav": {"listen": "127.0.0.1:0"},
        "sftp": {"enabled": False},
        "admin": {"enabled": False},
        "backends": {"local": {"type": "local", "root": "data"}},
    }))
    return path


def serve(path: Path) -> tuple[subprocess.Popen, int, str]:
    """Start `gateway serve`; returns the process, the WebDAV port and the first user's password."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = wait_for_line(proc, "gateway ready")
    except AssertionError:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"gateway serve did not start: {err}") from None
    password = next(l for l in lines if "with password: " in l).rsplit(": ", 1)[1].strip()
    return proc, _listening_ports(lines)["webdav"], password


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out, err


def test_sighup_reopens_the_audit_log_after_logrotate_moved_it(tmp_path):
    (tmp_path / "logs").mkdir()
    proc, port, password = serve(write_serve_config(tmp_path, "logs/audit.jsonl"))
    current, rotated = tmp_path / "logs" / "audit.jsonl", tmp_path / "logs" / "audit.jsonl.1"
    try:
        assert put(port, "/before.txt", b"1", user="admin", password=password) == 201
        wait_for(lambda: any(l["path"] == "/before.txt" for l in read_lines(current)), "the first line")
        current.rename(rotated)
        # Until SIGHUP the gateway keeps writing to the file it has open.
        assert put(port, "/moved.txt", b"2", user="admin", password=password) == 201
        wait_for(lambda: any(l["path"] == "/moved.txt" for l in read_lines(rotated)), "a line in the old file")
        assert not current.exists()
        proc.send_signal(signal.SIGHUP)
        wait_for(current.exists, "the audit log to be reopened")
        assert put(port, "/after.txt", b"3", user="admin", password=password) == 201
        wait_for(lambda: any(l["path"] == "/after.txt" for l in read_lines(current)), "a line in the new file")
    finally:
        out, err = stop(proc)
    assert "/after.txt" not in rotated.read_text()
    assert "Traceback" not in err


def test_audit_log_dash_writes_json_lines_to_stdout(tmp_path):
    proc, port, password = serve(write_serve_config(tmp_path, "-"))
    try:
        assert put(port, "/to-stdout.txt", b"abc", user="admin", password=password) == 201
        # SIGHUP with stdout as the audit log changes nothing and stops nothing.
        proc.send_signal(signal.SIGHUP)
        assert put(port, "/still-serving.txt", b"d", user="admin", password=password) == 201
    finally:
        out, _ = stop(proc)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(l["op"], l["path"], l["bytes"]) for l in lines if l["op"] == "upload"] == [
        ("upload", "/to-stdout.txt", 3), ("upload", "/still-serving.txt", 1)]


def test_audit_log_that_cannot_be_opened_fails_with_the_key(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    path = write_serve_config(tmp_path, "blocker/audit.jsonl")
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "[server] audit_log" in result.stderr and "Traceback" not in result.stderr
