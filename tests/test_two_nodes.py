"""Two `gateway serve` processes on one PostgreSQL and one S3 bucket act as one server.

WebDAV locks and dead properties, quota usage and uploads in flight live in
the store: what one node does, the other sees; and when a node dies with
-9 mid-upload, the other aborts its multipart upload.
"""
from __future__ import annotations

import http.client
import re
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from gateway.permissions import parse_perms
from gateway.store import open_store
from gateway.users import Location, User, hash_password
from tests.conftest import PASSWORD, wait_for
from tests.s3_server import multipart_uploads
from tests.webdav.conftest import LOCK_BODY, DavClient, proppatch_body

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
NODE_TIMEOUT = 2      # seconds: low, so a dead node's uploads are swept soon
SWEEP_INTERVAL = 1


@dataclass
class Node:
    proc: subprocess.Popen
    ports: dict[str, int]

    def dav(self, user: str) -> DavClient:
        return DavClient(self.ports["webdav"], user)


def create_user(tmp_path: Path, store_url: str, name: str, *, home: str, quota_bytes: int = 0) -> None:
    """Make `name` known to both nodes: users live in the store they share."""
    user = User(name, hash_password(PASSWORD), (), Location.parse(home), (),
                {"/": parse_perms(["*"])}, quota_bytes, 0, False)
    store = open_store(store_url, tmp_path)
    try:
        store.import_users([user])
    finally:
        store.close()


def write_node_config(tmp_path: Path, index: int, store_url: str, s3_table: dict) -> Path:
    path = tmp_path / f"node{index}.toml"
    path.write_text(tomli_w.dumps({
        "server": {"state_dir": f"state{index}", "log_level": "info"},
        "store": {"url": store_url, "node_timeout": NODE_TIMEOUT, "sweep_interval": SWEEP_INTERVAL},
        "webdav": {"enabled": True, "listen": "127.0.0.1:0"},
        "sftp": {"enabled": False, "listen": "127.0.0.1:0"},
        "admin": {"enabled": False},
        # The smallest part S3 allows: a multipart upload starts after 5 MiB.
        "backends": {"s3": {**s3_table, "part_size": 5 * MiB}},
    }))
    return path


def start_node(config: Path) -> Node:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ports: dict[str, int] = {}
    for line in proc.stdout:
        if " listening on " in line:
            name, _, address = line.strip().partition(" listening on ")
            ports[name] = int(address.rsplit(":", 1)[1])
        if "gateway ready" in line:
            return Node(proc, ports)
    proc.wait()
    pytest.fail(f"node {config.name} exited with {proc.returncode} before it was ready")


