"""A real PostgreSQL 15 for the test session (a pytest plugin, registered in tests/conftest.py).

`postgres` starts one cluster per session; `postgres.create_database()` gives
each test an empty database of its own.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PASSWORD = "store-test-pw"


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: a role `gateway` with a password, a database per test."""

    port: int
    socket_dir: Path
    data_dir: Path
    options: str = ""            # the server's command line options (pg_ctl -o), for a start after a stop
    _numbers = itertools.count(1)

    def stop(self) -> None:
        """Stop the server at once (fast shutdown: every connection is cut), as for a restart."""
        self.pg_ctl("-m", "fast", "-w", "-t", "60", "stop")

    def start(self) -> None:
        """Start the server stopped by `stop()` again, on the same port and data."""
        self.pg_ctl("-l", str(self.data_dir.parent / "log"), "-w", "-t", "60", "-o", self.options, "start")

    def admin(self) -> psycopg.Connection:
        # Local (socket) connections use trust auth; TCP ones need the password.
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                               dbname="postgres", autocommit=True)

    def create_database(self, owner: str = "gateway") -> str:
        """A fresh empty database owned by `owner`; returns its URL (logging in as `owner`)."""
        name = f"gw{os.getpid()}_{next(self._numbers)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {owner}")
        return f"postgresql://{owner}:{PG_PASSWORD}@127.0.0.1:{self.port}/{name}"

    def create_role(self, member_of: str | None = None) -> str:
        """A new login role with the test password (with the rights of `member_of`); returns its name."""
        name = f"role{os.getpid()}_{next(self._numbers)}"
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{PG_PASSWORD}'")
            if member_of is not None:
                conn.execute(f"GRANT {member_of} TO {name}")
        return name

    def block(self, role: str) -> None:
        """Cut `role` off: no new logins, and its open connections are ended."""
        with self.admin() as conn:
            conn.execute(f"ALTER ROLE {role} NOLOGIN")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                         (role,))

    def unblock(self, role: str) -> None:
        with self.admin() as conn:
            conn.execute(f"ALTER ROLE {role} LOGIN")

    def restart(self) -> None:
        """Restart the server as an operator would: every connection is cut, then it serves again."""
        self.pg_ctl("-l", str(self.data_dir.parent / "log"), "-m", "fast", "-w", "-t", "60", "restart")

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on this cluster as its owner, e.g. pg_ctl("-m", "fast", "-w", "stop") (a soak's fault)."""
        _as_owner(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), *args)


def _as_owner(*args: str) -> None:
    # The server runs as `postgres` when we are root (initdb refuses to run as root).
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *args], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing_postgres() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return f"needs PostgreSQL 15 in {PG_BIN} (installed by .ci/run)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "needs the 'postgres' system user (Debian's postgresql package creates it)"
    return None


@pytest.fixture(scope="session")
def postgres():
    """Start PostgreSQL 15 on a free port for the whole session; stop and delete it at the end.

    Missing PostgreSQL skips, except in CI, where it is an install step .ci/run forgot.
    """
    missing = _missing_postgres()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    with running_postgres() as server:
        yield server


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 cluster on a free port with the role `gateway`; stopped and deleted on exit."""
    # Not under pytest's tmp dir: its parents are private to root, and the
    # server runs as `postgres` (initdb refuses to run as root).
    base = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    port = _free_port()
    pwfile = base / "pw"
    pwfile.write_text("unused-superuser-pw\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    _as_owner(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
              "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
    server = PostgresServer(port, sockets, data, f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off")
    server.pg_ctl("-l", str(base / "log"), "-w", "-t", "60", "-o", server.options, "start")
    try:
        with server.admin() as conn:
            conn.execute(f"CREATE ROLE gateway LOGIN PASSWORD '{PG_PASSWORD}'")
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.pg_ctl("-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
