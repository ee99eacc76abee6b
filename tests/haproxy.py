"""HAProxy in front of gateways: Debian's haproxy in the foreground on free ports, stopped on exit.

`run_haproxy` writes a TCP-mode config with one frontend per name in
`backends`, each balancing (leastconn) over the given gateway ports with
`send-proxy-v2`, the way config/haproxy.cfg does for real nodes. Tests that
use it carry `needs_haproxy`, so CI fails where haproxy is missing.
"""
from __future__ import annotations

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


def haproxy_config(frontends: dict[str, int], backends: dict[str, list[int]], ready_port: int) -> str:
    """A test config: TCP frontends on loopback, PROXY v2 towards the gateways, no health checks."""
    lines = ["global", "    maxconn 512", "",
             "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 300s",
             "    timeout server 300s", "    timeout tunnel 1h", "",
             # Answers only once haproxy has bound every listener: the fixture waits for it.
             "frontend ready", "    mode http", f"    bind 127.0.0.1:{ready_port}",
             "    monitor-uri /ready", ""]
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


@contextmanager
def run_haproxy(tmp: Path, backends: dict[str, list[int]]) -> Iterator[HAProxy]:
    """haproxy with a frontend per entry of `backends` (name -> gateway ports), stopped on exit."""
    binary = shutil.which("haproxy")
    assert binary, "haproxy is not installed"
    tmp.mkdir(parents=True, exist_ok=True)
    config, log = tmp / "haproxy.cfg", tmp / "haproxy.log"
    # A port picked here can be taken by someone else before haproxy binds it: try again then.
    for _attempt in range(3):
        ports = {name: free_port() for name in backends}
        ready_port = free_port()
        config.write_text(haproxy_config(ports, backends, ready_port))
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
