"""SSH clients that never log in, open too many channels, or never start a subsystem."""
from __future__ import annotations

import io
import resource
import select
import signal
import socket
import subprocess
import threading
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import paramiko
import pytest

from gateway.config import load_config
from gateway.server import Gateway
from tests.conftest import PASSWORD, RunningGateway, wait_for, write_config
from tests.sftp.helpers import copy_host_keys, sftp_client
from tests.test_serve import REPO, config, wait_for_line
from tests.webdav.conftest import DavClient, read_until_closed


@contextmanager
def gateway_with(tmp: Path, host_key_dir: Path, *, webdav: bool = False,
                 **sections: dict) -> Iterator[RunningGateway]:
    path = write_config(tmp, webdav=webdav, sftp=True, extra=sections)
    copy_host_keys(host_key_dir, tmp / "state")
    gateway = Gateway(load_config(path))
    gateway.start()
    try:
        running = RunningGateway(gateway, path, tmp / "data")
        for frontend in gateway.frontends:
            running.ports[frontend.name] = frontend.address[1]
        yield running
    finally:
        gateway.stop()


@contextmanager
def handshake_only(port: int) -> Iterator[paramiko.Transport]:
    """An SSH connection that completes the key exchange and never authenticates."""
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=60)
        yield transport
    finally:
        transport.close()


def test_connections_that_do_not_log_in_are_closed_after_login_timeout(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, sftp={"login_timeout": 1}) as running:
        port = running.sftp_port
        with socket.create_connection(("127.0.0.1", port), timeout=60) as silent:
            # No client banner at all: the server's own banner, then the end.
            assert read_until_closed(silent).startswith(b"SSH-2.0-")
        with handshake_only(port) as transport:
            wait_for(lambda: not transport.is_active(), "the unauthenticated connection closed")
        with sftp_client_for(running) as sftp:
            assert sftp.listdir("/") == []


@contextmanager
def sftp_client_for(running: RunningGateway, user: str = "alice") -> Iterator[paramiko.SFTPClient]:
    if running.gateway.users.get(user) is None:
        running.add_user(user)
    with sftp_client(running.sftp_port, user) as sftp:
        yield sftp


def refused_at_accept(port: int) -> bool:
    try:
        with handshake_only(port):
            return False
    except (paramiko.SSHException, EOFError, OSError):
        return True


def test_unauthenticated_connections_have_their_own_cap_and_leave_webdav_its_slots(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, webdav=True,
                      sftp={"max_unauthenticated": 8, "max_unauthenticated_per_ip": 8},
                      defender={"max_connections": 8}) as running:
        running.add_user("alice")
        with ExitStack() as held:
            pending = [held.enter_context(handshake_only(running.sftp_port)) for _ in range(8)]
            assert refused_at_accept(running.sftp_port)
            assert DavClient(running.webdav_port, "alice").get("/").status == 200
            pending[0].close()
            wait_for(lambda: uploads(running), "a login and upload once a slot is free")
            assert (running.data / "alice" / "hello.txt").read_bytes() == b"logged in"


def uploads(running: RunningGateway) -> bool:
    """Log in over SFTP and upload a file; False when the connection is refused."""
    try:
        with sftp_client(running.sftp_port, "alice") as sftp:
            sftp.putfo(io.BytesIO(b"logged in"), "/hello.txt")
            return True
    except (paramiko.SSHException, EOFError, OSError):
        return False


def test_unauthenticated_connections_are_capped_per_address(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, sftp={"max_unauthenticated_per_ip": 3}) as running:
        with ExitStack() as held:
            for _ in range(3):
                held.enter_context(handshake_only(running.sftp_port))
            assert refused_at_accept(running.sftp_port)


@contextmanager
def logged_in(port: int) -> Iterator[paramiko.Transport]:
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        yield transport
    finally:
        transport.close()


