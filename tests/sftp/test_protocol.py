"""SFTP v3 requests through paramiko's SFTPClient: exact status codes, flags, handles and traps."""
from __future__ import annotations

import os
import socket
import struct

import paramiko
import pytest
from paramiko.sftp import (CMD_CLOSE, CMD_EXTENDED, CMD_INIT, CMD_MKDIR, CMD_OPEN, CMD_READLINK,
                           CMD_REMOVE, CMD_STAT, CMD_STATUS, CMD_SYMLINK, CMD_VERSION, SFTP_FAILURE,
                           SFTP_FLAG_WRITE, SFTP_FLAG_CREATE, SFTP_NO_SUCH_FILE, SFTP_OP_UNSUPPORTED,
                           SFTP_PERMISSION_DENIED)

from gateway.storage.base import TEMP_PREFIX
from tests.conftest import PASSWORD, wait_for
from tests.sftp.helpers import raw_status, sftp_client, start_sftp_gateway


def _home(server, user="alice"):
    return server.data / user


def _temp_files(path):
    return [p for p in path.rglob(f"{TEMP_PREFIX}*")]


# -- status codes ------------------------------------------------------------------


def test_stat_of_a_missing_file_answers_no_such_file(sftp):
    with pytest.raises(FileNotFoundError) as info:
        sftp.stat("/missing.txt")
    assert "'/missing.txt' not found" in str(info.value)


def test_error_messages_never_show_the_storage_path(sftp):
    with pytest.raises(FileNotFoundError) as info:
        sftp.open("/no/dir/file.txt")
    assert "alice" not in str(info.value)


def test_write_without_permission_answers_permission_denied(sftp_server):
    with sftp_client(sftp_server.sftp_port, "reader") as client:
        with pytest.raises(PermissionError):
            client.open("/new.txt", "w")
        with pytest.raises(PermissionError):
            client.mkdir("/newdir")


def test_mkdir_of_an_existing_folder_fails_with_a_message(sftp, sftp_server):
    (_home(sftp_server) / "exists").mkdir(exist_ok=True)
    with pytest.raises(OSError) as info:
        sftp.mkdir("/exists")
    assert "already exists" in str(info.value)


def test_rmdir_of_a_folder_with_files_fails_with_a_message(sftp, sftp_server):
    (_home(sftp_server) / "full").mkdir(exist_ok=True)
    (_home(sftp_server) / "full" / "f").write_text("x")
    with pytest.raises(OSError) as info:
        sftp.rmdir("/full")
    assert "not empty" in str(info.value)


def test_plain_rename_refuses_an_existing_target_and_posix_rename_replaces_it(sftp, sftp_server):
    home = _home(sftp_server)
    (home / "r1.txt").write_text("one")
    (home / "r2.txt").write_text("two")
    with pytest.raises(OSError) as info:
        sftp.rename("/r1.txt", "/r2.txt")
    assert "already exists" in str(info.value)
    sftp.posix_rename("/r1.txt", "/r2.txt")
    assert (home / "r2.txt").read_text() == "one"


def test_readlink_and_symlink_answer_op_unsupported(sftp):
    assert raw_status(sftp, CMD_READLINK, "/anything")[0] == SFTP_OP_UNSUPPORTED
    assert raw_status(sftp, CMD_SYMLINK, "/target", "/link") == (SFTP_OP_UNSUPPORTED,
                                                                 "symbolic links are not supported")


def test_unknown_extension_answers_op_unsupported(sftp):
    assert raw_status(sftp, CMD_EXTENDED, "copy-data")[0] == SFTP_OP_UNSUPPORTED
    assert raw_status(sftp, CMD_EXTENDED, "hardlink@openssh.com", "/a", "/b")[0] == SFTP_OP_UNSUPPORTED


def test_status_codes_are_exact(sftp_server, sftp):
    (_home(sftp_server) / "taken").mkdir(exist_ok=True)
    assert raw_status(sftp, CMD_STAT, "/gone") == (SFTP_NO_SUCH_FILE, "'/gone' not found")
    assert raw_status(sftp, CMD_MKDIR, "/taken", paramiko.SFTPAttributes()) == (
        SFTP_FAILURE, "'/taken' already exists")
    assert raw_status(sftp, CMD_REMOVE, "/taken")[0] == SFTP_FAILURE
    assert raw_status(sftp, CMD_OPEN, "/nope/x", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE,
                      paramiko.SFTPAttributes())[0] == SFTP_NO_SUCH_FILE
    assert raw_status(sftp, CMD_CLOSE, b"bogus") == (SFTP_FAILURE, "invalid handle")
    with sftp_client(sftp_server.sftp_port, "reader") as client:
        assert raw_status(client, CMD_MKDIR, "/d", paramiko.SFTPAttributes())[0] == SFTP_PERMISSION_DENIED


