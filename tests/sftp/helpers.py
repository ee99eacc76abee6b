"""SFTP test helpers any test folder can import: host and client keys, gateways, clients, OpenSSH options.

`host_key_dir` and `client_key` are session fixtures, registered for every
folder as a pytest plugin from tests/conftest.py.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.sftp import CMD_STATUS
import pytest

from gateway.config import load_config
from gateway.server import Gateway
from gateway.sftp.hostkey import load_host_keys
from tests.conftest import PASSWORD, RunningGateway, write_config


@pytest.fixture(scope="session")
def host_key_dir(tmp_path_factory) -> Path:
    """Host keys generated once per test run (RSA 3072 takes a while) and copied into each gateway."""
    path = tmp_path_factory.mktemp("hostkeys")
    load_host_keys(path)
    return path


@dataclass
class ClientKey:
    private: Path
    public_line: str

    def pkey(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key_file(str(self.private))


@pytest.fixture(scope="session")
def client_key(tmp_path_factory) -> ClientKey:
    path = tmp_path_factory.mktemp("clientkey") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return ClientKey(path, path.with_suffix(".pub").read_text().strip())


def copy_host_keys(host_key_dir: Path, state_dir: Path) -> None:
    """Seed a gateway's state dir with the session's host keys, so it generates none."""
    state_dir.mkdir(exist_ok=True)
    for key in host_key_dir.iterdir():
        shutil.copy2(key, state_dir / key.name)


def start_sftp_gateway(tmp: Path, host_key_dir: Path, *, backends: dict | None = None,
                       **sftp_options) -> RunningGateway:
    """Start a gateway serving SFTP only, reusing the session's host keys."""
    return start_gateway(tmp, host_key_dir, webdav=False, backends=backends,
                         extra={"sftp": sftp_options} if sftp_options else None)


def start_gateway(tmp: Path, host_key_dir: Path, *, webdav: bool = True, backends: dict | None = None,
                  extra: dict | None = None) -> RunningGateway:
    """Start a gateway serving SFTP (and WebDAV unless told not to), reusing the session's host keys."""
    path = write_config(tmp, webdav=webdav, sftp=True, backends=backends, extra=extra)
    copy_host_keys(host_key_dir, tmp / "state")
    gateway = Gateway(load_config(path))
    gateway.start()
    running = RunningGateway(gateway, path, tmp / "data")
    for frontend in gateway.frontends:
        running.ports[frontend.name] = frontend.address[1]
    return running


@contextmanager
def sftp_client(port: int, user: str = "alice", password: str | None = PASSWORD,
                pkey: paramiko.PKey | None = None) -> Iterator[paramiko.SFTPClient]:
    """A paramiko SFTPClient, closed with its transport on exit."""
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.connect(username=user, password=None if pkey else password, pkey=pkey)
        client = paramiko.SFTPClient.from_transport(transport)
        try:
            yield client
        finally:
            client.close()
    finally:
        transport.close()


def known_hosts(tmp: Path, port: int, host_key_dir: Path) -> Path:
    """A known_hosts file pinning the gateway's host keys, so clients check them strictly."""
    path = tmp / "known_hosts"
    lines = []
    for pub in sorted(host_key_dir.glob("*.pub")):
        kind, blob = pub.read_text().split()[:2]
        lines.append(f"[127.0.0.1]:{port} {kind} {blob}\n")
    path.write_text("".join(lines))
    return path


