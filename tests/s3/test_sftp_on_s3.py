"""SFTP clients on a home kept in S3 (moto over HTTP): OpenSSH sftp/scp, sshfs, psftp, rclone, paramiko."""
from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import tarfile
import threading
from collections.abc import Iterator

import pytest
from paramiko.sftp import CMD_CLOSE, SFTP_OK

from gateway.sftp.hostkey import load_host_keys
from gateway.storage.s3 import MiB
from tests.conftest import PASSWORD, RunningGateway, wait_for
from tests.s3_server import count_calls, multipart_uploads
from tests.sftp.helpers import (OpenSSH, known_hosts, make_tree, needs_sshfs, raw_status, same_tree,
                                sftp_client, sshfs_mount, start_sftp_gateway)

PART = 5 * MiB

pytestmark = pytest.mark.client


@pytest.fixture
def s3sftp(tmp_path, host_key_dir, client_key, s3_backend_table) -> Iterator[RunningGateway]:
    """SFTP with alice (key and password) and a read-only reader, both at home on S3, in 5 MiB parts."""
    (tmp_path / "gw").mkdir()
    running = start_sftp_gateway(tmp_path / "gw", host_key_dir,
                                 backends={"s3": {**s3_backend_table, "part_size": PART}})
    running.add_user("alice", keys=(client_key.public_line,), home="s3:/alice")
    running.add_user("reader", home="s3:/alice", perms={"/": ["list", "download"]})
    yield running
    running.gateway.stop()


@pytest.fixture
def openssh(s3sftp, tmp_path, host_key_dir, client_key) -> OpenSSH:
    port = s3sftp.sftp_port
    return OpenSSH(port, tmp_path, known_hosts(tmp_path, port, host_key_dir), client_key)


@pytest.fixture
def s3(s3_server):
    client = s3_server.client()
    yield client
    client.close()


@pytest.fixture
def objects(s3, s3_server, s3_backend_table):
    """Read alice's objects straight from the bucket: objects("a.txt") -> bytes or None."""
    home = f"{s3_backend_table['prefix']}alice/"

    def read(name: str) -> bytes | None:
        try:
            return s3.get_object(Bucket=s3_server.bucket, Key=home + name)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    return read



def test_sftp_batch_puts_gets_lists_renames_and_removes_on_s3(openssh, objects, tmp_path):
    data = os.urandom(2 * PART + 4321)
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    result = openssh.sftp_batch(
        f"mkdir /kdir\nput {local} /kdir/up.bin\nls -l /kdir\nrename /kdir/up.bin /kdir/moved.bin\n"
        f"get /kdir/moved.bin {tmp_path}/back.bin\n")
    assert result.returncode == 0, result.stderr
    assert "up.bin" in result.stdout
    assert (tmp_path / "back.bin").read_bytes() == data
    assert objects("kdir/moved.bin") == data
    assert objects("kdir/up.bin") is None
    result = openssh.sftp_batch("rm /kdir/moved.bin\nrmdir /kdir\nls /\n")
    assert result.returncode == 0, result.stderr
    assert objects("kdir/moved.bin") is None
    assert objects("kdir/") is None


def test_reput_continues_a_large_object_with_a_server_side_copy(openssh, s3sftp, objects, tmp_path):
    data = os.urandom(3 * PART + 777)
    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[:PART + MiB])
    assert openssh.sftp_batch(f"put {partial} /resume.bin\n").returncode == 0
    local = tmp_path / "full.bin"
    local.write_bytes(data)
    copies, downloads = count_calls(s3sftp.gateway.backends["s3"], "UploadPartCopy"), \
        count_calls(s3sftp.gateway.backends["s3"], "GetObject")
    result = openssh.sftp_batch(f"reput {local} /resume.bin\n")
    assert result.returncode == 0, result.stderr
    assert objects("resume.bin") == data
    # The 6 MiB already in S3 were copied there, not downloaded and sent again.
    assert copies[0] >= 1
    assert downloads[0] == 0


