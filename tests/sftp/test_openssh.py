"""OpenSSH sftp and scp against the gateway, with a key and with a password."""
from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.client


def test_sftp_batch_with_key_puts_gets_lists_renames_and_removes(openssh, sftp_server, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(300_000))
    result = openssh.sftp_batch(
        f"mkdir /kdir\nput {local} /kdir/up.bin\nls -l /kdir\nrename /kdir/up.bin /kdir/moved.bin\n"
        f"get /kdir/moved.bin {tmp_path}/back.bin\nrm /kdir/moved.bin\nrmdir /kdir\n")
    assert result.returncode == 0, result.stderr
    assert "up.bin" in result.stdout
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert not (sftp_server.data / "alice" / "kdir").exists()
