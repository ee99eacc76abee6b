"""Command line: gateway serve | check | user add/passwd/remove/list/enable/disable/import/export
| admin token create/list/revoke | store migrate."""
from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import tomli_w

from .config import Config, ConfigError, check_listeners, load_config
from .errors import GatewayError
from .permissions import ALL
from .store import Store, StoreError, UserCache, open_store
from .users import (User, UsersFileError, _user_to_toml, check_new_names, check_password, check_quota,
                    hash_password, parse_home, parse_mount, parse_perm_rule, parse_public_key,
                    read_users_file, unknown_backend)


# Where prometheus_client's multiprocess mode keeps each process's values (gateway.metrics).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class CommandError(Exception):
    """A usage or input problem the user can fix; printed as one line."""


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        try:
            password = sys.stdin.readline().rstrip("\r\n")
        except UnicodeDecodeError:
            # A strict stdin; with surrogateescape the bytes arrive as lone
            # surrogates instead, and check_password says the same.
            raise CommandError("the password on stdin is not UTF-8 text") from None
    else:
        if not sys.stdin.isatty():
            raise CommandError("no terminal to prompt for a password: use --password-stdin")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise CommandError("the passwords do not match")
    try:
        return check_password(password)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


@contextlib.contextmanager
def _state_store(config: Config) -> Iterator[Store]:
    store = open_store(config.store.url, config.server.state_dir)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def _users(config: Config) -> Iterator[UserCache]:
    """The users in the store, checked against this config's backends (as the gateway does)."""
    with _state_store(config) as store:
        yield UserCache(store, backends=config.backends.keys())


def _parse_perm_rules(rules: list[str]) -> dict:
    result = {}
    for rule in rules:
        path, sep, words = rule.partition("=")
        if not sep:
            raise CommandError(f"--perm {rule!r}: expected /path=perm,perm")
        try:
            path, perms = parse_perm_rule(path, words.split(","))
            result[path] = perms
        except ValueError as exc:
            raise CommandError(f"--perm {rule!r}: {exc}") from None
    return result


def cmd_user_add(args: argparse.Namespace, config: Config) -> int:
    keys = []
    for key_file in args.key:
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise CommandError(f"--key {key_file}: {exc.strerror}") from None
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                try:
                    keys.append(parse_public_key(line))
                except ValueError as exc:
                    raise CommandError(f"--key {key_file}: {exc}") from None
    password_hash = None
    if args.password_stdin or not keys:
        password_hash = hash_password(_read_password(args))
    default_backend = next(iter(config.backends))
    try:
        home = parse_home(args.home or f"{default_backend}:/{args.name}", config.backends, str(config.path))
    except ValueError as exc:
        raise CommandError(f"--home: {exc}") from None
    mounts = []
    for spec in args.mount:
        vpath, sep, target = spec.partition("=")
        try:
            if not sep:
                raise ValueError("expected /path=backend:/path")
            mounts.append(parse_mount(vpath, target, ["*"], config.backends))
        except ValueError as exc:
            raise CommandError(f"--mount {spec!r}: {exc}") from None
    perms = {"/": ALL}
    perms.update(_parse_perm_rules(args.perm))
    for key in ("quota_bytes", "quota_files"):
        try:
            check_quota(key, getattr(args, key))
        except ValueError as exc:
            raise CommandError(f"--{key.replace('_', '-')}: {exc}") from None
    user = User(args.name, password_hash, tuple(keys), home, tuple(mounts), perms,
                args.quota_bytes, args.quota_files, False)
    with _users(config) as users:
        users.add(user)
    print(f"added user '{args.name}' (home {home})")
    return 0


def cmd_user_passwd(args: argparse.Namespace, config: Config) -> int:
    with _users(config) as users:
        if users.store.get_user(args.name) is None:
            raise CommandError(f"no user '{args.name}'")
        users.update(args.name, password_hash=hash_password(_read_password(args)))
    print(f"password changed for '{args.name}'")
    return 0


def cmd_user_remove(args: argparse.Namespace, config: Config) -> int:
    with _users(config) as users:
        users.remove(args.name)
    print(f"removed user '{args.name}' (their files are kept)")
    return 0


def cmd_user_enable(args: argparse.Namespace, config: Config, disabled: bool) -> int:
    with _users(config) as users:
        users.update(args.name, disabled=disabled)
    print(f"{'disabled' if disabled else 'enabled'} user '{args.name}'")
    return 0


def cmd_user_list(args: argparse.Namespace, config: Config) -> int:
    with _state_store(config) as store:
        users = store.list_users()
    if not users:
        print("no users")
    for user in users:
        flags = []
        if user.password_hash:
            flags.append("password")
        if user.keys:
            flags.append(f"{len(user.keys)} key(s)")
        if user.quota_bytes or user.quota_files:
            flags.append(f"quota {user.quota_bytes or '-'} bytes/{user.quota_files or '-'} files")
        if user.disabled:
            flags.append("DISABLED")
        mounts = "".join(f" {m.path}->{m.target}" for m in user.mounts)
        print(f"{user.name}\t{user.home}{mounts}\t{', '.join(flags)}")
    return 0


def cmd_user_import(args: argparse.Namespace, config: Config) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    # The same validation as every user change, and errors that name the key.
    users = read_users_file(path, backends=config.backends.keys())
    with _state_store(config) as store:
        try:
            # New names as strictly as `user add` checks them; existing ones are replaced.
            check_new_names(users, (user.name for user in store.list_users()))
        except UsersFileError as exc:
            raise UsersFileError(f"{path}: {exc}") from None
        added, replaced = store.import_users(users.values())
    print(f"imported {len(users)} user(s) from {path}: {added} added, {replaced} replaced")
    return 0


