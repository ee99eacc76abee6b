"""Shared fixtures: a real gateway on port 0, users, and a leak check."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w

from gateway.config import load_config
from gateway.permissions import parse_perms
from gateway.server import Gateway
from gateway.users import Location, Mount, User, hash_password

# The moto S3 server, the SFTP key fixtures and PostgreSQL, available to every test folder.
pytest_plugins = ["tests.s3_server", "tests.sftp.helpers", "tests.postgres"]

PASSWORD = "correct horse battery"


@dataclass
class RunningGateway:
    """A gateway started in this process, bound to ephemeral ports."""

    gateway: Gateway
    config_path: Path
    data: Path                      # root of the "local" backend
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def webdav_port(self) -> int:
        return self.ports["webdav"]

    @property
    def sftp_port(self) -> int:
        return self.ports["sftp"]

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    def add_user(self, name: str, password: str | None = PASSWORD, *, keys: tuple[str, ...] = (),
                 home: str | None = None, perms: dict[str, list[str]] | None = None,
                 mounts: dict[str, tuple[str, list[str]]] | None = None,
                 quota_bytes: int = 0, quota_files: int = 0, disabled: bool = False) -> User:
        rules = {p: parse_perms(w) for p, w in (perms or {"/": ["*"]}).items()}
        user = User(
            name, hash_password(password) if password else None, tuple(keys),
            Location.parse(home or f"local:/{name}"),
            tuple(Mount(p, Location.parse(t), parse_perms(w)) for p, (t, w) in (mounts or {}).items()),
            rules, quota_bytes, quota_files, disabled)
        self.gateway.users.add(user)
        return user

    def fs(self, name: str, protocol: str = "test"):
        user = self.gateway.users.get(name)
        assert user is not None
        return self.gateway.open_fs(user, protocol, "127.0.0.1")


@dataclass
class SmallDisk:
    """A small tmpfs: a real file system that runs out of space."""

    root: Path

    def fill(self) -> None:
        """Take every free block with one file, `filler`, so the next write gets ENOSPC."""
        fd = os.open(self.root / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for size in (65536, 4096, 1):       # down to the last partial block
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError:
                        break
        finally:
            os.close(fd)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    """A 4 MiB tmpfs under the test's directory (needs root, as CI has)."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def wait_for(condition, what: str, limit: float = 60.0) -> None:
    """Poll until `condition()` holds; the limit only stops a hung test, it measures nothing."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def write_config(tmp_path: Path, *, webdav: bool = True, sftp: bool = True, admin: bool = False,
                 backends: dict | None = None, extra: dict | None = None) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    config = {
        "server": {"state_dir": "state", "log_level": "warning"},
        "webdav": {"enabled": webdav, "listen": "127.0.0.1:0"},
        "sftp": {"enabled": sftp, "listen": "127.0.0.1:0"},
        "admin": {"enabled": admin, "listen": "127.0.0.1:0"},
        "backends": {"local": {"type": "local", "root": "data"}, **(backends or {})},
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@pytest.fixture
def make_gateway(tmp_path):
    """Factory: start a real gateway (front-ends as asked) and stop it after the test."""
    started: list[Gateway] = []

    def factory(*, webdav: bool = False, sftp: bool = False, admin: bool = False,
                backends: dict | None = None, extra: dict | None = None,
                start: bool = True) -> RunningGateway:
        path = write_config(tmp_path, webdav=webdav, sftp=sftp, admin=admin, backends=backends,
                            extra=extra)
        gateway = Gateway(load_config(path))
        # Stopped at the end even if never started: it holds the store open.
        started.append(gateway)
        running = RunningGateway(gateway, path, tmp_path / "data")
        if start:
            gateway.start()
            for frontend in gateway.frontends:
                running.ports[frontend.name] = frontend.address[1]
        return running

    yield factory
    for gateway in started:
        gateway.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "tools(*names): client programs the test drives")


def pytest_runtest_setup(item):
    """A test marked tools("litmus", ...) skips where a program is missing, except in CI.

    In CI a missing client is an install step .ci/run forgot: that must fail,
    not pass quietly as a skip.
    """
    for marker in item.iter_markers("tools"):
        missing = [name for name in marker.args
                   if (shutil.which(name) is None if name != "/dev/fuse"
                       else not os.access(name, os.R_OK | os.W_OK))]
        if missing:
            message = f"needs {', '.join(missing)} (installed by .ci/run)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)


# A gateway that outlives one test (a module-scoped fixture) keeps a pool of
# connections to its SQLite store, which grows with the test's concurrency up
# to the pool's size: by design, not a leak. A stopped gateway closes them all
# (test_uploads_in_flight checks it).
_STORE_FILES = ("/gateway.db", "/gateway.db-wal", "/gateway.db-shm")


def _open_fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.endswith(_STORE_FILES):
            found[fd] = target
    return found


def _pooled(target: str, open_before: set[str]) -> bool:
    """A SQLite store file that was open before the test: its pool may grow while a longer-lived
    (module-scoped) gateway serves the test. A store opened during the test is never excused."""
    database = target.removesuffix("-wal").removesuffix("-shm")
    return database.endswith(".db") and database in open_before


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Flag threads and file descriptors a test leaves behind."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    open_before = set(fds_before.values())
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()
                  and not t.name.startswith(("asyncio", "moto-"))]
        fds_now = _open_fds()
        pooled = sum(1 for fd, target in fds_now.items()
                     if fds_before.get(fd) != target and _pooled(target, open_before))
        fds_leaked = len(fds_now) - len(fds_before) - pooled
        if (not leaked and fds_leaked <= 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    new_fds = sorted(target for fd, target in fds_now.items()
                     if fds_before.get(fd) != target and not _pooled(target, open_before))
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
    assert fds_leaked <= 0, f"{fds_leaked} file descriptor(s) left open: {new_fds}"
