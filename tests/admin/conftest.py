"""Admin fixtures: a gateway with WebDAV, SFTP and the admin listener on port 0."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.config import load_config
from gateway.server import Gateway
from tests.conftest import RunningGateway, write_config
from tests.sftp.helpers import copy_host_keys


def start_gateway(tmp_path, host_key_dir, *, backends: dict | None = None,
                  extra: dict | None = None) -> RunningGateway:
    path = write_config(tmp_path, webdav=True, sftp=True, admin=True, backends=backends, extra=extra)
    copy_host_keys(host_key_dir, tmp_path / "state")
    gateway = Gateway(load_config(path))
    gateway.start()
    running = RunningGateway(gateway, path, tmp_path / "data")
    for frontend in gateway.frontends:
        running.ports[frontend.name] = frontend.address[1]
    return running


@pytest.fixture
def full_gateway(tmp_path, host_key_dir, client_key) -> Iterator[RunningGateway]:
    """WebDAV, SFTP and admin; alice logs in with a password or a key."""
    running = start_gateway(tmp_path, host_key_dir)
    running.add_user("alice", keys=(client_key.public_line,))
    running.add_user("reader", perms={"/": ["list", "download"]})
    yield running
    running.gateway.stop()
