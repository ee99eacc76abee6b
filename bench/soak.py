"""Soak: WebDAV and SFTP clients doing mixed operations for a set time while one fault is injected.

Every write a client gets acknowledged (a 2xx to PUT, a successful SFTP close)
is recorded with its SHA-256, per path; at the end every path is read back
through WebDAV and must hold what was last acknowledged there. A write that
failed with a clear status must have left the previous version; one whose
outcome the client cannot know (the connection dropped, a timeout) may have
happened or not. Anything else is a lost or corrupt write; reads during the
run are checked the same way (a "wrong read", reported with the path's history).

Faults (one per run, injected after 30% of --duration, lasting --fault-seconds):
  s3-stop     moto frozen (SIGSTOP), then thawed (SIGCONT)           (--backend s3)
  s3-cut      the TCP forwarder in front of moto closed, then reopened (--backend s3)
  pg-restart  PostgreSQL stopped (pg_ctl as postgres), then started  (--store postgresql)
  worker-kill SIGKILL of one worker of the gateway (--workers 2)
  node-kill   SIGKILL of one of two `gateway serve` nodes behind HAProxy (--store postgresql)
  tmpfs-full  the local backend's root is a small tmpfs, filled up, then freed (--backend local; root)
  store-slow  every byte to S3 (or, on local, to PostgreSQL) delayed by --slow-ms per chunk
  none        no fault: the baseline

Acceptance (the exit status is 1 when one fails): 0 acknowledged writes lost or
corrupt; no 5xx other than 503/507, no unexpected status and no hang past the
client's timeout; recovery (a WebDAV PUT+GET and an SFTP write succeed again)
within 10 s of the fault's end; 0 leftovers (temp files, open multipart
uploads, locks, sessions, upload and dead node rows) once `node_timeout` plus a
sweep has passed after the clients stopped. --smoke drops the timed checks
(recovery time), for CI.

    python bench/soak.py --duration 60 --webdav 48 --sftp 16 --fault tmpfs-full \\
        [--backend local|s3] [--store sqlite|postgresql] [--workers 2] [--out FILE.json]
    python bench/soak.py --summarize bench/results/soak-*/*.json     # one table row per result
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.sftp import CMD_CLOSE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (CONNECTS, PASSWORD, REPO, S3_USER, USER, Http, RssWatch, Server, _children,  # noqa: E402
                 free_port, start_gateway, start_moto, wait_port)

FAULTS = ("none", "s3-stop", "s3-cut", "pg-restart", "worker-kill", "node-kill", "tmpfs-full", "store-slow")
RESULTS = Path(__file__).resolve().parent / "results"
SIZES = ((4096, 60), (64 * 1024, 25), (1024 * 1024, 15))     # (bytes, weight) of a write
FILES_PER_CLIENT = 8
CLEAR_HTTP = (503, 507)
RECOVERY_LIMIT = 10.0
ABSENT = None
EMPTY = hashlib.sha256(b"").hexdigest()


# -- the ledger: what each path may hold --------------------------------------------

class Ledger:
    """Per path, the set of SHA-256 digests (or ABSENT) it may hold now.

    An acknowledged write or delete makes that the only state; a clear failure
    leaves the set alone (the old version stays); an unknown outcome adds the
    attempted state. Each client has paths of its own, so no two threads race
    on one path.
    """

    def __init__(self) -> None:
        self.allowed: dict[str, set[str | None]] = {}
        self.acked: dict[str, str | None] = {}      # the last acknowledged state, for the report
        self.acked_writes = 0
        self.lock = threading.Lock()
        self.history: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=6))   # for the report

    def note(self, path: str, event: str, digest: str | None = "") -> None:
        what = f" {short(digest)}" if digest != "" else ""
        self.history[path].append(f"{Recorder.clock():.1f}s {event}{what}")

    def story(self, path: str) -> str:
        with self.lock:
            return "; ".join(self.history.get(path, ()))

    def state(self, path: str) -> set[str | None]:
        with self.lock:
            return set(self.allowed.get(path, {ABSENT}))

    def acknowledged(self, path: str, digest: str | None) -> None:
        with self.lock:
            self.allowed[path] = {digest}
            self.acked[path] = digest
            self.note(path, "acknowledged", digest)
            if digest is not ABSENT:
                self.acked_writes += 1

    def unknown(self, path: str, digest: str | None) -> None:
        with self.lock:
            self.allowed.setdefault(path, {ABSENT}).add(digest)
            self.note(path, "unknown outcome", digest)

    def failed(self, path: str, what: str, outcome: "Outcome") -> None:
        """A clear failure changes nothing; kept in the path's history for the report."""
        with self.lock:
            self.note(path, f"{what} failed ({outcome.kind})")

    def created_empty(self, path: str, certain: bool) -> None:
        """A LOCK on an unmapped path creates an empty file (RFC 4918, 9.10.4); so may an SFTP open."""
        with self.lock:
            states = self.allowed.setdefault(path, {ABSENT})
            if ABSENT in states:
                if certain:
                    states.discard(ABSENT)
                    self.acked[path] = EMPTY
                states.add(EMPTY)

    def moved(self, src: str, dst: str, certain: bool) -> None:
        with self.lock:
            states = self.allowed.get(src, {ABSENT})
            self.note(src, f"moved to {dst.rpartition('/')[2]}{'' if certain else ' (unknown outcome)'}")
            self.note(dst, f"moved from {src.rpartition('/')[2]}{'' if certain else ' (unknown outcome)'}",
                      self.acked.get(src))
            if certain:
                self.allowed[dst], self.allowed[src] = set(states), {ABSENT}
                self.acked[dst], self.acked[src] = self.acked.get(src), ABSENT
            else:
                self.allowed.setdefault(dst, {ABSENT}).update(states)
                self.allowed[src] = states | {ABSENT}


