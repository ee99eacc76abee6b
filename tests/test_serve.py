"""`gateway serve` as a process: first-run user, clean shutdown on signals."""
from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import paramiko
import pytest
import tomli_w

from gateway.store import open_store
from tests.conftest import wait_for

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
    # A short drain: the uploads never finish, so the default 30 s would only be waited out.
    path = drain_config(tmp_path, drain_timeout=1)
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


# -- SIGTERM drain -------------------------------------------------------------

def drain_config(tmp_path: Path, drain_timeout: float, workers: int = 1, tls: Path | None = None) -> Path:
    """WebDAV and SFTP on free ports; with `tls` (a folder with cert.pem and key.pem), admin too, all over TLS."""
    path = tmp_path / "gateway.toml"
    certs = {"tls_cert": str(tls / "cert.pem"), "tls_key": str(tls / "key.pem")} if tls else {}
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": "state", "drain_timeout": drain_timeout, "workers": workers},
        "webdav": {"enabled": True, "listen": "127.0.0.1:0", **certs},
        "sftp": {"enabled": True, "listen": "127.0.0.1:0"},
        "admin": {"enabled": bool(tls), "listen": "127.0.0.1:0", **certs},
        "backends": {"local": {"type": "local", "root": "data"}},
    }))
    return path


class Served:
    """`gateway serve` in a subprocess, its log in a file, with the first user's password and ports."""

    def __init__(self, path: Path) -> None:
        self.log = path.parent / "serve.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                     text=True)
        try:
            lines = wait_for_line(self.proc, "gateway ready")
        except BaseException:
            self.close()
            raise
        self.password = next(line for line in lines if "password: " in line).rsplit(": ", 1)[1].strip()
        self.ports = {line.split()[0]: int(line.rsplit(":", 1)[1]) for line in lines
                      if " listening on " in line}

    def refuses(self, name: str) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.ports[name]), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def wait(self) -> int:
        try:
            self.proc.communicate(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode


@pytest.fixture
def serve():
    """Start `gateway serve` processes; any still running at the end is killed and its pipes closed."""
    started: list[Served] = []

    def start(path: Path) -> Served:
        started.append(Served(path))
        return started[-1]

    yield start
    for served in started:
        served.close()


def put_started(served: Served, name: str, size: int, first: bytes) -> http.client.HTTPConnection:
    """A PUT of `size` bytes whose first bytes are sent, and the rest not yet."""
    conn = http.client.HTTPConnection("127.0.0.1", served.ports["webdav"], timeout=60)
    token = base64.b64encode(f"admin:{served.password}".encode()).decode()
    conn.putrequest("PUT", f"/{name}")
    conn.putheader("Authorization", f"Basic {token}")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    conn.send(first)
    return conn


def upload_in_flight(served: Served, tmp_path: Path) -> Path:
    """Wait until the PUT sent so far is being written (an upload is open on the server)."""
    home = tmp_path / "data" / "admin"
    wait_for(lambda: home.is_dir() and len(list(home.iterdir())) > 1, "the upload's temp file")
    return home


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_a_webdav_upload_in_flight_finish_and_refuses_new_connections(tmp_path, workers, serve):
    served = serve(drain_config(tmp_path, drain_timeout=60, workers=workers))
    home = tmp_path / "data" / "admin"
    home.mkdir(parents=True)
    (home / "file.bin").write_bytes(b"old")
    body = os.urandom(256 * 1024)
    conn = put_started(served, "file.bin", len(body), body[:1024])
    try:
        upload_in_flight(served, tmp_path)
        served.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: served.refuses("webdav") and served.refuses("sftp"), "listeners closed")
        conn.send(body[1024:])
        response = conn.getresponse()
        assert response.status == 204, response.read()   # replaced
        response.read()
    finally:
        conn.close()
    assert served.wait() == 0, served.log.read_text()
    assert (home / "file.bin").read_bytes() == body
    assert os.listdir(home) == ["file.bin"]
    log = served.log.read_text()
    assert "waiting up to 60s for" in log and "webdav requests" in log
    assert "Traceback" not in log


