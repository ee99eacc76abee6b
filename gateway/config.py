"""Configuration: gateway.toml read with tomllib into validated dataclasses.

Every problem becomes one ConfigError whose message names the file and the
key, so `gateway serve` and `gateway check` can print a single line.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .proxy_protocol import parse_networks
from .storage import BACKEND_TYPES, backend_classes
from .store import StoreError, check_url

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.toml"


class ConfigError(Exception):
    """A configuration problem, stated in one line that names the file and key."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Listen":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"expected 'HOST:PORT', got '{text}'")
        host = host.strip("[]") or "0.0.0.0"
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")


@dataclass
class ServerSection:
    state_dir: Path = Path("var")
    # Retired: users live in the store. Still parsed, only to say how to move them there.
    users_file: Path | None = None
    log_level: str = "info"
    # Audit lines (JSON, one per file operation and login) go to this file, relative
    # to the config file, or to stdout with "-"; unset: to the main log.
    audit_log: str | None = None
    # Largest run of zeros one write or truncate may leave past the end of a
    # file: a byte written at 1 TiB would otherwise make every copy (and every
    # S3 upload of it) move a terabyte of zeros. 0: no gap at all.
    max_hole_bytes: int = 64 * 1024 * 1024
    # Most names in a path a user may create (a folder, a file, a copy or move
    # destination); deeper trees that already exist stay readable and deletable.
    max_depth: int = 256
    # Open file and folder handles of all SFTP sessions together; 0: the open-file
    # limit (RLIMIT_NOFILE, raised to its hard limit at start) minus a reserve
    # for sockets, listeners and the state store.
    max_open_files: int = 0
    # Worker processes sharing the listeners: N, or "auto" for one per CPU; 1 runs
    # in-process. Resolved to a number when the config is read.
    workers: int | str = 1
    # SIGTERM: seconds the transfers in flight get to finish once the listeners
    # are closed; what is left then is aborted. 0: abort at once.
    drain_timeout: float = 30.0
    # Most of a process's time the read and write packets of bulk SFTP transfers
    # (a handle past 1 MiB) may take while WebDAV requests keep coming (one
    # interpreter lock serves both); 1: no limit.
    bulk_share: float = 0.4

    def __post_init__(self) -> None:
        self.workers = _parse_workers(self.workers)
        if not 0 < self.bulk_share <= 1:
            raise ConfigError(f"bulk_share: must be more than 0 and at most 1, got {self.bulk_share}")
        if self.drain_timeout < 0:
            raise ConfigError(f"drain_timeout: must be 0 or more seconds, got {self.drain_timeout}")
        if self.users_file is not None:
            raise ConfigError(f"users_file: users live in the state store now: remove this key and run "
                              f"'gateway user import {self.users_file}'")
        if self.max_hole_bytes < 0:
            raise ConfigError(f"max_hole_bytes: must be 0 or more, got {self.max_hole_bytes}")
        if self.max_depth < 1:
            raise ConfigError(f"max_depth: must be at least 1, got {self.max_depth}")


MAX_WORKERS = 256


def _parse_workers(value: int | str) -> int:
    """`[server] workers` as a number of processes: N, or "auto" for os.cpu_count()."""
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"workers: expected a whole number from 1 to {MAX_WORKERS} or \"auto\", "
                          f"got {value!r}")
    return value