# -- extensions and version --------------------------------------------------------


def _raw_version(port: int) -> tuple[int, dict[str, str]]:
    """Open the sftp subsystem by hand and read the server's VERSION packet."""
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        channel = transport.open_session()
        channel.invoke_subsystem("sftp")
        channel.sendall(struct.pack(">IBI", 5, CMD_INIT, 3))
        size = struct.unpack(">I", channel.recv(4))[0]
        data = b""
        while len(data) < size:
            data += channel.recv(size - len(data))
        assert data[0] == CMD_VERSION
        msg = paramiko.Message(data[1:])
        version = msg.get_int()
        extensions = {}
        while msg.get_remainder():
            name = msg.get_text()
            extensions[name] = msg.get_text()
        channel.shutdown_write()
        status = channel.recv_exit_status()
        channel.close()
        return version, extensions | {"exit-status": str(status)}
    finally:
        transport.close()


def test_version_advertises_posix_rename_statvfs_and_limits(sftp_server):
    version, extensions = _raw_version(sftp_server.sftp_port)
    assert version == 3, extensions
    assert extensions.get("posix-rename@openssh.com") == "1", extensions
    assert extensions["statvfs@openssh.com"] == "2"
    assert "limits@openssh.com" in extensions


def test_session_end_sends_exit_status_zero_before_the_channel_closes(sftp_server):
    _, extensions = _raw_version(sftp_server.sftp_port)
    assert extensions["exit-status"] == "0"


def test_statvfs_reports_the_users_quota(tmp_path, host_key_dir):
    server = start_sftp_gateway(tmp_path, host_key_dir)
    try:
        server.add_user("quota", quota_bytes=10 * 1024 * 1024)
        with sftp_client(server.sftp_port, "quota") as client:
            client.putfo(__import__("io").BytesIO(b"x" * 4096 * 10), "/f.bin")
            _, msg = client._request(CMD_EXTENDED, "statvfs@openssh.com", "/")
            values = [msg.get_int64() for _ in range(11)]
        bsize, frsize, blocks, bfree = values[:4]
        assert blocks * frsize == 10 * 1024 * 1024
        assert bfree * frsize == 10 * 1024 * 1024 - 40960
    finally:
        server.gateway.stop()


# -- open flags, uploads, resume ---------------------------------------------------


def test_exclusive_create_of_an_existing_file_fails(sftp, sftp_server):
    (_home(sftp_server) / "x.txt").write_text("keep")
    with pytest.raises(OSError) as info:
        sftp.open("/x.txt", "x")
    assert "already exists" in str(info.value)
    assert (_home(sftp_server) / "x.txt").read_text() == "keep"


def test_open_without_create_of_a_missing_file_answers_no_such_file(sftp):
    assert raw_status(sftp, CMD_OPEN, "/absent.txt", SFTP_FLAG_WRITE,
                      paramiko.SFTPAttributes())[0] == SFTP_NO_SUCH_FILE


def test_truncate_flag_replaces_and_append_flag_appends(sftp, sftp_server):
    path = _home(sftp_server) / "flags.txt"
    path.write_text("0123456789")
    with sftp.open("/flags.txt", "w") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    with sftp.open("/flags.txt", "a") as f:
        f.write(b"+more")
    assert path.read_bytes() == b"new+more"


def test_reopen_without_truncate_writing_at_the_size_resumes(sftp, sftp_server):
    path = _home(sftp_server) / "resume.bin"
    path.write_bytes(b"A" * 1000)
    with sftp.open("/resume.bin", "r+") as f:
        f.seek(1000)
        f.write(b"B" * 500)
    assert path.read_bytes() == b"A" * 1000 + b"B" * 500