def test_sigterm_aborts_an_upload_that_outlasts_drain_timeout_and_keeps_the_old_version(tmp_path, serve):
    served = serve(drain_config(tmp_path, drain_timeout=2))
    home = tmp_path / "data" / "admin"
    home.mkdir(parents=True)
    (home / "file.bin").write_bytes(b"old")
    conn = put_started(served, "file.bin", 1 << 20, b"x" * 1024)
    try:
        upload_in_flight(served, tmp_path)
        served.proc.send_signal(signal.SIGTERM)
        assert served.wait() == 0, served.log.read_text()
    finally:
        conn.close()
    assert (home / "file.bin").read_bytes() == b"old"
    assert os.listdir(home) == ["file.bin"]
    log = served.log.read_text()
    assert "drain_timeout (2s) passed: aborting 1 webdav requests" in log
    assert "Traceback" not in log


def test_sigterm_lets_an_sftp_upload_in_flight_finish(tmp_path, serve):
    served = serve(drain_config(tmp_path, drain_timeout=60))
    transport = paramiko.Transport(("127.0.0.1", served.ports["sftp"]))
    try:
        transport.connect(username="admin", password=served.password)
        sftp = paramiko.SFTPClient.from_transport(transport)
        body = os.urandom(256 * 1024)
        with sftp.open("file.bin", "wb") as remote:
            remote.write(body[:1024])
            remote.flush()
            served.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: served.refuses("sftp") and served.refuses("webdav"), "listeners closed")
            # A new session on the open connection is refused while it drains.
            with pytest.raises(paramiko.ChannelException):
                transport.open_session()
            remote.write(body[1024:])
    finally:
        transport.close()
    assert served.wait() == 0, served.log.read_text()
    assert (tmp_path / "data" / "admin" / "file.bin").read_bytes() == body
    assert "1 sftp handles" in served.log.read_text()


# -- SIGHUP reload ---------------------------------------------------------------

def test_sighup_reloads_log_level_and_added_backends_while_an_sftp_transfer_goes_on(tmp_path, serve):
    from gateway.permissions import ALL
    from gateway.users import Location, User, hash_password
    path = drain_config(tmp_path, drain_timeout=0)
    settings = tomllib.loads(path.read_text())
    served = serve(path)
    transport = paramiko.Transport(("127.0.0.1", served.ports["sftp"]))
    try:
        transport.connect(username="admin", password=served.password)
        sftp = paramiko.SFTPClient.from_transport(transport)
        body = os.urandom(256 * 1024)
        with sftp.open("file.bin", "wb") as remote:
            remote.write(body[:1024])
            # A config that does not load changes nothing.
            path.write_text("[server\n")
            served.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "config not reloaded" in served.log.read_text(), "the bad config refused")
            settings["server"]["log_level"] = "debug"
            settings["backends"]["extra"] = {"type": "local", "root": "data2"}
            path.write_text(tomli_w.dumps(settings))
            served.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "SIGHUP: reloaded" in served.log.read_text(), "the reload")
            remote.write(body[1024:])
        assert sftp.stat("file.bin").st_size == len(body)
    finally:
        transport.close()
    assert (tmp_path / "data" / "admin" / "file.bin").read_bytes() == body
    # Nothing was logged at debug level up to the refused reload (from the
    # good one on, the transfer and the closed connection may be).
    assert " DEBUG " not in served.log.read_text().split("config not reloaded")[0]
    # A user homed on the backend the reload added can log in and write there.
    store = open_store("sqlite:///gateway.db", tmp_path / "state")
    try:
        store.add_user(User("bob", hash_password("bob-password-1"), home=Location("extra", "/bob"),
                            permissions={"/": ALL}))
    finally:
        store.close()

    def bob_writes() -> bool:
        client = paramiko.Transport(("127.0.0.1", served.ports["sftp"]))
        try:
            client.connect(username="bob", password="bob-password-1")
        except paramiko.AuthenticationException:
            return False
        finally:
            if not client.is_authenticated():
                client.close()
        try:
            with paramiko.SFTPClient.from_transport(client).open("hello.txt", "wb") as remote:
                remote.write(b"hello")
        finally:
            client.close()
        return True

    wait_for(bob_writes, "bob's login")
    assert (tmp_path / "data2" / "bob" / "hello.txt").read_bytes() == b"hello"
    served.proc.send_signal(signal.SIGTERM)
    assert served.wait() == 0, served.log.read_text()
    log = served.log.read_text()
    assert " DEBUG " in log
    assert "Traceback" not in log