def short(digest: str | None) -> str:
    return "absent" if digest is ABSENT else "empty" if digest == EMPTY else digest[:12]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(rng: random.Random) -> bytes:
    size = rng.choices([s for s, _ in SIZES], [w for _, w in SIZES])[0]
    return os.urandom(size)


# -- operation records ----------------------------------------------------------------

@dataclass
class Op:
    start: float           # seconds since the load started
    protocol: str
    name: str
    seconds: float
    kind: str              # "ok", or the kind of error


class Outcome(Exception):
    """An operation's failure, classified: kind is what the report counts, certain says
    whether the server surely did not do it (a clear status) or the outcome is unknown."""

    def __init__(self, kind: str, certain: bool, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.certain, self.detail = kind, certain, detail


@dataclass
class Recorder:
    # One clock for the whole run (the ledger's history uses it too), set when the load starts.
    started: typing.ClassVar[float] = time.monotonic()
    ops: list[Op] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)     # reads during the run that matched no allowed state
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return self.clock()

    @staticmethod
    def clock() -> float:
        """Seconds since the load started."""
        return time.monotonic() - Recorder.started

    def run(self, protocol: str, name: str, fn) -> object:
        """Time fn(); return its value, or the Outcome it failed with (recorded either way)."""
        start = self.now()
        try:
            value, kind = fn(), "ok"
        except Outcome as e:
            value, kind = e, e.kind
            with self.lock:
                self.examples.setdefault(e.kind, f"{protocol} {name}: {e.detail}"[:200])
        with self.lock:
            self.ops.append(Op(start, protocol, name, self.now() - start, kind))
        return value


def http_outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Outcome("hang (client timeout)", False, str(exc))
    return Outcome(f"connection: {type(exc).__name__}", False, str(exc))


# -- WebDAV client --------------------------------------------------------------------

LOCKINFO = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
            b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner>soak</D:owner></D:lockinfo>')


class DavClient:
    """One keep-alive WebDAV connection (run.Http) with a folder of its own."""

    def __init__(self, server: Server, n: int, soak: "Soak") -> None:
        self.http = Http(server, timeout=soak.args.client_timeout)
        self.folder = f"/soak/d{n:03d}"
        self.soak, self.rng = soak, random.Random(n)
        self.locks: list[tuple[str, str]] = []

    def call(self, method: str, path: str, ok: tuple[int, ...], **kwargs) -> tuple[int, http.client.HTTPResponse,
                                                                                 bytes]:
        try:
            status, response, data = self.http.request(method, path, **kwargs)
        except Exception as e:
            raise http_outcome(e) from None
        if status in ok:
            return status, response, data
        if status in CLEAR_HTTP:
            raise Outcome(f"HTTP {status}", True, f"{method} {path}")
        if status >= 500:
            # A 500 may come after the change happened: its outcome is unknown.
            raise Outcome(f"HTTP {status}", False, f"{method} {path}: {data[:120]!r}")
        raise Outcome(f"unexpected HTTP {status}", True, f"{method} {path}: {data[:120]!r}")

    def put(self, path: str, headers: dict | None = None) -> None:
        data = payload(self.rng)
        try:
            self.call("PUT", path, (200, 201, 204), body=data, headers=headers)
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.unknown(path, sha(data))
            else:
                self.soak.ledger.failed(path, "PUT", e)
            raise
        self.soak.ledger.acknowledged(path, sha(data))

    def get(self, path: str) -> None:
        allowed = self.soak.ledger.state(path)
        status, _, data = self.call("GET", path, (200, 404))
        got = sha(data) if status == 200 else ABSENT
        if got not in allowed:
            self.soak.recorder.mismatches.append(f"{self.soak.recorder.now():.1f}s GET {path}: {short(got)} "
                                                 f"({len(data)} bytes); before: {self.soak.ledger.story(path)}")
            raise Outcome("read mismatch", True, path)

    def delete(self, path: str) -> None:
        try:
            self.call("DELETE", path, (204, 200, 404))
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.unknown(path, ABSENT)
            raise
        self.soak.ledger.acknowledged(path, ABSENT)

    def move(self, src: str, dst: str) -> None:
        if ABSENT in self.soak.ledger.state(src):
            return self.put(src)
        url = f"http://127.0.0.1:{self.http.server.http_port}{dst}"
        try:
            self.call("MOVE", src, (201, 204), headers={"Destination": url, "Overwrite": "T"})
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.moved(src, dst, certain=False)
            else:
                self.soak.ledger.failed(src, "MOVE", e)
            raise
        self.soak.ledger.moved(src, dst, certain=True)

    def locked_put(self, path: str) -> None:
        try:
            _, response, _ = self.call("LOCK", path, (200, 201), body=LOCKINFO,
                                       headers={"Timeout": "Second-600", "Content-Type": "text/xml"})
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.created_empty(path, certain=False)
            else:
                self.soak.ledger.failed(path, "LOCK", e)
            raise
        self.soak.ledger.created_empty(path, certain=True)
        token = response.getheader("Lock-Token", "")
        self.locks.append((path, token))
        try:
            self.put(path, headers={"If": f"({token})"})
        finally:
            self.unlock()

    def unlock(self) -> None:
        """Release the locks this client holds; one that fails stays listed and is tried again next step."""
        for path, token in list(self.locks):
            self.call("UNLOCK", path, (204, 409, 412), headers={"Lock-Token": token})
            self.locks.remove((path, token))

    def setup(self) -> None:
        with contextlib.suppress(Outcome):
            self.call("MKCOL", "/soak/", (201, 405))
        self.call("MKCOL", self.folder + "/", (201, 405))

    def step(self) -> None:
        if self.locks:
            self.soak.recorder.run("webdav", "UNLOCK (retry)", self.unlock)
            return
        path = f"{self.folder}/f{self.rng.randrange(FILES_PER_CLIENT)}.bin"
        other = f"{self.folder}/f{self.rng.randrange(FILES_PER_CLIENT)}.bin"
        op = self.rng.choices(["PUT", "GET", "PROPFIND", "MOVE", "DELETE", "LOCK+PUT"], [35, 30, 15, 8, 4, 8])[0]
        actions = {"PUT": lambda: self.put(path), "GET": lambda: self.get(path),
                   "PROPFIND": lambda: self.call("PROPFIND", self.folder + "/", (207,), headers={"Depth": "1"}),
                   "MOVE": lambda: self.move(path, other) if other != path else self.get(path),
                   "DELETE": lambda: self.delete(path), "LOCK+PUT": lambda: self.locked_put(path)}
        self.soak.recorder.run("webdav", op, actions[op])

    def finish(self) -> None:
        """Release the locks a failure left held: what is left after this is the server's leftover."""
        with contextlib.suppress(Outcome):
            self.unlock()
        self.http.close()


