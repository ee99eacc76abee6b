"""Password verification under a herd: bounded, counted before it runs, and done once per credential.

argon2id holds 64 MiB per verification. Real WebDAV requests over HTTP drive
the gateway; a wrapper around `verify_password` counts what really runs.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import gateway.auth
from tests.webdav.conftest import DavClient


class VerifyCounter:
    """Wraps verify_password: how many ran in all, and the most at once."""

    def __init__(self, real) -> None:
        self._real = real
        self._lock = threading.Lock()
        self.running = self.peak = self.total = 0

    def __call__(self, password_hash: str, password: str) -> bool:
        with self._lock:
            self.running += 1
            self.total += 1
            self.peak = max(self.peak, self.running)
        try:
            return self._real(password_hash, password)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def counter(monkeypatch) -> VerifyCounter:
    counter = VerifyCounter(gateway.auth.verify_password)
    monkeypatch.setattr(gateway.auth, "verify_password", counter)
    return counter


def propfind_all(clients: list[DavClient]) -> list[int]:
    """One PROPFIND per client, all at once."""
    start = threading.Barrier(len(clients))

    def one(client: DavClient) -> int:
        start.wait()
        return client.request("PROPFIND", "/", headers={"Depth": "0"}).status

    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(one, clients))


def test_a_herd_of_wrong_passwords_is_verified_a_few_at_a_time_and_only_up_to_the_ban(
        make_gateway, counter):
    running = make_gateway(webdav=True, extra={"defender": {"failure_delay": 0.0}})
    running.add_user("alice")
    section = running.gateway.config.defender
    clients = [DavClient(running.webdav_port, "alice", f"wrong password {i}") for i in range(24)]
    statuses = propfind_all(clients)
    assert set(statuses) <= {401, 403}
    assert counter.peak <= section.max_concurrent_verifications
    assert counter.total <= section.max_failures
    assert running.gateway.defender.is_banned("127.0.0.1")


def test_concurrent_requests_with_one_right_password_verify_it_once(make_gateway, counter):
    running = make_gateway(webdav=True)
    running.add_user("alice")
    statuses = propfind_all([DavClient(running.webdav_port, "alice") for _ in range(16)])
    assert statuses == [207] * 16
    assert counter.total == 1


def test_a_credential_in_use_stays_cached_past_its_lifetime(make_gateway, counter):
    running = make_gateway(webdav=True)
    running.add_user("alice")
    auth = running.gateway.auth
    now = [1000.0]
    auth.clock = lambda: now[0]
    client = DavClient(running.webdav_port, "alice")
    lifetime = gateway.auth._CACHE_SECONDS
    for step in range(6):
        now[0] = 1000.0 + step * lifetime * 0.8      # used again before it would expire
        assert client.request("PROPFIND", "/", headers={"Depth": "0"}).status == 207
    assert counter.total == 1
    now[0] += lifetime + 1                            # left alone longer than its lifetime
    assert client.request("PROPFIND", "/", headers={"Depth": "0"}).status == 207
    assert counter.total == 2


def test_a_password_change_drops_the_cached_credential_at_once(make_gateway, counter):
    running = make_gateway(webdav=True)
    running.add_user("alice")
    client = DavClient(running.webdav_port, "alice")
    assert client.request("PROPFIND", "/", headers={"Depth": "0"}).status == 207
    running.gateway.users.update("alice", password_hash=gateway.auth.hash_password("another one!"))
    assert client.request("PROPFIND", "/", headers={"Depth": "0"}).status == 401
    assert DavClient(running.webdav_port, "alice", "another one!").request(
        "PROPFIND", "/", headers={"Depth": "0"}).status == 207
