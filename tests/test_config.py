"""Config validation: broken configs give one line naming the file and key, exit status 2."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.store import open_store
from gateway.users import Location, User

REPO = Path(__file__).resolve().parent.parent


def run_gateway(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd or REPO, input=stdin,
                          capture_output=True, text=True, timeout=60)


GOOD = """
[server]
state_dir = "state"

[webdav]
listen = "127.0.0.1:0"

[sftp]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[backends.local]
type = "local"
root = "data"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_good_config_checks_ok_with_summary(tmp_path):
    result = run_gateway("check", "--config", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK:")
    assert "local (local)" in result.stdout and "users: 0" in result.stdout
    assert "webdav 127.0.0.1:0" in result.stdout and "sftp 127.0.0.1:0" in result.stdout


def test_embedded_default_config_is_valid():
    config = load_config(None)
    assert config.webdav.listen.port == 8080 and config.sftp.listen.port == 2022
    assert config.backends["local"].type == "local"


BROKEN = {
    "unknown key": (GOOD.replace('[webdav]\n', '[webdav]\nlisten_port = 8080\n'), "[webdav] listen_port"),
    "wrong type": (GOOD.replace('[sftp]\n', '[sftp]\nidle_timeout = "ten"\n'), "[sftp] idle_timeout"),
    "bad listen": (GOOD.replace('listen = "127.0.0.1:0"\n\n[sftp]', 'listen = "nowhere"\n\n[sftp]'),
                   "[webdav] listen"),
    "unknown backend type": (GOOD.replace('type = "local"', 'type = "ftp"'), "[backends.local] type"),
    "unknown section": (GOOD + "\n[ftp]\nenabled = true\n", "[ftp]"),
    "missing root": (GOOD.replace('root = "data"', ''), "[backends.local] root"),
    "not toml": ("[server\nstate_dir=", "not valid TOML"),
    "unknown backend key": (GOOD.replace('root = "data"', 'root = "data"\nbucket = "x"'),
                            "[backends.local] bucket"),
    "negative property limit": (GOOD.replace('[webdav]\n', '[webdav]\nmax_properties = -1\n'),
                                "[webdav] max_properties"),
    "property size not a number": (GOOD.replace('[webdav]\n', '[webdav]\nmax_property_bytes = "64k"\n'),
                                   "[webdav] max_property_bytes"),
    "negative lock limit": (GOOD.replace('[webdav]\n', '[webdav]\nmax_locks_per_user = -1\n'),
                            "[webdav] max_locks_per_user"),
    "lock timeout not a number": (GOOD.replace('[webdav]\n', '[webdav]\nmax_lock_timeout = "1d"\n'),
                                  "[webdav] max_lock_timeout"),
    "tiny header cap": (GOOD.replace('[webdav]\n', '[webdav]\nmax_header_size = 100\n'),
                        "[webdav] max_header_size"),
    "no channels": (GOOD.replace('[sftp]\n', '[sftp]\nmax_channels = 0\n'), "[sftp] max_channels"),
    "no login time": (GOOD.replace('[sftp]\n', '[sftp]\nlogin_timeout = 0\n'), "[sftp] login_timeout"),
    "trusted proxy not an address": (
        GOOD.replace('[webdav]\n', '[webdav]\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.1/8"]\n'),
        "[webdav] trusted_proxies[0]: '10.0.0.1/8'"),
    "proxy protocol without trusted proxies": (
        GOOD.replace('[sftp]\n', '[sftp]\nproxy_protocol = true\n'), "[sftp] trusted_proxies"),
    "bad admin listen": (GOOD.replace('[admin]\nlisten = "127.0.0.1:0"', '[admin]\nlisten = "8090"'),
                         "[admin] listen"),
    "admin cert without key": (GOOD.replace('[admin]\n', '[admin]\ntls_cert = "cert.pem"\n'),
                               "[admin] tls_key"),
    "empty audit log": (GOOD.replace('[server]\n', '[server]\naudit_log = ""\n'), "[server] audit_log"),
    "no bulk share": (GOOD.replace('[server]\n', '[server]\nbulk_share = 0\n'), "[server] bulk_share"),
    "bulk share above one": (GOOD.replace('[server]\n', '[server]\nbulk_share = 1.5\n'), "[server] bulk_share"),
}


def test_proxy_protocol_is_off_by_default_and_takes_addresses_and_networks(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert not config.webdav.proxy_protocol and config.webdav.trusted_proxies == []
    text = GOOD.replace('[sftp]\n', '[sftp]\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.5", "fd00::/8"]\n')
    config = load_config(write(tmp_path, text))
    assert config.sftp.proxy_protocol and config.sftp.trusted_proxies == ["10.0.0.5", "fd00::/8"]
    assert not config.webdav.proxy_protocol


def test_audit_log_is_relative_to_the_config_file_or_dash(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace('[server]\n', '[server]\naudit_log = "logs/a.jsonl"\n')))
    assert config.server.audit_log == str(tmp_path.resolve() / "logs" / "a.jsonl")
    config = load_config(write(tmp_path, GOOD.replace('[server]\n', '[server]\naudit_log = "-"\n')))
    assert config.server.audit_log == "-"
    assert config.admin.enabled and config.admin.listen.port == 0


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_gives_one_line_naming_the_key(tmp_path, case):
    text, key = BROKEN[case]
    path = write(tmp_path, text)
    result = run_gateway("check", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert str(path) in lines[0] and key in lines[0]


def test_unreadable_root_is_reported(tmp_path):
    (tmp_path / "data").write_text("a file where a folder should be")
    result = run_gateway("check", "--config", str(write(tmp_path, GOOD)))
    assert result.returncode == 2
    assert "[backends.local] root" in result.stderr and "not a directory" in result.stderr


def test_port_in_use_is_reported(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = GOOD.replace('[webdav]\nlisten = "127.0.0.1:0"', f'[webdav]\nlisten = "127.0.0.1:{port}"')
        result = run_gateway("check", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert "[webdav] listen" in result.stderr and str(port) in result.stderr


def test_user_pointing_at_undefined_backend_is_reported(tmp_path):
    path = write(tmp_path, GOOD)
    # Added while the config had an `archive` backend, which it no longer has.
    store = open_store("sqlite:///gateway.db", tmp_path / "state")
    try:
        store.add_user(User("bob", home=Location("archive", "/bob")))
    finally:
        store.close()
    result = run_gateway("check", "--config", str(path))
    assert result.returncode == 2
    assert "[users.bob] home" in result.stderr and "'archive'" in result.stderr


def test_a_config_that_still_names_a_users_file_says_to_import_it(tmp_path):
    path = write(tmp_path, GOOD.replace('state_dir = "state"\n', 'state_dir = "state"\nusers_file = "users.toml"\n'))
    for command in (["check"], ["serve"], ["user", "list"]):
        result = run_gateway(*command, "--config", str(path))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert "[server] users_file" in result.stderr
        assert f"gateway user import {tmp_path / 'users.toml'}" in result.stderr


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.server.state_dir == (tmp_path / "state").resolve()
    assert Path(config.backends["local"].options.root) == (tmp_path / "data").resolve()


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


# -- what a SIGHUP keeps: the supervisor starts later workers from it ------------

RELOAD_BASE = """
[server]
state_dir = "state"
log_level = "info"
drain_timeout = 30
[webdav]
listen = "127.0.0.1:18080"
max_header_size = 65536
threads = 32
[sftp]
listen = "127.0.0.1:18022"
idle_timeout = 900
[defender]
max_failures = 10
[backends.local]
type = "local"
root = "data"
"""


def test_a_reloaded_config_takes_what_a_sighup_applies_and_keeps_the_rest(tmp_path):
    from gateway.server import reloaded_config
    old = load_config(write(tmp_path, RELOAD_BASE))
    changed = (RELOAD_BASE.replace('"info"', '"debug"').replace("drain_timeout = 30", "drain_timeout = 5")
               .replace(":18080", ":18081").replace("65536", "4096").replace("threads = 32", "threads = 8")
               .replace(":18022", ":18023").replace("idle_timeout = 900", "idle_timeout = 60")
               .replace("max_failures = 10", "max_failures = 3").replace('root = "data"', 'root = "moved"')
               + '[backends.extra]\ntype = "local"\nroot = "data2"\n')
    new = load_config(write(tmp_path, changed))
    got = reloaded_config(old, new)
    assert (got.server.log_level, got.server.drain_timeout) == ("debug", 5)
    assert got.webdav.max_header_size == 4096
    assert (got.webdav.listen, got.webdav.threads) == (old.webdav.listen, 32)
    assert (got.sftp.listen, got.sftp.idle_timeout) == (old.sftp.listen, 60)
    assert got.defender.max_failures == 3
    # An added backend comes in; a changed one waits for a restart, as in the workers.
    assert got.backends == {"local": old.backends["local"], "extra": new.backends["extra"]}


def test_a_reload_whose_certificate_does_not_load_is_refused_before_anything_changes(tmp_path):
    from gateway.server import check_reload
    from tests.webdav.test_tls import self_signed
    cert, key = self_signed(tmp_path)
    tls = RELOAD_BASE.replace("threads = 32", f"threads = 32\ntls_cert = '{cert}'\ntls_key = '{key}'")
    old = load_config(write(tmp_path, tls))
    check_reload(old, old)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    new = load_config(write(tmp_path, tls.replace(str(cert), str(bad))))
    with pytest.raises(ConfigError, match="gateway.toml"):
        check_reload(old, new)
