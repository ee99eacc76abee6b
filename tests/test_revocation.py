"""Revocation: disabling, removing or re-keying a user ends that user's sessions on both protocols.

The changes are made the way an operator makes them, by the real CLI in
another process (or, for keys, by another writer of the store); the gateway
notices through the store's change feed.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from gateway.config import load_config
from gateway.store import Store, UserCache, open_store
from tests.conftest import PASSWORD, RunningGateway, wait_for
from tests.sftp.helpers import start_gateway

REPO = Path(__file__).resolve().parent.parent
NEW_PASSWORD = "a brand new password"
OLD = b"the previous version\n"


@pytest.fixture
def both(tmp_path, host_key_dir, client_key) -> Iterator[RunningGateway]:
    """A gateway with WebDAV and SFTP, alice (password and key) and bob, and alice's /keep.txt."""
    running = start_gateway(tmp_path, host_key_dir)
    try:
        running.add_user("alice", keys=(client_key.public_line,))
        running.add_user("bob")
        (running.data / "alice").mkdir()
        (running.data / "alice" / "keep.txt").write_bytes(OLD)
        yield running
    finally:
        running.gateway.stop()


@contextlib.contextmanager
def another_store(running: RunningGateway) -> Iterator[Store]:
    """The gateway's store opened again, as another process (the CLI, the admin API) holds it."""
    config = load_config(running.config_path)
    store = open_store(config.store.url, config.server.state_dir)
    try:
        yield store
    finally:
        store.close()


