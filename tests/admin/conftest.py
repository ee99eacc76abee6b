"""Admin fixtures: a gateway with WebDAV, SFTP and the admin listener on port 0."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway.config import load_config
from gateway.server import Gateway
from tests.admin.helpers import API_ANSWERS
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


@contextmanager
def api_gateway(tmp_path, host_key_dir, client_key, extra: dict | None = None) -> Iterator[RunningGateway]:
    """WebDAV, SFTP and the admin API, a ban after 3 failures; `.token` is a valid admin token.

    On exit: no API answer meanwhile carried a password hash or the token's hash.
    """
    running = start_gateway(tmp_path, host_key_dir, extra={"defender": {"max_failures": 3,
                                                                        "failure_delay": 0},
                                                           **(extra or {})})
    running.token = running.gateway.store.create_token("provisioning")
    running.add_user("alice", keys=(client_key.public_line,))
    before = len(API_ANSWERS)
    try:
        yield running
    finally:
        running.gateway.stop()
    token_hash = hashlib.sha256(running.token.encode()).hexdigest().encode()
    for answer in API_ANSWERS[before:]:
        assert b"$argon2" not in answer.body
        assert token_hash not in answer.body


@pytest.fixture
def api(tmp_path, host_key_dir, client_key) -> Iterator[RunningGateway]:
    """The admin API on the default SQLite store (see api_gateway)."""
    with api_gateway(tmp_path, host_key_dir, client_key) as running:
        yield running


@pytest.fixture(params=["sqlite", "postgresql"])
def api_on_each_store(request, tmp_path, host_key_dir, client_key) -> Iterator[RunningGateway]:
    """The admin API (see api_gateway) on SQLite, then on PostgreSQL (tests/postgres.py)."""
    extra = {}
    if request.param == "postgresql":
        extra["store"] = {"url": request.getfixturevalue("postgres").create_database()}
    with api_gateway(tmp_path, host_key_dir, client_key, extra) as running:
        yield running
