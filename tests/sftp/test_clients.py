"""Real clients other than OpenSSH sftp/scp: sshfs, PuTTY's psftp and rclone."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import PASSWORD
from tests.sftp.helpers import make_tree, needs_sshfs, same_tree, sshfs_mount

pytestmark = pytest.mark.client


@needs_sshfs
def test_sshfs_mount_copies_a_tree_extracts_a_tar_appends_and_reads_back(openssh, sftp_server, tmp_path):
    with sshfs_mount(openssh, tmp_path / "mnt") as mnt:
        source = make_tree(tmp_path / "src")
        shutil.copytree(source, mnt / "copied")
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            tar.add(source, arcname="unpacked")
        archive.seek(0)
        with tarfile.open(fileobj=archive, mode="r:gz") as tar:
            tar.extractall(mnt, filter="data")
        home = sftp_server.data / "alice"
        assert same_tree(source, mnt / "unpacked")
        assert same_tree(source, home / "unpacked")
        for root in (mnt / "copied", source):
            with open(root / "a" / "small-3.txt", "ab") as f:
                f.write(b"appended\n")
        assert same_tree(source, mnt / "copied")
        assert same_tree(source, home / "copied")
        assert os.statvfs(mnt).f_bavail > 0
    assert not (mnt / "copied").exists()


def _psftp_fingerprint(host_key_dir: Path) -> str:
    from gateway.sftp.hostkey import load_host_keys
    return load_host_keys(host_key_dir)[0].fingerprint


@pytest.mark.tools("psftp")
def test_psftp_with_a_password_puts_and_gets(openssh, sftp_server, tmp_path, host_key_dir):
    data = os.urandom(500_000)
    (tmp_path / "up.bin").write_bytes(data)
    batch = tmp_path / "psftp.txt"
    batch.write_text("mkdir putty\ncd putty\nput up.bin\nls\nget up.bin down.bin\n"
                     "rename up.bin renamed.bin\nquit\n")
    result = subprocess.run(
        ["psftp", "-P", str(openssh.port), "-pw", PASSWORD, "-hostkey",
         _psftp_fingerprint(host_key_dir), "-batch", "-b", str(batch), "bob@127.0.0.1"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "down.bin").read_bytes() == data
    assert (sftp_server.data / "bob" / "putty" / "renamed.bin").read_bytes() == data


@pytest.mark.tools("rclone")
def test_rclone_copies_a_tree_and_check_finds_no_differences(openssh, tmp_path):
    source = make_tree(tmp_path / "src")
    assert same_tree(source, openssh.rclone_round_trip(source, tmp_path))