def change_alice(running: RunningGateway, change: str) -> None:
    """Change alice as an operator would: the CLI in its own process, or another writer for keys."""
    if change == "keys":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(running.config_path.parent / "other_key")], check=True)
        line = (running.config_path.parent / "other_key.pub").read_text().strip()
        with another_store(running) as store:
            UserCache(store).update("alice", keys=(line,))
        return
    args = {"disable": ["disable", "alice"], "remove": ["remove", "alice"],
            "passwd": ["passwd", "alice", "--password-stdin"]}[change]
    result = subprocess.run([sys.executable, "-m", "gateway", "user", *args,
                             "--config", str(running.config_path)],
                            input=NEW_PASSWORD + "\n", cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def alice_sessions(running: RunningGateway) -> list:
    return [s for s in running.gateway.sessions.list() if s.user == "alice"]


def temp_files(home: Path) -> list[str]:
    return [p.name for p in home.iterdir() if p.name.startswith(".gw-upload-")]


@pytest.mark.parametrize("change", ["disable", "remove", "passwd", "keys"])
def test_a_changed_user_loses_an_open_sftp_session_and_its_upload(both, change):
    transport = paramiko.Transport(("127.0.0.1", both.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        sftp = paramiko.SFTPClient.from_transport(transport)
        upload = sftp.open("/keep.txt", "w")
        upload.write(b"half of a new version")
        upload.flush()
        assert sftp.listdir("/") == ["keep.txt"]
        wait_for(lambda: temp_files(both.data / "alice"), "the upload to start")
        assert [s.protocol for s in alice_sessions(both)] == ["sftp"]
        bob_transport = paramiko.Transport(("127.0.0.1", both.sftp_port))
        try:
            bob_transport.connect(username="bob", password=PASSWORD)

            change_alice(both, change)

            wait_for(lambda: not transport.is_active(), "alice's SSH connection to be closed")
            with pytest.raises(paramiko.SSHException):
                transport.open_session()
            # Bob is not touched.
            assert bob_transport.is_active()
            bob = paramiko.SFTPClient.from_transport(bob_transport)
            assert bob.listdir("/") == []
            bob.close()
        finally:
            bob_transport.close()
    finally:
        transport.close()
    # The open upload was aborted: the previous version stays, no temp file is left.
    wait_for(lambda: not temp_files(both.data / "alice"), "the open upload to be aborted")
    assert (both.data / "alice" / "keep.txt").read_bytes() == OLD
    wait_for(lambda: not alice_sessions(both), "alice's session to leave the registry")


def _basic(password: str, user: str = "alice") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _status(port: int, password: str, user: str = "alice") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("PROPFIND", "/", headers={"Depth": "0", "Authorization": _basic(password, user)})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize("change", ["disable", "passwd"])
def test_a_changed_user_loses_a_webdav_upload_in_flight_and_the_old_password(both, change):
    size = 64 * 1024 * 1024
    chunk = b"x" * (64 * 1024)
    conn = http.client.HTTPConnection("127.0.0.1", both.webdav_port, timeout=60)
    try:
        conn.putrequest("PUT", "/keep.txt")
        conn.putheader("Authorization", _basic(PASSWORD))
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        conn.send(chunk)
        wait_for(lambda: temp_files(both.data / "alice"), "the slow PUT to start its upload")
        assert [s.protocol for s in alice_sessions(both)] == ["webdav"]

        change_alice(both, change)

        # Keep trickling the body until the server gives up on it; it never gets all of it.
        sent = len(chunk)
        answered = False
        for _ in range(size // len(chunk) - 2):
            if select.select([conn.sock], [], [], 0.05)[0]:
                answered = True
                break
            try:
                conn.send(chunk)
            except OSError:
                answered = True
                break
            sent += len(chunk)
        assert answered, "the server took the whole body of a revoked user's upload"
        try:
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            status = None      # the server closed the connection: just as good
        assert status in (None, 403)
    finally:
        conn.close()
    wait_for(lambda: not temp_files(both.data / "alice"), "the cut upload to be aborted")
    assert (both.data / "alice" / "keep.txt").read_bytes() == OLD
    wait_for(lambda: not alice_sessions(both), "alice's request to leave the registry")
    # The cached credential went with the change: the old password fails at once.
    assert _status(both.webdav_port, PASSWORD) == 401
    if change == "passwd":
        assert _status(both.webdav_port, NEW_PASSWORD) == 207


def test_a_login_racing_a_revocation_is_ended_when_it_registers(both):
    user = both.gateway.users.get("alice")
    both.gateway.users.update("alice", disabled=True)
    ended = []
    session = both.gateway.open_session(user, "test", "127.0.0.1", on_end=lambda: ended.append(1))
    assert session.ended.is_set() and ended == [1]
    assert not alice_sessions(both)


def test_sessions_are_listed_and_one_can_be_ended_by_id(both):
    with socket.create_connection(("127.0.0.1", both.sftp_port)) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.connect(username="bob", password=PASSWORD)
            wait_for(lambda: both.gateway.sessions.list(), "bob's session to be registered")
            (session,) = both.gateway.sessions.list()
            assert (session.user, session.protocol, session.ip) == ("bob", "sftp", "127.0.0.1")
            assert both.gateway.sessions.end(session.id)
            wait_for(lambda: not transport.is_active(), "bob's connection to be closed")
            assert not both.gateway.sessions.end(session.id)
        finally:
            transport.close()


def test_a_disabled_user_loses_a_webdav_download_in_flight(both):
    size = 256 * 1024 * 1024
    with open(both.data / "alice" / "big.bin", "wb") as fh:
        fh.truncate(size)
    sock = socket.create_connection(("127.0.0.1", both.webdav_port), timeout=60)
    try:
        # A small receive buffer: the server cannot push the whole file into the kernel.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Authorization: {_basic(PASSWORD)}\r\n\r\n".encode())
        received = len(sock.recv(65536))
        assert received
        wait_for(lambda: alice_sessions(both), "the download to register its session")

        change_alice(both, "disable")

        wait_for(lambda: not alice_sessions(both), "the revocation to reach the download")
        try:
            while chunk := sock.recv(1024 * 1024):
                received += len(chunk)
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert received < size


def test_live_sessions_are_in_the_store_and_one_is_ended_by_id_from_another_process(both):
    with socket.create_connection(("127.0.0.1", both.sftp_port)) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.connect(username="bob", password=PASSWORD)
            with another_store(both) as store:
                wait_for(lambda: store.list_sessions(user="bob"), "bob's session to reach the store")
                (row,) = store.list_sessions()
                assert (row.user, row.protocol, row.ip, row.node) == ("bob", "sftp", "127.0.0.1",
                                                                      both.gateway.node)
                store.revoke(session_id=row.id)       # what the admin API's DELETE /sessions/{id} does
                wait_for(lambda: not transport.is_active(), "bob's connection to be closed")
                wait_for(lambda: not store.list_sessions(), "bob's session to leave the store")
        finally:
            transport.close()
    # Only that session: bob logs in again at once.
    with socket.create_connection(("127.0.0.1", both.sftp_port)) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.connect(username="bob", password=PASSWORD)
            assert transport.is_authenticated()
        finally:
            transport.close()


def test_a_live_session_swept_from_the_store_by_another_node_is_published_again(both):
    transport = paramiko.Transport(("127.0.0.1", both.sftp_port))
    try:
        transport.connect(username="bob", password=PASSWORD)
        with another_store(both) as store:
            wait_for(lambda: store.list_sessions(user="bob"), "bob's session to reach the store")
            # What another node's sweep does to a node it found silent for node_timeout.
            store.remove_node_sessions(both.gateway.node)
            store.forget_node(both.gateway.node)
            wait_for(lambda: [s.user for s in store.list_sessions()] == ["bob"],
                     "bob's session to be listed again")
        assert transport.is_active()
    finally:
        transport.close()


def test_a_quick_disable_and_enable_still_ends_the_users_sessions(both):
    transport = paramiko.Transport(("127.0.0.1", both.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        wait_for(lambda: alice_sessions(both), "alice's session to be registered")
        # Both changes may land within one poll of the change counter: the
        # revocation record still reaches the gateway.
        with another_store(both) as store:
            users = UserCache(store)
            users.update("alice", disabled=True)
            users.update("alice", disabled=False)
        wait_for(lambda: not transport.is_active(), "alice's SSH connection to be closed")
    finally:
        transport.close()
    with socket.create_connection(("127.0.0.1", both.sftp_port)) as sock:
        again = paramiko.Transport(sock)
        try:
            again.connect(username="alice", password=PASSWORD)
            assert again.is_authenticated()
        finally:
            again.close()


def test_a_node_cut_off_from_the_store_stops_cached_logins_and_ends_sessions_after_the_grace(
        tmp_path, host_key_dir, client_key, postgres):
    role = postgres.create_role()
    url = postgres.create_database(owner=role)
    # Another node, logging in as another role with the same rights, that stays connected.
    elsewhere = url.replace(f"{role}:", f"{postgres.create_role(member_of=role)}:", 1)
    running = start_gateway(tmp_path, host_key_dir,
                            extra={"store": {"url": url, "feed_stale_after": 1, "session_grace": 2}})
    transport = None
    try:
        running.add_user("alice")
        running.add_user("bob", keys=(client_key.public_line,))
        (running.data / "alice").mkdir()
        assert _status(running.webdav_port, PASSWORD) == 207     # alice's password is cached now
        transport = paramiko.Transport(("127.0.0.1", running.sftp_port))
        transport.connect(username="alice", password=PASSWORD)
        assert paramiko.SFTPClient.from_transport(transport).listdir("/") == []
        postgres.block(role)
        store = open_store(elsewhere, tmp_path)
        try:
            UserCache(store).update("alice", disabled=True)
        finally:
            store.close()
        wait_for(lambda: _status(running.webdav_port, PASSWORD) == 503, "the cached password to be refused with 503, not a 401 that asks for a password",
                 limit=30)
        # Neither a password nor a key (of bob, not disabled) opens a login while the users are unknown.
        for user, credential in (("alice", {"password": PASSWORD}), ("bob", {"pkey": client_key.pkey()})):
            refused = paramiko.Transport(("127.0.0.1", running.sftp_port))
            try:
                with pytest.raises(paramiko.AuthenticationException):
                    refused.connect(username=user, **credential)
            finally:
                refused.close()
        wait_for(lambda: not transport.is_active(), "alice's SFTP session to end", limit=30)
        postgres.unblock(role)
        # Back in touch: the node serves again, and knows alice is disabled.
        wait_for(lambda: _status(running.webdav_port, PASSWORD, "bob") == 207,
                 "bob's login once the store is back", limit=30)
        assert _status(running.webdav_port, PASSWORD) == 401
    finally:
        postgres.unblock(role)
        if transport is not None:
            transport.close()
        running.gateway.stop()
