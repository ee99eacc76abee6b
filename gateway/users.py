"""Users: the User record, the TOML users file, and password hashing.

Passwords are stored only as argon2id hashes. The file is rewritten
atomically (temp file, fsync, os.replace) with mode 0600, under an exclusive
lock so two concurrent `gateway user add` runs lose no user.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import argon2
import tomli_w
from cryptography.hazmat.primitives import serialization

from . import paths
from .errors import InvalidPath
from .permissions import ALL, Perm, Policy, format_perms, parse_perms

_hasher = argon2.PasswordHasher()  # argon2id with the library's current defaults


class UsersFileError(Exception):
    """The users file, or a value for it, is invalid; the message names the key."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def parse_public_key(line: str) -> str:
    """Validate one OpenSSH public key line and return it normalized ("type base64 [comment]").

    Raises:
        ValueError: the line is not a public key this server can use.
    """
    line = line.strip()
    words = line.split()
    if len(words) < 2:
        raise ValueError("not an OpenSSH public key line ('TYPE BASE64 [COMMENT]')")
    try:
        serialization.load_ssh_public_key(" ".join(words[:2]).encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid SSH public key: {exc}") from None
    return " ".join(words)


@dataclass(frozen=True)
class Location:
    """A place in storage: a backend name and a path inside that backend."""

    backend: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "Location":
        """Parse "backend:/path".

        Raises:
            ValueError: no backend name, or the path is invalid.
        """
        backend, sep, path = text.partition(":")
        if not sep or not backend:
            raise ValueError(f"expected 'BACKEND:/path', got '{text}'")
        try:
            return cls(backend, paths.normalize(path))
        except InvalidPath as exc:
            raise ValueError(str(exc)) from None

    def __str__(self) -> str:
        return f"{self.backend}:{self.path}"


@dataclass(frozen=True)
class Mount:
    """A virtual folder: `path` in the user's tree shows `target`, with its own permissions."""

    path: str
    target: Location
    permissions: frozenset[Perm] = ALL


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str | None = None
    keys: tuple[str, ...] = ()
    home: Location = Location("local", "/")
    mounts: tuple[Mount, ...] = ()
    permissions: Mapping[str, frozenset[Perm]] = field(default_factory=lambda: {"/": ALL})
    quota_bytes: int = 0   # 0 means no limit
    quota_files: int = 0
    disabled: bool = False

    def policy(self) -> Policy:
        """Rules from the user's permissions, with each mount's own set at its path.

        A user rule inside a mount (longer prefix) still wins over the mount's set.
        """
        rules = {m.path: m.permissions for m in self.mounts}
        rules.update(self.permissions)
        return Policy(rules)


_USER_KEYS = {"password", "keys", "home", "mounts", "permissions", "quota_bytes",
              "quota_files", "disabled"}
_MOUNT_KEYS = {"target", "permissions"}


def _user_from_toml(name: str, table: dict, where: str) -> User:
    def fail(key: str, message: str) -> UsersFileError:
        return UsersFileError(f"{where}: [users.{name}] {key}: {message}")

    if not isinstance(table, dict):
        raise UsersFileError(f"{where}: [users.{name}] must be a table")
    for key in table:
        if key not in _USER_KEYS:
            raise fail(key, "unknown key")
    password = table.get("password")
    if password is not None and (not isinstance(password, str) or not password.startswith("$argon2")):
        raise fail("password", "must be an argon2 hash (set it with 'gateway user passwd')")
    keys = table.get("keys", [])
    if not isinstance(keys, list):
        raise fail("keys", "must be a list of public key lines")
    parsed_keys = []
    for i, key in enumerate(keys):
        try:
            parsed_keys.append(parse_public_key(str(key)))
        except ValueError as exc:
            raise fail(f"keys[{i}]", str(exc)) from None
    try:
        home = Location.parse(table.get("home", f"local:/{name}"))
    except (ValueError, AttributeError) as exc:
        raise fail("home", str(exc)) from None
    mounts = []
    raw_mounts = table.get("mounts", {})
    if not isinstance(raw_mounts, dict):
        raise fail("mounts", "must be a table of '/path' = { target = 'backend:/path' }")
    for mpath, mtable in raw_mounts.items():
        if not isinstance(mtable, dict):
            raise fail(f"mounts.\"{mpath}\"", "must be a table")
        for key in mtable:
            if key not in _MOUNT_KEYS:
                raise fail(f"mounts.\"{mpath}\".{key}", "unknown key")
        try:
            vpath = paths.normalize(mpath)
            if vpath == "/":
                raise ValueError("a mount cannot replace the home at '/'")
            target = Location.parse(mtable.get("target", ""))
            perms = parse_perms(mtable.get("permissions", ["*"]))
        except (ValueError, InvalidPath) as exc:
            raise fail(f"mounts.\"{mpath}\"", str(exc)) from None
        mounts.append(Mount(vpath, target, perms))
    raw_perms = table.get("permissions", {"/": ["*"]})
    if not isinstance(raw_perms, dict):
        raise fail("permissions", "must be a table of '/path' = ['perm', ...]")
    permissions = {}
    for ppath, words in raw_perms.items():
        try:
            if not isinstance(words, list):
                raise ValueError("must be a list of permission names")
            permissions[paths.normalize(ppath)] = parse_perms(words)
        except (ValueError, InvalidPath) as exc:
            raise fail(f"permissions.\"{ppath}\"", str(exc)) from None
    for key in ("quota_bytes", "quota_files"):
        value = table.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise fail(key, "must be a whole number >= 0 (0 means no limit)")
    disabled = table.get("disabled", False)
    if not isinstance(disabled, bool):
        raise fail("disabled", "must be true or false")
    return User(name, password, tuple(parsed_keys), home, tuple(mounts), permissions,
                table.get("quota_bytes", 0), table.get("quota_files", 0), disabled)


def _user_to_toml(user: User) -> dict:
    table: dict = {}
    if user.password_hash:
        table["password"] = user.password_hash
    if user.keys:
        table["keys"] = list(user.keys)
    table["home"] = str(user.home)
    table["permissions"] = {p: format_perms(perms) for p, perms in user.permissions.items()}
    if user.mounts:
        table["mounts"] = {m.path: {"target": str(m.target), "permissions": format_perms(m.permissions)}
                           for m in user.mounts}
    if user.quota_bytes:
        table["quota_bytes"] = user.quota_bytes
    if user.quota_files:
        table["quota_files"] = user.quota_files
    if user.disabled:
        table["disabled"] = True
    return table


def validate_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name) \
            or name.startswith((".", "-")):
        raise UsersFileError(f"invalid user name '{name}': use letters, digits, '.', '_', '-', '@'")
    return name


