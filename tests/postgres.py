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
from dataclasses import dataclass, field
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
    pg_ctl: list[str] = field(default_factory=list)   # pg_ctl -D DATA, run as `postgres`
    _numbers = itertools.count(1)

    def stop(self) -> None:
        """Stop the server at once (fast shutdown: every connection is cut), as for a restart."""
        subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "-t", "60", "stop"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        """Start the server stopped by `stop()` again, on the same port and data."""
        subprocess.run([*self.pg_ctl, "-w", "-t", "60", "start"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=120)

    def admin(self) -> psycopg.Connection:
        # Local (socket) connections use trust auth; TCP ones need the password.
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                               dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        """A fresh empty database owned by `gateway`; returns its URL."""
        name = f"gw{os.getpid()}_{next(self._numbers)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER gateway")
        return f"postgresql://gateway:{PG_PASSWORD}@127.0.0.1:{self.port}/{name}"


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
    # Not under pytest's tmp dir: its parents are private to root, and the
    # server runs as `postgres` (initdb refuses to run as root).
    base = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    pwfile = base / "pw"
    pwfile.write_text("unused-superuser-pw\n")
    if as_postgres:
        shutil.chown(pwfile, "postgres", "postgres")

    def run(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
    run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
        "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    pg_ctl = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"),
              "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"]
    try:
        server = PostgresServer(port, sockets, pg_ctl)
        with server.admin() as conn:
            conn.execute(f"CREATE ROLE gateway LOGIN PASSWORD '{PG_PASSWORD}'")
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
