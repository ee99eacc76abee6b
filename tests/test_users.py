"""Users file and `gateway user ...`: hashed passwords, key validation, atomic and locked rewrites."""
from __future__ import annotations

import concurrent.futures
import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.users import (Location, User, UserStore, UsersFileError, hash_password,
                           parse_public_key, verify_password)
from tests.test_config import GOOD, run_gateway, write


@pytest.fixture
def config_path(tmp_path) -> Path:
    return write(tmp_path, GOOD)


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("keys") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.with_suffix(".pub")


def users_toml(config_path: Path) -> dict:
    return tomllib.loads((config_path.parent / "users.toml").read_text())["users"]


def test_user_add_stores_only_an_argon2id_hash(config_path):
    result = run_gateway("user", "add", "alice", "--password-stdin", "--config", str(config_path),
                         stdin="s3cret-password\n")
    assert result.returncode == 0, result.stderr
    text = (config_path.parent / "users.toml").read_text()
    assert "s3cret-password" not in text
    stored = users_toml(config_path)["alice"]
    assert stored["password"].startswith("$argon2id$")
    assert verify_password(stored["password"], "s3cret-password")
    assert stored["home"] == "local:/alice"


def test_users_file_is_mode_0600(config_path):
    run_gateway("user", "add", "alice", "--password-stdin", "--config", str(config_path),
                stdin="s3cret-password\n")
    mode = stat.S_IMODE(os.stat(config_path.parent / "users.toml").st_mode)
    assert mode == 0o600


def test_password_is_never_accepted_on_the_command_line(config_path):
    result = run_gateway("user", "add", "alice", "--password", "x", "--config", str(config_path))
    assert result.returncode != 0
    assert not (config_path.parent / "users.toml").exists()


def test_user_add_without_terminal_or_stdin_flag_refuses(config_path):
    result = run_gateway("user", "add", "alice", "--config", str(config_path), stdin="")
    assert result.returncode == 2
    assert "--password-stdin" in result.stderr


def test_user_add_with_key_validates_and_stores_it(config_path, ssh_key):
    result = run_gateway("user", "add", "bob", "--key", str(ssh_key), "--home", "local:/homes/bob",
                         "--perm", "/docs=list,download", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    bob = users_toml(config_path)["bob"]
    assert bob["keys"] == [ssh_key.read_text().strip()]
    assert "password" not in bob
    assert bob["home"] == "local:/homes/bob"
    assert bob["permissions"]["/docs"] == ["download", "list"]


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


def test_passwd_list_disable_remove(config_path):
    cfg = ["--config", str(config_path)]
    assert run_gateway("user", "add", "carol", "--password-stdin", *cfg, stdin="first-password\n").returncode == 0
    assert run_gateway("user", "passwd", "carol", "--password-stdin", *cfg, stdin="second-password\n").returncode == 0
    assert verify_password(users_toml(config_path)["carol"]["password"], "second-password")
    assert run_gateway("user", "disable", "carol", *cfg).returncode == 0
    listing = run_gateway("user", "list", *cfg)
    assert "carol" in listing.stdout and "DISABLED" in listing.stdout
    assert run_gateway("user", "remove", "carol", *cfg).returncode == 0
    assert "carol" not in run_gateway("user", "list", *cfg).stdout
    again = run_gateway("user", "remove", "carol", *cfg)
    assert again.returncode == 2 and "no user 'carol'" in again.stderr


def test_concurrent_adds_lose_no_user(tmp_path):
    store_path = tmp_path / "users.toml"
    hashed = hash_password("concurrent-pw")

    def add(i: int) -> None:
        # A fresh store per call, as separate `gateway user add` processes would have.
        UserStore(store_path).add(User(f"user{i}", hashed, home=Location("local", f"/user{i}")))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    assert sorted(UserStore(store_path).load()) == sorted(f"user{i}" for i in range(40))


def test_concurrent_cli_processes_lose_no_user(config_path):
    procs = [subprocess.Popen(
        [os.sys.executable, "-m", "gateway", "user", "add", f"p{i}", "--password-stdin",
         "--config", str(config_path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent, text=True)
        for i in range(6)]
    for p in procs:
        p.communicate("a-long-password\n", timeout=60)
        assert p.returncode == 0
    assert sorted(users_toml(config_path)) == sorted(f"p{i}" for i in range(6))


def test_duplicate_user_is_refused(tmp_path):
    store = UserStore(tmp_path / "users.toml")
    store.add(User("dup"))
    with pytest.raises(UsersFileError, match="already exists"):
        store.add(User("dup"))


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
        UserStore(path).load()
    assert f"[users.x] {key}" in str(info.value)


def test_store_reloads_after_the_file_changes(tmp_path):
    path = tmp_path / "users.toml"
    reader = UserStore(path)
    assert reader.get("late") is None
    UserStore(path).add(User("late"))
    reader._checked_at = 0  # skip the one-second re-check interval
    assert reader.get("late") is not None


def test_subscribers_see_each_change_another_writer_makes_once(tmp_path):
    store = UserStore(tmp_path / "users.toml")
    store.add(User("alice", hash_password("pw-123456")))
    seen = []
    store.subscribe(lambda old, new: seen.append((old["alice"].disabled, new["alice"].disabled)))
    UserStore(tmp_path / "users.toml").update("alice", disabled=True)
    store.refresh()
    store.refresh()
    assert seen == [(False, True)]


def test_parse_public_key_normalizes_whitespace(ssh_key):
    line = ssh_key.read_text().strip()
    kind, blob, comment = line.split()
    assert parse_public_key(f"  {kind}   {blob}  {comment} ") == f"{kind} {blob} {comment}"
    with pytest.raises(ValueError):
        parse_public_key("ssh-ed25519")