@dataclass
class OpenSSH:
    """Command-line options and environment for OpenSSH clients against the gateway."""

    port: int
    tmp: Path
    known_hosts: Path
    key: ClientKey

    def options(self, *, password: bool = False) -> list[str]:
        opts = ["-F", "/dev/null", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]
        if password:
            # sftp -b turns BatchMode on, which forbids password prompts; the first value wins.
            opts += ["-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
                     "-o", "PreferredAuthentications=keyboard-interactive,password",
                     "-o", "NumberOfPasswordPrompts=1"]
        else:
            opts += ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                     "-o", f"IdentityFile={self.key.private}",
                     "-o", "PreferredAuthentications=publickey"]
        return opts

    def env(self, *, password: str = PASSWORD) -> dict[str, str]:
        askpass = self.tmp / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
        askpass.chmod(0o700)
        env = dict(os.environ)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        return env

    def sftp_command(self, batch: Path, *, user: str = "alice", password: bool = False,
                     extra: tuple[str, ...] = ()) -> list[str]:
        return ["sftp", "-P", str(self.port), *self.options(password=password), *extra,
                "-b", str(batch), f"{user}@127.0.0.1"]

    def sftp_batch(self, commands: str, *, user: str = "alice", password: bool = False,
                   cwd: Path | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        batch = self.tmp / "batch.txt"
        batch.write_text(commands)
        return subprocess.run(self.sftp_command(batch, user=user, password=password, extra=extra),
                              env=self.env(), cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)

    def scp(self, source: str, dest: str) -> None:
        """One OpenSSH scp copy; it must exit 0 (scp checks the SFTP exit-status)."""
        result = subprocess.run(["scp", "-P", str(self.port), *self.options(), source, dest],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr

    def rclone_round_trip(self, source: Path, work: Path, user: str = "alice", path: str = "/rcloned") -> Path:
        """rclone copies `source` up, `rclone check --download` finds no difference, and
        rclone copies it back; returns the folder it came back to."""
        remote = self.rclone_remote(user, path)
        env = dict(os.environ, RCLONE_CONFIG=str(work / "rclone.conf"))
        back = work / "rclone-back"
        for args in (["copy", str(source), remote], ["check", "--download", str(source), remote],
                     ["copy", remote, str(back)]):
            result = subprocess.run(["rclone", *args], env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"rclone {args[0]}: {result.stderr}"
            if args[0] == "check":
                assert "0 differences found" in result.stderr
        return back

    def rclone_remote(self, user: str, path: str) -> str:
        """An rclone on-the-fly sftp remote; hashes off, since rclone would run md5sum in a shell."""
        return (f":sftp,host=127.0.0.1,port={self.port},user={user},"
                f"key_file='{self.key.private}',known_hosts_file='{self.known_hosts}',"
                f"disable_hashcheck=true:{path}")


needs_sshfs = pytest.mark.tools("sshfs", "fusermount3", "/dev/fuse")


@contextmanager
def sshfs_mount(openssh: OpenSSH, mnt: Path, user: str = "alice") -> Iterator[Path]:
    """Mount the user's tree at `mnt` with sshfs (key login); unmounted on exit."""
    mnt.mkdir()
    opts = ",".join(o for o in openssh.options() if o not in ("-o", "-F", "/dev/null"))
    with open(openssh.tmp / "sshfs.log", "wb") as errors:
        subprocess.run(["sshfs", "-p", str(openssh.port), "-F", "/dev/null", "-o", opts,
                        f"{user}@127.0.0.1:/", str(mnt)], check=True, stdout=subprocess.DEVNULL,
                       stderr=errors, stdin=subprocess.DEVNULL, timeout=60)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)


def make_tree(root: Path) -> Path:
    """A small tree with nested folders, an empty file and names with spaces and UTF-8."""
    (root / "a" / "b c").mkdir(parents=True)
    (root / "a" / "b c" / "über.txt").write_text("umlaut\n")
    (root / "a" / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    for i in range(20):
        (root / "a" / f"small-{i}.txt").write_text(f"file {i}\n" * i)
    return root


def same_tree(left: Path, right: Path) -> bool:
    """True when both trees hold the same names and the same bytes."""
    cmp = filecmp.dircmp(left, right)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(same_tree(left / d, right / d) for d in cmp.common_dirs)


def raw_status(client: paramiko.SFTPClient, t: int, *args) -> tuple[int, str]:
    """Send one request and return the STATUS reply's (code, message) as the server sent them.

    paramiko's own calls turn statuses into exceptions (and SFTPFile.close swallows them).
    """
    num = client._async_request(type(None), t, *args)
    reply, data = client._read_packet()
    msg = paramiko.Message(data)
    assert reply == CMD_STATUS and msg.get_int() == num
    return msg.get_int(), msg.get_text()
