"""OpenSSH sftp and scp against the gateway, with a key and with a password."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

pytestmark = pytest.mark.client


def _home(sftp_server, user="alice"):
    return sftp_server.data / user


def test_sftp_batch_with_key_puts_gets_lists_renames_and_removes(openssh, sftp_server, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(300_000))
    result = openssh.sftp_batch(
        f"mkdir /kdir\nput {local} /kdir/up.bin\nls -l /kdir\nrename /kdir/up.bin /kdir/moved.bin\n"
        f"get /kdir/moved.bin {tmp_path}/back.bin\nrm /kdir/moved.bin\nrmdir /kdir\n")
    assert result.returncode == 0, result.stderr
    assert "up.bin" in result.stdout
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert not (_home(sftp_server) / "kdir").exists()


def test_sftp_batch_with_password_through_keyboard_interactive(openssh, sftp_server, tmp_path):
    local = tmp_path / "pw.txt"
    local.write_bytes(b"typed password\n")
    result = openssh.sftp_batch(f"put {local} /pw.txt\nls\n", user="bob", password=True)
    assert result.returncode == 0, result.stderr
    assert (_home(sftp_server, "bob") / "pw.txt").read_bytes() == b"typed password\n"


def test_sftp_batch_with_password_auth_only(openssh, sftp_server, tmp_path):
    result = openssh.sftp_batch("mkdir /pwonly\n", user="bob", password=True,
                                extra=("-o", "PreferredAuthentications=password"))
    assert result.returncode == 0, result.stderr
    assert (_home(sftp_server, "bob") / "pwonly").is_dir()


def test_sftp_wrong_password_is_refused(openssh, tmp_path):
    batch = tmp_path / "b.txt"
    batch.write_text("ls\n")
    result = subprocess.run(
        ["sftp", "-P", str(openssh.port), *openssh.options(password=True), "-b", str(batch),
         "bob@127.0.0.1"], env=openssh.env(password="wrong"), capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr


def test_reput_and_reget_continue_partial_transfers(openssh, sftp_server, tmp_path):
    data = os.urandom(1_000_000)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    (_home(sftp_server) / "resume.bin").write_bytes(data[:400_000])
    result = openssh.sftp_batch(f"reput {local} /resume.bin\n")
    assert result.returncode == 0, result.stderr
    assert (_home(sftp_server) / "resume.bin").read_bytes() == data
    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[:123_456])
    result = openssh.sftp_batch(f"reget /resume.bin {partial}\n")
    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == data


def test_rename_over_an_existing_file_uses_posix_rename(openssh, sftp_server):
    home = _home(sftp_server)
    (home / "old.txt").write_bytes(b"old")
    (home / "new.txt").write_bytes(b"new")
    # OpenSSH's rename uses posix-rename@openssh.com only when the server advertises it;
    # a plain v3 rename would refuse the existing target.
    result = openssh.sftp_batch("rename /new.txt /old.txt\n")
    assert result.returncode == 0, result.stderr
    assert (home / "old.txt").read_bytes() == b"new"
    assert not (home / "new.txt").exists()


def test_df_reports_space_through_statvfs(openssh):
    result = openssh.sftp_batch("df -h /\n")
    assert result.returncode == 0, result.stderr
    assert "Size" in result.stdout and "Avail" in result.stdout


def test_ls_of_a_missing_path_fails_the_batch(openssh):
    result = openssh.sftp_batch("ls /no/such/dir\n")
    assert result.returncode != 0
    assert "not found" in result.stderr


def test_scp_copies_both_ways_and_exits_zero(openssh, sftp_server, tmp_path):
    data = os.urandom(200_000)
    local = tmp_path / "scp.bin"
    local.write_bytes(data)
    openssh.scp(str(local), "alice@127.0.0.1:/scp.bin")
    assert (_home(sftp_server) / "scp.bin").read_bytes() == data
    openssh.scp("alice@127.0.0.1:/scp.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data


def test_scp_of_a_tree_recursively(openssh, sftp_server, tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f.txt").write_text("deep")
    (tree / "top.txt").write_text("top")
    result = subprocess.run(["scp", "-r", "-P", str(openssh.port), *openssh.options(), str(tree),
                             "alice@127.0.0.1:/"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (_home(sftp_server) / "tree" / "a" / "b" / "f.txt").read_text() == "deep"


def test_host_key_algorithm_ssh_rsa_sha1_is_refused(openssh, caplog):
    result = subprocess.run(
        ["sftp", "-P", str(openssh.port), *openssh.options(), "-o", "HostKeyAlgorithms=ssh-rsa",
         "-b", "/dev/null", "alice@127.0.0.1"], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode != 0
    # The server thread logs the refusal after the client has gone: wait for it.
    deadline = time.monotonic() + 10
    while "no acceptable host key" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "no acceptable host key" in caplog.text


def test_rsa_host_key_is_served_with_sha2_signatures(openssh):
    result = openssh.sftp_batch("pwd\n", extra=("-o", "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256"))
    assert result.returncode == 0, result.stderr
