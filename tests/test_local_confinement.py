"""LocalBackend confinement and upload safety as a user reaches them through UserFS."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.errors import InvalidPath, NotFound, PermissionDenied
from gateway.storage.base import TEMP_PREFIX
from gateway.storage.local import LocalBackend, LocalConfig
from gateway.users import Location, User
from gateway.vfs import UserFS


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "root"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / "bob" / "secret.txt").write_text("bob's secret")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    backend = LocalBackend(LocalConfig(str(root)))
    fs = UserFS(User("alice", home=Location("local", "/alice")), {"local": backend})
    yield fs, root, outside, backend
    backend.close()


def plant(root: Path, name: str, target: Path) -> None:
    os.symlink(target, root / "alice" / name)


@pytest.mark.parametrize("target", ["outside-dir", "outside-file", "other-home", "other-file"])
def test_planted_symlink_is_neither_readable_nor_writable(env, target):
    fs, root, outside, _ = env
    targets = {"outside-dir": outside, "outside-file": outside / "passwd",
               "other-home": root / "bob", "other-file": root / "bob" / "secret.txt"}
    plant(root, "link", targets[target])
    assert "link" not in [e.name for e in fs.list_dir("/")]
    with pytest.raises(PermissionDenied):
        fs.stat("/link")
    with pytest.raises(PermissionDenied):
        fs.open_read("/link").read()
    with pytest.raises(PermissionDenied):
        fs.open_read("/link/passwd" if target == "outside-dir" else "/link/secret.txt")
    with pytest.raises(PermissionDenied):
        list(fs.list_dir("/link"))
    with pytest.raises(PermissionDenied):
        with fs.open_write("/link/new.txt") as up:
            up.write(b"x")
    with pytest.raises(PermissionDenied):
        fs.open_write("/link")
    with pytest.raises(PermissionDenied):
        fs.set_mtime("/link", 0)
    with pytest.raises(PermissionDenied):
        fs.rename("/link", "/renamed")
    assert (outside / "passwd").read_text() == "root:x:0:0"
    assert (root / "bob" / "secret.txt").read_text() == "bob's secret"
    assert not (outside / "new.txt").exists() and not (root / "bob" / "new.txt").exists()


def test_symlinked_home_parent_is_not_followed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    (outside / "eve").mkdir(parents=True)
    (outside / "eve" / "f").write_text("outside")
    os.symlink(outside, root / "homes")
    backend = LocalBackend(LocalConfig(str(root)))
    fs = UserFS(User("eve", home=Location("local", "/homes/eve")), {"local": backend})
    with pytest.raises(PermissionDenied):
        fs.open_read("/f")
    backend.close()


def test_fifo_is_refused_without_hanging(env):
    fs, root, _, _ = env
    os.mkfifo(root / "alice" / "pipe")
    assert "pipe" not in [e.name for e in fs.list_dir("/")]
    with pytest.raises(PermissionDenied):
        fs.open_read("/pipe")


def test_abort_keeps_the_previous_version_and_leaves_no_temp(env):
    fs, root, _, _ = env
    (root / "alice" / "doc.txt").write_bytes(b"version 1")
    upload = fs.open_write("/doc.txt")
    upload.write(b"version 2, half written")
    assert (root / "alice" / "doc.txt").read_bytes() == b"version 1"
    assert [e.name for e in fs.list_dir("/")] == ["doc.txt"]  # temp file hidden
    upload.abort()
    assert (root / "alice" / "doc.txt").read_bytes() == b"version 1"
    assert os.listdir(root / "alice") == ["doc.txt"]


def test_commit_replaces_atomically(env):
    fs, root, _, _ = env
    (root / "alice" / "doc.txt").write_bytes(b"version 1")
    before = os.stat(root / "alice" / "doc.txt").st_ino
    with fs.open_write("/doc.txt") as up:
        up.write(b"version 2")
    assert (root / "alice" / "doc.txt").read_bytes() == b"version 2"
    assert os.stat(root / "alice" / "doc.txt").st_ino != before  # a new file, renamed in
    assert os.listdir(root / "alice") == ["doc.txt"]


def test_an_upload_dropped_without_commit_leaves_nothing(env):
    fs, root, _, _ = env
    upload = fs.open_write("/lost.txt")
    upload.write(b"partial")
    del upload
    import gc
    gc.collect()
    assert os.listdir(root / "alice") == []


def test_sweep_removes_stale_temp_files(env):
    _, root, _, backend = env
    (root / "alice" / "deep").mkdir()
    (root / "alice" / "deep" / f"{TEMP_PREFIX}dead").write_bytes(b"crash leftovers")
    (root / "alice" / "keep.txt").write_bytes(b"keep")
    assert backend.sweep_temp_files() == 1
    assert os.listdir(root / "alice" / "deep") == []
    assert (root / "alice" / "keep.txt").exists()


def test_resume_continues_an_existing_file(env):
    fs, root, _, _ = env
    (root / "alice" / "big.bin").write_bytes(b"0123456789")
    with fs.open_write("/big.bin", offset=10, truncate=False) as up:
        up.write(b"abcdef")
    assert (root / "alice" / "big.bin").read_bytes() == b"0123456789abcdef"


def test_missing_parent_is_not_found(env):
    fs, _, _, _ = env
    with pytest.raises(NotFound):
        fs.open_write("/no/such/dir/file.txt")


def test_a_listing_dropped_unread_leaks_no_descriptor(env):
    fs, root, _, _ = env
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        fs.list_dir("/")
    import gc
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_abort_stale_upload_removes_only_temp_files(tmp_path):
    # The upload id comes from the shared store: a forged one must not delete user data.
    root = tmp_path / "root"
    root.mkdir()
    (root / "keep.txt").write_bytes(b"data")
    (tmp_path / "outside").write_bytes(b"data")
    backend = LocalBackend(LocalConfig(str(root)))
    try:
        for forged in ("keep.txt", f"{TEMP_PREFIX}x/../../outside", "../outside"):
            with pytest.raises(InvalidPath):
                backend.abort_stale_upload("/keep.txt", forged)
        assert (root / "keep.txt").read_bytes() == b"data"
        assert (tmp_path / "outside").exists()
    finally:
        backend.close()
