"""Two `gateway serve` processes on one PostgreSQL store and one shared folder act as one server.

Users are changed with the real CLI against either node's config; clients are
paramiko SFTP and curl. Each test gets an empty database of its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
import tomli_w

from tests.conftest import wait_for
from tests.haproxy import needs_haproxy, run_haproxy
from tests.sftp.helpers import copy_host_keys
from tests.webdav.test_litmus import assert_litmus_passes

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "a password for two nodes"
MAX_FAILURES = 4

pytestmark = pytest.mark.tools("curl")


@dataclass
class Node:
    name: str
    config: Path
    proc: subprocess.Popen
    printed: list[str]
    webdav_port: int = 0
    sftp_port: int = 0
    admin_port: int = 0

    @property
    def host_key_lines(self) -> list[str]:
        return [line.strip() for line in self.printed if line.strip().startswith("host key ")]


def write_node_config(base: Path, store_url: str, data: Path, *, proxied: bool = False) -> Path:
    base.mkdir()
    path = base / "gateway.toml"
    # Behind HAProxy: the PROXY header is believed from HAProxy's address only.
    proxy = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]} if proxied else {}
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": "state", "log_level": "warning"},
        "store": {"url": store_url},
        "webdav": {"listen": "127.0.0.1:0", **proxy},
        "sftp": {"listen": "127.0.0.1:0", **proxy},
        "admin": {"listen": "127.0.0.1:0"},
        # No slow-down: the test counts failures, it does not wait for them.
        "defender": {"max_failures": MAX_FAILURES, "failure_delay": 0.0},
        "backends": {"local": {"type": "local", "root": str(data)}},
    }))
    return path


def start_node(name: str, config: Path) -> Node:
    stderr = open(config.parent / "stderr.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    node = Node(name, config, proc, [])
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=60)
            pytest.fail(f"node {name} exited: {(config.parent / 'stderr.log').read_text()}")
        node.printed.append(line)
        if " listening on " in line:
            protocol, _, address = line.strip().partition(" listening on ")
            setattr(node, f"{protocol}_port", int(address.rsplit(":", 1)[1]))
        if line.startswith("gateway ready"):
            return node


def stop_node(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.communicate()
    else:
        node.proc.communicate()
    assert node.proc.returncode == 0, (node.config.parent / "stderr.log").read_text()


def start_nodes(tmp_path: Path, postgres, host_key_dir: Path, *, proxied: bool = False) -> list[Node]:
    url = postgres.create_database()
    data = tmp_path / "data"
    data.mkdir()
    configs = [write_node_config(tmp_path / name, url, data, proxied=proxied) for name in ("a", "b")]
    copy_host_keys(host_key_dir, tmp_path / "a" / "state")
    started: list[Node] = []
    try:
        for name, config in zip(("a", "b"), configs):
            started.append(start_node(name, config))
    except BaseException:
        for node in started:
            stop_node(node)
        raise
    return started


@pytest.fixture
def nodes(tmp_path, postgres, host_key_dir) -> Iterator[tuple[Node, Node]]:
    """Nodes a and b on one fresh database and one data folder; only a has host key files."""
    started = start_nodes(tmp_path, postgres, host_key_dir)
    try:
        yield started[0], started[1]
    finally:
        for node in started:
            stop_node(node)


def cli(node: Node, *args: str, stdin: str | None = None) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(node.config)],
                            cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def webdav_status(node: Node, user: str, password: str) -> int:
    return webdav_status_at(node.webdav_port, user, password)


def webdav_status_at(port: int, user: str, password: str) -> int:
    result = subprocess.run(["curl", "-s", "-o", os.devnull, "-w", "%{http_code}", "-X", "PROPFIND",
                             "-H", "Depth: 0", "-u", f"{user}:{password}",
                             f"http://127.0.0.1:{port}/"],
                            capture_output=True, text=True, timeout=60)
    return int(result.stdout)


def sftp_login(node: Node, user: str, password: str) -> paramiko.Transport:
    """An authenticated transport; raises paramiko.AuthenticationException when refused."""
    transport = paramiko.Transport(("127.0.0.1", node.sftp_port))
    try:
        transport.connect(username=user, password=password)
    except BaseException:
        transport.close()
        raise
    return transport


def sftp_can_log_in(node: Node, user: str, password: str) -> bool:
    try:
        transport = sftp_login(node, user, password)
    except (paramiko.SSHException, OSError):
        return False
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        sftp.listdir("/")
        sftp.close()
        return True
    finally:
        transport.close()


def test_a_user_added_with_the_cli_on_one_node_logs_in_on_the_other(nodes):
    a, b = nodes
    assert webdav_status(b, "carol", PASSWORD) == 401
    cli(a, "user", "add", "carol", "--password-stdin", stdin=PASSWORD + "\n")
    wait_for(lambda: webdav_status(b, "carol", PASSWORD) == 207, "carol's WebDAV login on node b")
    assert sftp_can_log_in(b, "carol", PASSWORD)
    assert webdav_status(a, "carol", PASSWORD) == 207


def test_failed_logins_spread_over_both_nodes_ban_the_address_on_both(nodes):
    a, b = nodes
    cli(a, "user", "add", "carol", "--password-stdin", stdin=PASSWORD + "\n")
    wait_for(lambda: webdav_status(b, "carol", PASSWORD) == 207, "carol to reach node b")
    for i in range(MAX_FAILURES // 2):
        assert webdav_status(a, "carol", f"wrong {i}") == 401
        with pytest.raises(paramiko.AuthenticationException):
            sftp_login(b, "carol", f"wrong again {i}")
    # Neither node saw enough failures on its own; together they ban the address.
    for node in (a, b):
        wait_for(lambda: webdav_status(node, "carol", PASSWORD) == 403, f"the ban on node {node.name}")
        assert not sftp_can_log_in(node, "carol", PASSWORD)


def test_disabling_a_user_on_one_node_ends_their_sftp_session_on_the_other(nodes):
    a, b = nodes
    cli(a, "user", "add", "carol", "--password-stdin", stdin=PASSWORD + "\n")
    wait_for(lambda: sftp_can_log_in(b, "carol", PASSWORD), "carol to reach node b")
    transport = sftp_login(b, "carol", PASSWORD)
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp.listdir("/") == []
        cli(a, "user", "disable", "carol")
        wait_for(lambda: not transport.is_active(), "carol's connection to node b to be closed")
    finally:
        transport.close()
    assert webdav_status(b, "carol", PASSWORD) == 401


def test_both_nodes_show_the_same_host_keys(nodes, host_key_dir):
    a, b = nodes
    assert len(a.host_key_lines) == 2 and a.host_key_lines == b.host_key_lines
    # Node a's key files went into the store, so clients that pinned them see no change.
    pinned = paramiko.Ed25519Key.from_private_key_file(str(host_key_dir / "ssh_host_ed25519_key"))
    for node in nodes:
        for key_type in ("ssh-ed25519", "rsa-sha2-256"):
            transport = paramiko.Transport(("127.0.0.1", node.sftp_port))
            try:
                transport.get_security_options().key_types = [key_type]
                transport.start_client(timeout=60)
                key = transport.get_remote_server_key()
            finally:
                transport.close()
            if key_type == "ssh-ed25519":
                assert key.get_fingerprint() == pinned.get_fingerprint()
            else:
                rsa = paramiko.RSAKey.from_private_key_file(str(host_key_dir / "ssh_host_rsa_key"))
                assert key.get_fingerprint() == rsa.get_fingerprint()
    assert not (b.config.parent / "state" / "ssh_host_ed25519_key").exists()


@needs_haproxy
@pytest.mark.tools("litmus")
@pytest.mark.client
def test_litmus_passes_through_haproxy_spreading_requests_over_both_nodes(tmp_path, postgres, host_key_dir):
    """Every litmus suite, its requests spread by HAProxy (leastconn) over two nodes sharing one store.

    Locks taken through one node must hold on the other, properties set on one
    must be read on the other, and each node must take the PROXY header.
    """
    a, b = start_nodes(tmp_path, postgres, host_key_dir, proxied=True)
    try:
        cli(a, "user", "add", "litmus", "--password-stdin", stdin=PASSWORD + "\n")
        with run_haproxy(tmp_path / "haproxy", {"webdav": [a.webdav_port, b.webdav_port]}) as haproxy:
            port = haproxy.ports["webdav"]
            wait_for(lambda: webdav_status_at(port, "litmus", PASSWORD) == 207, "the user through HAProxy")
            assert_litmus_passes(port, "litmus", tmp_path, password=PASSWORD)
        # Both nodes took part: each counted WebDAV connections of its own.
        for node in (a, b):
            assert webdav_connections(node) > 0, f"node {node.name} served nothing"
    finally:
        for node in (a, b):
            stop_node(node)


def webdav_connections(node: Node) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('gateway_connections_total{protocol="webdav"}'))