def stop_node(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
    node.proc.stdout.close()


@pytest.fixture
def cluster(tmp_path, postgres, s3_backend_table):
    """Two nodes on one fresh PostgreSQL database and one S3 prefix; users alice (quota 1000 bytes)."""
    store_url = postgres.create_database()
    create_user(tmp_path, store_url, "alice", home="s3:/alice", quota_bytes=1000)
    create_user(tmp_path, store_url, "bob", home="s3:/bob")
    nodes = []
    try:
        for index in (1, 2):
            nodes.append(start_node(write_node_config(tmp_path, index, store_url, s3_backend_table)))
        yield nodes[0], nodes[1], store_url
    finally:
        for node in nodes:
            stop_node(node)


def test_a_lock_taken_on_one_node_holds_on_the_other_and_unlocks_on_either(cluster):
    one, two, _ = cluster
    assert one.dav("alice").put("/doc.txt", b"v1").status == 201
    lock = one.dav("alice").request("LOCK", "/doc.txt", LOCK_BODY, {"Timeout": "Second-600"})
    assert lock.status == 200
    token = lock.header("Lock-Token")
    refused = two.dav("alice").put("/doc.txt", b"v2")
    assert refused.status == 423
    # The conflict names the client's URL, not the storage location.
    assert b"<D:href>/doc.txt</D:href>" in refused.body or b"/doc.txt</" in refused.body
    assert two.dav("alice").put("/doc.txt", b"v2", If=f"({token})").status == 204
    assert two.dav("alice").request("UNLOCK", "/doc.txt", headers={"Lock-Token": token}).status == 204
    assert one.dav("alice").put("/doc.txt", b"v3").status == 204
    # And the other way round: taken on node 2, released on node 1.
    lock = two.dav("alice").request("LOCK", "/doc.txt", LOCK_BODY, {"Timeout": "Second-600"})
    assert lock.status == 200
    assert one.dav("alice").put("/doc.txt", b"v4").status == 423
    assert one.dav("alice").request("UNLOCK", "/doc.txt",
                                    headers={"Lock-Token": lock.header("Lock-Token")}).status == 204
    assert two.dav("alice").put("/doc.txt", b"v4").status == 204


def test_dead_properties_set_on_one_node_are_seen_on_the_other(cluster):
    one, two, _ = cluster
    assert one.dav("bob").put("/paper.txt", b"text").status == 201
    assert one.dav("bob").proppatch("/paper.txt", proppatch_body("author", "urn:test:", "Ada")).status == 207
    body = two.dav("bob").propfind("/paper.txt", "0").body
    assert re.search(rb"<[^>]*author[^>]*>Ada<", body), body
    # A move on node 2 carries them; node 1 sees them at the new name.
    assert two.dav("bob").request("MOVE", "/paper.txt", headers={"Destination": "/final.txt"}).status == 201
    body = one.dav("bob").propfind("/final.txt", "0").body
    assert re.search(rb"<[^>]*author[^>]*>Ada<", body), body


def test_uploads_split_over_both_nodes_hit_the_quota_together(cluster):
    one, two, store_url = cluster
    # Each node counts alice's home before the other's upload lands.
    assert two.dav("alice").put("/a.bin", b"a" * 400).status == 201
    assert one.dav("alice").put("/b.bin", b"b" * 400).status == 201
    # 800 of 1000 bytes are used: node 2 must know of node 1's 400.
    assert two.dav("alice").put("/c.bin", b"c" * 400).status == 507
    assert one.dav("alice").put("/c.bin", b"c" * 150).status == 201
    assert two.dav("alice").request("DELETE", "/a.bin").status == 204
    assert one.dav("alice").put("/d.bin", b"d" * 400).status == 201
    store = open_store(store_url, Path("."))
    try:
        usage = store.get_usage("alice")
    finally:
        store.close()
    assert (usage.bytes, usage.files) == (950, 3)


def test_a_node_killed_mid_upload_leaves_the_old_version_and_the_other_aborts_its_upload(
        cluster, s3_server, s3_backend_table):
    one, two, store_url = cluster
    assert one.dav("bob").put("/big.bin", b"old version").status == 201
    # A slow PUT on node 1: 12 MiB announced, 7 MiB sent (one 5 MiB part is out).
    conn = http.client.HTTPConnection("127.0.0.1", one.ports["webdav"], timeout=60)
    conn.putrequest("PUT", "/big.bin")
    conn.putheader("Authorization", one.dav("bob").auth)
    conn.putheader("Content-Length", str(12 * MiB))
    conn.endheaders()
    chunk = secrets.token_bytes(MiB)
    for _ in range(7):
        conn.send(chunk)
    store = open_store(store_url, Path("."))
    s3 = s3_server.client()
    try:
        wait_for(lambda: any(u.upload_id for u in store.list_uploads()), "the multipart upload to be recorded")
        [recorded] = store.list_uploads()
        assert recorded.backend == "s3" and recorded.path == "/bob/big.bin"
        assert multipart_uploads(s3, s3_server, s3_backend_table) == [s3_backend_table["prefix"] + "bob/big.bin"]
        one.proc.send_signal(signal.SIGKILL)
        one.proc.wait()
        conn.close()
        assert two.dav("bob").get("/big.bin").body == b"old version"
        # Within node_timeout plus a sweep; the limit only stops a hung test.
        wait_for(lambda: multipart_uploads(s3, s3_server, s3_backend_table) == [],
                 "node 2 to abort the dead node's multipart upload")
        wait_for(lambda: store.list_uploads() == [], "the upload's record to be dropped")
    finally:
        store.close()
        s3.close()
    assert two.dav("bob").get("/big.bin").body == b"old version"
    assert two.dav("bob").put("/big.bin", b"new version").status == 204
