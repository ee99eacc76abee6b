"""A local home with a mount on S3: files and folders moved between them over SFTP and WebDAV."""
from __future__ import annotations

import os

import pytest

from gateway.storage.s3 import MiB
from tests.conftest import RunningGateway
from tests.sftp.helpers import copy_host_keys, sftp_client
from tests.webdav.conftest import DavClient

BIG = 6 * MiB + 3      # more than one 5 MiB part on the S3 side


@pytest.fixture
def both(make_gateway, tmp_path, host_key_dir, s3_backend_table) -> RunningGateway:
    """WebDAV and SFTP; alice's home is local, /archive is her folder on S3."""
    copy_host_keys(host_key_dir, tmp_path / "state")
    running = make_gateway(webdav=True, sftp=True,
                           backends={"s3": {**s3_backend_table, "part_size": 5 * MiB}})
    running.add_user("alice", home="local:/alice", mounts={"/archive": ("s3:/alice-archive", ["*"])})
    running.fs("alice")     # the first login creates the home and the mount's folder
    return running


@pytest.fixture
def bucket(s3_server, s3_backend_table):
    """Read alice's archive straight from S3: bucket("a/b.txt") -> bytes or None; bucket.keys()."""
    client = s3_server.client()
    prefix = f"{s3_backend_table['prefix']}alice-archive/"

    class Bucket:
        def __call__(self, name: str) -> bytes | None:
            try:
                return client.get_object(Bucket=s3_server.bucket, Key=prefix + name)["Body"].read()
            except client.exceptions.NoSuchKey:
                return None

        def keys(self, under: str) -> list[str]:
            page = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix + under)
            return sorted(o["Key"][len(prefix):] for o in page.get("Contents", []))

    yield Bucket()
    client.close()


def _local_tree(root, big: bytes) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "deep.txt").write_bytes(b"deep")
    (root / "big.bin").write_bytes(big)
    (root / "top.txt").write_bytes(b"top")


def _assert_tree_on_s3(bucket, name: str, big: bytes) -> None:
    assert bucket(f"{name}/sub/deep.txt") == b"deep"
    assert bucket(f"{name}/top.txt") == b"top"
    assert bucket(f"{name}/big.bin") == big


def _assert_tree_local(root, big: bytes) -> None:
    assert (root / "sub" / "deep.txt").read_bytes() == b"deep"
    assert (root / "top.txt").read_bytes() == b"top"
    assert (root / "big.bin").read_bytes() == big


def test_sftp_rename_moves_a_file_and_a_folder_to_the_s3_mount_and_back(both, bucket):
    home = both.data / "alice"
    big = os.urandom(BIG)
    (home / "report.bin").write_bytes(big)
    os.utime(home / "report.bin", (1_600_000_000, 1_600_000_000))
    _local_tree(home / "project", big)
    with sftp_client(both.sftp_port) as sftp:
        sftp.rename("/report.bin", "/archive/report.bin")
        sftp.rename("/project", "/archive/project")
        assert not (home / "report.bin").exists() and not (home / "project").exists()
        assert bucket("report.bin") == big
        _assert_tree_on_s3(bucket, "project", big)
        assert sorted(sftp.listdir("/archive")) == ["project", "report.bin"]
        # The time the file had on disk came along.
        assert sftp.stat("/archive/report.bin").st_mtime == 1_600_000_000
        sftp.rename("/archive/report.bin", "/report-back.bin")
        sftp.rename("/archive/project", "/project-back")
    assert (home / "report-back.bin").read_bytes() == big
    assert int((home / "report-back.bin").stat().st_mtime) == 1_600_000_000
    _assert_tree_local(home / "project-back", big)
    assert bucket.keys("report.bin") == [] and bucket.keys("project") == []


def test_webdav_move_moves_a_file_and_a_folder_to_the_s3_mount_and_back(both, bucket):
    dav = DavClient(both.webdav_port, "alice")
    home = both.data / "alice"
    big = os.urandom(BIG)
    (home / "report.bin").write_bytes(big)
    _local_tree(home / "project", big)
    assert dav.request("MOVE", "/report.bin", headers={"Destination": "/archive/report.bin"}).status == 201
    assert dav.request("MOVE", "/project", headers={"Destination": "/archive/project"}).status == 201
    assert not (home / "report.bin").exists() and not (home / "project").exists()
    assert bucket("report.bin") == big
    _assert_tree_on_s3(bucket, "project", big)
    assert dav.get("/archive/project/sub/deep.txt").body == b"deep"
    assert dav.request("MOVE", "/archive/report.bin", headers={"Destination": "/report-back.bin"}).status == 201
    assert dav.request("MOVE", "/archive/project", headers={"Destination": "/project-back"}).status == 201
    assert (home / "report-back.bin").read_bytes() == big
    _assert_tree_local(home / "project-back", big)
    assert bucket.keys("report.bin") == [] and bucket.keys("project") == []
    assert dav.request("PROPFIND", "/archive/project", headers={"Depth": "0"}).status == 404


def test_a_move_onto_an_existing_file_across_backends_follows_overwrite(both, bucket):
    dav = DavClient(both.webdav_port, "alice")
    home = both.data / "alice"
    (home / "new.txt").write_bytes(b"new")
    assert dav.put("/archive/old.txt", b"old").status == 201
    assert dav.request("MOVE", "/new.txt", headers={"Destination": "/archive/old.txt",
                                                   "Overwrite": "F"}).status == 412
    assert bucket("old.txt") == b"old" and (home / "new.txt").exists()
    assert dav.request("MOVE", "/new.txt", headers={"Destination": "/archive/old.txt"}).status == 204
    assert bucket("old.txt") == b"new" and not (home / "new.txt").exists()
    (home / "again.txt").write_bytes(b"again")
    with sftp_client(both.sftp_port) as sftp:
        with pytest.raises(OSError, match="already exists"):
            sftp.rename("/again.txt", "/archive/old.txt")
        sftp.posix_rename("/again.txt", "/archive/old.txt")
    assert bucket("old.txt") == b"again" and not (home / "again.txt").exists()