# -- SFTP client ----------------------------------------------------------------------

def sftp_outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Outcome("hang (client timeout)", False, str(exc))
    if isinstance(exc, OSError) and str(exc) == "Socket is closed":
        # paramiko's word for a request on a transport that already died: the connection is gone.
        return Outcome("SFTP connection: closed", False, str(exc))
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.args:
        message = str(exc.args[-1]) if exc.args else ""
        # A status with a message (SFTP_FAILURE "No space left", ENOENT...): a clear failure.
        # Its kind leaves out the quoted path, so that one kind counts all of them.
        kind = re.sub(r"https?://\S+", "URL", re.sub(r"'[^']*'", "'...'", message))[:60]
        if "internal" in message.lower():
            # SFTP's 500: no clear answer, so the change may have happened.
            return Outcome(f"SFTP status: {kind}", False, message)
        return Outcome(f"SFTP status: {kind}" if message else "SFTP status without message", True, message)
    return Outcome(f"SFTP connection: {type(exc).__name__}", False, str(exc))


class SftpClient:
    """One paramiko SFTP session with a folder of its own; `pipelined` clients do not wait for each write."""

    def __init__(self, server: Server, n: int, soak: "Soak", pipelined: bool) -> None:
        self.server, self.soak, self.pipelined = server, soak, pipelined
        self.folder = f"/soak/s{n:03d}"
        self.rng = random.Random(1000 + n)
        self.transport: paramiko.Transport | None = None
        self.sftp: paramiko.SFTPClient | None = None

    def connect(self) -> paramiko.SFTPClient:
        if self.sftp is None:
            with CONNECTS:
                transport = paramiko.Transport(("127.0.0.1", self.server.sftp_port))
                try:
                    transport.banner_timeout = transport.auth_timeout = self.soak.args.client_timeout
                    transport.connect(username=self.server.sftp_user, pkey=self.soak.key)
                    sftp = paramiko.SFTPClient.from_transport(transport)
                    sftp.get_channel().settimeout(self.soak.args.client_timeout)
                except BaseException:
                    transport.close()
                    raise
            self.transport, self.sftp = transport, sftp
        return self.sftp

    def call(self, fn):
        try:
            return fn(self.connect())
        except Outcome:
            raise
        except Exception as e:
            outcome = sftp_outcome(e)
            if not outcome.certain:
                self.close()
            raise outcome from None

    def put(self, path: str) -> None:
        data = payload(self.rng)
        # The open (SSH_FXF_CREAT) may create the file before a write fails.
        self.soak.ledger.created_empty(path, certain=False)

        def write(sftp: paramiko.SFTPClient) -> None:
            fh = sftp.open(path, "wb")
            fh.set_pipelined(self.pipelined)
            try:
                for i in range(0, len(data), 32768):
                    fh.write(data[i:i + 32768])
                fh.flush()
                sftp._finish_responses(fh)      # a pipelined handle's WRITE statuses; raises on a failed one
            except BaseException:
                fh.close()                      # the write's error is the outcome, not the close's
                raise
            # paramiko's close() swallows a failed CLOSE, and CLOSE is where the server
            # reports a failed upload (pipelining clients learn of failed WRITEs there):
            # send it here, so that its status counts.
            fh._closed = True
            sftp._request(CMD_CLOSE, fh.handle)
        try:
            self.call(write)
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.unknown(path, sha(data))
            else:
                self.soak.ledger.failed(path, "write", e)
            raise
        self.soak.ledger.acknowledged(path, sha(data))

    def get(self, path: str) -> None:
        allowed = self.soak.ledger.state(path)

        def read(sftp: paramiko.SFTPClient) -> str | None:
            try:
                with sftp.open(path, "rb") as fh:
                    fh.prefetch()
                    return sha(fh.read())
            except FileNotFoundError:
                return ABSENT
        got = self.call(read)
        if got not in allowed:
            self.soak.recorder.mismatches.append(f"{self.soak.recorder.now():.1f}s SFTP read {path}: {short(got)}; "
                                                 f"before: {self.soak.ledger.story(path)}")
            raise Outcome("read mismatch", True, path)

    def rename(self, src: str, dst: str) -> None:
        if ABSENT in self.soak.ledger.state(src) or src == dst:
            return self.put(src)

        def move(sftp: paramiko.SFTPClient) -> None:
            sftp.posix_rename(src, dst)
        try:
            self.call(move)
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.moved(src, dst, certain=False)
            raise
        self.soak.ledger.moved(src, dst, certain=True)

    def remove(self, path: str) -> None:
        def rm(sftp: paramiko.SFTPClient) -> None:
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(path)
        try:
            self.call(rm)
        except Outcome as e:
            if not e.certain:
                self.soak.ledger.unknown(path, ABSENT)
            raise
        self.soak.ledger.acknowledged(path, ABSENT)

    def setup(self) -> None:
        def mkdirs(sftp: paramiko.SFTPClient) -> None:
            for folder in ("/soak", self.folder):
                with contextlib.suppress(OSError):
                    sftp.mkdir(folder)
        self.call(mkdirs)

    def step(self) -> None:
        path = f"{self.folder}/f{self.rng.randrange(FILES_PER_CLIENT)}.bin"
        other = f"{self.folder}/f{self.rng.randrange(FILES_PER_CLIENT)}.bin"
        op = self.rng.choices(["write", "read", "stat", "list", "rename", "remove"], [40, 30, 10, 10, 6, 4])[0]
        actions = {"write": lambda: self.put(path), "read": lambda: self.get(path),
                   "stat": lambda: self.call(lambda s: s.lstat(self.folder)),
                   "list": lambda: self.call(lambda s: s.listdir_attr(self.folder)),
                   "rename": lambda: self.rename(path, other), "remove": lambda: self.remove(path)}
        name = f"{op} (pipelined)" if op == "write" and self.pipelined else op
        self.soak.recorder.run("sftp", name, actions[op])

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.transport = self.sftp = None


