"""HAProxy in front of gateways: Debian's haproxy in the foreground on free ports, stopped on exit.

`run_haproxy` writes a TCP-mode config with one frontend per name in
`backends`, each balancing (leastconn) over the given gateway ports with
`send-proxy-v2`, the way config/haproxy.cfg does for real nodes. Tests that
use it carry `needs_haproxy`, so CI fails where haproxy is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

needs_haproxy = pytest.mark.tools("haproxy")
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "haproxy.cfg"

# Connections a test makes through HAProxy come from here, so that the
# gateway (which sees HAProxy at 127.0.0.1) can tell the two apart.
CLIENT_IP = "127.0.0.2"
_START_LIMIT = 30.0


@dataclass
class HAProxy:
    """A running haproxy: frontend name -> the port it listens on."""

    ports: dict[str, int]
    config: Path
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect_from(ip: str, port: int, timeout: float = 30.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port whose source address is `ip` (any 127.x works on Linux)."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout)
        sock.bind((ip, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _ready_frontend(port: int) -> list[str]:
    # Answers only once haproxy has bound every listener: run_haproxy waits for it.
    return ["frontend ready", "    mode http", f"    bind 127.0.0.1:{port}", "    monitor-uri /ready", ""]


def haproxy_config(frontends: dict[str, int], backends: dict[str, list[int]], ready_port: int) -> str:
    """A test config: TCP frontends on loopback, PROXY v2 towards the gateways, no health checks."""
    lines = ["global", "    maxconn 512", "",
             "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 300s",
             "    timeout server 300s", "    timeout tunnel 1h", "", *_ready_frontend(ready_port)]
    for name, port in frontends.items():
        lines += [f"frontend {name}", f"    bind 127.0.0.1:{port}", f"    default_backend {name}_nodes",
                  "", f"backend {name}_nodes", "    balance leastconn"]
        lines += [f"    server node{i} 127.0.0.1:{target} send-proxy-v2"
                  for i, target in enumerate(backends[name], 1)]
        lines.append("")
    return "\n".join(lines)


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def example_config(frontends: dict[str, int], nodes: list[dict[str, int]], ready_port: int) -> str:
    """config/haproxy.cfg as shipped, moved onto loopback: its public ports become `frontends`
    ("webdav", "sftp"), node N's addresses and check port become `nodes[N-1]` ("webdav",
    "sftp", "admin" ports)."""
    # Logs go to the test's haproxy.log instead of syslog.
    text = EXAMPLE.read_text().replace("log /dev/log local0", "log stderr local0")
    text = text.replace("bind :443\n", f"bind 127.0.0.1:{frontends['webdav']}\n")
    text = text.replace("bind :22\n", f"bind 127.0.0.1:{frontends['sftp']}\n")
    for number, node in enumerate(nodes, 1):
        for protocol, example_port in (("webdav", 8080), ("sftp", 2022)):
            line = f"server node{number} 10.0.0.{10 + number}:{example_port}\n"
            assert line in text, f"{EXAMPLE} no longer has '{line.strip()}'"
            # Both nodes share 127.0.0.1 here, so each needs its own check port.
            text = text.replace(line, f"server node{number} 127.0.0.1:{node[protocol]} port {node['admin']}\n")
    if os.geteuid() != 0:
        text = re.sub(r"^\s*(user|group) haproxy\n", "", text, flags=re.M)
    return text + "\n" + "\n".join(_ready_frontend(ready_port))


@contextmanager
def run_haproxy(tmp: Path, backends: dict[str, list[int]]) -> Iterator[HAProxy]:
    """haproxy with a frontend per entry of `backends` (name -> gateway ports), stopped on exit."""
    with _run(tmp, list(backends), lambda ports, ready: haproxy_config(ports, backends, ready)) as haproxy:
        yield haproxy


@contextmanager
def run_example(tmp: Path, nodes: list[dict[str, int]]) -> Iterator[HAProxy]:
    """haproxy running config/haproxy.cfg in front of `nodes` (see example_config), stopped on exit."""
    with _run(tmp, ["webdav", "sftp"], lambda ports, ready: example_config(ports, nodes, ready)) as haproxy:
        yield haproxy


@contextmanager
def _run(tmp: Path, names: list[str], make_config) -> Iterator[HAProxy]:
    binary = shutil.which("haproxy")
    assert binary, "haproxy is not installed"
    tmp.mkdir(parents=True, exist_ok=True)
    config, log = tmp / "haproxy.cfg", tmp / "haproxy.log"
    # A port picked here can be taken by someone else before haproxy binds it: try again then.
    for _attempt in range(3):
        ports = {name: free_port() for name in names}
        ready_port = free_port()
        config.write_text(make_config(ports, ready_port))
        with open(log, "wb") as out:
            process = subprocess.Popen([binary, "-f", str(config), "-db"], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_LIMIT
        while process.poll() is None and not _ready(ready_port) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None and _ready(ready_port):
            break
        _stop(process)
    else:
        pytest.fail(f"haproxy did not start:\n{log.read_text(errors='replace')}")
    try:
        yield HAProxy(ports, config, log)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
