"""Quota and reserved names over SFTP: what a client can store stays what the gateway counts."""
from __future__ import annotations

import io

import pytest

from tests.sftp.helpers import sftp_client, start_sftp_gateway


@pytest.fixture
def server(tmp_path, host_key_dir):
    running = start_sftp_gateway(tmp_path, host_key_dir)
    (running.data / "team").mkdir()
    running.add_user("alice", quota_bytes=3000, mounts={"/team": ("local:/team", ["*"])})
    yield running
    running.gateway.stop()


def test_a_file_deleted_while_open_without_truncate_still_counts_against_the_quota(server):
    home = server.data / "alice"
    # The delete comes from another session: within one session a removed
    # pending file is dropped at its last close, as an unlinked open file is.
    with sftp_client(server.sftp_port) as client, sftp_client(server.sftp_port) as other:
        client.putfo(io.BytesIO(b"x" * 1000), "/f.bin")
        for _ in range(3):
            handle = client.open("/f.bin", "r+")     # no O_TRUNC: the upload resumes the file
            other.remove("/f.bin")
            handle.seek(0)
            handle.write(b"y" * 1000)
            handle.close()
        assert (home / "f.bin").stat().st_size == 1000
        # 1000 bytes are stored: 2500 more would pass the 3000-byte quota.
        handle = client.open("/g.bin", "w")
        with pytest.raises(OSError, match="quota"):
            handle.write(b"z" * 2500)
        handle.close()
        client.putfo(io.BytesIO(b"z" * 1500), "/g.bin")
    assert sum(p.stat().st_size for p in home.iterdir()) == 2500


def test_a_move_from_a_mount_on_the_home_backend_is_held_to_the_quota(server):
    with sftp_client(server.sftp_port) as client:
        client.putfo(io.BytesIO(b"b" * 5000), "/team/big.bin")
        with pytest.raises(OSError, match="quota"):
            client.rename("/team/big.bin", "/big.bin")
        with pytest.raises(OSError, match="quota"):
            client.posix_rename("/team/big.bin", "/big.bin")
    assert (server.data / "team" / "big.bin").stat().st_size == 5000
    assert not (server.data / "alice" / "big.bin").exists()


@pytest.mark.parametrize("path", ["/.gw-upload-0123456789abcdef", "/d/.gw-upload-x"])
def test_paths_with_the_reserved_temp_prefix_are_refused(server, path):
    with sftp_client(server.sftp_port) as client:
        client.mkdir("/d")
        for call in (lambda: client.putfo(io.BytesIO(b"x"), path, confirm=False),
                     lambda: client.mkdir(path), lambda: client.stat(path)):
            with pytest.raises(OSError, match="reserved"):
                call()
        client.putfo(io.BytesIO(b"a"), "/a.txt")
        with pytest.raises(OSError, match="reserved"):
            client.rename("/a.txt", path)
    assert not list((server.data / "alice").rglob(".gw-upload-*"))
