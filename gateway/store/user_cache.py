"""The store's users as the gateway reads them: in memory, refreshed by the change feed.

UserCache offers get, all, add, update, remove, load, refresh and
subscribe(callback(old, new)); reads cost no query. `current_within` tells
how long ago the users were last known to be the store's, so that a process
cut off from the store can stop trusting them. A change that revokes a
user's credentials (remove, disable, new password or keys) also writes a
revocation, so every process ends that user's sessions even when it only
sees the final state of several quick changes (disable, then enable).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from ..sessions import revokes
from ..users import NoSuchUser, User, UserExists, UsersFileError, check_new_names, unknown_backend
from .errors import Conflict, Missing, StoreUnavailable
from .store import Store

log = logging.getLogger(__name__)

Subscriber = Callable[[dict[str, User], dict[str, User]], None]


class UserCache:
    """Every user of `store`, cached. After `start()` a watcher thread reloads on each change
    (from any process or node); without it, reads check the change counter at most once a second.
    """

    def __init__(self, store: Store, backends: Iterable[str] | None = None) -> None:
        self.store = store
        self._backends = set(backends) if backends is not None else None
        self._users: dict[str, User] = {}
        self._counter: int | None = None
        self._checked_at = 0.0
        # When the users were last known to be the store's (monotonic): a load, a
        # refresh or the change feed reading the counter they were read at.
        self._current_at: float | None = None
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Set by follow(): the owner runs the change feed and calls changed().
        self._followed = False
        # One reload at a time, so subscribers see each change once and in order.
        self._reload_lock = threading.RLock()

    def start(self) -> None:
        """Load the users and keep them fresh from a watcher thread until close()."""
        self.load()
        self._stop.clear()
        self._watcher = threading.Thread(target=self.store.watch, args=(lambda _: self.load(), self._stop),
                                         kwargs={"since": self._counter, "alive": self.confirm},
                                         name="store-user-watch", daemon=True)
        self._watcher.start()

    def follow(self) -> None:
        """The owner runs a change-feed watch and calls `changed()` from it: reads stop polling."""
        self._followed = True

    def changed(self, counter: int) -> None:
        """The change feed reports `counter`: reload unless that is what was read last."""
        if counter != self._counter:
            self.load()

    def confirm(self, counter: int) -> None:
        """The change feed read `counter` just now: the users are current if that is what they reflect."""
        if counter == self._counter:
            with self._lock:
                self._current_at = time.monotonic()

    def current_within(self, seconds: float) -> bool:
        """The users were known to be the store's at most `seconds` ago (no store query)."""
        current_at = self._current_at
        return current_at is not None and time.monotonic() - current_at <= seconds

    def close(self) -> None:
        """Stop the watcher thread (the store itself stays open)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def add_backends(self, names: Iterable[str]) -> None:
        """Backends configured since the start (SIGHUP): users homed there are read again.

        Raises:
            StoreUnavailable: the store cannot be reached (the new backends are known anyway).
        """
        if self._backends is not None:
            self._backends.update(names)
            self.load()

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(old, new)` (name -> User) whenever the users change."""
        self._subscribers.append(callback)

    # -- reading --------------------------------------------------------------

    def load(self) -> dict[str, User]:
        """Read every user from the store now; tell subscribers if anything changed.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        with self._reload_lock:
            read_at = time.monotonic()
            # The counter first: a change landing between the two reads is seen again next time.
            counter = self.store.change_counter()
            users = {}
            for user in self.store.list_users():
                missing = unknown_backend(user, self._backends) if self._backends is not None else None
                if missing:
                    # Another node's config may define it; here the user cannot log in.
                    log.warning("user %r left out: %s", user.name, missing)
                    continue
                users[user.name] = user
            with self._lock:
                old, self._users = self._users, users
                self._counter, self._checked_at = counter, time.monotonic()
                self._current_at = read_at
            if old != users:
                for callback in list(self._subscribers):
                    try:
                        callback(old, users)
                    except Exception:
                        log.exception("user change subscriber failed")
        return users

    def refresh(self) -> None:
        """Reload now if the store changed since the last read (one query when it did not).

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        with self._reload_lock:
            self._checked_at = read_at = time.monotonic()
            if self._counter is None or self.store.change_counter() != self._counter:
                self.load()
            else:
                with self._lock:
                    self._current_at = read_at

    def _refresh(self) -> None:
        if (self._watcher is not None or self._followed) and self._counter is not None:
            return
        if self._counter is not None and time.monotonic() - self._checked_at < 1.0:
            return
        try:
            self.refresh()
        except StoreUnavailable as exc:
            # Keep serving the last users read: an outage must not lock everyone out.
            log.warning("%s; using the users read before", exc)

    def get(self, name: str) -> User | None:
        self._refresh()
        return self._users.get(name)

    def all(self) -> list[User]:
        self._refresh()
        return sorted(self._users.values(), key=lambda u: u.name)

    # -- writing (through to the store) ----------------------------------------

    def _check_backends(self, user: User) -> None:
        missing = unknown_backend(user, self._backends) if self._backends is not None else None
        if missing:
            raise UsersFileError(missing)

    def add(self, user: User) -> None:
        """Add a user.

        Raises:
            UsersFileError: invalid; UserExists: the name is taken, or one that differs
                from it only in case or compatibility form (users.check_new_names).
        """
        self._check_backends(user)
        check_new_names([user.name], (u.name for u in self.store.list_users()))
        try:
            self.store.add_user(user)
        except Conflict as exc:
            raise UserExists(str(exc)) from None
        self.load()

    def update(self, name: str, **changes) -> None:
        """Change fields of a user.

        Raises:
            UsersFileError: invalid; NoSuchUser: no such user.
        """
        try:
            current = self.store.get_user(name)
            if current is None:
                raise Missing(f"no user '{name}'")
            self._check_backends(replace(current, **changes))
            new = self.store.update_user(name, **changes)
        except Missing as exc:
            raise NoSuchUser(str(exc)) from None
        if revokes(current, new):
            self.store.revoke(user=name)
        self.load()

    def remove(self, name: str) -> None:
        """Remove a user.

        Raises:
            NoSuchUser: no such user.
        """
        try:
            self.store.remove_user(name)
        except Missing as exc:
            raise NoSuchUser(str(exc)) from None
        self.store.revoke(user=name)
        self.load()
