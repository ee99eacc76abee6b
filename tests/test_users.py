"""`gateway user ...` against the state store: hashed passwords, key validation, concurrent
writers, and the users TOML form used by import/export."""
from __future__ import annotations

import concurrent.futures
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.permissions import parse_perms
from gateway.store import Store, UserCache, open_store
from gateway.users import (Location, User, UserExists, UsersFileError, hash_password, parse_public_key,
                           read_users_file, verify_password)
from tests.test_config import GOOD, REPO, run_gateway, write


@pytest.fixture
def config_path(tmp_path) -> Path:
    return write(tmp_path, GOOD)


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("keys") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.with_suffix(".pub")


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    """The store the config's CLI commands use (the default SQLite file in its state dir)."""
    store = open_store("sqlite:///gateway.db", tmp_path / "state")
    yield store
    store.close()


def stored(store: Store) -> dict[str, User]:
    return {user.name: user for user in store.list_users()}


def test_user_add_stores_only_an_argon2id_hash(config_path, store):
    result = run_gateway("user", "add", "alice", "--password-stdin", "--config", str(config_path),
                         stdin="s3cret-password\n")
    assert result.returncode == 0, result.stderr
    for name in os.listdir(config_path.parent / "state"):
        assert b"s3cret-password" not in (config_path.parent / "state" / name).read_bytes()
    alice = stored(store)["alice"]
    assert alice.password_hash.startswith("$argon2id$")
    assert verify_password(alice.password_hash, "s3cret-password")
    assert str(alice.home) == "local:/alice"


def test_the_store_file_is_mode_0600(config_path):
    run_gateway("user", "add", "alice", "--password-stdin", "--config", str(config_path),
                stdin="s3cret-password\n")
    mode = stat.S_IMODE(os.stat(config_path.parent / "state" / "gateway.db").st_mode)
    assert mode == 0o600


def test_password_is_never_accepted_on_the_command_line(config_path):
    result = run_gateway("user", "add", "alice", "--password", "x", "--config", str(config_path))
    assert result.returncode != 0
    assert "unrecognized arguments" in result.stderr
    assert not (config_path.parent / "state" / "gateway.db").exists()


def test_user_add_without_terminal_or_stdin_flag_refuses(config_path):
    result = run_gateway("user", "add", "alice", "--config", str(config_path), stdin="")
    assert result.returncode == 2
    assert "--password-stdin" in result.stderr


