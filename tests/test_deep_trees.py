"""Trees deeper than Python's recursion limit, and the cap on how deep a user may build.

1,101 nested folders made DELETE and MOVE answer 500 (RecursionError) and
the start-up sweep fail. The gateway now walks trees with explicit stacks,
and `[server] max_depth` (256) caps the depth of what a user creates; a
deeper tree that already exists stays readable and deletable.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.server import Gateway
from gateway.storage.base import TEMP_PREFIX
from tests.conftest import RunningGateway, wait_for, write_config
from tests.sftp.helpers import copy_host_keys, sftp_client
from tests.webdav.conftest import DavClient

LEVELS = 1101


def nest(top: Path, levels: int = LEVELS) -> Path:
    """Make `levels` nested folders "d" under `top` and return the deepest.

    Not os.makedirs: it recurses, and fails past about 1,000 levels itself.
    """
    path = top
    path.mkdir()
    for _ in range(levels):
        path = path / "d"
        path.mkdir()
    return path


def remove_all(top: Path) -> None:
    """Delete a tree of any depth (shutil.rmtree recurses too); pytest's cleanup would choke."""
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if not os.path.lexists(path):
            continue
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            path.unlink()
        elif emptied:
            path.rmdir()
        else:
            stack.append((path, True))
            stack.extend((child, False) for child in path.iterdir())


def deep_url(top: str, levels: int = LEVELS) -> str:
    return top + "/d" * levels


@pytest.fixture
def start(tmp_path, host_key_dir) -> Iterator:
    """Factory: a gateway with WebDAV and SFTP, alice at home in local:/alice, a mount /other
    on a second local backend; `server` options go to [server]."""
    started: list[Gateway] = []

    def factory(**server) -> RunningGateway:
        copy_host_keys(host_key_dir, tmp_path / "state")
        path = write_config(tmp_path, backends={"other": {"type": "local", "root": "other"}},
                            extra={"server": server})
        gateway = Gateway(load_config(path))
        (tmp_path / "data" / "alice").mkdir(exist_ok=True)
        gateway.start()
        started.append(gateway)
        running = RunningGateway(gateway, path, tmp_path / "data",
                                 {f.name: f.address[1] for f in gateway.frontends})
        running.add_user("alice", mounts={"/other": ("other:/alice", ["*"])})
        return running

    yield factory
    for gateway in started:
        gateway.stop()
    for top in (tmp_path / "data", tmp_path / "other"):
        remove_all(top)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "data" / "alice"
    path.mkdir(parents=True)
    return path


def test_webdav_delete_of_1101_nested_folders_answers_204(start, home):
    nest(home / "top")
    dav = DavClient(start().webdav_port, "alice")
    reply = dav.request("DELETE", "/top")
    assert reply.status == 204, reply.body[:500]
    assert not (home / "top").exists()


def test_webdav_move_of_1101_nested_folders_answers_201(start, home):
    bottom = nest(home / "top")
    (bottom / "last.txt").write_bytes(b"at the bottom")
    dav = DavClient(start().webdav_port, "alice")
    reply = dav.request("MOVE", "/top", headers={"Destination": "/moved"})
    assert reply.status == 201, reply.body[:500]
    assert not (home / "top").exists()
    assert dav.get(deep_url("/moved") + "/last.txt").body == b"at the bottom"


def test_webdav_copy_of_1101_nested_folders_answers_201_within_a_raised_cap(start, home):
    bottom = nest(home / "top")
    (bottom / "last.txt").write_bytes(b"at the bottom")
    dav = DavClient(start(max_depth=2000).webdav_port, "alice")
    reply = dav.request("COPY", "/top", headers={"Destination": "/copy"})
    assert reply.status == 201, reply.body[:500]
    assert dav.get(deep_url("/copy") + "/last.txt").body == b"at the bottom"
    assert (bottom / "last.txt").exists()


def test_webdav_propfind_depth_1_at_the_bottom_of_1101_nested_folders_works(start, home):
    bottom = nest(home / "top")
    (bottom / "last.txt").write_bytes(b"at the bottom")
    dav = DavClient(start().webdav_port, "alice")
    reply = dav.propfind(deep_url("/top"), depth="1")
    assert reply.status == 207
    assert b"last.txt" in reply.body