def test_read_write_handle_reads_back_what_it_wrote(sftp, sftp_server):
    (_home(sftp_server) / "rw.bin").write_bytes(b"hello world")
    with sftp.open("/rw.bin", "r+") as f:
        f.seek(6)
        f.write(b"WORLD")
        f.seek(0)
        assert f.read(11) == b"hello WORLD"


def test_read_write_open_that_writes_nothing_leaves_the_file_as_it_was(sftp, sftp_server):
    path = _home(sftp_server) / "untouched.txt"
    path.write_text("same")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    inode = path.stat().st_ino
    with sftp.open("/untouched.txt", "r+") as f:
        assert f.read() == b"same"
    assert path.stat().st_ino == inode
    assert int(path.stat().st_mtime) == 1_000_000_000


def test_nothing_is_visible_until_close(sftp, sftp_server):
    path = _home(sftp_server) / "pending.txt"
    path.write_text("previous")
    f = sftp.open("/pending.txt", "w")
    f.write(b"next version")
    f.flush()
    sftp.stat("/pending.txt")
    assert path.read_text() == "previous"
    f.close()
    assert path.read_text() == "next version"


def test_a_failed_commit_on_close_reaches_the_client(sftp, sftp_server):
    home = _home(sftp_server)
    f = sftp.open("/becomes-dir", "w")
    f.write(b"data")
    f.flush()
    (home / "becomes-dir").mkdir()    # the commit cannot replace a folder
    code, message = raw_status(sftp, CMD_CLOSE, f.handle)
    f._closed = True
    assert code == SFTP_FAILURE
    assert message == "'/becomes-dir' is a directory"
    assert (home / "becomes-dir").is_dir()
    assert not _temp_files(home)


def test_client_that_dies_mid_upload_leaves_the_previous_version_and_no_partial_file(sftp_server):
    home = _home(sftp_server)
    (home / "precious.bin").write_bytes(b"version one")
    transport = paramiko.Transport(("127.0.0.1", sftp_server.sftp_port))
    transport.connect(username="alice", password=PASSWORD)
    client = paramiko.SFTPClient.from_transport(transport)
    f = client.open("/precious.bin", "w")
    f.write(os.urandom(100_000))
    f.flush()
    new = client.open("/brand-new.bin", "w")
    new.write(b"half")
    new.flush()
    wait_for(lambda: len(_temp_files(home)) == 2, "the uploads to start")
    # Die without closing: paramiko would close (= commit) these handles.
    transport.sock.close()
    transport.close()
    wait_for(lambda: not _temp_files(home), "the server to drop the uploads")
    assert (home / "precious.bin").read_bytes() == b"version one"
    assert not (home / "brand-new.bin").exists()


def test_setstat_applies_times_and_truncates(sftp, sftp_server):
    path = _home(sftp_server) / "times.txt"
    path.write_text("0123456789")
    sftp.utime("/times.txt", (1_000_000_000, 1_000_000_000))
    assert int(path.stat().st_mtime) == 1_000_000_000
    sftp.truncate("/times.txt", 4)
    assert path.read_text() == "0123"
    sftp.chmod("/times.txt", 0o600)   # accepted, ignored


def test_put_with_preserved_times_sets_the_mtime_after_commit(sftp, sftp_server):
    with sftp.open("/stamped.txt", "w") as f:
        f.write(b"x")
        f.utime((1_100_000_000, 1_100_000_000))
    assert int((_home(sftp_server) / "stamped.txt").stat().st_mtime) == 1_100_000_000


def test_readdir_streams_large_folders_completely(sftp, sftp_server):
    folder = _home(sftp_server) / "many"
    folder.mkdir(exist_ok=True)
    for i in range(345):
        (folder / f"f{i:04d}").write_text("")
    names = sftp.listdir("/many")
    assert sorted(names) == [f"f{i:04d}" for i in range(345)]


def test_realpath_resolves_dot_dot_at_the_root_to_the_root(sftp):
    assert sftp.normalize(".") == "/"
    assert sftp.normalize("/../..") == "/"
    assert sftp.normalize("a/../b") == "/b"