def test_user_add_with_key_validates_and_stores_it(config_path, ssh_key, store):
    result = run_gateway("user", "add", "bob", "--key", str(ssh_key), "--home", "local:/homes/bob",
                         "--perm", "/docs=list,download", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    bob = stored(store)["bob"]
    assert bob.keys == (ssh_key.read_text().strip(),)
    assert bob.password_hash is None
    assert str(bob.home) == "local:/homes/bob"
    assert bob.permissions["/docs"] == parse_perms(["download", "list"])


def test_user_add_rejects_a_broken_key(config_path, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 AAAAnotbase64!!! me@host\n")
    result = run_gateway("user", "add", "bob", "--key", str(bad), "--config", str(config_path))
    assert result.returncode == 2
    assert "invalid SSH public key" in result.stderr


def test_user_add_rejects_unknown_permission_and_backend(config_path):
    r1 = run_gateway("user", "add", "bob", "--password-stdin", "--perm", "/=read",
                     "--config", str(config_path), stdin="s3cret-password\n")
    assert r1.returncode == 2 and "unknown permission 'read'" in r1.stderr
    r2 = run_gateway("user", "add", "bob", "--password-stdin", "--home", "nas:/bob",
                     "--config", str(config_path), stdin="s3cret-password\n")
    assert r2.returncode == 2 and "'nas'" in r2.stderr


def test_passwd_list_disable_remove(config_path, store):
    cfg = ["--config", str(config_path)]
    assert run_gateway("user", "add", "carol", "--password-stdin", *cfg, stdin="first-password\n").returncode == 0
    assert run_gateway("user", "passwd", "carol", "--password-stdin", *cfg, stdin="second-password\n").returncode == 0
    assert verify_password(stored(store)["carol"].password_hash, "second-password")
    assert run_gateway("user", "disable", "carol", *cfg).returncode == 0
    listing = run_gateway("user", "list", *cfg)
    assert "carol" in listing.stdout and "DISABLED" in listing.stdout
    assert run_gateway("user", "remove", "carol", *cfg).returncode == 0
    assert "carol" not in run_gateway("user", "list", *cfg).stdout
    again = run_gateway("user", "remove", "carol", *cfg)
    assert again.returncode == 2 and "no user 'carol'" in again.stderr


def test_concurrent_adds_lose_no_user(tmp_path, store):
    hashed = hash_password("concurrent-pw")

    def add(i: int) -> None:
        # A store of its own per call, as separate `gateway user add` processes would have.
        own = open_store("sqlite:///gateway.db", tmp_path / "state")
        try:
            UserCache(own).add(User(f"user{i}", hashed, home=Location("local", f"/user{i}")))
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    assert sorted(stored(store)) == sorted(f"user{i}" for i in range(40))


def test_concurrent_cli_processes_lose_no_user(config_path, store):
    procs = [subprocess.Popen(
        [os.sys.executable, "-m", "gateway", "user", "add", f"p{i}", "--password-stdin",
         "--config", str(config_path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent, text=True)
        for i in range(6)]
    for p in procs:
        _, err = p.communicate("a-long-password\n", timeout=120)
        assert p.returncode == 0, err
    assert sorted(stored(store)) == sorted(f"p{i}" for i in range(6))


def test_duplicate_user_is_refused(store):
    users = UserCache(store)
    users.add(User("dup"))
    with pytest.raises(UsersFileError, match="already exists"):
        users.add(User("dup"))


def test_a_user_on_a_backend_the_config_lacks_is_refused_naming_it(config_path):
    result = run_gateway("user", "add", "bob", "--password-stdin", "--home", "nas:/bob",
                         "--config", str(config_path), stdin="s3cret-password\n")
    assert result.returncode == 2
    assert result.stderr == f"gateway: --home: backend 'nas' is not defined in {config_path}\n"


@pytest.mark.parametrize("text,key", [
    ('[users.x]\npassword = "plaintext"\n', "password"),
    ('[users.x]\nhome = "nobackend"\n', "home"),
    ('[users.x]\nquota_bytes = -1\n', "quota_bytes"),
    ('[users.x]\nshell = "/bin/sh"\n', "shell"),
    ('[users.x.permissions]\n"/" = ["fly"]\n', "permissions"),
    ('[users.x.mounts."/m"]\ntarget = "local:/../etc"\n', "mounts"),
])
def test_invalid_users_file_names_the_key(tmp_path, text, key):
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as info:
        read_users_file(path)
    assert f"[users.x] {key}" in str(info.value)


def test_a_reader_sees_a_user_another_process_added(store, tmp_path):
    reader = UserCache(store)
    assert reader.get("late") is None
    writer = open_store("sqlite:///gateway.db", tmp_path / "state")
    try:
        UserCache(writer).add(User("late"))
    finally:
        writer.close()
    reader.refresh()
    assert reader.get("late") is not None


def test_subscribers_see_each_change_another_writer_makes_once(store, tmp_path):
    users = UserCache(store)
    users.add(User("alice", hash_password("pw-123456")))
    seen = []
    users.subscribe(lambda old, new: seen.append((old["alice"].disabled, new["alice"].disabled)))
    writer = open_store("sqlite:///gateway.db", tmp_path / "state")
    try:
        UserCache(writer).update("alice", disabled=True)
    finally:
        writer.close()
    users.refresh()
    users.refresh()
    assert seen == [(False, True)]


def test_a_revoking_change_also_writes_a_revocation_for_every_node(store):
    users = UserCache(store)
    users.add(User("alice", hash_password("pw-123456")))
    users.update("alice", quota_bytes=10)          # not a revoking change
    assert store.revocations_after(0) == []
    users.update("alice", disabled=True)
    users.update("alice", disabled=False)
    users.remove("alice")
    assert [r.user for r in store.revocations_after(0)] == ["alice", "alice"]


def test_parse_public_key_normalizes_whitespace(ssh_key):
    line = ssh_key.read_text().strip()
    kind, blob, comment = line.split()
    assert parse_public_key(f"  {kind}   {blob}  {comment} ") == f"{kind} {blob} {comment}"
    with pytest.raises(ValueError):
        parse_public_key("ssh-ed25519")


# -- passwords and names that would pass for something else --------------------------

def add_with_password_bytes(config_path: Path, password: bytes, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "user", "add", "bob", "--password-stdin",
                           "--config", str(config_path)], cwd=REPO, input=password + b"\n",
                          capture_output=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize("encoding, message", [
    ("utf-8:surrogateescape", "password is not valid Unicode text"),   # bytes arrive as surrogates
    ("utf-8:strict", "the password on stdin is not UTF-8 text"),
])
def test_a_password_on_stdin_that_is_not_utf8_gets_a_clear_message(config_path, store, encoding, message):
    result = add_with_password_bytes(config_path, b"long enough \xff\xfe", PYTHONIOENCODING=encoding)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().startswith(f"gateway: {message}")
    assert b"Traceback" not in result.stderr and b"codec" not in result.stderr
    assert "bob" not in stored(store)


@pytest.mark.parametrize("option", ["--quota-bytes", "--quota-files"])
def test_user_add_refuses_a_quota_past_64_bits(config_path, store, option):
    result = run_gateway("user", "add", "bob", "--password-stdin", option, str(1 << 63),
                         "--config", str(config_path), stdin="s3cret-password\n")
    assert result.returncode == 2, result.stderr
    key = option.removeprefix("--").replace("-", "_")
    assert result.stderr == (f"gateway: {option}: {key}: must be a whole number >= 0 (0 means no limit) "
                             f"and at most {(1 << 63) - 1}\n")
    assert "bob" not in stored(store)


@pytest.mark.parametrize("name, words", [
    ("ALICE", "user name 'ALICE' is taken: user 'alice' differs from it only in case or Unicode form"),
    ("ａｌｉｃｅ", "not in Unicode normal form NFKC (write it as 'alice')"),
    ("\u0430lice", "it mixes Latin, Greek or Cyrillic letters"),
])
def test_user_add_refuses_a_name_that_passes_for_an_existing_one(config_path, store, name, words):
    assert run_gateway("user", "add", "alice", "--password-stdin", "--config", str(config_path),
                       stdin="s3cret-password\n").returncode == 0
    result = run_gateway("user", "add", name, "--password-stdin", "--config", str(config_path),
                         stdin="s3cret-password\n")
    assert result.returncode == 2
    assert words in result.stderr
    assert sorted(stored(store)) == ["alice"]


def test_import_refuses_a_name_differing_only_in_case_and_imports_nothing(config_path, store, tmp_path):
    UserCache(store).add(User("alice", hash_password("s3cret-password")))
    users_file = tmp_path / "users.toml"
    users_file.write_text('[users.carol]\nhome = "local:/carol"\n\n[users.Alice]\nhome = "local:/x"\n')
    result = run_gateway("user", "import", str(users_file), "--config", str(config_path))
    assert result.returncode == 2
    assert result.stderr == (f"gateway: {users_file}: user name 'Alice' is taken: "
                             "user 'alice' differs from it only in case or Unicode form\n")
    assert sorted(stored(store)) == ["alice"]


def test_import_still_replaces_a_user_of_the_very_same_name(config_path, store, tmp_path):
    UserCache(store).add(User("alice", hash_password("s3cret-password")))
    users_file = tmp_path / "users.toml"
    users_file.write_text('[users.alice]\nhome = "local:/elsewhere"\n')
    result = run_gateway("user", "import", str(users_file), "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert str(stored(store)["alice"].home) == "local:/elsewhere"


def test_a_look_alike_name_stored_before_the_rules_can_still_be_disabled(config_path, store):
    store.add_user(User("ａｄｍｉｎ", hash_password("s3cret-password")))
    result = run_gateway("user", "disable", "ａｄｍｉｎ", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert stored(store)["ａｄｍｉｎ"].disabled


def test_a_new_name_equal_to_the_nfkc_form_of_a_stored_look_alike_is_refused(store):
    store.add_user(User("ａｄｍｉｎ", hash_password("s3cret-password")))
    with pytest.raises(UserExists, match="user 'ａｄｍｉｎ' differs from it only in case or Unicode form"):
        UserCache(store).add(User("Admin", hash_password("s3cret-password")))
    assert sorted(stored(store)) == ["ａｄｍｉｎ"]