def test_reget_continues_a_partial_download(openssh, objects, tmp_path):
    data = os.urandom(PART + 1234)
    (tmp_path / "src.bin").write_bytes(data)
    assert openssh.sftp_batch(f"put {tmp_path}/src.bin /reget.bin\n").returncode == 0
    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[:100_000])
    result = openssh.sftp_batch(f"reget /reget.bin {partial}\n")
    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == data


def test_scp_copies_both_ways_on_s3(openssh, objects, tmp_path):
    data = os.urandom(PART + 99)
    local = tmp_path / "scp.bin"
    local.write_bytes(data)
    openssh.scp(str(local), "alice@127.0.0.1:/scp.bin")
    assert objects("scp.bin") == data
    openssh.scp("alice@127.0.0.1:/scp.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data


@pytest.mark.tools("rclone")
def test_rclone_copies_a_tree_to_s3_and_check_finds_no_differences(openssh, tmp_path):
    source = make_tree(tmp_path / "src")
    assert same_tree(source, openssh.rclone_round_trip(source, tmp_path))


@needs_sshfs
def test_sshfs_on_s3_copies_a_tree_extracts_a_tar_appends_and_reads_back(openssh, tmp_path, objects):
    source = make_tree(tmp_path / "src")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(source, arcname="unpacked")
    with sshfs_mount(openssh, tmp_path / "mnt") as mnt:
        shutil.copytree(source, mnt / "copied")
        archive.seek(0)
        with tarfile.open(fileobj=archive, mode="r:gz") as tar:
            tar.extractall(mnt, filter="data")
        assert same_tree(source, mnt / "unpacked")
        # An append reopens the object without truncating it: a resume on S3.
        for root in (mnt / "copied", source):
            with open(root / "a" / "small-3.txt", "ab") as f:
                f.write(b"appended\n")
        assert same_tree(source, mnt / "copied")
        os.rename(mnt / "copied" / "big.bin", mnt / "copied" / "moved.bin")
        assert os.statvfs(mnt).f_bavail > 0
    assert objects("copied/a/small-3.txt") == (source / "a" / "small-3.txt").read_bytes()
    assert objects("copied/moved.bin") == (source / "big.bin").read_bytes()
    assert objects("unpacked/a/b c/über.txt") == b"umlaut\n"


@pytest.mark.tools("psftp")
def test_psftp_with_a_password_puts_gets_and_renames_on_s3(openssh, host_key_dir, objects, tmp_path):
    data = os.urandom(PART + 500_000)
    (tmp_path / "up.bin").write_bytes(data)
    batch = tmp_path / "psftp.txt"
    batch.write_text("mkdir putty\ncd putty\nput up.bin\nls\nget up.bin down.bin\n"
                     "rename up.bin renamed.bin\nquit\n")
    fingerprint = load_host_keys(host_key_dir)[0].fingerprint
    result = subprocess.run(
        ["psftp", "-P", str(openssh.port), "-pw", PASSWORD, "-hostkey", fingerprint, "-batch",
         "-b", str(batch), "alice@127.0.0.1"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "down.bin").read_bytes() == data
    assert objects("putty/renamed.bin") == data


def test_failures_answer_exact_sftp_status_codes_on_s3(s3sftp):
    with sftp_client(s3sftp.sftp_port) as sftp:
        with sftp.open("/f.txt", "w") as f:
            f.write(b"x")
        sftp.mkdir("/dir")
        with sftp.open("/dir/inner.txt", "w") as f:
            f.write(b"y")
        # NO_SUCH_FILE arrives as ENOENT; FAILURE carries no errno, only the message.
        for call in (lambda: sftp.stat("/missing"), lambda: sftp.open("/no/dir/f.txt", "w"),
                     lambda: sftp.open("/missing.txt"), lambda: sftp.remove("/missing.txt"),
                     lambda: sftp.listdir("/missing")):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.ENOENT
        cases = [(lambda: sftp.mkdir("/dir"), "already exists"),
                 (lambda: sftp.rmdir("/dir"), "not empty"),
                 (lambda: sftp.rename("/f.txt", "/dir/inner.txt"), "already exists")]
        for call, message in cases:
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno is None
            assert message in str(info.value)
    with sftp_client(s3sftp.sftp_port, "reader") as sftp:
        for call in (lambda: sftp.open("/new.txt", "w"), lambda: sftp.mkdir("/d2"),
                     lambda: sftp.remove("/f.txt"), lambda: sftp.rename("/f.txt", "/g.txt")):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EACCES
        with sftp.open("/f.txt") as f:
            assert f.read() == b"x"


def test_a_client_killed_mid_upload_keeps_the_previous_version_and_leaves_no_multipart_upload(
        openssh, s3sftp, objects, s3, s3_server, s3_backend_table, tmp_path):
    assert openssh.sftp_batch("mkdir /up\n").returncode == 0
    (tmp_path / "old.bin").write_bytes(b"previous version")
    assert openssh.sftp_batch(f"put {tmp_path}/old.bin /up/big.bin\n").returncode == 0
    # Hold every part inside the gateway so that several are in flight when the client dies.
    held, release = [], threading.Event()

    def hold(**kwargs) -> None:
        held.append(kwargs)
        release.wait(120)

    s3sftp.gateway.backends["s3"].transfer_client.meta.events.register("before-call.s3.UploadPart", hold)
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(12 * PART))
    batch = tmp_path / "kill.txt"
    batch.write_text(f"put {local} /up/big.bin\n")
    client = subprocess.Popen(openssh.sftp_command(batch), env=openssh.env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(held) >= 3, "three parts in flight")
        assert multipart_uploads(s3, s3_server, s3_backend_table)
    finally:
        # sftp and the ssh it runs go down together, with no chance to close the file.
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()
        release.set()
    wait_for(lambda: not multipart_uploads(s3, s3_server, s3_backend_table),
             "the killed upload to be aborted")
    assert objects("up/big.bin") == b"previous version"


def test_appends_through_a_second_handle_before_close_keep_both_writes_on_s3(
        s3sftp, objects, s3, s3_server, s3_backend_table):
    """sshfs sends CLOSE after the next OPEN: the second handle shares the pending upload.

    Appends need no read-back, so they work on S3 whether the upload still
    streams parts or spools; reading back parts already sent is refused.
    """
    def close(sftp, f):
        status = raw_status(sftp, CMD_CLOSE, f.handle)
        f._closed = True
        return status

    big = os.urandom(PART + 1000)
    with sftp_client(s3sftp.sftp_port) as sftp:
        with sftp.open("/old.txt", "w") as f:
            f.write(b"zero\n")
        first = sftp.open("/old.txt", "a")
        first.write(b"one\n")
        first.flush()
        second = sftp.open("/old.txt", "a")
        second.write(b"two\n")
        second.flush()
        with sftp.open("/old.txt", "r") as reader:
            assert reader.read() == b"zero\none\ntwo\n"
        assert close(sftp, first) == (SFTP_OK, "OK")
        assert objects("old.txt") == b"zero\n"
        assert close(sftp, second) == (SFTP_OK, "OK")
        assert objects("old.txt") == b"zero\none\ntwo\n"

        streamed = sftp.open("/streamed.bin", "w")
        streamed.write(big)
        streamed.flush()
        tail = sftp.open("/streamed.bin", "a")
        tail.write(b"tail")
        tail.flush()
        with sftp.open("/streamed.bin", "r") as reader:
            with pytest.raises(OSError) as info:
                reader.read(10)
            assert "cannot read back" in str(info.value)
        assert close(sftp, streamed) == (SFTP_OK, "OK")
        assert close(sftp, tail) == (SFTP_OK, "OK")
    assert objects("streamed.bin") == big + b"tail"
    assert multipart_uploads(s3, s3_server, s3_backend_table) == []