def test_the_eleventh_channel_on_one_connection_is_refused(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, sftp={"channel_setup_timeout": 300}) as running:
        running.add_user("alice")
        with logged_in(running.sftp_port) as transport:
            channels = [transport.open_session(timeout=30) for _ in range(10)]
            with pytest.raises(paramiko.ChannelException):
                transport.open_session(timeout=30)
            channels[0].close()
            wait_for(lambda: _opens(transport), "a channel slot freed")


def _opens(transport: paramiko.Transport) -> bool:
    try:
        transport.open_session(timeout=30).close()
        return True
    except paramiko.ChannelException:
        return False


def test_a_channel_that_starts_no_subsystem_is_closed(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, sftp={"channel_setup_timeout": 1}) as running:
        running.add_user("alice")
        with logged_in(running.sftp_port) as transport:
            idle = transport.open_session(timeout=30)
            working = transport.open_session(timeout=30)
            working.invoke_subsystem("sftp")
            wait_for(lambda: idle.closed or idle.eof_received, "the idle channel closed")
            sftp = paramiko.SFTPClient(working)
            assert sftp.listdir("/") == []
            sftp.close()


def test_a_user_past_the_handle_budget_is_refused_while_another_user_still_transfers(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, sftp={"max_handles_per_user": 8},
                      server={"max_open_files": 12}) as running:
        running.add_user("alice")
        running.add_user("bob")
        with sftp_client(running.sftp_port, "alice") as first, \
                sftp_client(running.sftp_port, "alice") as second:
            # The budget is per user, over all of that user's sessions.
            handles = [client.open(f"/f{i}-{n}.txt", "w") for i, client in enumerate((first, second))
                       for n in range(4)]
            with pytest.raises(IOError, match="too many open files"):
                first.open("/one-more.txt", "w")
            with pytest.raises(IOError, match="too many open files"):
                second.listdir("/")
            with sftp_client(running.sftp_port, "bob") as bob:
                bob.putfo(io.BytesIO(b"bob's data"), "/bob.txt")
                assert bob.open("/bob.txt").read() == b"bob's data"
            handles[0].close()
            with first.open("/after-close.txt", "w") as again:
                again.write(b"ok")
            for handle in handles[1:]:
                handle.close()
        assert (running.data / "alice" / "after-close.txt").read_bytes() == b"ok"


def test_start_raises_the_soft_open_file_limit_to_the_hard_one(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                             str(config(tmp_path, sftp=True))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        wait_for_line(proc, "gateway ready")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "open file limit raised from 256" in err


def test_a_connection_over_the_per_address_limit_waits_for_a_slot_instead_of_being_refused(tmp_path, host_key_dir):
    with gateway_with(tmp_path, host_key_dir, sftp={"max_unauthenticated_per_ip": 2,
                                                    "unauthenticated_wait": 30}) as running:
        held = [socket.create_connection(("127.0.0.1", running.sftp_port), timeout=20) for _ in range(2)]
        try:
            for sock in held:
                assert sock.recv(64).startswith(b"SSH-2.0-")
            (sftp,) = [f for f in running.gateway.frontends if f.name == "sftp"]
            with socket.create_connection(("127.0.0.1", running.sftp_port), timeout=20) as waiting:
                # Queued, or (as it used to be) refused: no banner while both slots are held.
                wait_for(lambda: len(getattr(sftp, "_waiting", ())) == 1
                         or select.select([waiting], [], [], 0)[0], "the third connection accepted")
                held.pop().close()
                assert waiting.recv(64).startswith(b"SSH-2.0-")
        finally:
            for sock in held:
                sock.close()


def test_sixteen_clients_dialling_at_once_from_one_address_all_log_in(tmp_path, host_key_dir):
    # The per-address limit (10) stays; the six over it wait for the first logins.
    with gateway_with(tmp_path, host_key_dir, sftp={"unauthenticated_wait": 60}) as running:
        running.add_user("alice")
        problems: list[str] = []

        def client(number: int) -> None:
            try:
                with sftp_client(running.sftp_port, "alice") as sftp:
                    sftp.listdir("/")
            except Exception as exc:
                problems.append(f"client {number}: {exc!r}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert problems == []
