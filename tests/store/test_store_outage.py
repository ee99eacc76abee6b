"""PostgreSQL stopping and restarting under a running gateway.

A request that needs the store while it is down answers 503 (never 500), one
that finds it back works without a gateway restart, and an operation that
storage already carried out is reported done with the usage it changed kept.
"""
from __future__ import annotations

import pytest

from gateway.store import Usage
from tests.conftest import RunningGateway
from tests.sftp.helpers import copy_host_keys, sftp_client
from tests.webdav.conftest import DavClient

LOCK_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:">'
             b"<D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype>"
             b"<D:owner>tester</D:owner></D:lockinfo>")


@pytest.fixture
def pg_dav(make_gateway, postgres) -> RunningGateway:
    """WebDAV on a PostgreSQL store; alice (quota counted) has /shared mounted from outside her home."""
    running = make_gateway(webdav=True, extra={"store": {"url": postgres.create_database()}})
    running.add_user("alice", quota_bytes=10**9,
                     mounts={"/shared": ("local:/shared", ["*"])})
    return running


@pytest.fixture
def restarts(postgres):
    """The session's PostgreSQL; started again after the test whatever happened."""
    yield postgres
    try:
        postgres.start()
    except Exception:
        pass   # it was running


def lock(alice: DavClient, path: str) -> int:
    return alice.request("LOCK", path, LOCK_BODY, {"Content-Type": "application/xml"}).status


def test_webdav_answers_503_while_postgresql_is_down_and_serves_again_once_it_is_back(pg_dav, restarts):
    alice = DavClient(pg_dav.webdav_port, "alice")
    assert alice.put("/a.txt", b"first").status == 201
    restarts.stop()
    down = {"PROPFIND": alice.propfind("/", depth="1").status,
            "PUT": alice.put("/a.txt", b"second").status,
            "DELETE": alice.request("DELETE", "/a.txt").status,
            "LOCK": lock(alice, "/a.txt"),
            "PROPPATCH": alice.proppatch("/a.txt", b'<?xml version="1.0"?><D:propertyupdate '
                                         b'xmlns:D="DAV:" xmlns:Z="urn:z"><D:set><D:prop><Z:k>v</Z:k>'
                                         b"</D:prop></D:set></D:propertyupdate>").status}
    assert down == {method: 503 for method in down}
    restarts.start()
    assert alice.put("/a.txt", b"third").status == 204
    assert lock(alice, "/b.txt") == 201
    assert alice.request("DELETE", "/a.txt").status == 204


class _StoreStopsAfterRename:
    """A backend whose rename is followed by PostgreSQL stopping: the store is lost mid-MOVE."""

    def __init__(self, inner, postgres) -> None:
        self._inner = inner
        self._postgres = postgres

    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        self._inner.rename(src, dst, overwrite=overwrite)
        self._postgres.stop()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_a_move_that_happened_before_the_store_went_down_is_reported_done_and_its_usage_kept(
        pg_dav, restarts):
    alice = DavClient(pg_dav.webdav_port, "alice")
    assert alice.put("/a.txt", b"x" * 1000).status == 201
    (pg_dav.data / "shared").mkdir(exist_ok=True)
    assert pg_dav.gateway.store.get_usage("alice") == Usage(1000, 1)
    backends = pg_dav.gateway.backends
    backends["local"] = _StoreStopsAfterRename(backends["local"], restarts)

    # Out of the home into the mount: the home's usage goes down by the file.
    assert alice.request("MOVE", "/a.txt", None, {"Destination": "/shared/a.txt"}).status == 201
    assert (pg_dav.data / "shared" / "a.txt").read_bytes() == b"x" * 1000

    restarts.start()
    backends["local"] = backends["local"]._inner
    assert alice.put("/b.txt", b"y" * 10).status == 201
    assert pg_dav.gateway.store.get_usage("alice") == Usage(10, 1)


def test_sftp_answers_failure_with_a_message_while_postgresql_is_down_and_keeps_the_session(
        make_gateway, postgres, restarts, tmp_path, host_key_dir):
    copy_host_keys(host_key_dir, tmp_path / "state")
    running = make_gateway(sftp=True, extra={"store": {"url": postgres.create_database()}})
    running.add_user("alice", quota_bytes=10**9)
    with sftp_client(running.sftp_port) as sftp:
        with sftp.open("/a.txt", "wb") as handle:
            handle.write(b"first")
        restarts.stop()
        # A quota needs the store's count: the upload is refused with the reason.
        with pytest.raises(IOError, match="quota usage"):
            with sftp.open("/b.txt", "wb") as handle:
                handle.write(b"second")
        assert sftp.listdir("/") == ["a.txt"]
        restarts.start()
        with sftp.open("/b.txt", "wb") as handle:
            handle.write(b"second")
        assert sorted(sftp.listdir("/")) == ["a.txt", "b.txt"]
