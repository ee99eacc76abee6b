"""On a full disk, or after any failed WRITE, an SFTP upload fails at CLOSE and the previous version stays.

Found by a load run on a 200 MiB tmpfs: every SFTP upload was acknowledged
and most read back empty or truncated, previous versions destroyed. paramiko
and most clients pipeline WRITEs and learn of a failed one only at CLOSE, so
CLOSE is where the failure must be reported.
"""
from __future__ import annotations

import base64
import http.client
import os
from collections.abc import Iterator

import paramiko
import pytest
from paramiko.sftp import CMD_CLOSE, CMD_RENAME, SFTP_FAILURE

from gateway.storage.base import TEMP_PREFIX
from tests.conftest import PASSWORD, RunningGateway
from tests.sftp.helpers import OpenSSH, known_hosts, raw_status, sftp_client, start_gateway

OLD = os.urandom(256 * 1024)
CHUNK = 32 * 1024
FULL = "no space left on the storage writing '/kept.bin'"


@pytest.fixture
def full_server(tmp_path, small_disk, host_key_dir) -> Iterator[RunningGateway]:
    """A gateway whose user alice lives on a small tmpfs that is full but for her 256 KiB file."""
    running = start_gateway(tmp_path, host_key_dir, webdav=True,
                            backends={"small": {"type": "local", "root": str(small_disk.root)}})
    try:
        running.add_user("alice", home="small:/alice")
        (small_disk.root / "alice").mkdir()
        (small_disk.root / "alice" / "kept.bin").write_bytes(OLD)
        small_disk.fill()
        running.home = small_disk.root / "alice"
        yield running
    finally:
        running.gateway.stop()


def _left_behind(home) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.name.startswith(TEMP_PREFIX))


def _close(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> tuple[int, str]:
    """CLOSE a handle and return the server's status (paramiko's close swallows it)."""
    status = raw_status(sftp, CMD_CLOSE, f.handle)
    f._closed = True
    return status


def _write_until_refused(f: paramiko.SFTPFile) -> None:
    """Write and wait for each WRITE's status, as a careful client does, until the disk is full."""
    with pytest.raises(OSError, match="no space left"):
        for _ in range(64):
            f.write(os.urandom(CHUNK))
            f.flush()


def _drain(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> list[str]:
    """Read every queued WRITE reply of a pipelined handle; the errors among them."""
    errors = []
    while f._reqs:
        try:
            sftp._read_response(f._reqs.popleft())
        except OSError as exc:
            errors.append(str(exc))
    return errors


def test_a_client_that_checks_every_write_is_told_the_disk_is_full_and_close_fails(full_server):
    with sftp_client(full_server.sftp_port) as sftp:
        f = sftp.open("/kept.bin", "w")
        _write_until_refused(f)
        assert _close(sftp, f) == (SFTP_FAILURE, FULL)
    assert (full_server.home / "kept.bin").read_bytes() == OLD
    assert not _left_behind(full_server.home)


def test_a_pipelining_client_learns_at_close_that_the_upload_failed(full_server):
    with sftp_client(full_server.sftp_port) as sftp:
        f = sftp.open("/kept.bin", "w")
        f.set_pipelined(True)
        for _ in range(8):
            f.write(os.urandom(CHUNK))
        f.flush()
        # The WRITE replies are still queued: drain them as paramiko would at close.
        assert any("no space left" in error for error in _drain(sftp, f))
        assert _close(sftp, f) == (SFTP_FAILURE, FULL)
    assert (full_server.home / "kept.bin").read_bytes() == OLD
    assert not _left_behind(full_server.home)


def test_a_resumed_upload_that_hits_a_full_disk_keeps_the_previous_version(full_server, small_disk):
    filler = small_disk.root / "filler"
    os.truncate(filler, filler.stat().st_size - 2 * len(OLD))    # room for the copy a resume starts from
    with sftp_client(full_server.sftp_port) as sftp:
        f = sftp.open("/kept.bin", "r+")
        small_disk.fill()
        f.seek(len(OLD))
        _write_until_refused(f)
        assert _close(sftp, f) == (SFTP_FAILURE, FULL)
    assert (full_server.home / "kept.bin").read_bytes() == OLD
    assert not _left_behind(full_server.home)


def test_openssh_sftp_put_onto_a_full_disk_fails_and_keeps_the_previous_version(full_server, tmp_path,
                                                                              host_key_dir, client_key):
    port = full_server.sftp_port
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(1024 * 1024))
    openssh = OpenSSH(port, tmp_path, known_hosts(tmp_path, port, host_key_dir), client_key)
    result = openssh.sftp_batch(f"put {source} /kept.bin\n", password=True)
    assert result.returncode != 0, result.stdout
    # OpenSSH prints the status name ("Failure"), not the server's message.
    assert "close remote: Failure" in result.stderr, result.stderr
    assert (full_server.home / "kept.bin").read_bytes() == OLD
    assert not _left_behind(full_server.home)


def test_a_rename_after_a_failed_write_fails_and_nothing_is_committed(full_server):
    with sftp_client(full_server.sftp_port) as sftp:
        f = sftp.open("/kept.bin", "w")
        _write_until_refused(f)
        # WinSCP uploads as name.filepart and renames; the rename must not store the failed upload.
        assert raw_status(sftp, CMD_RENAME, "/kept.bin", "/moved.bin") == (SFTP_FAILURE, FULL)
        assert _close(sftp, f) == (SFTP_FAILURE, FULL)
    assert (full_server.home / "kept.bin").read_bytes() == OLD
    assert not (full_server.home / "moved.bin").exists()


def test_a_webdav_put_onto_a_full_disk_answers_507_and_keeps_the_previous_version(full_server):
    conn = http.client.HTTPConnection("127.0.0.1", full_server.webdav_port, timeout=30)
    auth = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    body = os.urandom(1024 * 1024)
    conn.request("PUT", "/kept.bin", body=body, headers={"Authorization": f"Basic {auth}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 507
    assert (full_server.home / "kept.bin").read_bytes() == OLD
    assert not _left_behind(full_server.home)


def test_a_write_refused_mid_upload_makes_close_fail_on_a_disk_with_room(sftp_server):
    home = sftp_server.data / "alice"
    home.mkdir(exist_ok=True)
    (home / "holes.bin").write_bytes(b"version one")
    limit = sftp_server.gateway.config.server.max_hole_bytes
    with sftp_client(sftp_server.sftp_port) as sftp:
        f = sftp.open("/holes.bin", "w")
        f.set_pipelined(True)
        f.write(b"start")
        f.flush()
        f.seek(limit * 2)
        f.write(b"far past the end")
        f.flush()
        f.seek(5)
        f.write(b" and more after the refused write")
        f.flush()
        assert _drain(sftp, f)
        code, message = _close(sftp, f)
    assert code == SFTP_FAILURE and "bytes of zeros past the end of '/holes.bin'" in message
    assert (home / "holes.bin").read_bytes() == b"version one"
