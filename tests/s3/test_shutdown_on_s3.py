"""Stopping the gateway with uploads in flight on S3: old versions stay, no multipart upload is left."""
from __future__ import annotations

import socket
import time

import pytest

from gateway.storage.s3 import MiB
from tests.sftp.helpers import copy_host_keys, sftp_client
from tests.webdav.conftest import DavClient

PART = 5 * MiB


def test_stop_with_an_sftp_and_a_webdav_upload_in_flight_aborts_both_multipart_uploads(
        make_gateway, tmp_path, host_key_dir, s3_server, s3_backend_table):
    copy_host_keys(host_key_dir, tmp_path / "state")
    running = make_gateway(webdav=True, sftp=True,
                           backends={"s3": {**s3_backend_table, "part_size": PART}})
    running.add_user("alice", home="s3:/alice")
    dav = DavClient(running.webdav_port, "alice")
    assert dav.put("/via-sftp.bin", b"old sftp version").status == 201
    assert dav.put("/via-webdav.bin", b"old webdav version").status == 201
    s3 = s3_server.client()

    def uploads() -> list[str]:
        page = s3.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=s3_backend_table["prefix"])
        return sorted(u["Key"].rsplit("/", 1)[1] for u in page.get("Uploads", []))

    sock = socket.create_connection(("127.0.0.1", running.webdav_port), timeout=60)
    try:
        with sftp_client(running.sftp_port) as sftp:
            handle = sftp.open("/via-sftp.bin", "wb")
            handle.write(b"s" * (2 * PART + 1))
            handle.flush()
            sock.sendall((f"PUT /via-webdav.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {dav.auth}\r\n"
                          f"Content-Length: {8 * PART}\r\n\r\n").encode() + b"w" * (2 * PART + 1))
            deadline = time.monotonic() + 60
            while uploads() != ["via-sftp.bin", "via-webdav.bin"]:
                if time.monotonic() > deadline:
                    pytest.fail(f"both uploads never started: {uploads()}")
                time.sleep(0.05)
            running.gateway.stop()
        assert uploads() == []
        for name, old in (("via-sftp.bin", b"old sftp version"), ("via-webdav.bin", b"old webdav version")):
            key = f"{s3_backend_table['prefix']}alice/{name}"
            assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == old
    finally:
        sock.close()
        s3.close()
