"""WebDAV locks and dead properties, persisted in one SQLite file in the state dir.

Both classes speak wsgidav's storage interfaces (LockStorageDict, PropertyManager)
so wsgidav's LockManager and resources use them unchanged; a restart loses no
lock and no property. One connection per store, serialized by a mutex: safe
with cheroot's worker threads, and SQLite's own locking covers other processes.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

from wsgidav.lock_man.lock_manager import generate_lock_token, normalize_lock_root, validate_lock

# Seconds to wait for other processes opening the same file.
_OPEN_TIMEOUT = 30
# wsgidav's own limits: one week by default, a month at most.
LOCK_TIMEOUT_DEFAULT = 604800
LOCK_TIMEOUT_MAX = 4 * 604800

_SCHEMA = """
CREATE TABLE IF NOT EXISTS locks (
    token TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    expire REAL NOT NULL,
    owner BLOB NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS locks_root ON locks(root);
CREATE TABLE IF NOT EXISTS properties (
    url TEXT NOT NULL,
    name TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (url, name)
);
"""


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting for other processes that switch the same new file at once.

    Worker processes open the file together on a first run. Two connections
    that both hold a read lock and both want the write lock are a deadlock
    SQLite breaks by failing one at once, without the busy timeout: retry.
    """
    deadline = time.monotonic() + _OPEN_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _Database:
    """One SQLite connection shared by the lock store and the property store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        with self._mutex:
            if self._conn is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=30)
                _use_wal(conn)
                # WAL with NORMAL survives a crash of the process intact; only a power
                # loss can take back the last commits (a lock or a property just set).
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                self._conn = conn

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection for one SELECT: atomic on its own, no write lock taken."""
        with self._mutex:
            if self._conn is None:
                raise RuntimeError(f"WebDAV state database {self.path} is closed")
            yield self._conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            if self._conn is None:
                raise RuntimeError(f"WebDAV state database {self.path} is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")


def _below(url: str) -> tuple[str, str]:
    """Bounds of the keys strictly below `url` for a range query ('/' sorts before '0')."""
    prefix = url.rstrip("/") + "/"
    return prefix, prefix[:-1] + "0"


class SQLiteLockStorage:
    """wsgidav lock storage (the LockStorageDict interface) backed by SQLite."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    def __repr__(self) -> str:
        return f"SQLiteLockStorage({str(self._db.path)!r})"

    def open(self) -> None:
        self._db.open()

    def close(self) -> None:
        self._db.close()

    def cleanup(self) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM locks WHERE expire >= 0 AND expire < ?", (time.time(),))

    def clear(self) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM locks")

    @staticmethod
    def _row_to_lock(row: tuple) -> dict:
        lock = json.loads(row[1])
        lock["owner"] = bytes(row[0])
        return lock

    def get(self, token: str) -> dict | None:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT owner, data, expire FROM locks WHERE token = ?",
                               (token,)).fetchone()
            if row is None:
                return None
            if 0 <= row[2] < time.time():
                conn.execute("DELETE FROM locks WHERE token = ?", (token,))
                return None
        return self._row_to_lock(row)

    def create(self, path: str, lock: dict) -> dict:
        root = normalize_lock_root(path)
        lock["root"] = root
        timeout = float(lock.get("timeout") or LOCK_TIMEOUT_DEFAULT)
        if timeout < 0 or timeout > LOCK_TIMEOUT_MAX:
            timeout = LOCK_TIMEOUT_MAX
        lock["timeout"] = timeout
        lock["expire"] = time.time() + timeout
        validate_lock(lock)
        lock["token"] = generate_lock_token()
        self._store(lock, insert=True)
        return lock

    def _store(self, lock: dict, *, insert: bool) -> None:
        data = {k: v for k, v in lock.items() if k != "owner"}
        with self._db.transaction() as conn:
            if insert:
                conn.execute("INSERT INTO locks (token, root, expire, owner, data) VALUES (?, ?, ?, ?, ?)",
                             (lock["token"], lock["root"], lock["expire"], lock["owner"], json.dumps(data)))
            else:
                conn.execute("UPDATE locks SET expire = ?, data = ? WHERE token = ?",
                             (lock["expire"], json.dumps(data), lock["token"]))

    def refresh(self, token: str, *, timeout: float) -> dict:
        lock = self.get(token)
        if lock is None:
            raise ValueError(f"lock {token} does not exist")
        if timeout < 0 or timeout > LOCK_TIMEOUT_MAX:
            timeout = LOCK_TIMEOUT_MAX
        lock["timeout"] = timeout
        lock["expire"] = time.time() + timeout
        self._store(lock, insert=False)
        return lock

    def delete(self, token: str) -> bool:
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM locks WHERE token = ?", (token,)).rowcount > 0

    def get_lock_list(self, path: str, *, include_root: bool, include_children: bool,
                      token_only: bool) -> list:
        root = normalize_lock_root(path)
        clauses, args = [], []
        if include_root:
            clauses.append("root = ?")
            args.append(root)
        if include_children:
            low, high = _below(root)
            clauses.append("(root >= ? AND root < ?)")
            args += [low, high]
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT owner, data FROM locks WHERE ({' OR '.join(clauses)}) "
                "AND (expire < 0 OR expire >= ?)", (*args, time.time())).fetchall()
        locks = [self._row_to_lock(row) for row in rows]
        return [lock["token"] for lock in locks] if token_only else locks


class SQLitePropertyManager:
    """wsgidav dead-property manager (the PropertyManager interface) backed by SQLite."""

    def __init__(self, db: _Database) -> None:
        self._db = db
        db.open()

    def __repr__(self) -> str:
        return f"SQLitePropertyManager({str(self._db.path)!r})"

    @staticmethod
    def _key(url: str) -> str:
        # A collection's ref URL ends with "/" (or not, depending on the caller).
        return url.rstrip("/") or "/"

    def get_properties(self, norm_url: str, environ: dict | None = None) -> list[str]:
        with self._db.read() as conn:
            rows = conn.execute("SELECT name FROM properties WHERE url = ?", (self._key(norm_url),))
            return [row[0] for row in rows.fetchall()]

    def get_property(self, norm_url: str, name: str, environ: dict | None = None) -> bytes | None:
        with self._db.read() as conn:
            row = conn.execute("SELECT value FROM properties WHERE url = ? AND name = ?",
                               (self._key(norm_url), name)).fetchone()
        return None if row is None else bytes(row[0])

    def write_property(self, norm_url: str, name: str, property_value: bytes, dry_run: bool = False,
                       environ: dict | None = None) -> None:
        if dry_run:
            return
        with self._db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO properties (url, name, value) VALUES (?, ?, ?)",
                         (self._key(norm_url), name, property_value))

    def remove_property(self, norm_url: str, name: str, dry_run: bool = False,
                        environ: dict | None = None) -> None:
        if dry_run:
            return
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM properties WHERE url = ? AND name = ?", (self._key(norm_url), name))

    def remove_properties(self, norm_url: str, environ: dict | None = None, *,
                          recursive: bool = False) -> None:
        key = self._key(norm_url)
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM properties WHERE url = ?", (key,))
            if recursive:
                conn.execute("DELETE FROM properties WHERE url >= ? AND url < ?", _below(key))

    def copy_properties(self, src_url: str, dest_url: str, environ: dict | None = None) -> None:
        src, dest = self._key(src_url), self._key(dest_url)
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM properties WHERE url = ?", (dest,))
            conn.execute("INSERT INTO properties (url, name, value) "
                         "SELECT ?, name, value FROM properties WHERE url = ?", (dest, src))

    def move_properties(self, src_url: str, dest_url: str, with_children: bool,
                        environ: dict | None = None) -> None:
        src, dest = self._key(src_url), self._key(dest_url)
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM properties WHERE url = ?", (dest,))
            conn.execute("UPDATE properties SET url = ? WHERE url = ?", (dest, src))
            if with_children:
                low, high = _below(src)
                conn.execute("DELETE FROM properties WHERE url >= ? AND url < ?", _below(dest))
                conn.execute("UPDATE properties SET url = ? || substr(url, ?) "
                             "WHERE url >= ? AND url < ?", (dest.rstrip("/"), len(src.rstrip("/")) + 1,
                                                            low, high))


def rekey_user_urls(props: SQLitePropertyManager, new_key: Callable[[str, str], str | None]) -> int:
    """Move the locks and properties of the database behind `props` from the old
    per-user keys ("/~user/path") to `new_key(user, path)`, the storage-location
    keys; drop those it cannot place. Returns how many rows were moved.
    """
    db = props._db

    def place(old: str) -> str | None:
        user, _, rest = unquote(old)[2:].partition("/")
        return new_key(user, "/" + rest)

    moved = 0
    with db.transaction() as conn:
        for url, name in conn.execute("SELECT url, name FROM properties WHERE url LIKE '/~%'").fetchall():
            key = place(url)
            if key is not None:
                conn.execute("INSERT OR REPLACE INTO properties (url, name, value) "
                             "SELECT ?, name, value FROM properties WHERE url = ? AND name = ?",
                             (key, url, name))
                moved += 1
            conn.execute("DELETE FROM properties WHERE url = ? AND name = ?", (url, name))
        for token, root, data in conn.execute(
                "SELECT token, root, data FROM locks WHERE root LIKE '/~%'").fetchall():
            key = place(root)
            if key is None:
                conn.execute("DELETE FROM locks WHERE token = ?", (token,))
                continue
            lock = json.loads(data)
            lock["root"] = normalize_lock_root(key)
            conn.execute("UPDATE locks SET root = ?, data = ? WHERE token = ?",
                         (lock["root"], json.dumps(lock), token))
            moved += 1
    return moved


def open_state(path: Path) -> tuple[SQLiteLockStorage, SQLitePropertyManager]:
    """The lock storage and property manager over one database file."""
    db = _Database(path)
    return SQLiteLockStorage(db), SQLitePropertyManager(db)
