"""Writes that leave a gap of zeros past the end of a file: small gaps are fine, huge ones are refused.

A byte written at 1 TiB makes a sparse file on disk, but every copy of it
writes the zeros, and on S3 the upload sends them. `[server] max_hole_bytes`
(64 MiB by default) caps the gap one write or truncate may leave.
"""
from __future__ import annotations

from collections.abc import Iterator

import paramiko
import pytest

from gateway.config import load_config
from gateway.server import Gateway
from tests.conftest import RunningGateway, write_config
from tests.sftp.helpers import copy_host_keys, sftp_client, start_sftp_gateway
from tests.webdav.conftest import DavClient

MiB = 1024 * 1024
TiB = 1024 ** 4
OLD = b"hello, old version"


@pytest.fixture(params=["local", "s3"])
def gateway(request, tmp_path, host_key_dir, s3_server) -> Iterator[RunningGateway]:
    """SFTP with alice at home on local disk or on S3 (moto over HTTP).

    `s3_server` is asked for here, not only for S3, so the session's server
    starts before the leak check takes its first count.
    """
    backends = None
    if request.param == "s3":
        backends = {"s3": request.getfixturevalue("s3_backend_table")}
    running = start_sftp_gateway(tmp_path, host_key_dir, backends=backends)
    running.add_user("alice", home=f"{request.param}:/alice")
    yield running
    running.gateway.stop()


@pytest.fixture
def sftp(gateway) -> Iterator[paramiko.SFTPClient]:
    with sftp_client(gateway.sftp_port) as client:
        with client.open("/file.bin", "wb") as f:
            f.write(OLD)
        yield client


def read_back(sftp: paramiko.SFTPClient, path: str) -> bytes:
    with sftp.open(path, "rb") as f:
        return f.read()


def test_writing_one_byte_at_one_tib_is_refused_and_the_file_is_unchanged(sftp):
    with sftp.open("/file.bin", "r+", bufsize=0) as f:
        f.seek(TiB)
        with pytest.raises(IOError, match="zeros past the end"):
            f.write(b"x")
    assert sftp.stat("/file.bin").st_size == len(OLD)
    assert read_back(sftp, "/file.bin") == OLD


def test_writing_one_byte_at_one_tib_into_a_new_file_is_refused(sftp):
    with sftp.open("/new.bin", "wb", bufsize=0) as f:
        f.seek(TiB)
        with pytest.raises(IOError, match="zeros past the end"):
            f.write(b"x")
    # The refused write poisoned the upload: its close failed and nothing was created.
    with pytest.raises(FileNotFoundError):
        sftp.stat("/new.bin")


def test_truncating_up_to_one_tib_is_refused_and_the_file_is_unchanged(sftp):
    with pytest.raises(IOError, match="zeros past the end"):
        sftp.truncate("/file.bin", TiB)
    assert read_back(sftp, "/file.bin") == OLD


def test_writing_32_mib_past_the_end_is_within_the_default_limit(sftp):
    offset = len(OLD) + 32 * MiB
    with sftp.open("/file.bin", "r+", bufsize=0) as f:
        f.seek(offset)
        f.write(b"tail")
    assert sftp.stat("/file.bin").st_size == offset + 4
    with sftp.open("/file.bin", "rb") as f:
        assert f.read(len(OLD)) == OLD
        f.seek(offset - 3)
        assert f.read(7) == b"\0\0\0tail"


def test_a_gap_over_the_configured_limit_is_refused_and_one_at_it_accepted(tmp_path, host_key_dir):
    copy_host_keys(host_key_dir, tmp_path / "state")
    gateway = Gateway(load_config(write_config(tmp_path, webdav=False,
                                               extra={"server": {"max_hole_bytes": 1000}})))
    gateway.start()
    try:
        running = RunningGateway(gateway, tmp_path / "gateway.toml", tmp_path / "data",
                                 {"sftp": gateway.frontends[0].address[1]})
        running.add_user("alice")
        with sftp_client(running.sftp_port) as sftp:
            with sftp.open("/g.bin", "wb", bufsize=0) as f:
                f.write(b"ab")
                f.seek(2 + 1001)
                with pytest.raises(IOError, match="at most 1000 allowed"):
                    f.write(b"x")
            with pytest.raises(FileNotFoundError):
                sftp.stat("/g.bin")
            with sftp.open("/g.bin", "wb", bufsize=0) as f:
                f.write(b"ab")
                f.seek(2 + 1000)
                f.write(b"y")
            assert read_back(sftp, "/g.bin") == b"ab" + b"\0" * 1000 + b"y"
    finally:
        gateway.stop()


def test_webdav_put_with_a_content_range_is_refused(make_gateway):
    # wsgidav refuses partial PUTs, so WebDAV has no way to leave a gap.
    running = make_gateway(webdav=True)
    running.add_user("alice")
    dav = DavClient(running.webdav_port, "alice")
    assert dav.put("/file.bin", OLD).status == 201
    reply = dav.put("/file.bin", b"x", **{"Content-Range": f"bytes {TiB}-{TiB}/*"})
    assert reply.status == 400
    assert dav.get("/file.bin").body == OLD
