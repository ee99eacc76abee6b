"""The store's contract, run on SQLite and on a real PostgreSQL: every operation the gateway relies on."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import sqlalchemy as sa

from gateway.permissions import ALL, parse_perms
from gateway.store import (Conflict, InFlightUpload, Lock, LockConflict, Missing, OverBudget, Session,
                           StoreUnavailable, TooManyLocks, Usage, UserCache, open_store)
from gateway.users import Location, Mount, User, UsersFileError, hash_password
from tests.conftest import wait_for

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
HASH = hash_password("correct horse battery")


def make_user(name: str = "alice", **changes) -> User:
    fields = dict(password_hash=HASH, keys=(KEY,), home=Location("local", f"/{name}"),
                  mounts=(Mount("/shared", Location("archive", "/team"), parse_perms(["list", "download"])),),
                  permissions={"/": ALL, "/reports": parse_perms(["list", "download"])},
                  quota_bytes=10 << 30, quota_files=1000, disabled=False)
    fields.update(changes)
    return User(name, **fields)


def make_lock(root: str, *, token: str | None = None, scope: str = "exclusive", depth: str = "infinity",
              timeout: float = 600.0, principal: str = "alice") -> Lock:
    return Lock(token or f"opaquelocktoken:{root}:{scope}:{time.monotonic_ns()}", root,
                b"<owner>litmus</owner>", scope, depth, principal, timeout, time.time() + timeout)


def table_dump(store) -> str:
    """Every value in every table, as text: to prove what is not stored."""
    parts = []
    with store._engine.connect() as conn:
        for name in sa.inspect(conn).get_table_names():
            parts += [repr(tuple(row)) for row in conn.execute(sa.text(f'SELECT * FROM "{name}"'))]
    return "\n".join(parts)


# -- users -------------------------------------------------------------------

def test_user_round_trips_exactly(store):
    user = make_user()
    store.add_user(user)
    assert store.get_user("alice") == user
    assert store.list_users() == [user]


def test_user_without_password_or_rules_round_trips(store):
    user = User("bob", None, (KEY,), Location("local", "/b"), (), {}, 0, 0, True)
    store.add_user(user)
    assert store.get_user("bob") == user


def test_get_unknown_user_returns_none(store):
    assert store.get_user("nobody") is None


def test_add_existing_user_raises_conflict(store):
    store.add_user(make_user())
    with pytest.raises(Conflict, match="already exists"):
        store.add_user(make_user(quota_bytes=1))
    assert store.get_user("alice").quota_bytes == 10 << 30


@pytest.mark.parametrize("user, message", [
    (User("-bad"), "invalid user name"),
    (User("carol", keys=("ssh-ed25519 AAAAnotakey",)), "keys"),
    (User("carol", password_hash="plaintext"), "password"),
    (User("carol", quota_bytes=-1), "quota_bytes"),
])
def test_invalid_user_is_refused_and_nothing_is_stored(store, user, message):
    with pytest.raises(UsersFileError, match=message):
        store.add_user(user)
    assert store.list_users() == []


def test_list_users_is_sorted_by_name(store):
    for name in ("carol", "alice", "bob"):
        store.add_user(make_user(name))
    assert [u.name for u in store.list_users()] == ["alice", "bob", "carol"]


def test_update_user_changes_only_the_given_fields(store):
    store.add_user(make_user())
    updated = store.update_user("alice", disabled=True, quota_files=5)
    assert updated == make_user(disabled=True, quota_files=5)
    assert store.get_user("alice") == updated


def test_update_user_with_an_invalid_value_keeps_the_old_record(store):
    store.add_user(make_user())
    with pytest.raises(UsersFileError, match="keys"):
        store.update_user("alice", keys=("ssh-ed25519 AAAAnotakey",))
    assert store.get_user("alice") == make_user()


def test_update_unknown_user_raises_missing(store):
    with pytest.raises(Missing, match="no user 'ghost'"):
        store.update_user("ghost", disabled=True)


def test_remove_user_forgets_them_and_their_usage(store):
    store.add_user(make_user())
    store.add_usage("alice", 100, 1)
    store.remove_user("alice")
    assert store.get_user("alice") is None
    assert store.get_usage("alice") is None
    with pytest.raises(Missing):
        store.remove_user("alice")


def test_import_users_adds_new_and_replaces_existing(store):
    store.add_user(make_user("alice"))
    added, replaced = store.import_users([make_user("alice", disabled=True), make_user("bob")])
    assert (added, replaced) == (1, 1)
    assert store.get_user("alice").disabled
    assert store.get_user("bob") == make_user("bob")


def test_import_with_one_invalid_user_imports_nothing(store):
    with pytest.raises(UsersFileError):
        store.import_users([make_user("bob"), User("carol", quota_files=-3)])
    assert store.list_users() == []


# -- admin tokens ------------------------------------------------------------

def test_token_verifies_until_revoked(store):
    token = store.create_token("ci")
    assert store.verify_token(token) == "ci"
    assert store.verify_token(token + "x") is None
    store.revoke_token("ci")
    assert store.verify_token(token) is None
    with pytest.raises(Missing):
        store.revoke_token("ci")


def test_token_is_stored_only_as_a_hash_and_never_listed(store):
    token = store.create_token("ci")
    listed = store.list_tokens()
    assert [t.name for t in listed] == ["ci"]
    assert set(vars(listed[0])) == {"name", "created"}
    assert token not in table_dump(store)


def test_token_names_are_unique(store):
    store.create_token("ci")
    with pytest.raises(Conflict):
        store.create_token("ci")


# -- change feed -------------------------------------------------------------

def test_every_user_and_token_change_bumps_the_counter(store):
    seen = [store.change_counter()]

    def changed() -> None:
        seen.append(store.change_counter())
        assert seen[-1] > seen[-2]

    store.add_user(make_user()); changed()
    store.update_user("alice", disabled=True); changed()
    store.create_token("ci"); changed()
    store.revoke_token("ci"); changed()
    store.ban("192.0.2.1", time.time() + 60); changed()
    store.revoke(user="alice"); changed()
    store.remove_user("alice"); changed()


def test_a_failed_change_does_not_bump_the_counter(store):
    store.add_user(make_user())
    before = store.change_counter()
    with pytest.raises(Conflict):
        store.add_user(make_user())
    store.set_property("local:/a", "p", b"v")
    assert store.change_counter() == before


def test_change_from_another_process_wakes_a_watcher(store, open_another, store_url):
    """The watcher sees another Store's change. On PostgreSQL the fallback poll is off,
    so only NOTIFY can wake it; on SQLite it polls the counter every second."""
    woken = threading.Event()
    stop = threading.Event()
    poll = 3600.0 if store_url.startswith("postgresql") else None
    watcher = threading.Thread(target=store.watch, args=(lambda counter: woken.set(), stop, poll))
    watcher.start()
    other = open_another()
    added = []

    def change_until_woken() -> bool:
        # The watcher LISTENs a moment after it starts: a change before that is
        # only seen by the poll, so change again (once a second) until it wakes.
        if not woken.is_set() and (not added or time.monotonic() - added[-1] > 1):
            other.add_user(make_user(f"user{len(added)}"))
            added.append(time.monotonic())
        return woken.is_set()

    try:
        wait_for(change_until_woken, "the watcher to be called", limit=10)
    finally:
        stop.set()
        watcher.join()


def test_a_watcher_listens_again_once_postgresql_is_back_after_a_restart(postgres, tmp_path):
    url = postgres.create_database()
    store, other = open_store(url, tmp_path), open_store(url, tmp_path)
    woken = threading.Event()
    stop = threading.Event()
    # The fallback poll is off: only NOTIFY (or LISTEN coming back) wakes the watcher.
    watcher = threading.Thread(target=store.watch, args=(lambda counter: woken.set(), stop, 3600.0))
    watcher.start()
    added = []

    def change_until_woken() -> bool:
        if not woken.is_set() and (not added or time.monotonic() - added[-1] > 1):
            added.append(time.monotonic())
            try:
                other.add_user(make_user(f"user{len(added)}"))
            except StoreUnavailable:
                pass   # the server is still coming back
        return woken.is_set()

    try:
        wait_for(change_until_woken, "the watcher to listen", limit=10)
        postgres.restart()
        # Twice: the first wake may be the read that follows LISTEN's return; the second needs a NOTIFY.
        for _ in range(2):
            woken.clear()
            wait_for(change_until_woken, "the watcher to be woken after the restart", limit=30)
    finally:
        stop.set()
        watcher.join()
        store.close()
        other.close()


def test_watch_since_an_older_counter_reports_a_change_made_before_it_started(store, open_another):
    since = store.change_counter()
    open_another().add_user(make_user("bob"))
    seen = []
    stop = threading.Event()
    watcher = threading.Thread(target=store.watch, args=(seen.append, stop, 0.1, since))
    watcher.start()
    try:
        wait_for(lambda: seen, "the watcher to report the earlier change", limit=10)
    finally:
        stop.set()
        watcher.join()
    assert seen[0] == since + 1


def test_user_cache_follows_changes_made_elsewhere(store, open_another):
    cache = UserCache(store, backends=["local", "archive"])
    changes = []
    cache.subscribe(lambda old, new: changes.append((sorted(old), sorted(new))))
    cache.start()
    try:
        other = open_another()
        other.add_user(make_user("bob"))
        wait_for(lambda: cache.get("bob") is not None, "the cache to see bob", limit=10)
        other.update_user("bob", disabled=True)
        wait_for(lambda: cache.get("bob").disabled, "the cache to see bob disabled", limit=10)
        assert changes[0] == ([], ["bob"])
    finally:
        cache.close()


def test_user_cache_without_watcher_rereads_after_a_change(store, open_another):
    cache = UserCache(store)
    assert cache.all() == []
    open_another().add_user(make_user("bob"))
    wait_for(lambda: cache.get("bob") is not None, "the cache to see bob", limit=10)


def test_user_cache_speaks_the_users_file_errors(store):
    cache = UserCache(store, backends=["local"])
    with pytest.raises(UsersFileError, match="backend 'archive' is not defined"):
        cache.add(make_user())
    cache.add(make_user(mounts=()))
    with pytest.raises(UsersFileError, match="already exists"):
        cache.add(make_user(mounts=()))
    with pytest.raises(UsersFileError, match="no user"):
        cache.update("ghost", disabled=True)
    cache.update("alice", disabled=True)
    assert cache.get("alice").disabled
    cache.remove("alice")
    assert cache.get("alice") is None


# -- locks -------------------------------------------------------------------

def test_lock_is_found_by_token_and_location_until_removed(store):
    lock = make_lock("local:/a/b")
    store.add_lock(lock)
    assert store.get_lock(lock.token) == lock
    assert store.find_locks("local:/a/b") == [lock]
    assert store.find_locks("local:/a", include_root=False, include_children=True) == [lock]
    assert store.find_locks("local:/a/bc", include_children=True) == []
    assert store.remove_lock(lock.token)
    assert store.get_lock(lock.token) is None
    assert not store.remove_lock(lock.token)


def test_find_locks_children_only_leaves_out_deeper_descendants(store):
    # Names with LIKE's wildcards and its escape character must match only themselves.
    for location in ("local:/d", "local:/d/a", "local:/d/a/deep", "local:/d/b_%\\", "local:/d/b_%\\/x",
                     "local:/dx", "local:/dx/y", "other:/d/c"):
        store.add_lock(make_lock(location, scope="shared", depth="0"))

    def roots(location, **kwargs):
        return [lock.root for lock in store.find_locks(location, include_children=True, **kwargs)]

    assert roots("local:/d", include_root=False, children_only=True) == ["local:/d/a", "local:/d/b_%\\"]
    assert roots("local:/d", children_only=True) == ["local:/d", "local:/d/a", "local:/d/b_%\\"]
    assert roots("local:/d/b_%\\", include_root=False, children_only=True) == ["local:/d/b_%\\/x"]
    assert roots("local:/", include_root=False, children_only=True) == ["local:/d", "local:/dx"]
    assert roots("local:/d_", children_only=True) == []
    assert roots("local:/d", include_root=False) == [
        "local:/d/a", "local:/d/a/deep", "local:/d/b_%\\", "local:/d/b_%\\/x"]


def test_a_lock_with_a_token_already_held_is_refused_and_the_held_one_kept(store):
    held = make_lock("local:/a", scope="shared")
    store.add_lock(held)
    with pytest.raises(Conflict) as info:
        store.add_lock(make_lock("local:/b", token=held.token))
    assert not isinstance(info.value, LockConflict)
    assert store.find_locks("local:/b") == []
    assert store.get_lock(held.token) == held


@pytest.mark.parametrize("held, wanted", [
    (("local:/a", "exclusive", "0"), ("local:/a", "exclusive", "0")),
    (("local:/a", "shared", "0"), ("local:/a", "exclusive", "0")),
    (("local:/a", "exclusive", "infinity"), ("local:/a/b/c", "shared", "0")),
    (("local:/a/b", "shared", "0"), ("local:/a", "shared", "infinity")),
    (("local:/", "exclusive", "infinity"), ("local:/x", "exclusive", "0")),
])
def test_conflicting_lock_is_refused_naming_the_holder(store, held, wanted):
    store.add_lock(make_lock(held[0], scope=held[1], depth=held[2]))
    with pytest.raises(LockConflict) as info:
        store.add_lock(make_lock(wanted[0], scope=wanted[1], depth=wanted[2]))
    assert info.value.roots == [held[0]]


@pytest.mark.parametrize("held, wanted", [
    (("local:/a", "shared", "infinity"), ("local:/a", "shared", "0")),
    (("local:/a", "exclusive", "0"), ("local:/a/b", "exclusive", "0")),
    (("local:/a/b", "exclusive", "0"), ("local:/a", "exclusive", "0")),
    (("local:/a", "exclusive", "infinity"), ("local:/ab", "exclusive", "infinity")),
    (("local:/a", "exclusive", "infinity"), ("other:/a", "exclusive", "infinity")),
])
def test_compatible_locks_are_both_held(store, held, wanted):
    store.add_lock(make_lock(held[0], scope=held[1], depth=held[2]))
    store.add_lock(make_lock(wanted[0], scope=wanted[1], depth=wanted[2]))
    assert len(store.find_locks(held[0], include_children=True)) + \
        len(store.find_locks(wanted[0], include_children=True)) >= 2


def test_expired_lock_is_gone_and_does_not_conflict(store):
    old = make_lock("local:/a", timeout=0.0)
    store.add_lock(old)
    wait_for(lambda: time.time() > old.expire, "the lock to expire")
    assert store.get_lock(old.token) is None
    assert store.find_locks("local:/a") == []
    store.add_lock(make_lock("local:/a"))


def test_refresh_lock_extends_it(store):
    lock = make_lock("local:/a", timeout=10)
    store.add_lock(lock)
    refreshed = store.refresh_lock(lock.token, 3600)
    assert refreshed.timeout == 3600 and refreshed.expire > lock.expire
    assert store.get_lock(lock.token) == refreshed
    with pytest.raises(Missing):
        store.refresh_lock("opaquelocktoken:none", 60)


def test_only_one_of_two_racing_exclusive_locks_is_granted(store, open_another):
    stores = [store, open_another()]
    barrier = threading.Barrier(2)

    def take(i: int) -> bool:
        barrier.wait()
        try:
            stores[i].add_lock(make_lock("local:/race", token=f"opaquelocktoken:{i}"))
            return True
        except LockConflict:
            return False

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(take, range(2))) == [False, True]


def test_locks_at_finds_the_locks_on_several_locations_at_once(store):
    now = time.time()
    for token, root in (("t1", "local:/a"), ("t2", "local:/a/b"), ("t3", "local:/other")):
        store.add_lock(Lock(token, root, b"", "shared", "0", "alice", 60, now + 60))
    assert [lock.token for lock in store.locks_at(["local:/a/b", "local:/a", "local:/"])] == ["t1", "t2"]
    assert store.locks_at([]) == []


def test_shared_locks_on_one_location_stop_at_the_limit(store):
    for _ in range(3):
        store.add_lock(make_lock("local:/f", scope="shared", depth="0"), max_per_location=3)
    with pytest.raises(TooManyLocks) as info:
        store.add_lock(make_lock("local:/f", scope="shared", depth="0"), max_per_location=3)
    assert info.value.per == "location"
    # Locks below or beside it do not count toward it.
    store.add_lock(make_lock("local:/f2", scope="shared", depth="0"), max_per_location=3)
    assert len(store.find_locks("local:/f")) == 3


def test_one_users_locks_stop_at_the_limit_and_expired_ones_do_not_count(store):
    store.add_lock(make_lock("local:/a", timeout=-1), max_per_principal=2)   # expired at once
    store.add_lock(make_lock("local:/b"), max_per_principal=2)
    store.add_lock(make_lock("local:/c"), max_per_principal=2)
    with pytest.raises(TooManyLocks) as info:
        store.add_lock(make_lock("local:/d"), max_per_principal=2)
    assert info.value.per == "principal"
    store.add_lock(make_lock("local:/d", principal="bob"), max_per_principal=2)
    assert [lock.root for lock in store.find_locks("local:/", include_root=False, include_children=True)] == [
        "local:/b", "local:/c", "local:/d"]


def test_limit_locks_shortens_long_ones_and_removes_those_with_a_huge_owner(store):
    store.add_lock(make_lock("local:/long", timeout=28 * 86400))
    store.add_lock(make_lock("local:/short", timeout=600))
    huge = Lock("opaquelocktoken:huge", "local:/huge", b"o" * 900_000, "shared", "0", "alice", 600,
                time.time() + 600)
    store.add_lock(huge)
    assert store.limit_locks(86400, 4096) == (1, 1)
    [long] = store.find_locks("local:/long")
    assert long.timeout == 86400 and long.expire <= time.time() + 86400
    assert store.find_locks("local:/short")[0].timeout == 600
    assert store.get_lock("opaquelocktoken:huge") is None


# -- dead properties ---------------------------------------------------------

def test_properties_count_toward_the_budget_of_the_user_who_set_them(store):
    store.set_property("local:/a", "p", b"x" * 60, owner="alice", budget=100)
    store.set_property("local:/a", "p", b"y" * 90, owner="alice", budget=100)   # replaces: 90 in use
    with pytest.raises(OverBudget):
        store.set_property("local:/b", "p", b"z" * 11, owner="alice", budget=100)
    store.set_property("local:/b", "p", b"z" * 11, owner="bob", budget=100)
    assert store.property_bytes("alice") == 90 and store.property_bytes("bob") == 11
    assert store.owned_property_bytes("alice", "local:/a", "p") == 90
    assert store.owned_property_bytes("bob", "local:/a", "p") == 0
    # Another user replacing a value takes it over.
    store.set_property("local:/a", "p", b"w" * 5, owner="bob", budget=100)
    assert store.property_bytes("alice") == 0 and store.property_bytes("bob") == 16


def test_property_writes_racing_from_two_processes_stay_within_the_budget_together(store, open_another):
    stores = [store, open_another()]
    start = threading.Barrier(12)

    def write(i: int) -> bool:
        start.wait(timeout=30)
        try:
            stores[i % 2].set_property(f"local:/f{i}", "p", b"x" * 20, owner="alice", budget=100)
        except OverBudget:
            return False
        return True

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        written = list(pool.map(write, range(12)))
    assert written.count(True) == 5
    assert store.property_bytes("alice") == 100


def test_copy_properties_past_the_budget_changes_nothing(store):
    store.set_property("local:/src", "a", b"1" * 60, owner="alice")
    store.set_property("local:/dst", "old", b"0", owner="alice")
    with pytest.raises(OverBudget):
        store.copy_properties("local:/src", "local:/dst", owner="alice", budget=100)
    assert store.property_names("local:/dst") == ["old"]
    store.copy_properties("local:/src", "local:/dst", owner="bob", budget=100)
    assert store.property_names("local:/dst") == ["a"] and store.property_bytes("bob") == 60


def test_property_set_get_list_and_remove(store):
    store.set_property("local:/a", "{DAV:}x", b"1")
    store.set_property("local:/a", "{DAV:}x", b"2")
    store.set_property("local:/a", "{ns:}y", b"3")
    assert store.get_property("local:/a", "{DAV:}x") == b"2"
    assert store.property_names("local:/a") == ["{DAV:}x", "{ns:}y"]
    store.remove_property("local:/a", "{DAV:}x")
    assert store.get_property("local:/a", "{DAV:}x") is None
    assert store.property_names("local:/a") == ["{ns:}y"]


def test_remove_properties_recursive_spares_siblings_with_a_common_prefix(store):
    for location in ("local:/d", "local:/d/f", "local:/d/e/g", "local:/d0", "local:/dx"):
        store.set_property(location, "p", location.encode())
    store.remove_properties("local:/d", recursive=True)
    assert [loc for loc in ("local:/d", "local:/d/f", "local:/d/e/g", "local:/d0", "local:/dx")
            if store.property_names(loc)] == ["local:/d0", "local:/dx"]


def test_properties_below_lists_every_descendant_and_spares_siblings_with_a_common_prefix(store):
    for location in ("local:/d", "local:/d/a", "local:/d/a/deep", "local:/d/b", "local:/dx", "other:/d/a"):
        store.set_property(location, "{urn:t}p", location.encode())
    store.set_property("local:/d/a", "{urn:t}a", b"<x/>")
    assert store.properties_below("local:/d") == [
        ("local:/d/a", "{urn:t}a", b"<x/>"), ("local:/d/a", "{urn:t}p", b"local:/d/a"),
        ("local:/d/a/deep", "{urn:t}p", b"local:/d/a/deep"), ("local:/d/b", "{urn:t}p", b"local:/d/b")]
    assert [row[0] for row in store.properties_below("local:/")] == [
        "local:/d", "local:/d/a", "local:/d/a", "local:/d/a/deep", "local:/d/b", "local:/dx"]


def test_properties_below_children_only_leaves_out_deeper_descendants(store):
    # Names with LIKE's wildcards and its escape character must match only themselves.
    for location in ("local:/d", "local:/d/a", "local:/d/a/deep", "local:/d/a/deep/er", "local:/d/b_%\\",
                     "local:/d/b_%\\/x", "local:/dx", "local:/dx/y", "other:/d/a"):
        store.set_property(location, "p", location.encode())
    assert [row[0] for row in store.properties_below("local:/d", children_only=True)] == [
        "local:/d/a", "local:/d/b_%\\"]
    assert [row[0] for row in store.properties_below("local:/d/b_%\\", children_only=True)] == [
        "local:/d/b_%\\/x"]
    assert [row[0] for row in store.properties_below("local:/", children_only=True)] == [
        "local:/d", "local:/dx"]
    assert [row[0] for row in store.properties_below("local:/d_", children_only=True)] == []


def test_copy_properties_replaces_the_destination(store):
    store.set_property("local:/src", "a", b"1")
    store.set_property("local:/dst", "old", b"0")
    store.copy_properties("local:/src", "local:/dst")
    assert store.property_names("local:/dst") == ["a"]
    assert store.get_property("local:/src", "a") == b"1"


def test_move_properties_with_children(store):
    for location in ("local:/d", "local:/d/f", "local:/d/e/g", "local:/dx", "local:/n/old"):
        store.set_property(location, "p", location.encode())
    store.move_properties("local:/d", "local:/n", with_children=True)
    assert store.get_property("local:/n", "p") == b"local:/d"
    assert store.get_property("local:/n/f", "p") == b"local:/d/f"
    assert store.get_property("local:/n/e/g", "p") == b"local:/d/e/g"
    assert store.get_property("local:/n/old", "p") is None
    assert store.get_property("local:/dx", "p") == b"local:/dx"
    assert store.property_names("local:/d") == store.property_names("local:/d/f") == []


def test_property_values_are_kept_byte_for_byte(store):
    value = bytes(range(256)) * 4
    store.set_property("local:/ü/ß", "{urn:x}bin", value)
    assert store.get_property("local:/ü/ß", "{urn:x}bin") == value


# -- defender ----------------------------------------------------------------

def test_failures_are_counted_per_key_within_the_window(store):
    assert [store.record_failure("192.0.2.1", 60) for _ in range(3)] == [1, 2, 3]
    assert store.record_failure("192.0.2.2", 60) == 1
    assert store.count_failures("192.0.2.1", 60) == 3
    assert store.count_failures("192.0.2.1", 0) == 0
    store.clear_failures("192.0.2.1")
    assert store.count_failures("192.0.2.1", 60) == 0
    assert store.count_failures("192.0.2.2", 60) == 1


def test_ban_holds_until_lifted_or_expired(store):
    until = time.time() + 600
    store.ban("192.0.2.1", until)
    store.ban("192.0.2.9", time.time() - 1)
    assert store.banned_until("192.0.2.1") == pytest.approx(until)
    assert store.banned_until("192.0.2.9") is None
    assert [b.key for b in store.list_bans()] == ["192.0.2.1"]
    assert store.unban("192.0.2.1")
    assert not store.unban("192.0.2.1")
    assert store.list_bans() == []


# -- quota usage -------------------------------------------------------------

def test_usage_deltas_from_many_threads_add_up(store, open_another):
    store.add_user(make_user())
    stores = [store, open_another()]

    def add(i: int) -> None:
        for _ in range(20):
            stores[i % 2].add_usage("alice", 100, 1)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(add, range(4)))
    assert store.get_usage("alice") == Usage(8000, 80)


def test_set_usage_replaces_the_count(store):
    store.add_user(make_user())
    store.add_usage("alice", 5, 5)
    store.set_usage("alice", Usage(1000, 3))
    assert store.add_usage("alice", -1000, -1) == Usage(0, 2)


def test_init_usage_keeps_the_first_count_and_the_deltas_since(store, open_another):
    store.add_user(make_user())
    assert store.init_usage("alice", Usage(500, 5)) == Usage(500, 5)
    store.add_usage("alice", 10, 1)
    # A second process that counted the storage before the delta landed.
    assert open_another().init_usage("alice", Usage(500, 5)) == Usage(510, 6)
    assert store.get_usage("alice") == Usage(510, 6)
    with pytest.raises(Missing):
        store.init_usage("ghost", Usage(1, 1))


def test_usage_for_an_unknown_user_raises_missing(store):
    with pytest.raises(Missing):
        store.add_usage("ghost", 1, 1)


# -- sessions and revocations ------------------------------------------------

def test_sessions_of_every_node_are_listed_touched_and_removed(store):
    now = time.time()
    store.add_session(Session("s1", "alice", "sftp", "192.0.2.1", "node-a", now))
    store.add_session(Session("s2", "bob", "webdav", "192.0.2.2", "node-b", now + 1))
    store.touch_session("s1", 4096)
    listed = store.list_sessions()
    assert [(s.id, s.bytes) for s in listed] == [("s1", 4096), ("s2", 0)]
    assert [s.id for s in store.list_sessions(user="bob")] == ["s2"]
    store.remove_session("s1")
    assert store.remove_node_sessions("node-b") == 1
    assert store.list_sessions() == []


def test_revocations_are_read_in_order_after_a_cursor(store):
    start = store.last_revocation_id()
    first = store.revoke(user="alice")
    second = store.revoke(session_id="s9")
    assert store.revocations_after(start) == [first, second]
    assert store.revocations_after(first.id) == [second]
    assert store.last_revocation_id() == second.id
    with pytest.raises(ValueError):
        store.revoke()


# -- uploads in flight and heartbeats ----------------------------------------

def test_uploads_of_a_silent_node_are_stale(store):
    now = time.time()
    store.heartbeat("alive")
    store.add_upload(InFlightUpload("u1", "alive", "s3", "/a", "mp-1", now))
    store.add_upload(InFlightUpload("u2", "dead", "s3", "/b", "mp-2", now))
    assert [u.id for u in store.stale_uploads(60)] == ["u2"]
    assert [u.id for u in store.list_uploads("alive")] == ["u1"]
    store.remove_upload("u2")
    assert store.stale_uploads(60) == []
    wait_for(lambda: [u.id for u in store.stale_uploads(0.01)] == ["u1"], "the heartbeat to age")


def test_a_forgotten_node_has_no_heartbeat_and_its_uploads_are_stale(store):
    assert store.heartbeat("gone") is False      # a first beat: the node had no row
    assert store.heartbeat("gone") is True
    store.add_upload(InFlightUpload("u1", "gone", "local", "/a", ".gw-upload-1", time.time()))
    assert store.stale_uploads(60) == []
    store.forget_node("gone")
    assert [u.id for u in store.stale_uploads(60)] == ["u1"]
    assert store.heartbeat("gone") is False      # its row was removed: the node learns it


def test_sweeping_dead_nodes_removes_their_sessions_and_rows_and_keeps_the_live_ones(store):
    now = time.time()
    store.heartbeat("alive")
    store.heartbeat("dead")
    for session_id, node in (("s1", "alive"), ("s2", "dead"), ("s3", "never-beat")):
        store.add_session(Session(session_id, "alice", "sftp", "127.0.0.1", node, now))
    store.add_upload(InFlightUpload("u1", "dead", "s3", "/a", "mp-1", now))
    wait_for(lambda: store.sweep_dead_nodes(60) == (1, 0), "the session of a node without a row to go")
    time.sleep(1.0)
    store.heartbeat("alive")
    assert store.sweep_dead_nodes(0.5) == (1, 1)
    assert [s.id for s in store.list_sessions()] == ["s1"]
    # The dead node's upload is still found, for the sweep that cleans its backend.
    assert [u.id for u in store.stale_uploads(60)] == ["u1"]


# -- host keys ---------------------------------------------------------------

def test_first_host_key_wins_for_every_caller(store, open_another):
    stores = [store, open_another(), open_another()]
    barrier = threading.Barrier(3)

    def get(i: int) -> str:
        barrier.wait()
        return stores[i].get_or_create_host_key("ssh-ed25519", lambda: f"PEM from {i}")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        keys = set(pool.map(get, range(3)))
    assert len(keys) == 1
    assert store.get_or_create_host_key("ssh-ed25519", lambda: "late") == keys.pop()