@dataclass
class WebDAVSection:
    enabled: bool = True
    listen: Listen = Listen("127.0.0.1", 8080)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    threads: int = 32
    block_size: int = 1024 * 1024
    # "allow", "hide" (not listed) or "refuse" (403) for macOS ._* and .DS_Store files.
    macos_files: str = "allow"
    max_xml_body: int = 1024 * 1024
    timeout: int = 60
    # Dead properties (PROPPATCH) kept per file or folder, and bytes per property;
    # past either the property is refused with 507. 0 refuses all dead properties.
    max_properties: int = 100
    max_property_bytes: int = 64 * 1024
    # Bytes of dead properties one user may keep over all files and folders (never
    # more than the user's quota_bytes when set); past it 507. 0: no such budget.
    max_property_bytes_per_user: int = 1024 * 1024
    # Locks: the longest timeout granted (longer ones and "Infinite" get this), the
    # largest <owner> kept (400 beyond), locks on one resource (423 beyond) and
    # locks one user holds (507 beyond). Every lock a resource holds is listed in
    # full by PROPFIND to everyone who sees it. 0: no limit (timeout: 4 weeks).
    max_lock_timeout: int = 86400
    max_lock_owner_bytes: int = 4096
    max_locks_per_resource: int = 16
    max_locks_per_user: int = 1000
    # Request line and headers together; larger ones get 431 and the connection closes.
    max_header_size: int = 64 * 1024
    # Seconds a request's complete headers may take to arrive (counted from the
    # connection's accept, or from the first byte of a later request on it).
    header_timeout: int = 10
    # Behind a load balancer: take the client address from a PROXY protocol header (v2 or v1),
    # accepted only from these IPs/CIDR networks; every other peer is refused.
    proxy_protocol: bool = False
    trusted_proxies: list[str] = field(default_factory=list)
    # Requests served at once (each holds one of `threads`) for one client address,
    # and for one user, per process. Beyond its share an address or user borrows idle
    # threads while a quarter stay free; past that, 503 with Retry-After at once, so one
    # address or account never holds the whole pool. Unset: half of `threads`; 0: no limit.
    max_requests_per_ip: int | None = None
    max_requests_per_user: int | None = None
    # A request whose body or response moves under `min_rate` bytes/s over
    # `min_rate_window` seconds spent waiting for the client is ended; 0: no minimum.
    min_rate: int = 500
    min_rate_window: int = 20

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"threads: must be at least 1, got {self.threads}")
        share = max(1, self.threads // 2)
        if self.max_requests_per_ip is None:
            self.max_requests_per_ip = share
        if self.max_requests_per_user is None:
            self.max_requests_per_user = share
        if self.min_rate and not self.min_rate_window:
            raise ConfigError("min_rate_window: must be at least 1 second while min_rate is set")


@dataclass
class SFTPSection:
    enabled: bool = True
    listen: Listen = Listen("127.0.0.1", 2022)
    idle_timeout: int = 900          # seconds without a request before a connection is closed; 0: never
    max_handles: int = 512           # open files and folders per SFTP session
    # ssh-rsa (SHA-1) signatures are broken; only very old clients need them.
    # paramiko 5 removed them entirely, so there this only logs a warning.
    allow_ssh_rsa_sha1: bool = False
    # SSH channel window: bytes a client may have in flight, which the server may
    # have to buffer, per session. Measured: 4 MiB 174 MB/s, 16 MiB 185, 64 MiB 186.
    window_size: int = 16 * 1024 * 1024
    max_packet_size: int = 256 * 1024     # SSH packet and SFTP read/write size (limits@openssh.com)
    # Seconds from accept to a successful login; banner and key exchange included.
    login_timeout: int = 60
    # Connections not logged in yet, in total and per address. They do not use the
    # defender's connection slots (shared with WebDAV) until they log in.
    max_unauthenticated: int = 64
    max_unauthenticated_per_ip: int = 10
    # Seconds a connection over those limits waits, unanswered, for a slot before it
    # is refused (clients behind one NAT address dial at once); 0: refuse at once.
    unauthenticated_wait: float = 10.0
    # Channels open at once on one connection (OpenSSH's MaxSessions is 10).
    max_channels: int = 10
    # Seconds a channel may stay open without starting the SFTP subsystem.
    channel_setup_timeout: int = 10
    # Open file and folder handles of one user over all of their sessions.
    max_handles_per_user: int = 256
    # Behind a load balancer: take the client address from a PROXY protocol header (v2 or v1),
    # accepted only from these IPs/CIDR networks; every other peer is refused.
    proxy_protocol: bool = False
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass
class AdminSection:
    enabled: bool = True
    listen: Listen = Listen("127.0.0.1", 8090)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The REST API under /api/v1; /healthz, /readyz and /metrics answer either way.
    api: bool = True
    # Client addresses (IPs or CIDR networks) the REST API answers; any other gets 403
    # before a token is read. Loopback only by default: open it to an admin network, with TLS.
    allow_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1"])


@dataclass
class DefenderSection:
    enabled: bool = True
    max_failures: int = 10       # failed logins from one address within `window` before it is banned
    window: int = 300            # seconds
    ban_time: int = 900          # seconds
    # argon2id verifications running at once, 64 MiB each: 4 bounds them to
    # 256 MiB and already keeps two cores busy (each uses 4 lanes).
    max_concurrent_verifications: int = 4
    # A password attempt for a user with recent failures, from an address that
    # failed too, waits this long first, doubling per failure up to the max.
    failure_delay: float = 1.0
    failure_delay_max: float = 8.0
    max_connections: int = 512
    max_connections_per_ip: int = 64
    exempt: list[str] = field(default_factory=list)   # IPs never banned


@dataclass
class StoreSection:
    # sqlite:///FILE (relative to state_dir; one host) or postgresql://USER:PW@HOST:PORT/DB (several nodes).
    url: str = "sqlite:///gateway.db"
    # Seconds without a heartbeat after which a node's uploads in flight are aborted by the others.
    node_timeout: int = 60
    # Seconds between two sweeps for uploads of dead nodes (each node sweeps; jittered by 20%).
    sweep_interval: int = 30
    # Seconds without a successful read of the change feed after which cached users and
    # credentials no longer open logins: each login reads the store first, or is refused.
    feed_stale_after: float = 5.0
    # Seconds past feed_stale_after after which this process ends every session while the
    # users still cannot be read: nobody can tell it whom was disabled meanwhile.
    session_grace: float = 10.0


@dataclass
class BackendSection:
    name: str
    type: str
    options: Any  # the backend type's own config dataclass


@dataclass
class Config:
    path: Path
    server: ServerSection
    webdav: WebDAVSection
    sftp: SFTPSection
    defender: DefenderSection
    backends: dict[str, BackendSection]
    store: StoreSection = field(default_factory=StoreSection)
    admin: AdminSection = field(default_factory=AdminSection)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


_PATH_TYPES = (Path,)


def _convert(value: Any, hint: Any, key: str, where: str, base: Path) -> Any:
    """Check `value` against a type hint, converting paths and listen addresses."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if int in options and str in options and isinstance(value, (int, str)):
            # A number or a word (workers = 4 | "auto"): the section's own check reads it.
            return value
        return _convert(value, options[0], key, where, base)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} {key}: expected a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]", where, base) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} {key}: expected a whole number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where} {key}: must not be negative, got {value}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} {key}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} {key}: expected a path string, got {value!r}")
        return (base / value).resolve()
    if hint is Listen:
        if not isinstance(value, str):
            raise ConfigError(f"{where} {key}: expected 'HOST:PORT', got {value!r}")
        try:
            return Listen.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{where} {key}: {exc}") from None
    raise TypeError(f"unsupported config type {hint!r}")


def build_dataclass(cls: type, table: Any, where: str, base: Path, skip: tuple[str, ...] = ()) -> Any:
    """Build `cls` from a TOML table: unknown keys, wrong types and missing keys are errors."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields or key in skip:
            raise ConfigError(f"{where} {key}: unknown key")
    kwargs = {}
    for name, f in fields.items():
        if name in skip:
            continue
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], name, where, base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where} {name}: missing key")
        elif hints[name] is Path and isinstance(f.default, Path):
            kwargs[name] = (base / f.default).resolve()
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # A dataclass's own checks (__post_init__) name the key; add where it is.
        raise ConfigError(f"{where} {exc}") from None


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate a gateway.toml.

    Raises:
        ConfigError: with one line naming the file and key.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    where_file = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where_file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{where_file}: cannot read config file: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where_file}: not valid TOML: {exc}") from None
    path = path.resolve()
    base = path.parent
    known = {"server", "store", "webdav", "sftp", "defender", "backends", "admin"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where_file}: [{key}]: unknown section")
    server = build_dataclass(ServerSection, data.get("server", {}), f"{where_file}: [server]", base)
    webdav = build_dataclass(WebDAVSection, data.get("webdav", {}), f"{where_file}: [webdav]", base)
    sftp = build_dataclass(SFTPSection, data.get("sftp", {}), f"{where_file}: [sftp]", base)
    defender = build_dataclass(DefenderSection, data.get("defender", {}), f"{where_file}: [defender]", base)
    store = build_dataclass(StoreSection, data.get("store", {}), f"{where_file}: [store]", base)
    try:
        check_url(store.url)
    except StoreError as exc:
        raise ConfigError(f"{where_file}: [store] url: {exc}") from None
    if store.node_timeout < 1:
        raise ConfigError(f"{where_file}: [store] node_timeout: must be at least 1 second, "
                          f"got {store.node_timeout}")
    admin = build_dataclass(AdminSection, data.get("admin", {}), f"{where_file}: [admin]", base)
    if server.audit_log is not None:
        if not server.audit_log:
            raise ConfigError(f"{where_file}: [server] audit_log: expected a path or '-', got ''")
        if server.audit_log != "-":
            server.audit_log = str((base / server.audit_log).resolve())
    if store.feed_stale_after < 1:
        raise ConfigError(f"{where_file}: [store] feed_stale_after: must be at least 1 second, "
                          f"got {store.feed_stale_after}")
    if store.session_grace < 0:
        raise ConfigError(f"{where_file}: [store] session_grace: must not be negative, "
                          f"got {store.session_grace}")
    if store.sweep_interval < 1:
        raise ConfigError(f"{where_file}: [store] sweep_interval: must be at least 1 second, "
                          f"got {store.sweep_interval}")
    if webdav.macos_files not in ("allow", "hide", "refuse"):
        raise ConfigError(f"{where_file}: [webdav] macos_files: expected 'allow', 'hide' or 'refuse', "
                          f"got {webdav.macos_files!r}")
    if defender.max_concurrent_verifications < 1:
        raise ConfigError(f"{where_file}: [defender] max_concurrent_verifications: must be at least 1, "
                          f"got {defender.max_concurrent_verifications}")
    for key in ("failure_delay", "failure_delay_max"):
        if getattr(defender, key) < 0:
            raise ConfigError(f"{where_file}: [defender] {key}: must not be negative, "
                              f"got {getattr(defender, key)}")
    if sftp.max_packet_size < 34000:
        # RFC 4254 and SFTP clients assume packets of at least 32 KiB plus headers.
        raise ConfigError(f"{where_file}: [sftp] max_packet_size: must be at least 34000, "
                          f"got {sftp.max_packet_size}")
    for name, section, key in (("webdav", webdav, "header_timeout"), ("sftp", sftp, "login_timeout"),
                               ("sftp", sftp, "max_unauthenticated"),
                               ("sftp", sftp, "max_unauthenticated_per_ip"), ("sftp", sftp, "max_channels"),
                               ("sftp", sftp, "channel_setup_timeout"), ("sftp", sftp, "max_handles_per_user")):
        if getattr(section, key) < 1:
            raise ConfigError(f"{where_file}: [{name}] {key}: must be at least 1, got {getattr(section, key)}")
    if webdav.max_header_size < 1024:
        raise ConfigError(f"{where_file}: [webdav] max_header_size: must be at least 1024, "
                          f"got {webdav.max_header_size}")
    for name, section in (("webdav", webdav), ("sftp", sftp)):
        _check_proxy_protocol(section, f"{where_file}: [{name}]")
    try:
        parse_networks(admin.allow_networks)
    except ValueError as exc:
        raise ConfigError(f"{where_file}: [admin] allow_networks{exc}") from None
    for name, section in (("webdav", webdav), ("admin", admin)):
        if bool(section.tls_cert) != bool(section.tls_key):
            raise ConfigError(f"{where_file}: [{name}] tls_key: tls_cert and tls_key go together")
        for key in ("tls_cert", "tls_key"):
            value = getattr(section, key)
            if value is not None and not os.access(value, os.R_OK):
                raise ConfigError(f"{where_file}: [{name}] {key}: cannot read '{value}'")
    backends = {}
    raw_backends = data.get("backends", {})
    if not isinstance(raw_backends, dict) or not raw_backends:
        raise ConfigError(f"{where_file}: [backends]: define at least one backend")
    for name, table in raw_backends.items():
        where = f"{where_file}: [backends.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        type_name = table.get("type")
        if type_name not in BACKEND_TYPES:
            raise ConfigError(f"{where} type: expected one of {', '.join(sorted(BACKEND_TYPES))}, "
                              f"got {type_name!r}")
        try:
            _, config_cls = backend_classes(type_name)
        except ImportError as exc:
            raise ConfigError(f"{where} type: backend '{type_name}' cannot be loaded: {exc}") from None
        options = {k: v for k, v in table.items() if k != "type"}
        built = build_dataclass(config_cls, options, where, base)
        if type_name == "local":
            built = dataclasses.replace(built, root=str((base / built.root).resolve()))
            _check_local_root(Path(built.root), f"{where} root")
        if type_name == "s3" and built.spool_dir is None:
            built = dataclasses.replace(built, spool_dir=server.state_dir / "s3-spool")
        backends[name] = BackendSection(name, type_name, built)
    return Config(path, server, webdav, sftp, defender, backends, store, admin)


def _check_proxy_protocol(section: WebDAVSection | SFTPSection, where: str) -> None:
    try:
        parse_networks(section.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"{where} trusted_proxies{exc}") from None
    if section.proxy_protocol and not section.trusted_proxies:
        raise ConfigError(f"{where} trusted_proxies: proxy_protocol = true needs the load "
                          f"balancers' addresses here")


def _check_local_root(root: Path, where: str) -> None:
    if not root.exists():
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot create '{root}': {exc.strerror}") from None
    if not root.is_dir():
        raise ConfigError(f"{where}: '{root}' is not a directory")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: '{root}' is not readable and writable by this process")


def check_listeners(config: Config) -> None:
    """Bind each enabled listener once to prove its port is free.

    Raises:
        ConfigError: naming the key of the listener that cannot bind.
    """
    for section_name in ("webdav", "sftp", "admin"):
        section = getattr(config, section_name)
        if not section.enabled or section.listen.port == 0:
            continue
        try:
            family = socket.AF_INET6 if ":" in section.listen.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((section.listen.host, section.listen.port))
        except OSError as exc:
            raise ConfigError(f"{config.path}: [{section_name}] listen: cannot listen on "
                              f"{section.listen}: {exc.strerror}") from None
