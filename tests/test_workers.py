"""`gateway serve` with `[server] workers = 2`: shared listeners, restarts, drain and SIGHUP.

Which worker serves a connection is read from the kernel, not from the
gateway: the server side of a TCP connection is the socket in /proc/net/tcp
whose ports mirror the client's, and its inode shows up in exactly one
process's /proc/PID/fd.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import tomllib
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
import tomli_w

from gateway.config import MAX_WORKERS, ConfigError, load_config
from gateway.storage.base import TEMP_PREFIX
from tests.conftest import wait_for
from tests.sftp.helpers import copy_host_keys

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "alice-password"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}


def write_config(tmp_path: Path, workers, log_level: str = "warning", store: dict | None = None,
                 **server) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": "state", "workers": workers, "log_level": log_level, **server},
        "store": store or {},
        "webdav": {"listen": "127.0.0.1:0"},
        "sftp": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "backends": {"local": {"type": "local", "root": "data"}},
    }))
    return path


@dataclass
class Served:
    proc: subprocess.Popen
    stdout: list[str]
    log: Path
    ports: dict[str, int]
    home: Path
    opened: dict[str, list[int]] = field(default_factory=dict)

    def workers(self) -> set[int]:
        """The parent's live child processes (a killed one is gone once the parent reaped it)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return set()
        return {int(pid) for pid in text.split()}

    def wait_replaced(self, gone: int, others: set[int]) -> int:
        """Wait until worker `gone` was reaped and a new one runs beside `others`; return its pid.

        One read of the children list per check: two reads could see the killed worker
        still listed in the first and reaped in the second."""
        found: list[int] = []

        def replaced() -> bool:
            now = self.workers()
            found[:] = sorted(now - others - {gone})
            return gone not in now and now >= others and len(found) == 1

        wait_for(replaced, f"worker {gone} to be replaced")
        return found[0]

    def wait_ready(self, pid: int) -> None:
        """Wait until worker `pid` reported ready (its listeners serve); needs log_level "info"."""
        wait_for(lambda: f"(pid {pid}) ready" in self.log.read_text(), f"worker {pid} to be ready")

    def owner(self, client: socket.socket, name: str) -> int:
        """The pid of the worker holding the server side of `client`'s connection to listener `name`."""
        inode = _server_inode(self.ports[name], client.getsockname()[1])
        for pid in self.workers():
            if inode in _socket_inodes(pid):
                return pid
        raise AssertionError(f"no worker holds the connection from port {client.getsockname()[1]}")