def test_many_handles_hit_the_cap_with_an_error(tmp_path, host_key_dir):
    server = start_sftp_gateway(tmp_path, host_key_dir, max_handles=50)
    try:
        server.add_user("h")
        (server.data / "h").mkdir(exist_ok=True)
        (server.data / "h" / "f.txt").write_text("x")
        with sftp_client(server.sftp_port, "h") as client:
            handles = [client.open("/f.txt") for _ in range(50)]
            with pytest.raises(OSError) as info:
                client.open("/f.txt")
            assert "too many open handles" in str(info.value)
            with pytest.raises(OSError):
                client.listdir("/")
            handles.pop().close()
            assert client.listdir("/") == ["f.txt"]
            for f in handles:
                f.close()
    finally:
        server.gateway.stop()


# -- authentication ------------------------------------------------------------------


def test_public_key_authentication(sftp_server, client_key):
    with sftp_client(sftp_server.sftp_port, pkey=client_key.pkey()) as client:
        assert client.normalize(".") == "/"


def test_keyboard_interactive_authentication(sftp_server):
    transport = paramiko.Transport(("127.0.0.1", sftp_server.sftp_port))
    try:
        transport.start_client()
        transport.auth_interactive("bob", lambda title, instructions, prompts: [PASSWORD] * len(prompts))
        assert transport.is_authenticated()
    finally:
        transport.close()


def _refusal(port: int, user: str, password: str) -> str:
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client()
        with pytest.raises(paramiko.AuthenticationException) as info:
            transport.auth_password(user, password)
        return str(info.value)
    finally:
        transport.close()


def test_unknown_and_disabled_users_are_refused_alike(sftp_server):
    port = sftp_server.sftp_port
    unknown = _refusal(port, "nobody", PASSWORD)
    disabled = _refusal(port, "ghost", PASSWORD)
    wrong = _refusal(port, "bob", "wrong")
    assert unknown == disabled == wrong


