"""WebDAV locks and dead properties in the gateway's state store.

Both classes speak wsgidav's storage interfaces (LockStorageDict, PropertyManager)
so wsgidav's LockManager and resources use them unchanged. The store is shared
by every worker and node: a lock taken on one node holds on all, and a restart
loses no lock and no property.

wsgidav names resources by their ref URL; ours is the storage location quoted
as "/BACKEND/storage/path" (provider.UserFSProvider.ref_url). The store keys the
same location as "BACKEND:/storage/path", unquoted; the two functions below
convert between them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from wsgidav.dav_error import (HTTP_BAD_REQUEST, HTTP_INSUFFICIENT_STORAGE, HTTP_LOCKED,
                               PRECONDITION_CODE_LockConflict, DAVError, DAVErrorCondition)
from wsgidav.lock_man.lock_manager import generate_lock_token, normalize_lock_root, validate_lock

from ..store import Conflict, Lock, LockConflict, Missing, OverBudget, Store, StoreError, TooManyLocks

log = logging.getLogger(__name__)

# wsgidav's own limits: one week by default, a month at most. The store needs
# a finite expiry, so an infinite timeout (-1) gets the longest one; below
# both, LockLimits.max_timeout shortens every grant (RFC 4918 10.7 lets the
# server choose a shorter timeout; the activelock in the answer names it).
LOCK_TIMEOUT_DEFAULT = 604800
LOCK_TIMEOUT_MAX = 4 * 604800


@dataclass(frozen=True)
class LockLimits:
    """What one LOCK may take from the shared store ([webdav] max_lock_* and max_locks_*); 0 is no limit.

    Every lock on a resource is answered in full in every PROPFIND that
    lists it (lockdiscovery, with its owner), to every user who sees the
    resource: these bound that answer as well as the store.
    """

    max_timeout: int = 86400           # seconds; longer requests and "Infinite" get this
    max_owner_bytes: int = 4096        # the <D:owner> element as XML; a larger one is refused with 400
    max_per_resource: int = 16         # locks on one resource (shared ones pile up); 423 beyond
    max_per_user: int = 1000           # locks one user holds anywhere; 507 beyond


# Request memo keys of wsgidav's own URLs, beside the store keys ("backend:/path").
_URL_KEY = "\0url "


def url_to_location(url: str) -> str | None:
    """The store key of a ref URL: "/local/a%20b/" -> "local:/a b" (None for "/", which names no backend)."""
    backend, _, rest = url.strip("/").partition("/")
    if not backend:
        return None
    return f"{unquote(backend)}:/{unquote(rest)}"


def location_to_url(location: str) -> str:
    """The ref URL of a store key: "local:/a b" -> "/local/a%20b" (the inverse of url_to_location)."""
    backend, _, path = location.partition(":")
    return "/" + quote(backend, safe="") + (quote(path) if path != "/" else "")


def _clamp(timeout: float | None, longest: float = LOCK_TIMEOUT_MAX) -> float:
    """The timeout granted for one asked (None: the default, -1: infinite), at most `longest`."""
    longest = min(longest, LOCK_TIMEOUT_MAX) if longest > 0 else LOCK_TIMEOUT_MAX
    timeout = float(timeout or LOCK_TIMEOUT_DEFAULT)
    return longest if timeout < 0 or timeout > longest else timeout


def _lock_dict(lock: Lock) -> dict:
    return {"root": location_to_url(lock.root), "type": "write", "scope": lock.scope,
            "depth": lock.depth, "owner": lock.owner, "timeout": lock.timeout,
            "expire": lock.expire, "principal": lock.principal, "token": lock.token}


class StoreLockStorage:
    """wsgidav lock storage (the LockStorageDict interface) over the state store.

    wsgidav's LockManager checks for conflicts before it creates a lock, but
    only among what this process sees at that moment; the store checks again
    in the transaction that adds the lock, so two nodes racing for one
    resource cannot both win (the loser answers 423).
    """

    def __init__(self, store: Store, limits: LockLimits = LockLimits()) -> None:
        self._store = store
        self.limits = limits
        # Per request (thread): the locks on one location and all its ancestors,
        # read in one query. wsgidav asks for each ancestor in turn, twice per PUT.
        self._request = threading.local()

    def __repr__(self) -> str:
        return f"StoreLockStorage({self._store.url!r})"

    @contextlib.contextmanager
    def request_scope(self) -> Iterator[None]:
        """Within one request, answer the lock checks of a path and its ancestors, and of a token, from one read each.

        A lock another node takes during the request is seen by the next
        request: the same window wsgidav leaves between its check and the write.

        The read is never skipped on a cached "no lock anywhere": a lock taken
        on another node (or worker) reaches this one's change feed up to a
        poll later (1 s on SQLite), so a PUT sent right after that LOCK's 200
        would pass unlocked. One indexed query in plain SQL costs ~10-15 us.
        """
        self._request.memo = {}
        self._request.tokens = {}
        self._request.created = []
        try:
            yield
        except BaseException:
            # The request failed after it stored a lock (a 5xx from storage or
            # the store): its client never got the token, so nobody could unlock.
            self._drop_created()
            raise
        finally:
            self._request.memo = None
            self._request.tokens = None
            self._request.created = None

    def _drop_created(self) -> None:
        for token in self._request.created:
            try:
                self._store.remove_lock(token)
            except StoreError as exc:
                log.warning("lock %s of a failed LOCK stays until it expires: %s", token, exc)

    def _forget_memo(self) -> None:
        if getattr(self._request, "memo", None):
            self._request.memo = {}
        if getattr(self._request, "tokens", None):
            self._request.tokens = {}

    def _locks_on(self, location: str) -> list[Lock]:
        memo = getattr(self._request, "memo", None)
        if memo is None:
            return self._store.find_locks(location)
        if location not in memo:
            backend, _, path = location.partition(":")
            chain = [path]
            while chain[-1] != "/":
                chain.append(posixpath.dirname(chain[-1]))
            chain = [f"{backend}:{p}" for p in chain if f"{backend}:{p}" not in memo]
            for key in chain:
                memo[key] = []
            for lock in self._store.locks_at(chain):
                memo[lock.root].append(lock)
        return memo[location]

    # The store belongs to the gateway, which opens and closes it.
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def cleanup(self) -> None:
        self._store.purge_expired_locks()

    def get(self, token: str) -> dict | None:
        # UNLOCK asks for its token twice (is it on this URL? is it this
        # user's?): within a request, one read answers both.
        tokens = getattr(self._request, "tokens", None)
        if tokens is None:
            lock = self._store.get_lock(token)
        elif token in tokens:
            lock = tokens[token]
        else:
            lock = tokens[token] = self._store.get_lock(token)
        return None if lock is None else _lock_dict(lock)

    def create(self, path: str, lock: dict) -> dict:
        # wsgidav keeps using the dict it passed: fill it in place.
        root = normalize_lock_root(path)
        location = url_to_location(root)
        if location is None:
            raise DAVError(HTTP_LOCKED, context_info="the root of the server cannot be locked")
        limits = self.limits
        owner = lock.get("owner") or b""
        if limits.max_owner_bytes and len(owner) > limits.max_owner_bytes:
            # 400, not 507: the request itself is over a fixed limit, and the
            # same LOCK would fail again whatever is freed meanwhile.
            raise DAVError(HTTP_BAD_REQUEST, context_info=f"the lock owner is {len(owner)} bytes; at most "
                                                          f"{limits.max_owner_bytes} bytes are kept")
        lock["root"] = root
        lock["timeout"] = _clamp(lock.get("timeout"), limits.max_timeout)
        lock["expire"] = time.time() + lock["timeout"]
        validate_lock(lock)
        lock["token"] = generate_lock_token()
        added = Lock(lock["token"], location, owner, lock["scope"], lock["depth"], lock["principal"],
                     lock["timeout"], lock["expire"])
        try:
            self._store.add_lock(added, max_per_location=limits.max_per_resource,
                                 max_per_principal=limits.max_per_user)
        except LockConflict as exc:
            self._forget_memo()
            condition = DAVErrorCondition(PRECONDITION_CODE_LockConflict)
            for conflicting in exc.roots:
                condition.add_href(location_to_url(conflicting))
            raise DAVError(HTTP_LOCKED, err_condition=condition) from None
        except TooManyLocks as exc:
            self._forget_memo()
            # The resource is locked as much as it may be (423, RFC 4918 11.3);
            # the user's own allowance is used up (507, RFC 4918 11.5).
            status = HTTP_LOCKED if exc.per == "location" else HTTP_INSUFFICIENT_STORAGE
            log.info("LOCK on %r by %r refused: %s", location, lock["principal"], exc)
            raise DAVError(status, context_info=str(exc).replace(f"'{location}'", "the resource")) from None
        if getattr(self._request, "created", None) is not None:
            self._request.created.append(added.token)
        # The LOCK response lists the resource's locks next: the store took
        # this one after the conflict check, so what this request read before
        # plus the new lock is what it holds now.
        # In place: the memo by URL (get_lock_list) holds the same list.
        memo = getattr(self._request, "memo", None)
        if memo is not None and location in memo:
            memo[location].append(added)
        return lock

    def refresh(self, token: str, *, timeout: float) -> dict:
        self._forget_memo()
        try:
            return _lock_dict(self._store.refresh_lock(token, _clamp(timeout, self.limits.max_timeout)))
        except Missing:
            raise ValueError(f"lock {token} does not exist") from None

    def delete(self, token: str) -> bool:
        self._forget_memo()
        return self._store.remove_lock(token)

    def get_lock_list(self, path: str, *, include_root: bool, include_children: bool,
                      token_only: bool) -> list:
        memo = getattr(self._request, "memo", None)
        if memo is not None and include_root and not include_children:
            # wsgidav asks for the same few URLs again and again within a
            # request: skip their translation into store keys after the first.
            locks = memo.get(_URL_KEY + path)
            if locks is None:
                location = url_to_location(normalize_lock_root(path))
                locks = memo[_URL_KEY + path] = [] if location is None else self._locks_on(location)
            return [lock.token for lock in locks] if token_only else [_lock_dict(lock) for lock in locks]
        location = url_to_location(normalize_lock_root(path))
        if location is None:
            # "/" is above every backend: no lock is rooted there. (Only
            # wsgidav's debug dump asks for the children of "/".)
            return []
        if include_root and not include_children:
            locks = self._locks_on(location)
        else:
            locks = self._store.find_locks(location, include_root=include_root,
                                           include_children=include_children)
        return [lock.token for lock in locks] if token_only else [_lock_dict(lock) for lock in locks]

    def lock_roots_below(self, path: str) -> set[str]:
        """The ref URLs of the members of collection `path` that have a lock of their own (one query)."""
        location = url_to_location(normalize_lock_root(path))
        if location is None:
            return set()
        return {location_to_url(lock.root)
                for lock in self._store.find_locks(location, include_root=False, include_children=True,
                                                   children_only=True)}


# environ key: what one PROPPATCH would set, {(location, name): bytes}, and its user's bytes before it.
_PENDING = "gateway.property_bytes"


class StorePropertyManager:
    """wsgidav dead-property manager (the PropertyManager interface) over the state store.

    Each property records the user who set it. A user's properties may take
    `max_bytes_per_user` bytes in all, and no more than the user's
    quota_bytes when that is set (0: no budget): one user cannot fill the
    store that every node shares.
    """

    def __init__(self, store: Store, max_bytes_per_user: int = 0) -> None:
        self._store = store
        self.max_bytes_per_user = max_bytes_per_user

    def _owner_budget(self, environ: dict | None) -> tuple[str, int]:
        """(the request's user, the bytes of properties that user may keep; 0: no limit)."""
        environ = environ or {}
        owner = environ.get("wsgidav.user_name") or ""
        fs = environ.get("gateway.fs")
        quota = getattr(getattr(fs, "user", None), "quota_bytes", 0) or 0
        budgets = [b for b in (self.max_bytes_per_user, quota) if b]
        return owner, min(budgets, default=0)

    def __repr__(self) -> str:
        return f"StorePropertyManager({self._store.url!r})"

    @staticmethod
    def _key(url: str) -> str:
        location = url_to_location(url)
        if location is None:
            raise ValueError("the root of the server has no properties")
        return location

    def get_properties(self, norm_url: str, environ: dict | None = None) -> list[str]:
        return self._store.property_names(self._key(norm_url))

    def get_property(self, norm_url: str, name: str, environ: dict | None = None) -> bytes | None:
        return self._store.get_property(self._key(norm_url), name)

    def properties_below(self, norm_url: str) -> dict[str, list[tuple[str, bytes]]]:
        """The dead properties of a collection's members, by ref URL, names sorted (one query)."""
        found: dict[str, list[tuple[str, bytes]]] = {}
        for location, name, value in self._store.properties_below(self._key(norm_url), children_only=True):
            found.setdefault(location_to_url(location), []).append((name, value))
        return found

    def write_property(self, norm_url: str, name: str, property_value: bytes, dry_run: bool = False,
                       environ: dict | None = None) -> None:
        """Set one property; 507 (RFC 4918 9.2.1) when it would take its user past their budget.

        PROPPATCH tries every property (dry run) before it writes any: the dry
        run counts the request's properties together, so the answer names the
        one that does not fit and nothing is written; the write checks again
        in the store's transaction (a PROPPATCH racing on another node).
        """
        location = self._key(norm_url)
        owner, budget = self._owner_budget(environ)
        if dry_run:
            if budget and environ is not None:
                self._check_budget(environ, owner, budget, location, name, len(property_value))
            return
        try:
            self._store.set_property(location, name, property_value, owner=owner, budget=budget)
        except OverBudget as exc:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE, context_info=_budget_message(exc)) from None

    def _check_budget(self, environ: dict, owner: str, budget: int, location: str, name: str, size: int) -> None:
        pending = environ.get(_PENDING)
        if pending is None:
            pending = environ[_PENDING] = {"used": self._store.property_bytes(owner), "sizes": {}}
        key = (location, name)
        if key not in pending["sizes"]:
            # The value this one replaces no longer counts (if it was the user's).
            pending["used"] -= self._store.owned_property_bytes(owner, location, name)
        pending["sizes"][key] = size
        total = pending["used"] + sum(pending["sizes"].values())
        if total > budget:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE,
                           context_info=_budget_message(OverBudget(owner, total - size, budget)))

    def remove_property(self, norm_url: str, name: str, dry_run: bool = False,
                        environ: dict | None = None) -> None:
        if not dry_run:
            self._store.remove_property(self._key(norm_url), name)

    def remove_properties(self, norm_url: str, environ: dict | None = None, *,
                          recursive: bool = False) -> None:
        self._store.remove_properties(self._key(norm_url), recursive=recursive)

    def copy_properties(self, src_url: str, dest_url: str, environ: dict | None = None) -> None:
        """Copy the properties with the resource; past the copier's budget the copy has none.

        RFC 4918 9.8.2 asks that dead properties SHOULD be copied: the
        content is copied either way, and a COPY never grows the store past
        a user's budget.
        """
        owner, budget = self._owner_budget(environ)
        try:
            self._store.copy_properties(self._key(src_url), self._key(dest_url), owner=owner, budget=budget)
        except OverBudget as exc:
            log.info("COPY to %r left its dead properties behind: %s", unquote(dest_url), exc)

    def move_properties(self, src_url: str, dest_url: str, with_children: bool,
                        environ: dict | None = None) -> None:
        self._store.move_properties(self._key(src_url), self._key(dest_url), with_children=with_children)


