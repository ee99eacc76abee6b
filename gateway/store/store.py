"""The Store: every piece of state that must outlive a request or be seen by another process.

One class over SQLAlchemy Core, the same code for SQLite and PostgreSQL. It
knows users, tokens, storage locations and clients, but no protocol: callers
never see SQL, and the store never sees a request.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..users import User, _user_from_toml, _user_to_toml, validate_name
from . import schema
from .errors import Conflict, LockConflict, Missing, OverBudget, StoreError, StoreUnavailable, TooManyLocks
from .records import Ban, InFlightUpload, Lock, Revocation, Session, TokenInfo, Usage

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "gateway_changes"
# Serializes lock creation across nodes on PostgreSQL (SQLite's write lock does it there).
_LOCKS_ADVISORY_KEY = 0x6761746577617902
# With a user's name hashed to the second key: serializes the budget check and
# write of one user's properties across nodes on PostgreSQL.
_PROPERTIES_ADVISORY_CLASS = 0x67617465
# Revocations are read by nodes within seconds; older ones only take space.
_REVOCATION_KEEP = 3600.0
# Seconds before the one retry of a statement whose connection was lost
# (see Store._transaction): a PostgreSQL restart takes a fraction of a second.
RETRY_DELAY = 0.5

_T = TypeVar("_T")


def hash_token(token: str) -> str:
    # Tokens are 256 random bits: a plain SHA-256 is enough, no slow hash needed.
    return hashlib.sha256(token.encode()).hexdigest()


def _below(location: str) -> tuple[str, str]:
    """Bounds of the keys strictly below `location` for a range query ('/' sorts just before '0')."""
    prefix = location.rstrip("/") + "/"
    return prefix, prefix[:-1] + "0"


def _like_escape(text: str) -> str:
    """`text` as a literal in a LIKE pattern with escape character backslash."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _deeper(prefix: str) -> str:
    """LIKE pattern (escape backslash) of the keys that start with `prefix` and have a "/" after it.

    Within a `_below` range every key starts with the prefix, so NOT LIKE
    this pattern keeps only the direct children.
    """
    return _like_escape(prefix) + "%/%"


def _ancestors(location: str) -> list[str]:
    """The locations above "backend:/a/b": "backend:/a", "backend:/"."""
    backend, _, path = location.partition(":")
    found = []
    while path not in ("/", ""):
        path = posixpath.dirname(path)
        found.append(f"{backend}:{path}")
    return found


def _user_values(user: User) -> dict:
    """Validate `user` exactly as the users file does and return its column values.

    Raises:
        UsersFileError: a field is invalid (the message names it).
    """
    validate_name(user.name)
    table = _user_to_toml(user)
    # Round trip through the users-file parser: one validation for file, CLI and store.
    normalized = _user_from_toml(user.name, table, "user")
    table = _user_to_toml(normalized)
    return {
        "name": normalized.name,
        "password_hash": normalized.password_hash,
        "keys": json.dumps(list(normalized.keys)),
        "home": str(normalized.home),
        "mounts": json.dumps(table.get("mounts", {})),
        "permissions": json.dumps(table["permissions"]),
        "quota_bytes": normalized.quota_bytes,
        "quota_files": normalized.quota_files,
        "disabled": normalized.disabled,
    }


def _row_user(row: sa.Row) -> User:
    table = {"keys": json.loads(row.keys), "home": row.home, "mounts": json.loads(row.mounts),
             "permissions": json.loads(row.permissions), "quota_bytes": row.quota_bytes,
             "quota_files": row.quota_files, "disabled": bool(row.disabled)}
    if row.password_hash:
        table["password"] = row.password_hash
    return _user_from_toml(row.name, table, "store")


_LOCK_COLUMNS = "token, root, owner, scope, depth, principal, timeout, expire"


def _tuple_lock(row: tuple) -> Lock:
    """The Lock of a plain-SQL row of the _LOCK_COLUMNS."""
    token, root, owner, scope, depth, principal, timeout, expire = row
    return Lock(token, root, bytes(owner), scope, depth, principal, timeout, expire)