# What tells a changed users file: a rewrite (os.replace) gives a new inode even
# when the size and a coarse mtime stay the same, as after a password change.
_Signature = tuple[int, int, int]


class UserStore:
    """The users file: read on demand, reloaded when it changes on disk.

    `subscribe` lets the server see every change (to end the sessions of a
    disabled user); callbacks run after each reload, in the thread that reloaded.
    """

    def __init__(self, path: Path, backends: Iterable[str] | None = None) -> None:
        self.path = Path(path)
        self._backends = set(backends) if backends is not None else None
        self._users: dict[str, User] = {}
        self._signature: _Signature | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        # One reload at a time, so subscribers see each change once and in order.
        # Reentrant: a subscriber may read users again.
        self._reload_lock = threading.RLock()
        self._subscribers: list[Callable[[dict[str, User], dict[str, User]], None]] = []

    def subscribe(self, callback: Callable[[dict[str, User], dict[str, User]], None]) -> None:
        """Call `callback(old, new)` (name -> User) after every reload."""
        self._subscribers.append(callback)

    # -- reading --------------------------------------------------------------

    def _parse(self, text: str) -> dict[str, User]:
        where = str(self.path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsersFileError(f"{where}: not valid TOML: {exc}") from None
        for key in data:
            if key != "users":
                raise UsersFileError(f"{where}: {key}: unknown key (expected [users.NAME] tables)")
        users = {}
        for name, table in data.get("users", {}).items():
            validate_name(name)
            user = _user_from_toml(name, table, where)
            if self._backends is not None:
                for label, loc in [("home", user.home)] + [
                        (f"mounts.\"{m.path}\"", m.target) for m in user.mounts]:
                    if loc.backend not in self._backends:
                        raise UsersFileError(f"{where}: [users.{name}] {label}: backend "
                                             f"'{loc.backend}' is not defined in the config")
            users[name] = user
        return users

    def _stat(self) -> _Signature | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_file(self) -> tuple[dict[str, User], _Signature | None]:
        signature = self._stat()
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, None
        return self._parse(text), signature

    def load(self) -> dict[str, User]:
        """(Re)read the file now. Raises UsersFileError when it is invalid."""
        with self._reload_lock:
            users, signature = self._read_file()
            with self._lock:
                old = self._users
                self._users, self._signature = users, signature
                self._checked_at = time.monotonic()
            for callback in list(self._subscribers):
                try:
                    callback(old, users)
                except Exception:
                    logging.getLogger(__name__).exception("a users subscriber failed")
        return users

    def refresh(self) -> None:
        """Reload now if the file changed on disk (one stat when it did not)."""
        with self._reload_lock:
            self._checked_at = time.monotonic()
            signature = self._stat()
            if signature == self._signature:
                return
            try:
                self.load()
            except UsersFileError:
                # A broken edit must not lock everyone out: keep serving the
                # last good version and say so in the log.
                logging.getLogger(__name__).exception("users file invalid; keeping the previous version")
                self._signature = signature

    def _refresh(self) -> None:
        if time.monotonic() - self._checked_at >= 1.0:
            self.refresh()

    def get(self, name: str) -> User | None:
        self._refresh()
        return self._users.get(name)

    def all(self) -> list[User]:
        self._refresh()
        return sorted(self._users.values(), key=lambda u: u.name)

    # -- writing --------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, users: dict[str, User]) -> None:
        data = {"users": {name: _user_to_toml(users[name]) for name in sorted(users)}}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                tomli_w.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def modify(self, change: Callable[[dict[str, User]], None]) -> None:
        """Apply `change` to a fresh copy of all users and write it back atomically."""
        with self._locked():
            users, _ = self._read_file()
            change(users)
            self._write(users)
        self.load()

    def add(self, user: User) -> None:
        validate_name(user.name)

        def change(users: dict[str, User]) -> None:
            if user.name in users:
                raise UsersFileError(f"user '{user.name}' already exists")
            users[user.name] = user
        self.modify(change)

    def update(self, name: str, **changes) -> None:
        def change(users: dict[str, User]) -> None:
            if name not in users:
                raise UsersFileError(f"no user '{name}'")
            users[name] = replace(users[name], **changes)
        self.modify(change)

    def remove(self, name: str) -> None:
        def change(users: dict[str, User]) -> None:
            if name not in users:
                raise UsersFileError(f"no user '{name}'")
            del users[name]
        self.modify(change)