def cmd_user_export(args: argparse.Namespace, config: Config) -> int:
    with _state_store(config) as store:
        users = store.list_users()
    text = tomli_w.dumps({"users": {user.name: _user_to_toml(user) for user in users}})
    if args.output is None:
        sys.stdout.write(text)
        return 0
    # Password hashes: private to the owner, like the store itself.
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"exported {len(users)} user(s) to {args.output}", file=sys.stderr)
    return 0


def cmd_token_create(args: argparse.Namespace, config: Config) -> int:
    with _state_store(config) as store:
        token = store.create_token(args.name)
    print(f"created admin API token '{args.name}'; it is shown only this once:")
    print(token)
    return 0


def cmd_token_list(args: argparse.Namespace, config: Config) -> int:
    with _state_store(config) as store:
        tokens = store.list_tokens()
    if not tokens:
        print("no tokens")
    for token in tokens:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.created))
        print(f"{token.name}\tcreated {created}")
    return 0


def cmd_token_revoke(args: argparse.Namespace, config: Config) -> int:
    with _state_store(config) as store:
        store.revoke_token(args.name)
    print(f"revoked admin API token '{args.name}'")
    return 0


def cmd_store_migrate(args: argparse.Namespace, config: Config) -> int:
    with _state_store(config) as store:
        print(f"store {store.url}: schema version {store.version}")
    return 0


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    from .storage import create_backend
    for name, section in config.backends.items():
        try:
            backend = create_backend(section.type, section.options)
            backend.check()
            backend.close()
        except GatewayError as exc:
            raise ConfigError(f"{config.path}: [backends.{name}]: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{config.path}: [backends.{name}]: {exc}") from None
    with _state_store(config) as store:
        users = store.list_users()
    for user in users:
        missing = unknown_backend(user, set(config.backends))
        if missing:
            raise ConfigError(f"{config.path}: store {store.url}: {missing}")
    check_listeners(config)
    listeners = [f"{n} {getattr(config, n).listen}" for n in ("webdav", "sftp", "admin")
                 if getattr(config, n).enabled]
    backends = [f"{n} ({s.type})" for n, s in config.backends.items()]
    print(f"OK: {config.path}: backends: {', '.join(backends)}; users: {len(users)}; "
          f"listeners: {', '.join(listeners) or 'none'}")
    return 0


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    if config.server.workers > 1 and METRICS_DIR_ENV not in os.environ:
        # Worker processes add up their metrics through files in one directory.
        # prometheus_client picks its mode when first imported (with .server, below).
        os.environ[METRICS_DIR_ENV] = str(_fresh_metrics_dir(config.server.state_dir / "metrics"))
    from .server import serve
    return serve(config)


def _fresh_metrics_dir(path: Path) -> Path:
    """An empty directory for the worker processes' metric files: a previous run's would add up."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="WebDAV + SFTP file gateway")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="path to gateway.toml (default: config/gateway.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the gateway").set_defaults(func=cmd_serve)
    sub.add_parser("check", parents=[common], help="validate the config, the store and its users").set_defaults(
        func=cmd_check)
    user = sub.add_parser("user", help="manage users").add_subparsers(dest="user_command", required=True)
    add = user.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--key", action="append", default=[], metavar="PUBKEY_FILE",
                     help="an OpenSSH public key file (repeatable)")
    add.add_argument("--home", metavar="BACKEND:/path", help="home folder (default: first backend:/NAME)")
    add.add_argument("--perm", action="append", default=[], metavar="/path=perm,perm",
                     help="permission rule (repeatable); longest path wins")
    add.add_argument("--mount", action="append", default=[], metavar="/path=BACKEND:/path",
                     help="virtual folder (repeatable)")
    add.add_argument("--quota-bytes", type=int, default=0)
    add.add_argument("--quota-files", type=int, default=0)
    add.set_defaults(func=cmd_user_add)
    passwd = user.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(func=cmd_user_passwd)
    for verb, func in (("remove", cmd_user_remove),
                       ("disable", lambda a, c: cmd_user_enable(a, c, True)),
                       ("enable", lambda a, c: cmd_user_enable(a, c, False))):
        p = user.add_parser(verb, parents=[common], help=f"{verb} a user")
        p.add_argument("name")
        p.set_defaults(func=func)
    user.add_parser("list", parents=[common], help="list users").set_defaults(func=cmd_user_list)
    imp = user.add_parser("import", parents=[common], help="add or replace users from a users TOML file")
    imp.add_argument("file", metavar="FILE.toml")
    imp.set_defaults(func=cmd_user_import)
    exp = user.add_parser("export", parents=[common], help="print every user as a users TOML file")
    exp.add_argument("--output", "-o", metavar="FILE", help="write to FILE (mode 0600) instead of stdout")
    exp.set_defaults(func=cmd_user_export)
    admin = sub.add_parser("admin", help="admin API").add_subparsers(dest="admin_command", required=True)
    token = admin.add_parser("token", help="admin API tokens").add_subparsers(dest="token_command",
                                                                              required=True)
    for verb, func, text in (("create", cmd_token_create, "create a token and print it once"),
                             ("revoke", cmd_token_revoke, "revoke a token")):
        p = token.add_parser(verb, parents=[common], help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    token.add_parser("list", parents=[common], help="list token names").set_defaults(func=cmd_token_list)
    store = sub.add_parser("store", help="the state store").add_subparsers(dest="store_command", required=True)
    store.add_parser("migrate", parents=[common], help="apply schema migrations and print the version"
                     ).set_defaults(func=cmd_store_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except (ConfigError, UsersFileError, StoreError, CommandError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
