"""SFTP fixtures: a gateway with only SFTP enabled, users, and clients (helpers live in helpers.py)."""
from __future__ import annotations

from collections.abc import Iterator

import paramiko
import pytest

from tests.conftest import RunningGateway
from tests.sftp.helpers import OpenSSH, known_hosts, sftp_client, start_sftp_gateway


@pytest.fixture(scope="module")
def sftp_server(tmp_path_factory, host_key_dir, client_key) -> Iterator[RunningGateway]:
    """One gateway per test module with users alice (password and key), a disabled user and a reader."""
    running = start_sftp_gateway(tmp_path_factory.mktemp("sftp"), host_key_dir)
    running.add_user("alice", keys=(client_key.public_line,))
    running.add_user("bob")
    running.add_user("ghost", disabled=True)
    running.add_user("reader", perms={"/": ["list", "download"]})
    yield running
    running.gateway.stop()


@pytest.fixture
def sftp(sftp_server) -> Iterator[paramiko.SFTPClient]:
    with sftp_client(sftp_server.sftp_port) as client:
        yield client


@pytest.fixture
def openssh(sftp_server, tmp_path, host_key_dir, client_key) -> OpenSSH:
    port = sftp_server.sftp_port
    return OpenSSH(port, tmp_path, known_hosts(tmp_path, port, host_key_dir), client_key)