# -- faults -----------------------------------------------------------------------------

def tree(root: int) -> list[int]:
    children, pids, out = _children(), [root], []
    while pids:
        pid = pids.pop()
        out.append(pid)
        pids += children.get(pid, [])
    return out


def proc_stats(roots: list[int]) -> dict:
    """RSS (MiB), threads and open descriptors summed over the gateway processes and their children."""
    rss = threads = fds = 0
    for root in roots:
        for pid in tree(root):
            with contextlib.suppress(OSError, ValueError):
                status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if ":" in line)
                rss += int(status.get("VmRSS", "0 kB").split()[0])
                threads += int(status["Threads"])
                fds += len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": round(rss / 1024, 1), "threads": threads, "fds": fds}


# -- the soak ---------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.ledger, self.recorder = Ledger(), Recorder()
        self.nodes: list[Server] = []
        self.front: Server | None = None          # where clients connect (a node or HAProxy)
        self.stack = contextlib.ExitStack()
        self.pg = self.s3 = self.s3_forward = self.pg_forward = None
        self.tmpfs: Path | None = None
        self.filling = threading.Event()       # set: stop keeping the tmpfs full
        self.fault_log: list[str] = []
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        self.key_file, self.key = key, paramiko.Ed25519Key.from_private_key_file(str(key))
        self.user = S3_USER if args.backend == "s3" else USER

    # set-up and tear-down

    def start(self) -> None:
        args, settings = self.args, [f"server.workers={self.args.workers}", "server.log_level=\"info\"",
                                     f"store.node_timeout={self.args.node_timeout}",
                                     f"store.sweep_interval={self.args.sweep_interval}"]
        settings += args.set
        from tests.s3_server import TcpForwarder   # the same cuttable, slowable TCP path the tests use
        if args.store == "postgresql":
            from tests.postgres import running_postgres
            self.pg = self.stack.enter_context(running_postgres())
            self.pg_forward = TcpForwarder(("127.0.0.1", self.pg.port))
            self.stack.callback(self.pg_forward.cut)
            url = self.pg.create_database().replace(f":{self.pg.port}/", f":{self.pg_forward.port}/")
            settings.append(f'store.url="{url}"')
        s3_table = None
        if args.backend == "s3":
            self.s3 = start_moto(self.work)
            self.stack.callback(self.s3.stop)
            self.stack.callback(lambda: os.kill(self.s3.pid, signal.SIGCONT))   # never leave it frozen
            self.s3_forward = TcpForwarder(("127.0.0.1", int(self.s3.endpoint_url.rpartition(":")[2])))
            self.stack.callback(self.s3_forward.cut)
            s3_table = self.s3.backend_table(prefix="soak/",
                                             endpoint_url=f"http://127.0.0.1:{self.s3_forward.port}")
        data = self.work / "data"
        data.mkdir()
        if args.fault == "tmpfs-full":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mib}m", "soak-tmpfs", str(data)],
                           check=True)
            self.tmpfs = data
            self.stack.callback(lambda: subprocess.run(["umount", "-l", str(data)], check=False))
        settings.append(f'backends.local={{type = "local", root = "{data}"}}')
        node_count = 2 if args.fault == "node-kill" else 1
        admin_ports = [free_port() for _ in range(node_count)]
        for i in range(node_count):
            extra = []
            if node_count > 1:
                extra = [f'admin.listen="127.0.0.1:{admin_ports[i]}"', "webdav.proxy_protocol=true",
                         "sftp.proxy_protocol=true", 'webdav.trusted_proxies=["127.0.0.1"]',
                         'sftp.trusted_proxies=["127.0.0.1"]']
            node = start_gateway(self.work, self.key_file.with_suffix(".pub"), settings + extra, s3_table,
                                 name=f"node{i + 1}", add_users=i == 0)
            self.stack.callback(node.stop)
            self.nodes.append(node)
        self.front = Server("front", data)
        self.front.http_auth, self.front.sftp_user = (self.user, PASSWORD), self.user
        if node_count > 1:
            from tests.haproxy import run_example
            nodes = [{"webdav": n.http_port, "sftp": n.sftp_port, "admin": p}
                     for n, p in zip(self.nodes, admin_ports)]
            haproxy = self.stack.enter_context(run_example(self.work / "haproxy", nodes))
            self.front.http_port, self.front.sftp_port = haproxy.ports["webdav"], haproxy.ports["sftp"]
            for port in admin_ports:       # both nodes ready, so HAProxy's checks pass
                wait_port(port)
            time.sleep(5)
        else:
            self.front.http_port, self.front.sftp_port = self.nodes[0].http_port, self.nodes[0].sftp_port
        if args.workers > 1:
            deadline = time.monotonic() + 60
            while len(self.workers(self.nodes[0])) < args.workers and time.monotonic() < deadline:
                time.sleep(0.2)

    def workers(self, node: Server) -> list[int]:
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text()
            return [int(p) for p in text.split()]
        return []

    def stop(self) -> None:
        self.stack.close()

    # faults

    def inject(self) -> None:
        fault, args = self.args.fault, self.args
        log = self.fault_log.append
        if fault == "s3-stop":
            os.kill(self.s3.pid, signal.SIGSTOP)
            log("moto stopped (SIGSTOP)")
        elif fault == "s3-cut":
            self.s3_forward.cut()
            log("S3 forwarder closed (connections reset, new ones refused)")
        elif fault == "pg-restart":
            self.pg.pg_ctl("-m", "fast", "-w", "stop")
            log("PostgreSQL stopped (pg_ctl -m fast stop)")
        elif fault == "worker-kill":
            pid = self.workers(self.nodes[0])[0]
            os.kill(pid, signal.SIGKILL)
            log(f"worker {pid} killed (SIGKILL)")
        elif fault == "node-kill":
            self.nodes[1].proc.kill()
            log(f"node2 (pid {self.nodes[1].proc.pid}) killed (SIGKILL)")
        elif fault == "tmpfs-full":
            self.filling.clear()
            filler = self.tmpfs / "soak-filler"
            self.fill(filler)
            log(f"local root filled ({filler.stat().st_size // (1024 * 1024)} MiB filler, tmpfs {args.tmpfs_mib} "
                f"MiB) and kept full")
            threading.Thread(target=self.keep_full, args=(filler,), name="soak-filler", daemon=True).start()
        elif fault == "store-slow":
            forward = self.s3_forward or self.pg_forward
            forward.delay = args.slow_ms / 1000
            log(f"{'S3' if forward is self.s3_forward else 'PostgreSQL'} traffic delayed {args.slow_ms} ms per chunk")

    def fill(self, filler: Path) -> None:
        """Write to `filler` until the file system is full, to the last 4 KiB."""
        with filler.open("ab", buffering=0) as fh:
            for chunk in (1024 * 1024, 4096):
                with contextlib.suppress(OSError):
                    while True:
                        fh.write(b"\0" * chunk)

    def keep_full(self, filler: Path) -> None:
        # Clients delete and overwrite, which frees space: take it again at once.
        while not self.filling.wait(0.02):
            with contextlib.suppress(OSError):
                self.fill(filler)

    def clear(self) -> None:
        fault, log = self.args.fault, self.fault_log.append
        if fault == "s3-stop":
            os.kill(self.s3.pid, signal.SIGCONT)
            log("moto resumed (SIGCONT)")
        elif fault == "s3-cut":
            self.s3_forward.restore()
            log("S3 forwarder open again")
        elif fault == "pg-restart":
            self.pg.pg_ctl("-w", "-t", "60", "-l", str(self.pg.data_dir.parent / "log"), "-o", self.pg.options, "start")
            log("PostgreSQL started")
        elif fault == "tmpfs-full":
            self.filling.set()
            (self.tmpfs / "soak-filler").unlink()
            log("filler removed")
        elif fault == "store-slow":
            (self.s3_forward or self.pg_forward).delay = 0.0
            log("delay removed")

    def probe(self) -> bool:
        """One WebDAV PUT+GET and one SFTP write+read on fresh connections, each bounded by the client timeout."""
        body = os.urandom(1024)
        http_ = Http(self.front, timeout=self.args.client_timeout)
        try:
            status, _, _ = http_.request("PUT", "/soak-probe.bin", body=body)
            status2, _, data = http_.request("GET", "/soak-probe.bin")
            if status not in (200, 201, 204) or status2 != 200 or data != body:
                return False
        except Exception:
            return False
        finally:
            http_.close()
        client = SftpClient(self.front, 999, self, pipelined=False)
        try:
            sftp = client.connect()
            with sftp.open("/soak-probe.bin", "wb") as fh:
                fh.write(body)
            with sftp.open("/soak-probe.bin", "rb") as fh:
                return fh.read() == body
        except Exception:
            return False
        finally:
            client.close()

    # the run

    def run(self) -> dict:
        args, rec = self.args, self.recorder
        clients: list = [DavClient(self.front, n, self) for n in range(args.webdav)]
        clients += [SftpClient(self.front, n, self, pipelined=n % 2 == 0) for n in range(args.sftp)]
        setup_errors = []
        for client in clients:
            try:
                client.setup()
            except Exception as e:
                setup_errors.append(f"{type(client).__name__}: {e}")
        stop = threading.Event()

        def loop(client) -> None:
            while not stop.is_set():
                client.step()

        threads = [threading.Thread(target=loop, args=(c,), name=f"soak-{i}", daemon=True)
                   for i, c in enumerate(clients)]
        stats = {"start": proc_stats([n.proc.pid for n in self.nodes])}
        rss = RssWatch()
        for node in self.nodes:
            rss.watch(node.name, node.proc.pid)
        rss.start()
        Recorder.started = time.monotonic()
        for t in threads:
            t.start()
        fault_start = fault_end = recovered = None
        peak = dict(stats["start"])
        sample_stop = threading.Event()

        def sample() -> None:
            while not sample_stop.wait(1):
                now = proc_stats([n.proc.pid for n in self.nodes if n.proc.poll() is None])
                for k, v in now.items():
                    peak[k] = max(peak[k], v)
        sampler = threading.Thread(target=sample, name="soak-sample", daemon=True)
        sampler.start()
        if args.fault != "none":
            time.sleep(args.duration * 0.3)
            fault_start = rec.now()
            self.inject()
            if args.fault not in ("worker-kill", "node-kill"):
                time.sleep(args.fault_seconds)
                self.clear()
            fault_end = rec.now()
            deadline = time.monotonic() + max(30.0, args.client_timeout * 2)
            while time.monotonic() < deadline:
                if self.probe():
                    recovered = rec.now() - fault_end
                    break
                time.sleep(0.25)
        time.sleep(max(0.0, args.duration - rec.now()))
        stop.set()
        elapsed = rec.now()
        hung = []
        join_deadline = time.monotonic() + args.client_timeout * 3 + 10
        for t in threads:
            t.join(max(0.1, join_deadline - time.monotonic()))
            if t.is_alive():
                hung.append(t.name)
        for client in clients:
            with contextlib.suppress(Exception):
                client.finish()
        sample_stop.set()
        sampler.join()
        stats["peak"] = peak
        stats["after_load"] = proc_stats([n.proc.pid for n in self.nodes if n.proc.poll() is None])
        # Leftovers are counted once a dead node's things may be swept: node_timeout plus a sweep.
        wait = args.node_timeout + args.sweep_interval * 1.2 + 2
        time.sleep(wait)
        leftovers = self.leftovers()
        readback = self.read_back()
        stats["end"] = proc_stats([n.proc.pid for n in self.nodes if n.proc.poll() is None])
        rss.stop()
        stats["peak_rss_hwm_mib"] = {k: round(v / 1024, 1) for k, v in rss.peak_kib.items()}
        return self.report(elapsed, fault_start, fault_end, recovered, hung, setup_errors, leftovers,
                           readback, stats, wait)

    def read_back(self) -> dict:
        """Every path the ledger knows, read through WebDAV on a fresh connection: lost, corrupt or fine."""
        http_ = Http(self.front, timeout=max(60, self.args.client_timeout))
        result = {"checked": 0, "lost": [], "corrupt": [], "unreadable": [], "acknowledged_writes":
                  self.ledger.acked_writes}
        for path, allowed in sorted(self.ledger.allowed.items()):
            result["checked"] += 1
            try:
                status, _, data = http_.request("GET", path)
            except Exception as e:
                result["unreadable"].append(f"{path}: {type(e).__name__}: {e}")
                continue
            if status not in (200, 404):
                result["unreadable"].append(f"{path}: HTTP {status}")
                continue
            got = sha(data) if status == 200 else ABSENT
            if got in allowed:
                continue
            acked = self.ledger.acked.get(path)
            line = (f"{path}: holds {'nothing' if got is None else f'{len(data)} bytes {got[:12]}'}, "
                    f"last acknowledged {short(acked)}; before: {self.ledger.story(path)}")
            # Lost: the acknowledged version is gone (absent, empty or an older/failed write); corrupt: bytes
            # that no write of this path ever sent.
            (result["lost"] if got is None or not data else result["corrupt"]).append(line)
        http_.close()
        return result

    def leftovers(self) -> dict:
        out: dict[str, object] = {}
        from gateway.storage.base import TEMP_PREFIX as prefix     # the name the local backend's temp files start with
        temps = [p for p in Path(self.work / "data").rglob(f"{prefix}*")]
        out["temp files"] = len(temps)
        if temps:
            # Which, how big and how old: enough to tell whose upload it was.
            out["temp file examples"] = [f"{p.relative_to(self.work)} {p.stat().st_size} B, "
                                         f"{time.time() - p.stat().st_mtime:.0f} s old" for p in temps[:5]]
        if self.s3 is not None:
            client = self.s3.client()
            try:
                out["multipart uploads"] = len(client.list_multipart_uploads(
                    Bucket=self.s3.bucket, Prefix="soak/").get("Uploads", []))
            finally:
                client.close()
        out.update(self.store_rows())
        return out

    def store_rows(self) -> dict:
        """Rows of the state store that should be gone: live locks, sessions, uploads in flight, dead nodes."""
        import tomllib

        import sqlalchemy as sa
        config = self.work / "node1" / "gateway.toml"
        store_url = tomllib.loads(config.read_text()).get("store", {}).get("url", "sqlite:///gateway.db")
        if store_url.startswith("sqlite:///"):
            db = (self.work / "node1" / "gw-state" / store_url[len("sqlite:///"):]).resolve()
            url = f"sqlite:///{db}"
        else:
            url = "postgresql+psycopg://" + store_url.split("://", 1)[1]
        engine = sa.create_engine(url)
        now = time.time()
        try:
            with engine.connect() as conn:
                q = lambda sql, **kw: conn.execute(sa.text(sql), kw).scalar()    # noqa: E731
                return {"locks": q("SELECT count(*) FROM locks WHERE expire > :now", now=now),
                        "sessions": q("SELECT count(*) FROM sessions"),
                        "upload rows": q("SELECT count(*) FROM uploads"),
                        "dead node rows": q("SELECT count(*) FROM nodes WHERE heartbeat < :t",
                                            t=now - self.args.node_timeout)}
        except Exception as e:
            return {"store": f"unreadable: {type(e).__name__}: {e}"[:200]}
        finally:
            engine.dispose()

    # the report

    def report(self, elapsed, fault_start, fault_end, recovered, hung, setup_errors, leftovers, readback,
               stats, wait) -> dict:
        args, ops = self.args, self.recorder.ops
        per_op: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            per_op[f"{op.protocol} {op.name}"].append(op)
        table = {}
        for name, items in sorted(per_op.items()):
            lat = sorted(o.seconds * 1000 for o in items if o.kind == "ok")
            pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None   # noqa: E731
            table[name] = {"ok": len(lat), "errors": len(items) - len(lat), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}
        errors = Counter(o.kind for o in ops if o.kind != "ok")
        window_end = (fault_end or 0) + (recovered if recovered is not None else 30)
        phases = {"no fault": Counter(), "before fault": Counter(), "during fault and recovery": Counter(), "after recovery": Counter()}
        for op in ops:
            end = op.start + op.seconds       # an operation belongs to the phase it ended in
            phase = ("no fault" if fault_start is None else "before fault" if end < fault_start else
                     "during fault and recovery" if op.start < window_end else "after recovery")
            phases[phase][f"{op.protocol} {op.kind}"] += 1
        killed = args.fault in ("worker-kill", "node-kill")
        bad_kinds = {k: v for k, v in errors.items()
                     if k.startswith(("unexpected", "hang", "read mismatch", "SFTP status without"))
                     or "internal" in k.lower()
                     or (k.startswith("HTTP 5") and int(k[5:8]) not in CLEAR_HTTP)
                     or (k.startswith(("connection", "SFTP connection")) and not killed)}
        failures = []
        if readback["lost"] or readback["corrupt"] or readback["unreadable"]:
            failures.append(f"{len(readback['lost'])} lost, {len(readback['corrupt'])} corrupt, "
                            f"{len(readback['unreadable'])} unreadable of {readback['checked']} paths")
        if self.recorder.mismatches:
            failures.append(f"{len(self.recorder.mismatches)} reads during the run matched no acknowledged state")
        if bad_kinds:
            failures.append("errors that are not a clear status: "
                            + ", ".join(f"{k} x{v}" for k, v in bad_kinds.items()))
        if hung:
            failures.append(f"{len(hung)} clients still hung after the run")
        if setup_errors:
            failures.append(f"{len(setup_errors)} clients could not set up")
        if args.fault != "none" and recovered is None:
            failures.append("no recovery: the probe never succeeded after the fault")
        elif recovered is not None and recovered > RECOVERY_LIMIT and not args.smoke:
            failures.append(f"recovery took {recovered:.1f} s (> {RECOVERY_LIMIT:.0f} s)")
        left = {k: v for k, v in leftovers.items() if v}
        if left:
            failures.append("leftovers: " + ", ".join(f"{k} {v}" for k, v in left.items()))
        mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
        return {
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{platform.node()}: {os.cpu_count()} cores {platform.machine()}, {mem / 1024 ** 2:.0f} GiB, "
                       f"Linux {platform.release()}, Python {platform.python_version()}",
            "commit": gateway_commit(args.gateway_src),
            "args": {k: str(v) for k, v in vars(args).items()},
            "seconds": round(elapsed, 1), "ops": len(ops), "ops_per_s": round(len(ops) / elapsed, 1),
            "operations": table, "errors": dict(errors), "error_examples": self.recorder.examples,
            "fault": {"name": args.fault, "start_s": fault_start, "end_s": fault_end, "log": self.fault_log,
                      "recovery_s": None if recovered is None else round(recovered, 2)},
            "phases": {k: dict(v) for k, v in phases.items()},
            "readback": readback, "read_mismatches": self.recorder.mismatches[:50],
            "read_mismatch_count": len(self.recorder.mismatches),
            "leftovers": leftovers, "leftovers_checked_after_s": round(wait, 1),
            "process": stats, "hung_clients": hung, "setup_errors": setup_errors[:20],
            "failures": failures, "passed": not failures,
        }


