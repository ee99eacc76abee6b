"""Users: the User record, its TOML form (`gateway user import/export`), and password hashing.

Users live in the state store (gateway/store); the TOML form is how they are
imported, exported and validated. Passwords are stored only as argon2id hashes.
"""
from __future__ import annotations

import tomllib
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import argon2
from cryptography.hazmat.primitives import serialization

from . import paths
from .errors import InvalidPath
from .permissions import ALL, Perm, Policy, format_perms, parse_perms

_hasher = argon2.PasswordHasher()  # argon2id with the library's current defaults


class UsersFileError(Exception):
    """The users file, or a value for it, is invalid; the message names the key."""


class UserExists(UsersFileError):
    """A user of that name exists already."""


class NoSuchUser(UsersFileError):
    """No user of that name."""


MIN_PASSWORD_LENGTH = 8
# Quotas are stored in a signed 64-bit column (SQLite INTEGER, PostgreSQL BIGINT).
MAX_QUOTA = (1 << 63) - 1


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


# -- one field at a time: the CLI's options and the admin API's JSON fields both go
# through these, so both give the same messages (each front-end names the field its way).

def check_password(password: str) -> str:
    """Return `password` if it is acceptable for a new password.

    Raises:
        ValueError: too short, or not encodable as UTF-8 (a lone surrogate, from JSON
            "\\ud800" or from undecodable bytes on stdin).
    """
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("password is not valid Unicode text (it holds a lone surrogate "
                         "or bytes that are not UTF-8)") from None
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")
    return password


def check_quota(key: str, value: int) -> int:
    """Return `value` if it fits `key` ("quota_bytes" or "quota_files").

    Raises:
        ValueError: negative, or beyond what the store's 64-bit column holds.
    """
    if not 0 <= value <= MAX_QUOTA:
        raise ValueError(f"{key}: must be a whole number >= 0 (0 means no limit) "
                         f"and at most {MAX_QUOTA}")
    return value


def parse_home(text: str, backends: Collection[str], config_name: str) -> Location:
    """Parse a home "backend:/path" whose backend must be one of `backends` (defined in `config_name`).

    Raises:
        ValueError: malformed, or an unknown backend.
    """
    home = Location.parse(text)
    if home.backend not in backends:
        raise ValueError(f"backend '{home.backend}' is not defined in {config_name}")
    return home


def parse_mount(vpath: str, target: str, words: Iterable[str], backends: Collection[str]) -> Mount:
    """A mount at `vpath` showing `target` ("backend:/path") with the permissions `words`.

    Raises:
        ValueError: a malformed path or target, an unknown backend or permission, or a mount at "/".
    """
    location = Location.parse(target)
    if location.backend not in backends:
        raise ValueError(f"backend '{location.backend}' is not defined")
    try:
        path = paths.normalize(vpath)
    except InvalidPath as exc:
        raise ValueError(str(exc)) from None
    if path == "/":
        raise ValueError("a mount cannot replace the home at '/'")
    return Mount(path, location, parse_perms(words))