def test_sftp_rename_of_1101_nested_folders_onto_another_backend_moves_them_all(start, home, tmp_path):
    bottom = nest(home / "top")
    (bottom / "last.txt").write_bytes(b"at the bottom")
    with sftp_client(start(max_depth=2000).sftp_port) as sftp:
        sftp.rename("/top", "/other/top")
        assert not (home / "top").exists()
        with sftp.open(deep_url("/other/top") + "/last.txt") as f:
            assert f.read() == b"at the bottom"


def test_sftp_rename_onto_another_backend_deeper_than_the_cap_is_refused_and_keeps_the_source(
        start, home):
    bottom = nest(home / "top", 300)
    (bottom / "last.txt").write_bytes(b"at the bottom")
    with sftp_client(start().sftp_port) as sftp:
        with pytest.raises(IOError, match="at most 256 are allowed"):
            sftp.rename("/top", "/other/top")
    assert (bottom / "last.txt").read_bytes() == b"at the bottom"


def test_sftp_client_removing_1101_nested_folders_one_by_one_succeeds(start, home):
    bottom = nest(home / "top")
    (bottom / "last.txt").write_bytes(b"at the bottom")
    with sftp_client(start().sftp_port) as sftp:
        # What a recursive rm does, without recursion in the test itself.
        path = "/top"
        while any(stat.S_ISDIR(a.st_mode) for a in sftp.listdir_attr(path)):
            path += "/d"
        sftp.remove(path + "/last.txt")
        while path != "/":
            sftp.rmdir(path)
            path = path.rsplit("/", 1)[0] or "/"
    assert list(home.iterdir()) == []


def test_startup_sweep_removes_a_temp_file_at_the_bottom_of_1101_nested_folders(start, home):
    bottom = nest(home / "top")
    leftover = bottom / f"{TEMP_PREFIX}crashed"
    leftover.write_bytes(b"an interrupted upload")
    (bottom / "kept.txt").write_bytes(b"user data")
    start()
    wait_for(lambda: not leftover.exists(), "the start-up sweep")
    assert (bottom / "kept.txt").read_bytes() == b"user data"


def test_creating_deeper_than_max_depth_is_refused_over_webdav_and_sftp(start, home):
    running = start()
    dav = DavClient(running.webdav_port, "alice")
    nest(home / "top", 254)
    (home / "x").mkdir()
    at_cap = deep_url("/top", 255)         # 256 names: the deepest allowed
    assert dav.request("MKCOL", at_cap).status == 201
    reply = dav.request("MKCOL", at_cap + "/d")
    assert reply.status == 400
    assert b"at most 256 are allowed" in reply.body
    assert dav.put(at_cap + "/file.txt", b"x").status == 400
    with sftp_client(running.sftp_port) as sftp:
        with pytest.raises(IOError, match="257 levels deep, and at most 256 are allowed"):
            sftp.mkdir(at_cap + "/d")
        with pytest.raises(IOError, match="at most 256 are allowed"):
            sftp.open(at_cap + "/file.txt", "wb").close()
        with pytest.raises(IOError, match="at most 256 are allowed"):
            sftp.rename("/x", at_cap + "/x")
    assert os.listdir(home / "top" / Path(*["d"] * 255)) == []


def test_a_folder_deeper_than_max_depth_from_disk_can_be_read_and_deleted(start, home):
    bottom = nest(home / "top", 300)
    (bottom / "last.txt").write_bytes(b"at the bottom")
    running = start()
    with sftp_client(running.sftp_port) as sftp:
        with sftp.open(deep_url("/top", 300) + "/last.txt") as f:
            assert f.read() == b"at the bottom"
        sftp.remove(deep_url("/top", 300) + "/last.txt")
    assert DavClient(running.webdav_port, "alice").request("DELETE", "/top").status == 204
    assert not (home / "top").exists()


def test_max_depth_below_one_is_a_config_error(tmp_path):
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match=r"\[server\] max_depth"):
        load_config(write_config(tmp_path, extra={"server": {"max_depth": 0}}))
    with pytest.raises(ConfigError, match=r"\[server\] max_hole_bytes"):
        load_config(write_config(tmp_path, extra={"server": {"max_hole_bytes": -1}}))