def gateway_commit(src: Path) -> str:
    """The commit the gateway ran from, marked when its gateway/ package has changes not committed."""
    git = lambda *a: subprocess.run(["git", *a], cwd=src, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + (" + changes" if git("status", "--porcelain", "gateway") else "")


def render(r: dict) -> str:
    a = r["args"]
    lines = [f"# Soak {r['when']}: fault {a['fault']}, {a['webdav']} WebDAV + {a['sftp']} SFTP clients, "
             f"{a['backend']} backend, {a['store']} store, {a['workers']} workers, {r['seconds']} s "
             f"(commit {r['commit']})", "", f"Machine: {r['machine']}", "",
             f"{r['ops']} operations, {r['ops_per_s']} ops/s; {r['readback']['acknowledged_writes']} acknowledged "
             f"writes, {r['readback']['checked']} paths read back: {len(r['readback']['lost'])} lost, "
             f"{len(r['readback']['corrupt'])} corrupt, {len(r['readback']['unreadable'])} unreadable.", "",
             "| operation | ok | errors | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for name, row in r["operations"].items():
        lines.append(f"| {name} | {row['ok']} | {row['errors']} | {row['p50_ms']} | {row['p99_ms']} |")
    f = r["fault"]
    if f["name"] != "none":
        lines += ["", f"Fault {f['name']} at {f['start_s']:.1f} s, over at {f['end_s']:.1f} s: "
                  + "; ".join(f["log"]) + f". Recovery: "
                  + (f"{f['recovery_s']} s after the fault's end" if f["recovery_s"] is not None else "NONE")]
    lines += ["", "| phase | what clients saw |", "|---|---|"]
    for phase, counts in r["phases"].items():
        if not counts:
            continue
        lines.append(f"| {phase} | {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or '-'} |")
    if r["errors"]:
        lines += ["", "| error kind | count | first example |", "|---|---|---|"]
        for kind, count in sorted(r["errors"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {count} | {r['error_examples'].get(kind, '')[:100]} |")
    p = r["process"]
    lines += ["", "| gateway processes | RSS MiB | threads | fds |", "|---|---|---|---|"]
    for when in ("start", "peak", "after_load", "end"):
        lines.append(f"| {when} | {p[when]['rss_mib']} | {p[when]['threads']} | {p[when]['fds']} |")
    lines += ["", f"Leftovers {r['leftovers_checked_after_s']} s after the clients stopped: "
              + ", ".join(f"{k} {v}" for k, v in r["leftovers"].items())]
    for kind in ("lost", "corrupt", "unreadable"):
        for line in r["readback"][kind][:10]:
            lines.append(f"- {kind}: {line}")
    lines += ["", "RESULT: " + ("PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"]))]
    return "\n".join(lines) + "\n"


def summarize(files: list[Path]) -> str:
    """One Markdown row per result file: the table docs/reliability.md holds."""
    lines = ["| fault | clients | backend, store | ops/s | acknowledged writes | lost / corrupt at the end | "
             "wrong reads during the run | errors clients saw (kind x count) | worst p99 ms | recovery s | leftovers | "
             "peak RSS MiB / threads / fds | result |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for file in files:
        r = json.loads(file.read_text())
        a, rb, peak = r["args"], r["readback"], r["process"]["peak"]
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items(), key=lambda kv: -kv[1])) or "-"
        left = ", ".join(f"{k} {v}" for k, v in r["leftovers"].items() if v) or "0"
        recovery = r["fault"]["recovery_s"] if r["fault"]["name"] != "none" else "-"
        worst = max((row["p99_ms"] or 0 for row in r["operations"].values()), default=0)
        lines.append(f"| {a['fault']} | {a['webdav']} + {a['sftp']} | {a['backend']}, {a['store']} | {r['ops_per_s']} | "
                     f"{rb['acknowledged_writes']} | {len(rb['lost'])} / {len(rb['corrupt'])} | "
                     f"{r['errors'].get('read mismatch', 0)} | {errors} | {worst:,.0f} | {recovery} | {left} | "
                     f"{peak['rss_mib']} / {peak['threads']} / {peak['fds']} | {'PASS' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--summarize"] or argv and argv[:1] == ["--summarize"]:
        print(summarize([Path(f) for f in (argv or sys.argv[1:])[1:]]), end="")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load")
    parser.add_argument("--webdav", type=int, default=48, help="WebDAV clients")
    parser.add_argument("--keep-logs", type=Path, help="copy each node's gateway.log into this folder")
    parser.add_argument("--sftp", type=int, default=16, help="SFTP clients (half pipelined, half checking each write)")
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--fault-seconds", type=float, default=8, help="how long a fault lasts")
    parser.add_argument("--backend", choices=("local", "s3"), default="local")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--client-timeout", type=float, default=30, help="seconds a client waits for an answer")
    parser.add_argument("--node-timeout", type=int, default=5, help="[store] node_timeout of the gateway")
    parser.add_argument("--sweep-interval", type=int, default=2, help="[store] sweep_interval of the gateway")
    parser.add_argument("--tmpfs-mib", type=int, default=200, help="size of the local root for tmpfs-full")
    parser.add_argument("--slow-ms", type=float, default=200, help="delay per chunk for store-slow")
    parser.add_argument("--smoke", action="store_true", help="no timed acceptance (recovery time): for CI")
    parser.add_argument("--out", type=Path, help="JSON result file (default bench/results/soak-...json)")
    parser.add_argument("--gateway-src", type=Path, default=REPO)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a gateway config setting, value in TOML (repeatable)")
    args = parser.parse_args(argv)
    needs = {"s3-stop": ("backend", "s3"), "s3-cut": ("backend", "s3"), "pg-restart": ("store", "postgresql"),
             "node-kill": ("store", "postgresql"), "tmpfs-full": ("backend", "local")}
    if args.fault in needs and getattr(args, needs[args.fault][0]) != needs[args.fault][1]:
        parser.error(f"--fault {args.fault} needs --{needs[args.fault][0]} {needs[args.fault][1]}")
    if args.fault == "store-slow" and args.backend != "s3" and args.store != "postgresql":
        parser.error("--fault store-slow needs --backend s3 or --store postgresql")
    if args.fault == "worker-kill" and args.workers < 2:
        parser.error("--fault worker-kill needs --workers 2 or more")
    if args.fault == "tmpfs-full" and os.geteuid() != 0:
        parser.error("--fault tmpfs-full mounts a tmpfs: run as root")
    import run as bench_run
    bench_run.GATEWAY_SRC = args.gateway_src.resolve()
    work = Path(tempfile.mkdtemp(prefix="gw-soak-", dir="/dev/shm"))
    soak = Soak(args, work)
    try:
        soak.start()
        result = soak.run()
    finally:
        soak.stop()
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log_file in work.glob("node*/gateway.log"):
                shutil.copy2(log_file, args.keep_logs / f"{log_file.parent.name}.log")
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    print(render(result))
    out = args.out or RESULTS / (f"soak-{time.strftime('%Y%m%d-%H%M%S')}-{args.fault}-{args.backend}-{args.store}"
                                 ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"JSON: {out}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
