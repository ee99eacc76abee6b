"""Opening a store: URLs, migrations (once, under a lock, even with concurrent openers), and many processes."""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.store import StoreError, StoreUnavailable, Usage, migrations, open_store, schema
from gateway.store import check_url
from gateway.users import Location, User

ROOT = Path(__file__).resolve().parents[2]

# Runs in a child process: once every child is ready (a line on stdin), open the
# store (migrating if needed), then add users.
CHILD = """
import sys
from pathlib import Path
from gateway.store import open_store
from gateway.users import Location, User
url, state_dir, prefix, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
store = open_store(url, state_dir)
for i in range(count):
    store.add_user(User(f"{prefix}{i}", home=Location("local", f"/{prefix}{i}")))
store.close()
"""


def run_children(url: str, state_dir: Path, prefixes: list[str], count: int) -> None:
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(state_dir), prefix, str(count)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for prefix in prefixes]
        for child in children:
            assert child.stdout.readline() == "ready\n", child.stderr.read()
        for child in children:   # start them together, to race for real
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            _, err = child.communicate(timeout=300)
            assert child.returncode == 0, err


def test_two_processes_adding_users_at_once_lose_none(store, store_url, tmp_path):
    run_children(store_url, tmp_path, ["a", "b"], 25)
    assert len(store.list_users()) == 50
    assert store.change_counter() == 50


def test_concurrent_openers_of_an_empty_store_migrate_it_once(store_url, tmp_path):
    run_children(store_url, tmp_path, ["p", "q", "r", "s"], 0)
    store = open_store(store_url, tmp_path)
    try:
        with store._engine.connect() as conn:
            versions = conn.execute(sa.select(schema.schema_version.c.version)).scalars().all()
        assert versions == list(range(1, migrations.LATEST + 1))
        assert store.version == migrations.LATEST
    finally:
        store.close()


def test_reopening_a_migrated_store_keeps_its_data(store, store_url, tmp_path):
    store.create_token("ci")
    again = open_store(store_url, tmp_path)
    try:
        assert [t.name for t in again.list_tokens()] == ["ci"]
    finally:
        again.close()


def test_a_version_1_store_gets_the_lock_expiry_index(store, store_url, tmp_path):
    # Version 1 is the same tables without the index.
    with store._engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX locks_expire"))
        conn.execute(sa.delete(schema.schema_version).where(schema.schema_version.c.version > 1))
    store.close()
    upgraded = open_store(store_url, tmp_path)
    try:
        assert upgraded.version == migrations.LATEST >= 2
        with upgraded._engine.connect() as conn:
            assert "locks_expire" in {index["name"] for index in sa.inspect(conn).get_indexes("locks")}
            if conn.dialect.name == "sqlite":
                plan = conn.execute(sa.text("EXPLAIN QUERY PLAN DELETE FROM locks WHERE expire < 1")).all()
                assert "USING INDEX locks_expire" in " ".join(row[-1] for row in plan)
    finally:
        upgraded.close()


def test_a_version_2_store_gets_property_owners_and_counts_usage_again(store, store_url, tmp_path):
    # Version 2: properties without an owner, and usage counted without folders.
    store.set_property("local:/a", "p", b"old")
    store.add_user(User("alice", home=Location("local", "/alice"), quota_files=3))
    store.set_usage("alice", Usage(10, 2))
    with store._engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX properties_owner"))
        conn.execute(sa.text("DROP INDEX locks_principal"))
        conn.execute(sa.text("ALTER TABLE properties DROP COLUMN owner"))
        conn.execute(sa.delete(schema.schema_version).where(schema.schema_version.c.version > 2))
    store.close()
    upgraded = open_store(store_url, tmp_path)
    try:
        assert upgraded.version == migrations.LATEST >= 3
        assert upgraded.get_property("local:/a", "p") == b"old"
        assert upgraded.property_bytes("") == 3   # set before owners were kept: nobody's
        assert upgraded.get_usage("alice") is None   # counted again (folders too) at next use
        with upgraded._engine.connect() as conn:
            assert "locks_principal" in {index["name"] for index in sa.inspect(conn).get_indexes("locks")}
    finally:
        upgraded.close()


def test_store_newer_than_the_gateway_is_refused(store, store_url, tmp_path):
    with store._engine.begin() as conn:
        conn.execute(sa.insert(schema.schema_version).values(version=migrations.LATEST + 1, applied=0))
    with pytest.raises(StoreError, match="newer than this gateway"):
        open_store(store_url, tmp_path)


def test_relative_sqlite_path_lands_in_the_state_dir_private(tmp_path):
    store = open_store("sqlite:///sub/gateway.db", tmp_path / "state")
    store.close()
    path = tmp_path / "state" / "sub" / "gateway.db"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_absolute_sqlite_path_is_used_as_is(tmp_path):
    path = tmp_path / "elsewhere.db"
    store = open_store(f"sqlite:///{path}", tmp_path / "state")
    store.close()
    assert path.exists() and not (tmp_path / "state").exists()


def test_postgresql_url_uses_psycopg():
    assert check_url("postgresql://u:p@db:5432/gw").drivername == "postgresql+psycopg"


@pytest.mark.parametrize("url, message", [
    ("mysql://u:secretpw@h/db", "unsupported database 'mysql'"),
    ("sqlite://", "needs a file name"),
    ("sqlite:///:memory:", "needs a file name"),
    ("postgresql://u:secretpw@h", "needs a database name"),
    ("not a url secretpw", "not a database URL"),
])
def test_bad_url_is_refused_in_one_line_without_the_password(url, message, tmp_path):
    with pytest.raises(StoreError, match=message) as info:
        open_store(url, tmp_path)
    assert "secretpw" not in str(info.value) and "\n" not in str(info.value)


def test_unreachable_postgresql_is_unavailable_and_hides_the_password(tmp_path):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreUnavailable) as info:
        open_store(f"postgresql://gw:secretpw@127.0.0.1:{port}/gw", tmp_path)
    assert "secretpw" not in str(info.value) and f":{port}/gw" in str(info.value)


def test_wrong_postgresql_password_is_refused(postgres, tmp_path):
    url = postgres.create_database().replace(":store-test-pw@", ":wrong@")
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        open_store(url, tmp_path)
