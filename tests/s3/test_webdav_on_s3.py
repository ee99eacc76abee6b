"""WebDAV on a home kept in S3 (moto over HTTP): litmus, exact statuses, and PUTs cut short."""
from __future__ import annotations

import hashlib
import socket
import struct

import pytest

from gateway.storage.s3 import MiB
from tests.conftest import RunningGateway, wait_for
from tests.s3_server import multipart_uploads
from tests.webdav.conftest import DavClient, read_until_closed
from tests.webdav.test_litmus import assert_litmus_passes, needs_litmus

PART = 5 * MiB


@pytest.fixture
def s3dav(make_gateway, s3_backend_table) -> RunningGateway:
    """WebDAV with alice's home on S3, in parts of 5 MiB so a few MiB make a multipart upload."""
    running = make_gateway(webdav=True, backends={"s3": {**s3_backend_table, "part_size": PART}})
    running.add_user("alice", home="s3:/alice")
    return running


@pytest.fixture
def alice(s3dav) -> DavClient:
    return DavClient(s3dav.webdav_port, "alice")


@pytest.fixture
def s3(s3_server):
    client = s3_server.client()
    yield client
    client.close()


def pattern(size: int, seed: int = 0) -> bytes:
    block = bytes((i * 7 + seed) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


@needs_litmus
@pytest.mark.client
def test_litmus_passes_every_suite_on_an_s3_home(s3dav, tmp_path):
    assert_litmus_passes(s3dav.webdav_port, "alice", tmp_path)


def test_put_answers_201_for_a_new_file_and_204_for_an_overwrite(alice, s3, s3_server, s3_backend_table):
    assert alice.put("/a.txt", b"first").status == 201
    assert alice.put("/a.txt", b"second").status == 204
    key = f"{s3_backend_table['prefix']}alice/a.txt"
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"second"
    assert alice.put("/missing/a.txt", b"x").status == 409


def test_get_and_range_requests_of_a_multipart_object(alice):
    data = pattern(3 * PART + 12345)
    assert alice.put("/big.bin", data).status == 201
    whole = alice.get("/big.bin")
    assert whole.status == 200
    assert hashlib.sha256(whole.body).digest() == hashlib.sha256(data).digest()
    # A range across the first part boundary, and the tail.
    middle = alice.get("/big.bin", Range=f"bytes={PART - 10}-{PART + 9}")
    assert middle.status == 206
    assert middle.body == data[PART - 10:PART + 10]
    assert middle.header("Content-Range") == f"bytes {PART - 10}-{PART + 9}/{len(data)}"
    tail = alice.get("/big.bin", Range="bytes=-100")
    assert tail.status == 206
    assert tail.body == data[-100:]
    assert alice.get("/nothing.bin").status == 404


def test_mkcol_answers_201_then_405_and_409_for_a_missing_parent(alice):
    assert alice.request("MKCOL", "/folder").status == 201
    assert alice.request("MKCOL", "/folder").status == 405
    assert alice.request("MKCOL", "/no/such/folder").status == 409
    listing = alice.propfind("/", depth="1")
    assert listing.status == 207
    assert b"/folder/" in listing.body


def test_copy_and_move_of_files_answer_exact_statuses(alice):
    assert alice.put("/src.txt", b"source").status == 201
    assert alice.put("/other.txt", b"other").status == 201
    assert alice.request("COPY", "/src.txt", headers={"Destination": "/copy.txt"}).status == 201
    assert alice.request("COPY", "/src.txt", headers={"Destination": "/other.txt"}).status == 204
    assert alice.request("COPY", "/src.txt",
                         headers={"Destination": "/other.txt", "Overwrite": "F"}).status == 412
    assert alice.request("COPY", "/src.txt", headers={"Destination": "/no/dir/x.txt"}).status == 409
    assert alice.get("/other.txt").body == b"source"
    assert alice.request("MOVE", "/copy.txt", headers={"Destination": "/moved.txt"}).status == 201
    assert alice.get("/copy.txt").status == 404
    assert alice.get("/moved.txt").body == b"source"
    assert alice.request("MOVE", "/moved.txt", headers={"Destination": "/other.txt"}).status == 204
    assert alice.get("/other.txt").body == b"source"
    assert alice.request("MOVE", "/gone.txt", headers={"Destination": "/x.txt"}).status == 404


def test_move_and_copy_of_a_folder_carry_every_object(alice):
    assert alice.request("MKCOL", "/tree").status == 201
    assert alice.request("MKCOL", "/tree/sub").status == 201
    assert alice.put("/tree/a.txt", b"a").status == 201
    assert alice.put("/tree/sub/b.txt", b"b").status == 201
    assert alice.request("COPY", "/tree", headers={"Destination": "/copied"}).status == 201
    assert alice.request("MOVE", "/tree", headers={"Destination": "/moved"}).status == 201
    assert alice.request("PROPFIND", "/tree", headers={"Depth": "0"}).status == 404
    for root in ("/copied", "/moved"):
        assert alice.get(f"{root}/a.txt").body == b"a"
        assert alice.get(f"{root}/sub/b.txt").body == b"b"


def test_delete_answers_204_and_404_and_removes_folders_with_their_contents(alice):
    assert alice.put("/d.txt", b"x").status == 201
    assert alice.request("DELETE", "/d.txt").status == 204
    assert alice.request("DELETE", "/d.txt").status == 404
    assert alice.request("MKCOL", "/full").status == 201
    assert alice.put("/full/f.txt", b"x").status == 201
    assert alice.request("DELETE", "/full").status == 204
    assert alice.request("PROPFIND", "/full", headers={"Depth": "0"}).status == 404


def _send_partial_put(port: int, auth: str, path: str, announced: int, sent: bytes, *, reset: bool,
                      before_close=lambda: None) -> bytes:
    """Send a PUT whose body stops short of Content-Length; close cleanly or with a reset."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                f"Content-Length: {announced}\r\n\r\n").encode()
        sock.sendall(head + sent)
        before_close()
        if reset:
            # SO_LINGER 0: close() sends RST, the way a killed client disappears.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("reset", [False, True], ids=["clean-close", "reset"])
def test_a_put_cut_short_keeps_the_old_object_and_leaves_no_multipart_upload(
        alice, s3dav, s3, s3_server, s3_backend_table, reset):
    assert alice.put("/keep.bin", b"previous version").status == 201
    # The client goes only once the multipart upload exists on the S3 side.
    reply = _send_partial_put(s3dav.webdav_port, alice.auth, "/keep.bin", 8 * PART,
                              pattern(3 * PART + 1000), reset=reset,
                              before_close=lambda: wait_for(
                                  lambda: multipart_uploads(s3, s3_server, s3_backend_table),
                                  "the multipart upload to start"))
    assert not reply.startswith((b"HTTP/1.1 201", b"HTTP/1.1 204")), reply
    wait_for(lambda: not multipart_uploads(s3, s3_server, s3_backend_table),
             "the cut-short upload to be aborted")
    assert alice.get("/keep.bin").body == b"previous version"
    key = f"{s3_backend_table['prefix']}alice/keep.bin"
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"previous version"


def test_a_put_cut_short_of_a_new_file_leaves_no_object(alice, s3dav, s3, s3_server, s3_backend_table):
    _send_partial_put(s3dav.webdav_port, alice.auth, "/new.bin", 4 * PART, pattern(2 * PART), reset=False,
                      before_close=lambda: wait_for(
                          lambda: multipart_uploads(s3, s3_server, s3_backend_table),
                          "the multipart upload to start"))
    wait_for(lambda: not multipart_uploads(s3, s3_server, s3_backend_table),
             "the cut-short upload to be aborted")
    assert alice.get("/new.bin").status == 404
    listing = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{s3_backend_table['prefix']}alice/")
    assert [o["Key"] for o in listing.get("Contents", [])] == [f"{s3_backend_table['prefix']}alice/"]