def _server_inode(server_port: int, client_port: int) -> int:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return inode
    raise AssertionError(f"no server socket for client port {client_port}")


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(fd_dir / fd)
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:["):-1]))
    return inodes


@contextmanager
def serving(tmp_path: Path, host_key_dir: Path, workers=2, log_level: str = "warning",
            store: dict | None = None, **server) -> Iterator[Served]:
    path = write_config(tmp_path, workers, log_level, store, **server)
    copy_host_keys(host_key_dir, tmp_path / "state")
    subprocess.run([sys.executable, "-m", "gateway", "user", "add", "alice", "--password-stdin",
                    "--config", str(path)], input=f"{PASSWORD}\n", text=True, check=True, cwd=REPO,
                   capture_output=True)
    home = tmp_path / "data" / "alice"
    home.mkdir(parents=True)
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("gateway ready"):
                break
        assert lines and lines[-1].startswith("gateway ready"), (lines, log.read_text())
        ports = {}
        for line in lines:
            if " listening on " in line:
                name, _, address = line.strip().partition(" listening on ")
                ports[name] = int(address.rsplit(":", 1)[1])
        served = Served(proc, lines, log, ports, home)
        wait_for(lambda: len(served.workers()) == workers, f"{workers} workers")
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _put(port: int, name: str, body: bytes = b"x" * 4096) -> http.client.HTTPConnection:
    """PUT over a new keep-alive connection; returns it still open."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("PUT", f"/{name}", body=body, headers=AUTH)
    response = conn.getresponse()
    response.read()
    assert response.status in (201, 204), response.status
    return conn


def _sftp_login(port: int) -> paramiko.Transport:
    transport = paramiko.Transport(("127.0.0.1", port))
    transport.connect(username="alice", password=PASSWORD)
    return transport


def _owners_until_all(served: Served, connect, name: str, limit: int) -> set[int]:
    """Open connections until every worker holds one (or `limit` are open); the owners seen.

    Appends how many it opened to `served.opened[name]`.
    """
    expected = served.workers()
    owners: set[int] = set()
    opened = []
    try:
        while owners != expected and len(opened) < limit:
            conn = connect(len(opened))
            opened.append(conn)
            sock = conn.sock
            owners.add(served.owner(sock, name))
    finally:
        for conn in opened:
            conn.close()
        served.opened.setdefault(name, []).append(len(opened))
    return owners


def test_two_workers_share_the_webdav_and_sftp_listeners(tmp_path, host_key_dir):
    with serving(tmp_path, host_key_dir) as served:
        workers = served.workers()
        assert len(workers) == 2 and served.proc.pid not in workers
        # The parent printed each listener, its host keys and "ready" once.
        text = "".join(served.stdout)
        assert text.count("webdav listening on") == text.count("sftp listening on") == 1
        assert text.count("host key") == 2
        webdav = _owners_until_all(served, lambda i: _put(served.ports["webdav"], f"f{i}.bin"), "webdav", 200)
        assert webdav == workers
        sftp = _owners_until_all(served, lambda i: _sftp_login(served.ports["sftp"]), "sftp", 60)
        assert sftp == workers
        # The admin listener is shared too, and /metrics adds up every worker.
        admin = http.client.HTTPConnection("127.0.0.1", served.ports["admin"], timeout=60)
        admin.request("GET", "/metrics")
        text = admin.getresponse().read().decode()
        admin.close()
        counted = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('gateway_connections_total{protocol="webdav"}')]
        assert counted == [sum(served.opened["webdav"])]
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()
    assert len(list((tmp_path / "data" / "alice").glob("f*.bin"))) >= 2


def test_a_killed_worker_is_restarted_and_service_continues(tmp_path, host_key_dir):
    with serving(tmp_path, host_key_dir, log_level="info") as served:
        victim, survivor = sorted(served.workers())
        os.kill(victim, signal.SIGKILL)
        # The survivor answers everything in the meantime.
        for i in range(5):
            _put(served.ports["webdav"], f"during-{i}.bin").close()
        replacement = served.wait_replaced(victim, {survivor})
        assert survivor in served.workers()
        # Until then the survivor takes every connection, and refuses those
        # past its per-address limit.
        served.wait_ready(replacement)
        assert "killed by SIGKILL" in served.log.read_text()
        owners = _owners_until_all(served, lambda i: _put(served.ports["webdav"], f"after-{i}.bin"),
                                   "webdav", 200)
        assert owners == {survivor, replacement}
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _admin_token(tmp_path: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "gateway", "admin", "token", "create", "test",
                             "--config", str(tmp_path / "gateway.toml")],
                            text=True, check=True, cwd=REPO, capture_output=True, timeout=120)
    return result.stdout.strip().splitlines()[-1]


def _listed_sessions(served: Served, token: str) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", served.ports["admin"], timeout=60)
    try:
        conn.request("GET", "/api/v1/sessions", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, body
    return json.loads(body)


def _stored_nodes(tmp_path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "gateway.db")) as db:
        return {node for (node,) in db.execute("SELECT node FROM nodes")}


def _pid_of(node: str) -> int:
    # A node id is "HOST:PID:RANDOM" (gateway.node).
    return int(node.split(":")[1])


def test_a_killed_workers_sessions_and_node_row_are_swept_while_the_others_stay(tmp_path, host_key_dir):
    with serving(tmp_path, host_key_dir, store={"node_timeout": 3, "sweep_interval": 1}) as served:
        token = _admin_token(tmp_path)
        transports = []
        try:
            # One SFTP session on each worker at least.
            owner_of: dict[paramiko.Transport, int] = {}
            while set(owner_of.values()) != served.workers() and len(transports) < 40:
                transports.append(_sftp_login(served.ports["sftp"]))
                owner_of[transports[-1]] = served.owner(transports[-1].sock, "sftp")
            owners = set(owner_of.values())
            assert owners == served.workers()
            wait_for(lambda: {_pid_of(s["node"]) for s in _listed_sessions(served, token)} == owners,
                     "every worker's sessions to be listed")
            victim, survivor = sorted(owners)
            (dead_node,) = {s["node"] for s in _listed_sessions(served, token) if _pid_of(s["node"]) == victim}
            assert dead_node in _stored_nodes(tmp_path)
            os.kill(victim, signal.SIGKILL)
            served.wait_replaced(victim, {survivor})
            wait_for(lambda: all(s["node"] != dead_node for s in _listed_sessions(served, token)),
                     "the killed worker's sessions to leave the list")
            wait_for(lambda: dead_node not in _stored_nodes(tmp_path), "the killed worker's node row to go")
            # The survivor's sessions are still listed and still serve.
            live = [t for t in transports if owner_of[t] == survivor]
            assert {_pid_of(s["node"]) for s in _listed_sessions(served, token)} == {survivor}
            assert paramiko.SFTPClient.from_transport(live[0]).listdir("/") == []
        finally:
            for transport in transports:
                transport.close()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()


def test_workers_stop_when_their_parent_is_killed(tmp_path, host_key_dir):
    with serving(tmp_path, host_key_dir) as served:
        workers = served.workers()
        _put(served.ports["webdav"], "before.bin").close()
        served.proc.kill()
        served.proc.wait()
        # Orphans would serve on with nobody to restart them, and hold the ports.
        wait_for(lambda: all(_gone(pid) for pid in workers), "the workers to stop")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", served.ports["webdav"]), timeout=5).close()
    assert (served.home / "before.bin").exists()


@contextmanager
def _sftp_upload(served: Served, path: str, first: bytes) -> Iterator[tuple]:
    """An SFTP upload of `path` with `first` written and the handle left open.

    Yields (client, handle, pid of the worker serving it, pid of the other worker).
    """
    transport = _sftp_login(served.ports["sftp"])
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        uploader = served.owner(transport.sock, "sftp")
        (other,) = served.workers() - {uploader}
        handle = sftp.open(path, "wb")
        handle.write(first)
        handle.flush()
        yield sftp, handle, uploader, other
    finally:
        transport.close()


def test_a_restarted_worker_leaves_the_uploads_of_the_others_alone(tmp_path, host_key_dir):
    with serving(tmp_path, host_key_dir, log_level="info") as served:
        with _sftp_upload(served, "/big.bin", b"a" * 100_000) as (sftp, handle, uploader, other):
            os.kill(other, signal.SIGKILL)
            # The replacement is serving (so past its start-up) before the upload ends.
            replacement = served.wait_replaced(other, {uploader})
            served.wait_ready(replacement)
            assert _owners_until_all(served, lambda i: _put(served.ports["webdav"], f"probe-{i}.bin"),
                                     "webdav", 200) == {uploader, replacement}
            handle.write(b"b" * 100_000)
            handle.close()
            assert sftp.stat("/big.bin").st_size == 200_000
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()
    assert (served.home / "big.bin").read_bytes() == b"a" * 100_000 + b"b" * 100_000


def test_the_temp_file_of_a_young_upload_of_a_killed_worker_is_removed_without_a_restart(
        tmp_path, host_key_dir):
    # Younger than RECORD_AFTER and smaller than RECORD_BYTES: not in the store,
    # so only the worker's journal names it.
    with serving(tmp_path, host_key_dir, log_level="info") as served:
        (served.home / "kept.bin").write_bytes(b"version one")
        with _sftp_upload(served, "/kept.bin", b"a" * 100_000) as (_, _, uploader, other):
            temp = [p for p in served.home.iterdir() if p.name.startswith(TEMP_PREFIX)]
            assert len(temp) == 1
            os.kill(uploader, signal.SIGKILL)
            replacement = served.wait_replaced(uploader, {other})
            served.wait_ready(replacement)
            wait_for(lambda: not temp[0].exists(), "the dead worker's temp file to be removed", limit=30)
        assert (served.home / "kept.bin").read_bytes() == b"version one"
        assert not list((tmp_path / "state" / "uploads").glob("*.dead"))
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()
    # A clean stop leaves no journal behind.
    assert not list((tmp_path / "state" / "uploads").iterdir())


def test_a_worker_started_after_sighup_runs_with_the_reloaded_config(tmp_path, host_key_dir):
    with serving(tmp_path, host_key_dir, log_level="info") as served:
        path = tmp_path / "gateway.toml"
        config = tomllib.loads(path.read_text())
        config["webdav"]["max_header_size"] = 4096       # 64 KiB before
        path.write_text(tomli_w.dumps(config))
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served.log.read_text().count("SIGHUP: reloaded") == 2, "both workers to reload")
        survivor, victim = sorted(served.workers())
        os.kill(victim, signal.SIGKILL)
        replacement = served.wait_replaced(victim, {survivor})
        served.wait_ready(replacement)
        # Each worker answers a request with 8 KiB of headers on a connection it holds.
        answers: dict[int, int] = {}
        opened = []
        try:
            while set(answers) != {survivor, replacement} and len(opened) < 60:
                conn = http.client.HTTPConnection("127.0.0.1", served.ports["webdav"], timeout=60)
                opened.append(conn)
                conn.request("PROPFIND", "/", headers={**AUTH, "Depth": "0"})
                conn.getresponse().read()
                owner = served.owner(conn.sock, "webdav")
                if owner not in answers:
                    conn.request("PROPFIND", "/", headers={**AUTH, "Depth": "0", "X-Padding": "x" * 8192})
                    answers[owner] = conn.getresponse().status
        finally:
            for conn in opened:
                conn.close()
        assert answers == {survivor: 431, replacement: 431}
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()


def test_sigterm_drains_workers_and_an_sftp_upload_in_flight_keeps_the_old_version(tmp_path, host_key_dir):
    # The client never finishes: its upload is aborted once drain_timeout has passed.
    with serving(tmp_path, host_key_dir, drain_timeout=2) as served:
        target = served.home / "report.bin"
        target.write_bytes(b"old version")
        workers = served.workers()
        transport = _sftp_login(served.ports["sftp"])
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
            handle = sftp.open("/report.bin", "wb")
            handle.write(b"n" * 300_000)
            handle.flush()
            wait_for(lambda: any(n.startswith(".gw-upload-") for n in os.listdir(served.home)),
                     "the upload's temp file")
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(timeout=60) == 0, served.log.read_text()
        finally:
            transport.close()
        # Every worker is gone, not orphaned.
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert os.listdir(served.home) == ["report.bin"]
    assert target.read_bytes() == b"old version"
    assert "Traceback" not in served.log.read_text()


def test_sighup_reopens_the_audit_log_everywhere_and_leaves_sessions_and_connections_up(
        tmp_path, host_key_dir):
    audit = tmp_path / "audit.jsonl"
    with serving(tmp_path, host_key_dir, log_level="info", audit_log="audit.jsonl") as served:
        workers = served.workers()
        transport = _sftp_login(served.ports["sftp"])
        dav = _put(served.ports["webdav"], "before.bin")
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
            audit.rename(tmp_path / "audit.jsonl.1")   # as logrotate does
            served.proc.send_signal(signal.SIGHUP)
            # The parent and both workers.
            wait_for(lambda: served.log.read_text().count("SIGHUP: reopened the audit log") == 3,
                     "every process to reopen the audit log")
            assert served.proc.poll() is None and served.workers() == workers
            assert "before.bin" in sftp.listdir("/")
            dav.request("PUT", "/after.bin", body=b"y" * 4096, headers=AUTH)
            response = dav.getresponse()
            response.read()
            assert response.status == 201
        finally:
            dav.close()
            transport.close()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, served.log.read_text()
    assert "before.bin" in (tmp_path / "audit.jsonl.1").read_text()
    assert "after.bin" in audit.read_text() and "before.bin" not in audit.read_text()


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly():
    from gateway.supervisor import RESTART_DELAY_MAX, restart_delay

    delays = [0.0]
    for _ in range(10):
        delays.append(restart_delay(delays[-1], lived=1.0))
    assert delays[1:5] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == RESTART_DELAY_MAX
    # One that served for a while before dying comes back at once.
    assert restart_delay(RESTART_DELAY_MAX, lived=3600.0) == 0.0


def test_exit_statuses_are_described_in_words():
    from gateway.supervisor import describe_exit

    assert describe_exit(3 << 8) == "exited with status 3"
    assert describe_exit(signal.SIGKILL) == "killed by SIGKILL"


def test_workers_auto_means_one_per_cpu(tmp_path):
    assert load_config(write_config(tmp_path, "auto")).server.workers == os.cpu_count()


@pytest.mark.parametrize("value", ["many", 0, -2, True, 2.5, MAX_WORKERS + 1])
def test_a_bad_workers_value_is_a_config_error_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"\[server\] workers: expected a whole number"):
        load_config(write_config(tmp_path, value))


def test_serve_with_a_bad_workers_value_fails_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config",
                             str(write_config(tmp_path, "lots"))],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "[server] workers: " in result.stderr


def test_webdav_on_a_shared_socket_accepts_connections_without_nagle_delay():
    # A 201 goes out as headers, then body: with Nagle on, the body waits for
    # the client's delayed ACK (40 ms a request). cheroot sets TCP_NODELAY when
    # it binds; on the supervisor's socket the server must set it itself.
    from gateway.config import Listen
    from gateway.supervisor import _bind
    from gateway.webdav.http import make_server

    listener = _bind(Listen("127.0.0.1", 0))
    server = make_server(("127.0.0.1", 0), lambda environ, start_response: [], threads=1, timeout=5,
                         header_timeout=5, max_header_size=4096, sock=listener)
    server.prepare()
    try:
        assert server.bind_addr == listener.getsockname()
        with socket.create_connection(server.bind_addr, timeout=10):
            wait_for(lambda: select.select([listener], [], [], 0)[0], "the connection to arrive")
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.stop()


