"""Authentication and the defender shared by both protocols."""
from __future__ import annotations

import json
import logging

import pytest

from gateway.auth import Authenticator, Defender
from gateway.config import DefenderSection
from gateway.store import UserCache, open_store
from gateway.users import User, hash_password

PW = "the right password"


def _public_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    return Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


KEY = _public_key()
OTHER_KEY = _public_key()


@pytest.fixture
def store(tmp_path):
    """The default embedded store, in this test's tmp dir."""
    store = open_store("sqlite:///gateway.db", tmp_path)
    yield store
    store.close()


@pytest.fixture
def auth(store):
    users = UserCache(store)
    users.add(User("alice", hash_password(PW), keys=(KEY + " alice@x",)))
    users.add(User("mallory", hash_password(PW), disabled=True))
    return Authenticator(users, Defender(DefenderSection(max_failures=3, window=60, ban_time=60,
                                                         failure_delay=0.0), store))


def test_right_password_is_accepted_and_wrong_one_refused(auth):
    assert auth.check_password("alice", PW, "10.0.0.1").name == "alice"
    assert auth.check_password("alice", "wrong", "10.0.0.1") is None


def test_unknown_and_disabled_users_are_refused_alike(auth):
    assert auth.check_password("nobody", PW, "10.0.0.1") is None
    assert auth.check_password("mallory", PW, "10.0.0.1") is None


def test_cached_password_still_checks_the_password(auth):
    assert auth.check_password("alice", PW, "10.0.0.1") is not None
    assert auth.check_password("alice", PW, "10.0.0.1") is not None  # from the cache
    assert auth.check_password("alice", PW + "x", "10.0.0.1") is None


def test_ip_is_banned_after_max_failures_even_with_the_right_password(auth):
    for _ in range(3):
        assert auth.check_password("alice", "wrong", "10.0.0.2") is None
    assert auth.defender.is_banned("10.0.0.2")
    assert auth.check_password("alice", PW, "10.0.0.2") is None
    assert auth.check_key("alice", KEY, "10.0.0.2") is None


def test_failures_from_many_addresses_never_lock_the_user_out(auth):
    for i in range(5):
        assert auth.check_password("alice", "wrong", f"10.0.1.{i}") is None
    assert not auth.defender.is_banned("10.0.9.9")
    assert auth.check_password("alice", PW, "10.0.9.9") is not None
    assert auth.check_key("alice", KEY, "10.0.1.0") is not None


def test_repeated_failures_for_a_user_slow_down_only_addresses_that_failed(store):
    defender = Defender(DefenderSection(max_failures=100, failure_delay=1.0, failure_delay_max=8.0), store)
    delays = []
    for _ in range(6):
        defender.record_failure("10.0.0.1", "alice")
        delays.append(defender.delay_for("10.0.0.1", "alice"))
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert defender.delay_for("10.0.0.2", "alice") == 0.0     # a clean address never waits
    assert defender.delay_for("10.0.0.1", "bob") == 0.0       # nor does another user


def test_an_attempt_counts_as_a_failure_before_it_is_verified_and_a_success_refunds_it(store):
    defender = Defender(DefenderSection(max_failures=3), store)
    assert all(defender.begin_attempt("10.0.0.1") for _ in range(3))
    assert not defender.begin_attempt("10.0.0.1")     # three in flight would ban if they fail
    assert defender.begin_attempt("10.0.0.2")         # another address is not affected
    defender.end_attempt("10.0.0.1", "alice", ok=True)
    assert defender.begin_attempt("10.0.0.1")
    for _ in range(3):
        defender.end_attempt("10.0.0.1", "alice", ok=False)
    assert defender.is_banned("10.0.0.1") and not defender.is_banned("10.0.0.2")


def test_exempt_ip_is_never_banned(store):
    users = UserCache(store)
    users.add(User("alice", hash_password(PW)))
    auth = Authenticator(users, Defender(DefenderSection(max_failures=2, exempt=["127.0.0.1"]), store))
    for _ in range(5):
        auth.check_password("alice", "wrong", "127.0.0.1")
    assert auth.check_password("alice", PW, "127.0.0.1") is not None


def test_key_must_match_type_and_blob(auth):
    assert auth.check_key("alice", KEY + " other-comment", "10.0.0.1") is not None
    assert auth.check_key("alice", OTHER_KEY, "10.0.0.1") is None
    assert auth.check_key("mallory", KEY, "10.0.0.1") is None


def test_connection_limits_per_ip_and_in_total(store):
    defender = Defender(DefenderSection(max_connections=3, max_connections_per_ip=2), store)
    assert defender.open_connection("a") and defender.open_connection("a")
    assert not defender.open_connection("a")
    assert defender.open_connection("b")
    assert not defender.open_connection("c")
    defender.close_connection("a")
    assert defender.open_connection("c")


def test_userfs_writes_one_audit_line_per_operation(tmp_path, caplog):
    from gateway.storage.memory import MemoryBackend
    from gateway.users import Location
    from gateway.vfs import UserFS
    fs = UserFS(User("alice", home=Location("m", "/")), {"m": MemoryBackend()},
                protocol="sftp", client="10.1.2.3")
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        with fs.open_write("/a.txt") as up:
            up.write(b"12345")
        fs.rename("/a.txt", "/b.txt")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert len(lines) == 2
    assert {k: v for k, v in lines[0].items() if k not in ("time", "duration_ms")} == {
        "user": "alice", "protocol": "sftp", "ip": "10.1.2.3", "session": "", "op": "upload",
        "path": "/a.txt", "bytes": 5, "result": "ok"}
    assert (lines[1]["op"], lines[1]["path"], lines[1]["to"]) == ("rename", "/a.txt", "/b.txt")
def test_failures_counted_by_two_processes_ban_the_address_for_both(store, tmp_path):
    other = open_store("sqlite:///gateway.db", tmp_path)   # as another worker holds it
    try:
        section = DefenderSection(max_failures=4)
        here, there = Defender(section, store), Defender(section, other)
        for defender in (here, there, here):
            defender.record_failure("10.0.0.7", "alice")
        assert not here.is_banned("10.0.0.7") and not there.is_banned("10.0.0.7")
        there.record_failure("10.0.0.7", "alice")
        assert there.is_banned("10.0.0.7")
        # Before the change feed reloads its ban cache, `here` refuses to verify anyway.
        assert not here.begin_attempt("10.0.0.7")
        here.load_bans()
        assert here.is_banned("10.0.0.7") and not here.is_banned("10.0.0.8")
        # Lifting the ban in the store (the admin API's DELETE /bans) reaches both.
        assert other.unban("10.0.0.7")
        here.load_bans()
        there.load_bans()
        assert not here.is_banned("10.0.0.7") and not there.is_banned("10.0.0.7")
        assert here.begin_attempt("10.0.0.7")
    finally:
        other.close()