def test_sighup_makes_new_connections_use_the_new_tls_certificate(tmp_path, serve):
    from tests.webdav.test_tls import self_signed
    tls = tmp_path / "tls"
    tls.mkdir()
    old_cert, _ = self_signed(tls)
    old = ssl.PEM_cert_to_DER_cert(old_cert.read_text())
    served = serve(drain_config(tmp_path, drain_timeout=0, tls=tls))

    def served_cert(name: str) -> bytes:
        return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", served.ports[name])))

    assert served_cert("webdav") == old and served_cert("admin") == old
    # Open before the reload, used after it: the connection keeps its session.
    context = ssl.create_default_context(cafile=str(old_cert))
    conn = http.client.HTTPSConnection("localhost", served.ports["webdav"], context=context, timeout=30)
    token = base64.b64encode(f"admin:{served.password}".encode()).decode()
    try:
        conn.request("PUT", "/before.txt", body=b"1", headers={"Authorization": f"Basic {token}"})
        response = conn.getresponse()
        response.read()
        assert response.status == 201
        new_cert, _ = self_signed(tls)
        new = ssl.PEM_cert_to_DER_cert(new_cert.read_text())
        assert new != old
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reloaded" in served.log.read_text(), "the reload")
        conn.request("PUT", "/after.txt", body=b"2", headers={"Authorization": f"Basic {token}"})
        response = conn.getresponse()
        response.read()
        assert response.status == 201
    finally:
        conn.close()
    assert served_cert("webdav") == new and served_cert("admin") == new
    served.proc.send_signal(signal.SIGTERM)
    assert served.wait() == 0, served.log.read_text()


def test_stopping_twice_closes_no_descriptor_the_gateway_no_longer_owns(make_gateway, tmp_path):
    """A second stop (the test's, then the fixture's) once closed the local root's number again.

    In a process full of threads that number belongs to someone else by then:
    the next gateway's sweep lost its folder mid-listing ("Not a directory").
    """
    running = make_gateway()
    backend = running.gateway.backends["local"]
    root_fd = getattr(backend, "inner", backend)._root_fd
    other = os.open(tmp_path / "someone-else.txt", os.O_CREAT | os.O_WRONLY)
    try:
        running.gateway.stop()
        os.dup2(other, root_fd)               # the freed number goes to someone else
        try:
            running.gateway.stop()
            os.fstat(root_fd)                 # still theirs
        finally:
            os.close(root_fd)
    finally:
        os.close(other)


def test_a_user_name_with_a_newline_cannot_forge_a_line_of_the_main_log(tmp_path):
    # At debug, paramiko logs the user name of each auth request as it came.
    forged = "2026-12-08 02:00:00,000 INFO gateway.audit: FORGED login of admin ok"
    path = config(tmp_path, sftp=True)
    settings = tomllib.loads(path.read_text())
    settings["server"]["log_level"] = "debug"
    path.write_text(tomli_w.dumps(settings))
    proc = start(path)
    try:
        ports = _listening_ports(wait_for_line(proc, "gateway ready"))
        transport = paramiko.Transport(("127.0.0.1", ports["sftp"]))
        try:
            with pytest.raises(paramiko.AuthenticationException):
                transport.connect(username="eve\n" + forged, password="wrong password")
        finally:
            transport.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "eve\\n2026-12-08" in err
    assert not [line for line in err.splitlines() if line.startswith("2026-12-08 02:00:00")]