class Store:
    """Users, admin tokens, WebDAV locks and properties, defender, quota usage, sessions,
    uploads in flight, node heartbeats and SSH host keys.

    Thread-safe: every method runs in its own short transaction on a pooled
    connection. Times are `time.time()` of the calling host. Any method may
    raise StoreUnavailable when the database cannot be reached.
    """

    def __init__(self, engine: sa.Engine, version: int) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self.version = version

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def url(self) -> str:
        """The database URL, with any password hidden."""
        url = self._engine.url
        return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)

    @property
    def shared(self) -> bool:
        """True when other hosts can share this store (PostgreSQL)."""
        return self._pg

    def close(self) -> None:
        """Close every pooled connection. The store cannot be used afterwards."""
        self._engine.dispose()

    # -- plumbing -------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """SQLAlchemy's errors of a database that cannot be reached, as one StoreUnavailable."""
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise self._unavailable(exc.orig) from None
        except sa.exc.DBAPIError as exc:
            # Any other driver error that cost the connection (PostgreSQL
            # restarted under it); the rest (IntegrityError) is the caller's.
            if not exc.connection_invalidated:
                raise
            raise self._unavailable(exc.orig) from None

    def _unavailable(self, exc: BaseException, *, unsent: bool = False) -> StoreUnavailable:
        """The StoreUnavailable for a driver error; `unsent` marks a statement that cannot have taken effect."""
        lines = str(exc).strip().splitlines()
        error = StoreUnavailable(f"store {self.url}: {lines[0] if lines else type(exc).__name__}")
        error.unsent = unsent
        return error

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._translate(), self._engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One transaction that may write; on SQLite it takes the write lock at once.

        Taking it at BEGIN (IMMEDIATE) rather than at the first write means the
        busy timeout applies, instead of SQLite failing a read-then-write
        transaction that loses the race to upgrade its lock.
        """
        with self._translate(), self._engine.connect() as conn:
            if not self._pg:
                conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn

    def _sql(self, sql: str) -> str:
        """`sql` written with "?" placeholders, in the driver's own placeholder style."""
        return sql.replace("?", "%s") if self._pg else sql

    def _fetch(self, sql: str, params: tuple, *, write: bool = False) -> list[tuple]:
        """Run one statement on a pooled DB-API connection and return its rows.

        For the few statements every request runs (lock checks, quota usage):
        SQLAlchemy Core spends 100-250 us per call building, caching and
        wrapping a statement and its transaction, where the driver answers
        these indexed queries in 5-15 us. Only plain SQL that means the same
        in SQLite and PostgreSQL goes here.

        A read on SQLite runs in autocommit mode (the pool's connections have
        no implicit transaction): the statement is its own read transaction
        and sees every commit made before it. A write takes SQLite's write
        lock at BEGIN IMMEDIATE, for the same reason as `_write`.
        """
        return self._transaction(lambda run: run(sql, params), write=write)

    def _transaction(self, body: Callable[[Callable[[str, tuple], list[tuple]]], _T], *,
                     write: bool = False) -> _T:
        """`body(run)` in one `_raw` transaction, tried once more on a fresh connection if need be.

        Only when the first try cannot have taken effect: its connection
        failed before the commit was sent (PostgreSQL restarted, and the pool
        handed out a connection that died with it, or none could be made
        yet). A failed commit is never repeated: whether it landed is unknown.
        """
        try:
            with self._raw(write=write) as run:
                return body(run)
        except StoreUnavailable as exc:
            if not getattr(exc, "unsent", False):
                raise
            log.info("%s; trying once more on a fresh connection", exc)
        time.sleep(RETRY_DELAY)
        with self._raw(write=write) as run:
            return body(run)

    @contextlib.contextmanager
    def _raw(self, *, write: bool = False) -> Iterator[Callable[[str, tuple], list[tuple]]]:
        """Several plain-SQL statements in one transaction on a pooled DB-API connection.

        Yields `run(sql, params) -> rows` ("?" placeholders, see `_fetch`).
        With `write`, the statements form one transaction that takes SQLite's
        write lock at BEGIN IMMEDIATE and commits when the block ends, or rolls
        back if it raises. Without it, each statement reads on its own on
        SQLite; on PostgreSQL they share one read transaction.
        """
        dbapi = self._engine.dialect.loaded_dbapi
        try:
            with self._translate():
                conn = self._engine.raw_connection()
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            # The pool hands out the driver's own error when it cannot connect.
            raise self._unavailable(exc, unsent=self._pg) from None
        except StoreUnavailable as exc:
            exc.unsent = self._pg
            raise
        sql = ""
        params: tuple = ()
        committing = False
        try:
            cursor = conn.cursor()
            try:
                if write and not self._pg:
                    cursor.execute("BEGIN IMMEDIATE")

                def run(statement: str, values: tuple) -> list[tuple]:
                    nonlocal sql, params
                    sql, params = statement, values
                    cursor.execute(self._sql(statement), values)
                    return cursor.fetchall() if cursor.description is not None else []

                try:
                    yield run
                except BaseException:
                    if write or self._pg:
                        conn.rollback()
                    raise
                if write:
                    committing = True
                    conn.commit()
            finally:
                cursor.close()
        except dbapi.IntegrityError as exc:
            raise sa.exc.IntegrityError(sql, params, exc) from None
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            # The connection may be broken (PostgreSQL restarted): never reuse it.
            # On SQLite the error is the busy timeout or the disk: no retry.
            conn.invalidate()
            raise self._unavailable(exc, unsent=self._pg and not committing) from None
        finally:
            conn.close()

    def _insert(self, table: sa.Table):
        return (postgresql.insert if self._pg else sqlite.insert)(table)

    def _bump(self, conn: sa.Connection) -> int:
        """Advance the change counter in this transaction and tell listeners at commit."""
        counter = conn.execute(sa.update(schema.changes).where(schema.changes.c.id == 1)
                               .values(counter=schema.changes.c.counter + 1)
                               .returning(schema.changes.c.counter)).scalar_one()
        if self._pg:
            # NOTIFY is delivered when (and only if) the transaction commits.
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(counter))))
        return counter

    # -- change feed ----------------------------------------------------------

    def change_counter(self) -> int:
        """The counter bumped by every change to users, tokens, bans and revocations."""
        with self._read() as conn:
            return conn.execute(sa.select(schema.changes.c.counter)).scalar_one()

    def watch(self, callback: Callable[[int], None], stop: threading.Event,
              poll_interval: float | None = None, since: int | None = None,
              alive: Callable[[int], None] | None = None) -> None:
        """Call `callback(counter)` after each change made by any process, until `stop` is set.

        `since` is the counter the caller's data reflects (default: the counter
        now), so that a change made just before the watch starts is not missed.
        `alive(counter)` is called after every successful read of the counter
        (after `callback` when it changed): how a follower knows that the feed
        still reaches the store, which LISTEN alone does not tell.

        Blocks: run it in a thread. PostgreSQL wakes it through LISTEN/NOTIFY
        and polls every `poll_interval` (default 5 s) as a fallback; a lost
        LISTEN connection is opened again every LISTEN_RETRY seconds until it
        is back. SQLite polls the counter every `poll_interval` (default 1 s).
        Changes that land close together may be reported once. A failing
        callback or an unreachable store is logged and the watch goes on.
        """
        if poll_interval is None:
            poll_interval = 5.0 if self._pg else 1.0
        last = self._counter_or(None) if since is None else since
        listener = _Listener(self)
        try:
            while not stop.is_set():
                if self._pg:
                    listener.wait(poll_interval, stop)
                else:
                    stop.wait(poll_interval)
                if stop.is_set():
                    break
                try:
                    counter = self.change_counter()
                except StoreUnavailable as exc:
                    log.warning("%s", exc)
                    continue
                if counter != last:
                    last = counter
                    try:
                        callback(counter)
                    except Exception:
                        log.exception("store change callback failed")
                if alive is not None:
                    try:
                        alive(counter)
                    except Exception:
                        log.exception("store watch alive callback failed")
        finally:
            listener.close()

    def _counter_or(self, default: int | None) -> int | None:
        try:
            return self.change_counter()
        except StoreUnavailable as exc:
            log.warning("%s", exc)
            return default

    # -- users ----------------------------------------------------------------

    def get_user(self, name: str) -> User | None:
        """The user called `name`, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(schema.users).where(schema.users.c.name == name)).first()
        return None if row is None else _row_user(row)

    def list_users(self) -> list[User]:
        """Every user, sorted by name."""
        with self._read() as conn:
            rows = conn.execute(sa.select(schema.users).order_by(schema.users.c.name)).all()
        return [_row_user(row) for row in rows]

    def add_user(self, user: User) -> None:
        """Add a new user.

        Raises:
            UsersFileError: a field is invalid.
            Conflict: a user of that name exists.
        """
        values = _user_values(user)
        now = time.time()
        with self._write() as conn:
            inserted = conn.execute(self._insert(schema.users)
                                    .values(**values, created=now, updated=now)
                                    .on_conflict_do_nothing(index_elements=["name"])
                                    .returning(schema.users.c.name)).first()
            if inserted is None:
                raise Conflict(f"user '{user.name}' already exists")
            self._bump(conn)

    def update_user(self, name: str, **changes) -> User:
        """Change fields of a user (the User dataclass's names) and return the new record.

        Raises:
            UsersFileError: a new value is invalid.
            Missing: no such user.
        """
        if "name" in changes:
            raise StoreError("a user cannot be renamed")
        with self._write() as conn:
            row = conn.execute(sa.select(schema.users).where(schema.users.c.name == name)
                               .with_for_update()).first()
            if row is None:
                raise Missing(f"no user '{name}'")
            user = replace(_row_user(row), **changes)
            conn.execute(sa.update(schema.users).where(schema.users.c.name == name)
                         .values(**_user_values(user), updated=time.time()))
            self._bump(conn)
        return user

    def remove_user(self, name: str) -> None:
        """Remove a user and their quota usage (their files stay in storage).

        Raises:
            Missing: no such user.
        """
        with self._write() as conn:
            conn.execute(sa.delete(schema.quota_usage).where(schema.quota_usage.c.user == name))
            if not conn.execute(sa.delete(schema.users).where(schema.users.c.name == name)).rowcount:
                raise Missing(f"no user '{name}'")
            self._bump(conn)

    def import_users(self, users: Iterable[User]) -> tuple[int, int]:
        """Add or replace several users in one transaction; return (added, replaced).

        Raises:
            UsersFileError: a user is invalid (then nothing is imported).
        """
        rows = [_user_values(user) for user in users]
        now = time.time()
        added = replaced = 0
        with self._write() as conn:
            for values in rows:
                exists = conn.execute(sa.select(schema.users.c.name)
                                      .where(schema.users.c.name == values["name"])).first()
                if exists:
                    conn.execute(sa.update(schema.users).where(schema.users.c.name == values["name"])
                                 .values(**values, updated=now))
                    replaced += 1
                else:
                    conn.execute(sa.insert(schema.users).values(**values, created=now, updated=now))
                    added += 1
            self._bump(conn)
        return added, replaced

    # -- admin API tokens -----------------------------------------------------

    def create_token(self, name: str) -> str:
        """Create an admin API token called `name` and return it; only its hash is kept.

        Raises:
            Conflict: a token of that name exists.
        """
        if not name or len(name) > 64 or not name.isprintable():
            raise StoreError(f"invalid token name {name!r}")
        token = secrets.token_urlsafe(32)
        with self._write() as conn:
            inserted = conn.execute(self._insert(schema.admin_tokens)
                                    .values(name=name, token_hash=hash_token(token), created=time.time())
                                    .on_conflict_do_nothing(index_elements=["name"])
                                    .returning(schema.admin_tokens.c.name)).first()
            if inserted is None:
                raise Conflict(f"token '{name}' already exists")
            self._bump(conn)
        return token

    def list_tokens(self) -> list[TokenInfo]:
        """Every token's name and creation time, sorted by name (never a hash)."""
        t = schema.admin_tokens
        with self._read() as conn:
            rows = conn.execute(sa.select(t.c.name, t.c.created).order_by(t.c.name)).all()
        return [TokenInfo(row.name, row.created) for row in rows]

    def revoke_token(self, name: str) -> None:
        """Delete the token called `name`.

        Raises:
            Missing: no such token.
        """
        with self._write() as conn:
            if not conn.execute(sa.delete(schema.admin_tokens)
                                .where(schema.admin_tokens.c.name == name)).rowcount:
                raise Missing(f"no token '{name}'")
            self._bump(conn)

    def verify_token(self, token: str) -> str | None:
        """The name of the token `token`, or None when it is not a valid token."""
        t = schema.admin_tokens
        with self._read() as conn:
            return conn.execute(sa.select(t.c.name).where(t.c.token_hash == hash_token(token))).scalar()

    # -- locks ----------------------------------------------------------------

    def add_lock(self, lock: Lock, *, max_per_location: int = 0, max_per_principal: int = 0) -> None:
        """Store `lock` unless a held lock conflicts with it or it would pass a limit.

        A lock conflicts with another on the same location, on an ancestor
        with depth "infinity", or (when it has depth "infinity" itself) on any
        descendant; two shared locks on the same or an ancestor location do
        not conflict. Expired locks are removed first. A limit of 0 is none:
        `max_per_location` locks on `lock.root` (shared ones pile up there),
        `max_per_principal` locks held by `lock.principal` anywhere.

        Raises:
            LockConflict: naming the roots of the conflicting locks.
            TooManyLocks: a limit would be passed (checked after conflicts).
            Conflict: the token exists.
        """
        # Every WebDAV LOCK runs this: plain SQL in one transaction (see _fetch).
        now = time.time()
        above = [lock.root, *_ancestors(lock.root)]

        def body(run: Callable[[str, tuple], list[tuple]]) -> None:
            if self._pg:
                run("SELECT pg_advisory_xact_lock(?)", (_LOCKS_ADVISORY_KEY,))
            run("DELETE FROM locks WHERE expire < ?", (now,))
            # The locks on the location and its ancestors and, for a depth-infinity
            # lock, below it: one statement (a round trip each on PostgreSQL).
            where = f"root IN ({', '.join('?' * len(above))})"
            params = tuple(above)
            if lock.depth == "infinity":
                where += " OR (root >= ? AND root < ?)"
                params += _below(lock.root)
            sql = f"SELECT root, scope, depth FROM locks WHERE {where}"
            if max_per_principal:
                # The user's locks in the same round trip: one row with no root.
                sql += " UNION ALL SELECT NULL, NULL, CAST(COUNT(*) AS TEXT) FROM locks WHERE principal = ?"
                params += (lock.principal,)
            conflicts = []
            on_root = held = 0
            for root, scope, depth in run(sql, params):
                if root is None:
                    held = int(depth)
                    continue
                on_root += root == lock.root
                if root not in above:   # below: any lock there conflicts with a depth-infinity one
                    conflicts.append(root)
                elif (root == lock.root or depth == "infinity") and not (scope == "shared" and lock.scope == "shared"):
                    conflicts.append(root)
            if conflicts:
                raise LockConflict(lock.root, sorted(set(conflicts)))
            if max_per_location and on_root >= max_per_location:
                raise TooManyLocks(lock.root, "location", max_per_location)
            if max_per_principal and held >= max_per_principal:
                raise TooManyLocks(lock.root, "principal", max_per_principal)
            try:
                run(f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (lock.token, lock.root, lock.owner, lock.scope, lock.depth, lock.principal,
                     lock.timeout, lock.expire))
            except self._engine.dialect.loaded_dbapi.IntegrityError:
                raise Conflict(f"lock token {lock.token} exists") from None

        self._transaction(body, write=True)

    def get_lock(self, token: str) -> Lock | None:
        """The lock with `token`, or None if there is none or it has expired."""
        rows = self._fetch(f"SELECT {_LOCK_COLUMNS} FROM locks WHERE token = ? AND expire >= ?",
                           (token, time.time()))
        return _tuple_lock(rows[0]) if rows else None

    def refresh_lock(self, token: str, timeout: float) -> Lock:
        """Extend a lock to expire `timeout` seconds from now and return it.

        Raises:
            Missing: no such lock, or it has expired.
        """
        now = time.time()
        rows = self._fetch(f"UPDATE locks SET timeout = ?, expire = ? WHERE token = ? AND expire >= ? "
                           f"RETURNING {_LOCK_COLUMNS}", (timeout, now + timeout, token, now), write=True)
        if not rows:
            raise Missing(f"no lock {token}")
        return _tuple_lock(rows[0])

    def remove_lock(self, token: str) -> bool:
        """Remove a lock; False if there was none."""
        return bool(self._fetch("DELETE FROM locks WHERE token = ? RETURNING token", (token,), write=True))

    def find_locks(self, location: str, *, include_root: bool = True,
                   include_children: bool = False, children_only: bool = False) -> list[Lock]:
        """Unexpired locks whose root is `location` and/or below it.

        With `children_only`, of the locks below only those rooted at a direct
        child (a PROPFIND of a folder asks which children have a lock of their own).
        """
        clauses: list[str] = []
        params: list = []
        if include_root:
            clauses.append("root = ?")
            params.append(location)
        if include_children:
            low, high = _below(location)
            if children_only:
                clauses.append("(root >= ? AND root < ? AND root NOT LIKE ? ESCAPE '\\')")
                params.extend((low, high, _deeper(low)))
            else:
                clauses.append("(root >= ? AND root < ?)")
                params.extend((low, high))
        if not clauses:
            return []
        rows = self._fetch(f"SELECT {_LOCK_COLUMNS} FROM locks WHERE ({' OR '.join(clauses)}) AND expire >= ? "
                           f"ORDER BY root, token", (*params, time.time()))
        return [_tuple_lock(row) for row in rows]

    def locks_at(self, locations: Iterable[str]) -> list[Lock]:
        """Unexpired locks whose root is one of `locations` (a path and its ancestors in one query)."""
        locations = list(locations)
        if not locations:
            return []
        # Every WebDAV request asks this: plain SQL on the indexed root column (see _fetch).
        rows = self._fetch(f"SELECT {_LOCK_COLUMNS} FROM locks "
                           f"WHERE root IN ({', '.join('?' * len(locations))}) AND expire >= ? "
                           f"ORDER BY root, token", (*locations, time.time()))
        return [_tuple_lock(row) for row in rows]

    def limit_locks(self, longest: float, max_owner_bytes: int) -> tuple[int, int]:
        """Bring locks granted under looser limits within these; return (shortened, removed).

        A lock expiring more than `longest` seconds from now is shortened to
        that (0: none is); one whose owner is over `max_owner_bytes` is removed (0: none is).
        """
        now = time.time()
        with self._raw(write=True) as run:
            shortened = removed = []
            if longest > 0:
                shortened = run("UPDATE locks SET timeout = ?, expire = ? WHERE expire > ? RETURNING token",
                                (longest, now + longest, now + longest))
            if max_owner_bytes > 0:
                removed = run("DELETE FROM locks WHERE length(owner) > ? RETURNING token", (max_owner_bytes,))
        return len(shortened), len(removed)

    def purge_expired_locks(self) -> int:
        """Remove expired locks; return how many."""
        with self._write() as conn:
            return conn.execute(sa.delete(schema.locks).where(schema.locks.c.expire < time.time())).rowcount

    # -- dead properties ------------------------------------------------------

    # The single-property calls run for every PROPPATCH and PROPFIND: plain SQL (see _fetch).

    def property_names(self, location: str) -> list[str]:
        """Names of the properties set on `location`, sorted."""
        return [name for (name,) in self._fetch("SELECT name FROM properties WHERE location = ? ORDER BY name",
                                                (location,))]

    def properties_below(self, location: str, *, children_only: bool = False) -> list[tuple[str, str, bytes]]:
        """(location, name, value) of every property set strictly below `location`, in one query.

        A PROPFIND of a folder reads its children's properties with this
        instead of one query per child; with `children_only` the rows of
        deeper descendants stay in the database (the index range is still
        walked, but their values are neither read nor sent).
        """
        p = schema.properties
        low, high = _below(location)
        query = (sa.select(p.c.location, p.c.name, p.c.value)
                 .where(p.c.location >= low, p.c.location < high))
        if children_only:
            query = query.where(p.c.location.not_like(_deeper(low), escape="\\"))
        with self._read() as conn:
            rows = conn.execute(query.order_by(p.c.location, p.c.name)).all()
        return [(row[0], row[1], bytes(row[2])) for row in rows]

    def get_property(self, location: str, name: str) -> bytes | None:
        """The value of one property, or None."""
        rows = self._fetch("SELECT value FROM properties WHERE location = ? AND name = ?", (location, name))
        return bytes(rows[0][0]) if rows else None

    def set_property(self, location: str, name: str, value: bytes, *, owner: str = "", budget: int = 0) -> None:
        """Create or replace one property, set by `owner`.

        With a `budget`, the bytes of all properties `owner` set (the one
        this replaces not counted) must stay within it; checked and written
        in one transaction, so writes racing on other nodes cannot pass it together.

        Raises:
            OverBudget: the write would take `owner` past `budget`.
        """
        with self._raw(write=True) as run:
            if budget:
                if self._pg:
                    run("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_PROPERTIES_ADVISORY_CLASS, owner))
                used = self._owner_bytes(run, owner, location, name)
                if used + len(value) > budget:
                    raise OverBudget(owner, used, budget)
            run("INSERT INTO properties (location, name, value, owner) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (location, name) DO UPDATE SET value = excluded.value, owner = excluded.owner",
                (location, name, value, owner))

    @staticmethod
    def _owner_bytes(run: Callable[[str, tuple], list[tuple]], owner: str, location: str = "",
                     name: str = "") -> int:
        # length() is bytes for a BLOB (SQLite) and a bytea (PostgreSQL).
        [(used,)] = run("SELECT COALESCE(SUM(length(value)), 0) FROM properties "
                        "WHERE owner = ? AND NOT (location = ? AND name = ?)", (owner, location, name))
        return int(used)

    def property_bytes(self, owner: str) -> int:
        """Bytes of the values of every property `owner` set."""
        with self._raw() as run:
            return self._owner_bytes(run, owner)

    def owned_property_bytes(self, owner: str, location: str, name: str) -> int:
        """Bytes of the value of one property if `owner` set it, else 0 (none there, or another's)."""
        rows = self._fetch("SELECT length(value) FROM properties WHERE location = ? AND name = ? AND owner = ?",
                           (location, name, owner))
        return int(rows[0][0]) if rows else 0

    def remove_property(self, location: str, name: str) -> None:
        """Remove one property (no error if it is not set)."""
        self._fetch("DELETE FROM properties WHERE location = ? AND name = ?", (location, name), write=True)

    def remove_properties(self, location: str, *, recursive: bool = False) -> None:
        """Remove every property of `location`, and with `recursive` of everything below it."""
        p = schema.properties
        with self._write() as conn:
            conn.execute(sa.delete(p).where(p.c.location == location))
            if recursive:
                low, high = _below(location)
                conn.execute(sa.delete(p).where(p.c.location >= low, p.c.location < high))

    def copy_properties(self, source: str, dest: str, *, owner: str = "", budget: int = 0) -> None:
        """Replace the properties of `dest` with a copy of those of `source` (not recursive), set by `owner`.

        Raises:
            OverBudget: with a `budget`, the copies would take `owner` past it
                (then nothing changes).
        """
        p = schema.properties
        with self._write() as conn:
            conn.execute(sa.delete(p).where(p.c.location == dest))
            if budget:
                if self._pg:
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PROPERTIES_ADVISORY_CLASS,
                                                                          sa.func.hashtext(owner))))
                used = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(p.c.value)), 0))
                                    .where(p.c.owner == owner)).scalar()
                adding = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(p.c.value)), 0))
                                      .where(p.c.location == source)).scalar()
                if adding and used + adding > budget:
                    raise OverBudget(owner, int(used), budget)
            conn.execute(sa.insert(p).from_select(
                ["location", "name", "value", "owner"],
                sa.select(sa.literal(dest, schema.Location), p.c.name, p.c.value, sa.literal(owner, sa.Text))
                .where(p.c.location == source)))

    def move_properties(self, source: str, dest: str, *, with_children: bool = False) -> None:
        """Move the properties of `source` (and with `with_children` of everything below it) to `dest`."""
        p = schema.properties
        with self._write() as conn:
            conn.execute(sa.delete(p).where(p.c.location == dest))
            conn.execute(sa.update(p).where(p.c.location == source).values(location=dest))
            if with_children:
                low, high = _below(source)
                conn.execute(sa.delete(p).where(p.c.location >= _below(dest)[0],
                                                p.c.location < _below(dest)[1]))
                tail = sa.func.substr(p.c.location, len(low))
                conn.execute(sa.update(p).where(p.c.location >= low, p.c.location < high)
                             .values(location=sa.literal(dest.rstrip("/"), schema.Location).concat(tail)))

    # -- defender -------------------------------------------------------------

    def record_failure(self, key: str, window: float) -> int:
        """Record a failed login for `key`; return the failures within the last `window` seconds."""
        f = schema.failures
        now = time.time()
        with self._write() as conn:
            conn.execute(sa.delete(f).where(f.c.key == key, f.c.time < now - window))
            conn.execute(sa.insert(f).values(key=key, time=now))
            return conn.execute(sa.select(sa.func.count()).select_from(f).where(f.c.key == key)).scalar_one()

    def count_failures(self, key: str, window: float) -> int:
        """Failed logins for `key` within the last `window` seconds."""
        f = schema.failures
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(f)
                                .where(f.c.key == key, f.c.time >= time.time() - window)).scalar_one()

    def clear_failures(self, key: str) -> None:
        """Forget the failed logins of `key`."""
        with self._write() as conn:
            conn.execute(sa.delete(schema.failures).where(schema.failures.c.key == key))

    def purge_failures(self, window: float) -> int:
        """Remove failures older than `window` seconds for every key; return how many."""
        f = schema.failures
        with self._write() as conn:
            return conn.execute(sa.delete(f).where(f.c.time < time.time() - window)).rowcount

    def ban(self, key: str, until: float) -> None:
        """Ban `key` until the time `until` (a later ban replaces an earlier one)."""
        insert = self._insert(schema.bans).values(key=key, until=until)
        with self._write() as conn:
            conn.execute(insert.on_conflict_do_update(index_elements=["key"],
                                                      set_={"until": insert.excluded.until}))
            self._bump(conn)

    def unban(self, key: str) -> bool:
        """Lift the ban on `key`; False if it was not banned."""
        b = schema.bans
        with self._write() as conn:
            removed = conn.execute(sa.delete(b).where(b.c.key == key)).rowcount > 0
            conn.execute(sa.delete(schema.failures).where(schema.failures.c.key == key))
            if removed:
                self._bump(conn)
        return removed

    def banned_until(self, key: str) -> float | None:
        """When the ban on `key` ends, or None if it is not banned now."""
        b = schema.bans
        with self._read() as conn:
            return conn.execute(sa.select(b.c.until).where(b.c.key == key, b.c.until > time.time())).scalar()

    def list_bans(self) -> list[Ban]:
        """Bans in force, sorted by key."""
        b = schema.bans
        with self._read() as conn:
            rows = conn.execute(sa.select(b).where(b.c.until > time.time()).order_by(b.c.key)).all()
        return [Ban(row.key, row.until) for row in rows]

    # -- quota usage ----------------------------------------------------------

    def get_usage(self, user: str) -> Usage | None:
        """The recorded usage of `user`, or None if none was ever set."""
        # Read by every upload of a user with a quota: plain SQL (see _fetch).
        rows = self._fetch('SELECT bytes, files FROM quota_usage WHERE "user" = ?', (user,))
        return Usage(*rows[0]) if rows else None

    def set_usage(self, user: str, usage: Usage) -> None:
        """Record the usage of `user` (after counting it in storage).

        Raises:
            Missing: no such user.
        """
        insert = self._insert(schema.quota_usage).values(user=user, bytes=usage.bytes, files=usage.files)
        try:
            with self._write() as conn:
                conn.execute(insert.on_conflict_do_update(
                    index_elements=["user"], set_={"bytes": insert.excluded.bytes,
                                                   "files": insert.excluded.files}))
        except sa.exc.IntegrityError:
            raise Missing(f"no user '{user}'") from None

    def init_usage(self, user: str, usage: Usage) -> Usage:
        """Record `usage` for `user` unless usage is recorded already; return what is recorded.

        For the first count of a user's storage: when two processes count at
        once, the first one's numbers stay and the deltas added since are kept.

        Raises:
            Missing: no such user.
        """
        q = schema.quota_usage
        insert = self._insert(q).values(user=user, bytes=usage.bytes, files=usage.files)
        try:
            with self._write() as conn:
                conn.execute(insert.on_conflict_do_nothing(index_elements=["user"]))
                row = conn.execute(sa.select(q.c.bytes, q.c.files).where(q.c.user == user)).one()
        except sa.exc.IntegrityError:
            raise Missing(f"no user '{user}'") from None
        return Usage(row.bytes, row.files)

    def add_usage(self, user: str, bytes_delta: int, files_delta: int) -> Usage:
        """Add to the usage of `user` atomically (starting from 0) and return the new total.

        Raises:
            Missing: no such user.
        """
        # Written by every upload of a user whose usage is counted: plain SQL (see _fetch).
        try:
            [row] = self._fetch('INSERT INTO quota_usage ("user", bytes, files) VALUES (?, ?, ?) '
                                'ON CONFLICT ("user") DO UPDATE SET bytes = quota_usage.bytes + excluded.bytes, '
                                'files = quota_usage.files + excluded.files RETURNING bytes, files',
                                (user, bytes_delta, files_delta), write=True)
        except sa.exc.IntegrityError:
            raise Missing(f"no user '{user}'") from None
        return Usage(*row)

    # -- sessions and revocations ---------------------------------------------

    def add_session(self, session: Session) -> None:
        """Record a live session.

        Raises:
            Conflict: the session id exists.
        """
        values = vars(session) | {"touched": session.touched or session.started}
        try:
            with self._write() as conn:
                conn.execute(sa.insert(schema.sessions).values(**values))
        except sa.exc.IntegrityError:
            raise Conflict(f"session {session.id} exists") from None

    def touch_session(self, session_id: str, bytes_total: int) -> None:
        """Record activity on a session: now, and its bytes transferred so far."""
        s = schema.sessions
        with self._write() as conn:
            conn.execute(sa.update(s).where(s.c.id == session_id)
                         .values(touched=time.time(), bytes=bytes_total))

    def remove_session(self, session_id: str) -> None:
        """Forget a session that ended (no error if it is unknown)."""
        with self._write() as conn:
            conn.execute(sa.delete(schema.sessions).where(schema.sessions.c.id == session_id))

    def remove_node_sessions(self, node: str) -> int:
        """Forget every session of `node` (it restarted or died); return how many."""
        with self._write() as conn:
            return conn.execute(sa.delete(schema.sessions).where(schema.sessions.c.node == node)).rowcount

    def list_sessions(self, *, user: str | None = None, node: str | None = None) -> list[Session]:
        """Live sessions on every node, oldest first, optionally of one user or node."""
        s = schema.sessions
        query = sa.select(s).order_by(s.c.started, s.c.id)
        if user is not None:
            query = query.where(s.c.user == user)
        if node is not None:
            query = query.where(s.c.node == node)
        with self._read() as conn:
            return [Session(**row._mapping) for row in conn.execute(query).all()]

    def revoke(self, *, user: str | None = None, session_id: str | None = None) -> Revocation:
        """Ask every node to end the sessions of `user` started until now, or one session.

        Raises:
            ValueError: neither or both of user and session_id given.
        """
        if (user is None) == (session_id is None):
            raise ValueError("revoke() takes exactly one of user and session_id")
        r = schema.revocations
        now = time.time()
        with self._write() as conn:
            conn.execute(sa.delete(r).where(r.c.time < now - _REVOCATION_KEEP))
            new_id = conn.execute(sa.insert(r).values(user=user, session_id=session_id, time=now)
                                  .returning(r.c.id)).scalar_one()
            self._bump(conn)
        return Revocation(new_id, user, session_id, now)

    def revocations_after(self, last_id: int) -> list[Revocation]:
        """Revocations with an id above `last_id` (kept for an hour), oldest first."""
        r = schema.revocations
        with self._read() as conn:
            rows = conn.execute(sa.select(r).where(r.c.id > last_id).order_by(r.c.id)).all()
        return [Revocation(row.id, row.user, row.session_id, row.time) for row in rows]

    def last_revocation_id(self) -> int:
        """The id of the newest revocation (0 if none): where a new reader starts."""
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.max(schema.revocations.c.id))).scalar() or 0

    # -- uploads in flight and node heartbeats --------------------------------

    def heartbeat(self, node: str) -> bool:
        """Record that `node` is alive now; False when it had no row (new, or swept as dead)."""
        n = schema.nodes
        now = time.time()
        insert = self._insert(n).values(node=node, heartbeat=now)
        with self._write() as conn:
            if conn.execute(sa.update(n).where(n.c.node == node).values(heartbeat=now)).rowcount:
                return True
            conn.execute(insert.on_conflict_do_update(index_elements=["node"],
                                                      set_={"heartbeat": insert.excluded.heartbeat}))
        return False

    def forget_node(self, node: str) -> None:
        """Remove the heartbeat of a node that stopped cleanly (its uploads are gone already)."""
        with self._write() as conn:
            conn.execute(sa.delete(schema.nodes).where(schema.nodes.c.node == node))

    def sweep_dead_nodes(self, node_timeout: float) -> tuple[int, int]:
        """Remove the sessions of nodes silent for `node_timeout` seconds (or never heard of), and
        the rows of those nodes; returns (sessions, nodes) removed.

        A live node beats before it publishes any session, so a session whose
        node has no row was left by a node that died (or was swept already).
        Uploads are left alone: `stale_uploads` still finds those of a node
        without a row, and they need their backend cleaned first.
        """
        s, n = schema.sessions, schema.nodes
        cutoff = time.time() - node_timeout
        alive = sa.select(n.c.node).where(n.c.heartbeat >= cutoff)
        with self._write() as conn:
            sessions = conn.execute(sa.delete(s).where(s.c.node.not_in(alive))).rowcount
            nodes = conn.execute(sa.delete(n).where(n.c.heartbeat < cutoff)).rowcount
        return sessions, nodes

    def add_upload(self, upload: InFlightUpload) -> None:
        """Record an upload in flight (e.g. an S3 multipart upload) owned by `upload.node`."""
        with self._write() as conn:
            conn.execute(sa.insert(schema.uploads).values(**vars(upload)))

    def remove_upload(self, upload_id: str) -> None:
        """Forget an upload that was completed or aborted (by `InFlightUpload.id`)."""
        with self._write() as conn:
            conn.execute(sa.delete(schema.uploads).where(schema.uploads.c.id == upload_id))

    def list_uploads(self, node: str | None = None) -> list[InFlightUpload]:
        """Uploads in flight, oldest first, optionally of one node."""
        u = schema.uploads
        query = sa.select(u).order_by(u.c.started, u.c.id)
        if node is not None:
            query = query.where(u.c.node == node)
        with self._read() as conn:
            return [InFlightUpload(**row._mapping) for row in conn.execute(query).all()]

    def stale_uploads(self, node_timeout: float) -> list[InFlightUpload]:
        """Uploads whose node has sent no heartbeat for `node_timeout` seconds (or never)."""
        u, n = schema.uploads, schema.nodes
        query = (sa.select(u).join(n, n.c.node == u.c.node, isouter=True)
                 .where(sa.or_(n.c.heartbeat.is_(None), n.c.heartbeat < time.time() - node_timeout))
                 .order_by(u.c.started, u.c.id))
        with self._read() as conn:
            return [InFlightUpload(**row._mapping) for row in conn.execute(query).all()]

    # -- SSH host keys --------------------------------------------------------

    def get_or_create_host_key(self, key_type: str, generate: Callable[[], str]) -> str:
        """The private key PEM stored for `key_type`; the first caller stores `generate()`'s.

        Every node calling this at once gets the same key: the first insert
        wins and the others read it.
        """
        k = schema.host_keys
        with self._read() as conn:
            pem = conn.execute(sa.select(k.c.private_key).where(k.c.type == key_type)).scalar()
        if pem is not None:
            return pem
        candidate = generate()
        with self._write() as conn:
            conn.execute(self._insert(k).values(type=key_type, private_key=candidate)
                         .on_conflict_do_nothing(index_elements=["type"]))
            return conn.execute(sa.select(k.c.private_key).where(k.c.type == key_type)).scalar_one()



