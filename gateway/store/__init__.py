"""The state store: users, tokens, locks, properties, defender, quota usage, sessions,
uploads in flight and host keys, in SQLite (one host) or PostgreSQL (several nodes).

`open_store(url, state_dir)` connects, applies pending migrations and returns
the Store; the rest of the gateway sees only the Store's methods and records.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

from . import migrations
from .errors import Conflict, LockConflict, Missing, OverBudget, StoreError, StoreUnavailable, TooManyLocks
from .records import Ban, InFlightUpload, Lock, Revocation, Session, TokenInfo, Usage
from .store import Store
from .user_cache import UserCache

__all__ = ["open_store", "check_url", "Store", "UserCache", "StoreError", "StoreUnavailable", "Conflict",
           "LockConflict", "Missing", "OverBudget", "TooManyLocks", "Ban", "InFlightUpload", "Lock",
           "Revocation", "Session", "TokenInfo", "Usage"]

_SQLITE_DRIVERS = ("sqlite", "sqlite+pysqlite")
_PG_DRIVERS = ("postgresql", "postgresql+psycopg")
_URL_FORMS = "expected sqlite:///FILE or postgresql://USER:PASSWORD@HOST:PORT/DB"
BUSY_TIMEOUT = 30   # seconds a SQLite writer waits for another process's transaction
SQLITE_POOL_SIZE = 64   # SQLite connections kept open for reuse (each holds 3 descriptors)


def check_url(url: str) -> sa.URL:
    """Parse a store URL.

    Raises:
        StoreError: not a SQLite or PostgreSQL URL this gateway can use.
    """
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        # Never echo the text: it may hold a password.
        raise StoreError(f"not a database URL: {_URL_FORMS}") from None
    if parsed.drivername in _SQLITE_DRIVERS:
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
            raise StoreError(f"a SQLite store needs a file name: {_URL_FORMS}")
        return parsed.set(drivername="sqlite+pysqlite")
    if parsed.drivername in _PG_DRIVERS:
        if not parsed.database:
            raise StoreError(f"a PostgreSQL store needs a database name: {_URL_FORMS}")
        return parsed.set(drivername="postgresql+psycopg")
    raise StoreError(f"unsupported database '{parsed.drivername}': {_URL_FORMS}")


def _sqlite_engine(url: sa.URL, state_dir: Path) -> sa.Engine:
    path = Path(url.database)
    if not path.is_absolute():
        path = Path(state_dir) / path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The file holds password hashes: create it private (SQLite gives -wal/-shm the same mode).
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    # Every front-end thread may read the store at once (lock checks, quota).
    # SQLite connections are cheap, and SQLite itself serializes writers: no
    # thread should wait for a pool slot (the default: 15, then a 30 s wait)
    # or pay for a new connection and its pragmas because more threads than
    # the default 5 were busy a moment ago.
    engine = sa.create_engine(url.set(database=str(path)), pool_size=SQLITE_POOL_SIZE, max_overflow=-1,
                              connect_args={"timeout": BUSY_TIMEOUT, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # pysqlite's own transaction handling would defer BEGIN; issue it ourselves.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT * 1000}")
        _switch_to_wal(cursor)
        # WAL with NORMAL survives a crash of any process; only a power loss
        # can take back the last commits.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _switch_to_wal(cursor) -> None:
    """Put the file in WAL mode (a property of the file: a no-op once it is).

    Several processes opening a new file at once race to switch it, and
    SQLite answers the loser "database is locked" at once, without its busy
    wait: try again until the busy timeout would have passed.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def open_store(url: str, state_dir: Path) -> Store:
    """Connect to the store at `url`, apply pending migrations, and return it.

    A relative SQLite path is relative to `state_dir`.

    Raises:
        StoreError: the URL is invalid, or the schema is newer than this gateway.
        StoreUnavailable: the database cannot be reached.
    """
    parsed = check_url(url)
    if parsed.drivername.startswith("sqlite"):
        engine = _sqlite_engine(parsed, state_dir)
    else:
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    try:
        version = migrations.upgrade(engine)
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        where = engine.url.set(drivername=engine.url.get_backend_name()).render_as_string(hide_password=True)
        raise StoreUnavailable(f"store {where}: {str(exc.orig).strip().splitlines()[0]}") from None
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, version)