def _budget_message(exc: OverBudget) -> str:
    return (f"no room for this property: dead properties may take {exc.budget} bytes per user, "
            f"{exc.used} are in use")


def open_state(store: Store, lock_limits: LockLimits = LockLimits(),
               property_bytes_per_user: int = 0) -> tuple[StoreLockStorage, StorePropertyManager]:
    """The lock storage and property manager over the gateway's store, with their limits.

    Locks granted before under looser limits (a timeout of weeks, an owner
    of megabytes) are brought within these now, not left to lapse.
    """
    shortened, removed = store.limit_locks(lock_limits.max_timeout, lock_limits.max_owner_bytes)
    if shortened or removed:
        log.warning("WebDAV locks granted under looser limits: %d shortened to %d s, %d removed "
                    "(owner over %d bytes)", shortened, lock_limits.max_timeout, removed,
                    lock_limits.max_owner_bytes)
    return StoreLockStorage(store, lock_limits), StorePropertyManager(store, property_bytes_per_user)


def import_legacy_state(path: Path, store: Store, new_key: Callable[[str, str], str | None]) -> int | None:
    """Move the locks and properties of a WebDAV state file of earlier versions into the store.

    That file (webdav.sqlite in the state dir) keyed them by ref URL, and
    before that by per-user URL ("/~user/path"): `new_key(user, path)` gives
    the ref URL of such a path, or None when it no longer exists (its rows are
    dropped). Expired locks are dropped; a lock that conflicts with one in the
    store already is dropped with a warning. The file is then renamed to
    "webdav.sqlite.imported" so it is imported once.

    Returns how many rows were imported, or None if there is no such file.
    """
    if not path.exists():
        return None

    def place(url: str) -> str | None:
        if url.startswith("/~"):
            user, _, rest = unquote(url)[2:].partition("/")
            url = new_key(user, "/" + rest)
            if url is None:
                return None
        return url_to_location(url)

    conn = sqlite3.connect(path)
    try:
        properties = conn.execute("SELECT url, name, value FROM properties").fetchall()
        locks = conn.execute("SELECT token, root, expire, owner, data FROM locks").fetchall()
    finally:
        conn.close()
    imported = 0
    for url, name, value in properties:
        location = place(url)
        if location is not None:
            store.set_property(location, name, bytes(value))
            imported += 1
    now = time.time()
    for token, root, expire, owner, data in locks:
        location = place(root)
        if location is None or 0 <= expire < now:
            continue
        fields = json.loads(data)
        if expire < 0:   # an infinite lock of old: the longest finite one now
            expire = now + LOCK_TIMEOUT_MAX
        try:
            store.add_lock(Lock(token, location, bytes(owner), fields["scope"], fields["depth"],
                                fields.get("principal", ""), _clamp(fields.get("timeout")), expire))
        except Conflict as exc:   # LockConflict too, or imported before by another process
            log.warning("WebDAV lock %s on %r was not imported: %s", token, location, exc)
            continue
        imported += 1
    for suffix in ("", "-wal", "-shm"):
        # Another worker importing the same file at once may have renamed it first.
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{path}.imported{suffix}")
    return imported