# Seconds between two attempts to open a lost LISTEN connection again.
LISTEN_RETRY = 1.0


class _Listener:
    """The watch's LISTEN connection on PostgreSQL: opened on demand, opened again once lost."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._conn = None
        self._lost = False   # a warning was logged; the return to LISTEN is logged once too

    def wait(self, timeout: float, stop: threading.Event) -> None:
        """Return on a NOTIFY, once LISTEN is back after a loss, on `stop`, or after `timeout`."""
        import psycopg
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            if self._conn is None:
                try:
                    self._conn = self._listen()
                except psycopg.Error as exc:
                    self._lose(exc)
                    stop.wait(max(0.0, min(LISTEN_RETRY, deadline - time.monotonic())))
                    continue
                if self._lost:
                    self._lost = False
                    log.warning("store %s: LISTEN is back", self._store.url)
                    # Changes made while it was lost sent no NOTIFY: read the counter now.
                    return
            try:
                # Short waits so that `stop` is honoured promptly.
                for _ in self._conn.notifies(timeout=0.25, stop_after=1):
                    return
            except psycopg.Error as exc:
                self._lose(exc)
                self.close()

    def _listen(self):
        import psycopg
        url = self._store._engine.url.set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True,
                               connect_timeout=10)
        try:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _lose(self, exc: Exception) -> None:
        if not self._lost:
            self._lost = True
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("store %s: LISTEN failed, polling until it is back: %s", self._store.url, detail)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
