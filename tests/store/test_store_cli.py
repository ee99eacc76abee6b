"""`gateway store migrate`, `gateway admin token ...`, `gateway user import/export` and the [store] section."""
from __future__ import annotations

import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.store import migrations, open_store
from tests.test_config import GOOD, run_gateway, write

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$0w8Qk+Xn8kq7rO8uWgQd2K5k8w8r7n8GQ4m2vZ2b3rQ"
USERS = f"""
[users.alice]
password = "{HASH}"
keys = ["{KEY}"]
home = "local:/alice"
quota_bytes = 10737418240

[users.alice.permissions]
"/" = ["*"]
"/reports" = ["list", "download"]

[users.alice.mounts."/shared"]
target = "local:/shared"
permissions = ["list", "download", "upload"]

[users.bob]
home = "local:/bob"
keys = ["{KEY}"]
disabled = true
"""


@pytest.fixture
def config_path(tmp_path, store_url) -> Path:
    return write(tmp_path, GOOD + f'\n[store]\nurl = "{store_url}"\n')


def gateway(config_path: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = run_gateway(*args, "--config", str(config_path))
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def stored(config_path: Path):
    config = load_config(config_path)
    return open_store(config.store.url, config.server.state_dir)


def test_store_migrate_prints_the_schema_version(config_path, store_url):
    result = gateway(config_path, "store", "migrate")
    assert result.stdout.strip().endswith(f"schema version {migrations.LATEST}")
    if store_url.startswith("postgresql"):
        assert "store-test-pw" not in result.stdout and "***" in result.stdout


def test_token_create_prints_the_token_once_as_the_last_line(config_path):
    token = gateway(config_path, "admin", "token", "create", "ci").stdout.splitlines()[-1]
    store = stored(config_path)
    try:
        assert store.verify_token(token) == "ci"
        listed = gateway(config_path, "admin", "token", "list").stdout
        assert listed.startswith("ci\t") and token not in listed
        again = gateway(config_path, "admin", "token", "create", "ci", ok=False)
        assert again.returncode == 2 and again.stderr == "gateway: token 'ci' already exists\n"
        gateway(config_path, "admin", "token", "revoke", "ci")
        assert store.verify_token(token) is None
    finally:
        store.close()


def test_revoking_an_unknown_token_fails_in_one_line(config_path):
    result = gateway(config_path, "admin", "token", "revoke", "nope", ok=False)
    assert result.returncode == 2 and result.stderr == "gateway: no token 'nope'\n"


def test_user_import_then_export_round_trips(config_path, tmp_path):
    (tmp_path / "users.in.toml").write_text(USERS)
    result = gateway(config_path, "user", "import", str(tmp_path / "users.in.toml"))
    assert "2 added, 0 replaced" in result.stdout
    exported = gateway(config_path, "user", "export").stdout
    assert tomllib.loads(exported) == {"users": {
        "alice": {"password": HASH, "keys": [KEY], "home": "local:/alice", "quota_bytes": 10737418240,
                  "permissions": {"/": ["*"], "/reports": ["download", "list"]},
                  "mounts": {"/shared": {"target": "local:/shared",
                                         "permissions": ["download", "list", "upload"]}}},
        "bob": {"keys": [KEY], "home": "local:/bob", "permissions": {"/": ["*"]}, "disabled": True}}}
    (tmp_path / "users.out.toml").write_text(exported)
    again = gateway(config_path, "user", "import", str(tmp_path / "users.out.toml"))
    assert "0 added, 2 replaced" in again.stdout
    assert gateway(config_path, "user", "export").stdout == exported


def test_user_export_to_a_file_is_private(config_path, tmp_path):
    (tmp_path / "users.in.toml").write_text(USERS)
    gateway(config_path, "user", "import", str(tmp_path / "users.in.toml"))
    gateway(config_path, "user", "export", "--output", str(tmp_path / "out.toml"))
    assert stat.S_IMODE(os.stat(tmp_path / "out.toml").st_mode) == 0o600
    assert set(tomllib.loads((tmp_path / "out.toml").read_text())["users"]) == {"alice", "bob"}


def test_user_import_of_an_invalid_file_names_the_key_and_imports_nothing(config_path, tmp_path):
    bad = USERS + '\n[users.carol]\nhome = "nas:/carol"\n'
    (tmp_path / "bad.toml").write_text(bad)
    result = gateway(config_path, "user", "import", str(tmp_path / "bad.toml"), ok=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "[users.carol] home: backend 'nas'" in result.stderr
    assert tomllib.loads(gateway(config_path, "user", "export").stdout) == {"users": {}}


def test_user_import_of_a_missing_file_fails(config_path, tmp_path):
    result = gateway(config_path, "user", "import", str(tmp_path / "nope.toml"), ok=False)
    assert result.returncode == 2 and "no such file" in result.stderr


# -- the [store] section (no database needed) ----------------------------------

def test_store_section_defaults_to_sqlite_in_the_state_dir(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert (config.store.url, config.store.node_timeout) == ("sqlite:///gateway.db", 60)
    assert config.store.sweep_interval == 30
    assert (config.store.feed_stale_after, config.store.session_grace) == (5.0, 10.0)


@pytest.mark.parametrize("section, key", [
    ('url = "mysql://u:secretpw@h/db"', "url"),
    ('url = 5', "url"),
    ("node_timeout = 0", "node_timeout"),
    ("sweep_interval = 0", "sweep_interval"),
    ("feed_stale_after = 0.5", "feed_stale_after"),
    ("session_grace = -1", "session_grace"),
    ('colour = "blue"', "colour"),
])
def test_bad_store_section_names_the_key(tmp_path, section, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + f"\n[store]\n{section}\n"))
    assert f"[store] {key}:" in str(info.value)
    assert "secretpw" not in str(info.value)