def parse_perm_rule(path: str, words: Iterable[str]) -> tuple[str, frozenset[Perm]]:
    """One permission rule: a normalized path and its permission set.

    Raises:
        ValueError: a malformed path or an unknown permission word.
    """
    try:
        normalized = paths.normalize(path)
    except InvalidPath as exc:
        raise ValueError(str(exc)) from None
    return normalized, parse_perms(words)


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
        Built once per record: a User never changes (a change is a new record),
        and every WebDAV request opens a UserFS that asks for it.
        """
        policy = self.__dict__.get("_policy")
        if policy is None:
            rules = {m.path: m.permissions for m in self.mounts}
            rules.update(self.permissions)
            policy = Policy(rules)
            object.__setattr__(self, "_policy", policy)
        return policy


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
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail(key, "must be a whole number >= 0 (0 means no limit)")
        try:
            check_quota(key, value)
        except ValueError as exc:
            raise fail(key, str(exc).removeprefix(f"{key}: ")) from None
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
    """Return `name` if it is a well-formed user name (every stored name is).

    New names must also pass `check_new_names`, which is stricter: names
    stored before it existed stay usable (they can be disabled or removed).

    Raises:
        UsersFileError: empty, too long, or a character outside the set.
    """
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name) \
            or name.startswith((".", "-")):
        raise UsersFileError(f"invalid user name '{name}': use letters, digits, '.', '_', '-', '@'")
    return name


# Scripts whose letters look alike: a name mixing them ("аdmin" with a Cyrillic "а") is refused.
_CONFUSABLE_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")


def _name_key(name: str) -> str:
    """What two names must not share: their NFKC form, case-folded ("ＡＤＭＩＮ" -> "admin")."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_new_name(name: str) -> str:
    """Return `name` if a new user may have it (whatever the users are: see `check_new_names`).

    Raises:
        UsersFileError: malformed, not NFKC-normal, or mixing look-alike scripts.
    """
    validate_name(name)
    # Security decision: a new name is one a reader cannot mistake for another.
    # Letters of any script, but digits only 0-9; no compatibility forms
    # (fullwidth "ａｄｍｉｎ", superscripts, ligatures), which NFKC rewrites.
    if not all(c in "._-@0123456789" or unicodedata.category(c).startswith("L") for c in name):
        raise UsersFileError(f"invalid user name {name!r}: use letters, digits 0-9, '.', '_', '-', '@'")
    normal = unicodedata.normalize("NFKC", name)
    if normal != name:
        raise UsersFileError(f"invalid user name {name!r}: not in Unicode normal form NFKC "
                             f"(write it as {normal!r})")
    scripts = {unicodedata.name(c, "").split(" ", 1)[0] for c in name if c.isalpha()}
    if len(scripts & set(_CONFUSABLE_SCRIPTS)) > 1:
        raise UsersFileError(f"invalid user name {name!r}: it mixes Latin, Greek or Cyrillic letters")
    return name


def check_new_names(names: Iterable[str], taken: Iterable[str]) -> None:
    """Check names about to be added beside the `taken` ones (names in `taken` are replacements).

    The one check of a new user's name, for `user add`, the admin API and `user import`.

    Raises:
        UsersFileError: a new name is malformed, not NFKC-normal, or mixes look-alike scripts.
        UserExists: a new name differs from a taken one (or another new one) only in case
            or compatibility form ("Admin", "ａｄｍｉｎ" beside "admin").
    """
    taken = set(taken)
    keys = {_name_key(name): name for name in taken}
    for name in names:
        if name in taken:
            continue
        check_new_name(name)
        other = keys.get(_name_key(name))
        if other is not None and other != name:
            raise UserExists(f"user name '{name}' is taken: user '{other}' differs from it "
                             "only in case or Unicode form")
        keys[_name_key(name)] = name


def read_users_file(path: Path, backends: Iterable[str] | None = None) -> dict[str, User]:
    """Parse a users TOML file (`gateway user import`, or `user export`'s output): name -> User.

    Raises:
        UsersFileError: the file cannot be read or is invalid (the message names the key),
            or a user names a backend not in `backends`.
    """
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"{where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsersFileError(f"{where}: not UTF-8: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsersFileError(f"{where}: not valid TOML: {exc}") from None
    for key in data:
        if key != "users":
            raise UsersFileError(f"{where}: {key}: unknown key (expected [users.NAME] tables)")
    known = set(backends) if backends is not None else None
    users = {}
    for name, table in data.get("users", {}).items():
        validate_name(name)
        user = _user_from_toml(name, table, where)
        if known is not None:
            missing = unknown_backend(user, known)
            if missing:
                raise UsersFileError(f"{where}: {missing}")
        users[name] = user
    return users


def unknown_backend(user: User, backends: set[str]) -> str | None:
    """Say which location of `user` names a backend not in `backends` ("[users.x] home: ..."), or None."""
    for label, location in [("home", user.home)] + [(f"mounts.\"{m.path}\"", m.target)
                                                    for m in user.mounts]:
        if location.backend not in backends:
            return (f"[users.{user.name}] {label}: backend '{location.backend}' "
                    "is not defined in the config")
    return None
