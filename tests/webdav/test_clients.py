"""Real clients against the real gateway: rclone as a WebDAV remote and a davfs2 mount."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PASSWORD

pytestmark = pytest.mark.client


def make_tree(root: Path) -> None:
    """Mixed files: empty, text, binary over one block, odd names, nesting."""
    (root / "docs" / "deep" / "deeper").mkdir(parents=True)
    (root / "empty.txt").write_bytes(b"")
    (root / "hello world.txt").write_text("hello\n" * 100)
    (root / "docs" / "Grüße – ünïcödé.md").write_text("# héllo\n")
    (root / "docs" / "deep" / "random.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "docs" / "deep" / "deeper" / "percent%20and#hash.txt").write_text("odd\n")


def _rclone(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["rclone", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.tools("rclone")
@pytest.mark.parametrize("vendor", ["other", "owncloud"])
def test_rclone_copies_a_tree_up_and_back_with_no_differences(dav, tmp_path, vendor):
    src, back = tmp_path / "src", tmp_path / "back"
    src.mkdir()
    make_tree(src)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RCLONE_CONFIG": str(tmp_path / "none.conf")}
    obscured = _rclone(["obscure", PASSWORD], env).stdout.strip()
    env.update({"RCLONE_CONFIG_GW_TYPE": "webdav",
                "RCLONE_CONFIG_GW_URL": f"http://127.0.0.1:{dav.webdav_port}/",
                "RCLONE_CONFIG_GW_VENDOR": vendor,
                "RCLONE_CONFIG_GW_USER": "alice",
                "RCLONE_CONFIG_GW_PASS": obscured})
    up = _rclone(["copy", str(src), "gw:up"], env)
    assert up.returncode == 0, up.stderr
    down = _rclone(["copy", "gw:up", str(back)], env)
    assert down.returncode == 0, down.stderr
    check = _rclone(["check", "--download", str(src), "gw:up"], env)
    assert check.returncode == 0, check.stderr
    assert "0 differences found" in check.stderr
    local = _rclone(["check", "--download", str(src), str(back)], env)
    assert local.returncode == 0, local.stderr
    assert (dav.data / "alice" / "up" / "docs" / "deep" / "random.bin").stat().st_size == 3 * 1024 * 1024 + 17
    if vendor == "owncloud":
        # X-OC-Mtime was honoured: modification times survive the round trip.
        original = (src / "hello world.txt").stat().st_mtime
        assert abs((back / "hello world.txt").stat().st_mtime - original) < 1.0


def _mount_davfs(url: str, mnt: Path, conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", "davfs", url, str(mnt), "-o", f"conf={conf}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.tools("mount.davfs")
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting davfs2 from a test needs root")
def test_davfs2_mount_creates_appends_renames_deletes_and_reads_back(dav, tmp_path):
    url = f"http://127.0.0.1:{dav.webdav_port}/"
    secrets = tmp_path / "secrets"
    secrets.write_text(f'{url} alice "{PASSWORD}"\n')
    secrets.chmod(0o600)
    conf = tmp_path / "davfs2.conf"
    # Locks on (davfs2 locks every file it opens for writing); uploads on close.
    conf.write_text(f"secrets {secrets}\nuse_locks 1\ndelay_upload 0\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = _mount_davfs(url, mnt, conf)
    if mounted.returncode != 0:
        message = f"davfs2 cannot mount on this machine: {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    home = dav.data / "alice"
    try:
        (mnt / "notes.txt").write_text("first line\n")
        with open(mnt / "notes.txt", "a") as f:
            f.write("second line\n")
        (mnt / "folder").mkdir()
        os.rename(mnt / "notes.txt", mnt / "folder" / "renamed.txt")
        (mnt / "doomed.txt").write_text("short-lived\n")
        os.remove(mnt / "doomed.txt")
        assert (mnt / "folder" / "renamed.txt").read_text() == "first line\nsecond line\n"
        assert not (mnt / "doomed.txt").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=120)
    # What the mount did is on the server once it is unmounted (davfs2 flushes).
    assert (home / "folder" / "renamed.txt").read_text() == "first line\nsecond line\n"
    assert not (home / "notes.txt").exists()
    assert not (home / "doomed.txt").exists()