def test_a_key_not_listed_for_the_user_is_refused(sftp_server, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(
        str(_keygen(tmp_path / "other")))
    with pytest.raises(paramiko.AuthenticationException):
        with sftp_client(sftp_server.sftp_port, "alice", pkey=other):
            pass


def _keygen(path):
    import subprocess
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_host_keys_are_created_once_and_reused(tmp_path):
    from gateway.sftp.hostkey import load_host_keys
    first = [k.fingerprint for k in load_host_keys(tmp_path)]
    second = [k.fingerprint for k in load_host_keys(tmp_path)]
    assert first == second
    assert [k.get_name() for k in load_host_keys(tmp_path)] == ["ssh-ed25519", "ssh-rsa"]
    assert load_host_keys(tmp_path)[1].get_bits() == 3072
    assert (tmp_path / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600


def test_start_up_lists_the_host_key_fingerprints(sftp_server, host_key_dir):
    from gateway.sftp.hostkey import load_host_keys
    frontend = sftp_server.gateway.frontends[0]
    for key in load_host_keys(host_key_dir):
        assert any(key.fingerprint in line for line in frontend.notices)


# -- bad input -----------------------------------------------------------------------


def test_garbage_bytes_drop_only_that_connection(sftp_server, sftp):
    with socket.create_connection(("127.0.0.1", sftp_server.sftp_port)) as sock:
        sock.sendall(os.urandom(4096) + b"\r\n" * 10)
        sock.settimeout(30)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert sftp.normalize(".") == "/"


def test_truncated_handshake_drops_only_that_connection(sftp_server, sftp):
    with socket.create_connection(("127.0.0.1", sftp_server.sftp_port)) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + struct.pack(">IB", 1000, 10) + b"\x14" + b"\0" * 20)
        sock.recv(256)
    with socket.create_connection(("127.0.0.1", sftp_server.sftp_port)) as sock:
        sock.sendall(b"SSH-2.0-")
    with sftp_client(sftp_server.sftp_port, "bob") as other:
        assert other.listdir("/") is not None
    assert sftp.normalize(".") == "/"


def test_oversized_sftp_packet_ends_that_session_only(sftp_server, sftp):
    transport = paramiko.Transport(("127.0.0.1", sftp_server.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        channel = transport.open_session()
        channel.invoke_subsystem("sftp")
        channel.sendall(struct.pack(">I", 0x7FFFFFF0) + b"\x01")
        assert channel.recv(100) == b""
    finally:
        transport.close()
    assert sftp.normalize(".") == "/"


@pytest.mark.parametrize("path", ["/../../etc/passwd", "../etc/passwd", "/etc/passwd",
                                  "/a/../../etc/passwd", "/%2e%2e/etc/passwd", "/..\\..\\etc\\passwd"])
def test_traversal_paths_never_leave_the_home(sftp, path):
    with pytest.raises(OSError):
        sftp.open(path).read()
    with pytest.raises(OSError):
        sftp.open(path.replace("passwd", "evil"), "w").close()


def test_symlinks_planted_in_the_home_are_neither_listed_nor_followed(sftp, sftp_server):
    home = _home(sftp_server)
    (home / "escape").symlink_to("/etc")
    (home / "pw").symlink_to("/etc/passwd")
    try:
        assert "escape" not in sftp.listdir("/")
        with pytest.raises(OSError):
            sftp.listdir("/escape")
        with pytest.raises(PermissionError):
            sftp.open("/pw").read()
        with pytest.raises(OSError):
            sftp.open("/escape/evil", "w")
        assert not os.path.exists("/etc/evil")
        with pytest.raises(PermissionError):
            sftp.stat("/pw")
    finally:
        (home / "escape").unlink()
        (home / "pw").unlink()


def test_idle_connections_are_closed(tmp_path, host_key_dir):
    server = start_sftp_gateway(tmp_path, host_key_dir, idle_timeout=1)
    try:
        server.add_user("idle")
        transport = paramiko.Transport(("127.0.0.1", server.sftp_port))
        try:
            transport.connect(username="idle", password=PASSWORD)
            client = paramiko.SFTPClient.from_transport(transport)
            assert client.normalize(".") == "/"
            wait_for(lambda: not transport.is_active(), "the idle connection to close")
        finally:
            transport.close()
    finally:
        server.gateway.stop()


def test_a_file_being_uploaded_exists_for_its_own_session_only(sftp, sftp_server):
    f = sftp.open("/fresh.txt", "w")
    f.write(b"12345")
    f.flush()
    assert sftp.stat("/fresh.txt").st_size == 5
    sftp.utime("/fresh.txt", (1_200_000_000, 1_200_000_000))
    with sftp_client(sftp_server.sftp_port) as other:
        with pytest.raises(FileNotFoundError):
            other.stat("/fresh.txt")
    f.close()
    path = _home(sftp_server) / "fresh.txt"
    assert path.read_bytes() == b"12345"
    assert int(path.stat().st_mtime) == 1_200_000_000


def _stat_packet(request_id: int, path: str) -> bytes:
    body = struct.pack(">BII", CMD_STAT, request_id, len(path.encode())) + path.encode()
    return struct.pack(">I", len(body)) + body


def test_packets_split_across_sends_or_packed_into_one_are_all_answered_in_order(sftp_server, sftp):
    """The subsystem slices packets from its own buffer: any framing of the stream must parse the same."""
    sftp.mkdir("/there")
    transport = paramiko.Transport(("127.0.0.1", sftp_server.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        channel = transport.open_session()
        channel.invoke_subsystem("sftp")
        channel.sendall(struct.pack(">IBI", 5, CMD_INIT, 3))
        stream = b"".join(_stat_packet(n, "/there" if n % 2 else "/missing") for n in range(1, 201))
        first = _stat_packet(1000, "/there")
        for byte in first:              # one packet a byte at a time: the length word split too
            channel.sendall(bytes([byte]))
        channel.sendall(stream)          # then 200 packets in one send
        answers = []
        buf = b""
        while len(answers) < 202:        # VERSION, then 201 answers
            while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                chunk = channel.recv(65536)
                assert chunk, f"channel closed after {len(answers)} answers"
                buf += chunk
            size = struct.unpack(">I", buf[:4])[0]
            answers.append(buf[4:4 + size])
            buf = buf[4 + size:]
        assert answers[0][0] == CMD_VERSION
        ids = [struct.unpack(">I", a[1:5])[0] for a in answers[1:]]
        assert ids == [1000, *range(1, 201)]
        for request_id, answer in zip(ids, answers[1:]):
            found = request_id == 1000 or request_id % 2 == 1
            # ATTRS (105) for the folder, STATUS no-such-file for the missing name
            assert answer[0] == (105 if found else CMD_STATUS), (request_id, answer[:12])
            if not found:
                assert struct.unpack(">I", answer[5:9])[0] == SFTP_NO_SUCH_FILE
        channel.close()
    finally:
        transport.close()
