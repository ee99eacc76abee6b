"""The running gateway: backends, users and front-ends wired together, and clean shutdown."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from cheroot.ssl.builtin import BuiltinSSLAdapter

from .audit import ReopeningFileHandler, setup_audit_log
from .auth import Authenticator, Defender
from .budget import HandleBudget, derive_total, raise_open_file_limit
from .config import Config, ConfigError, load_config
from .errors import GatewayError
from .follower import StoreFollower
from .node import node_id
from .permissions import ALL
from .fairness import Fairness
from .sessions import Session, SessionRegistry, revokes
from .storage import Backend, create_backend
from .storage.base import Upload
from .storage.instrumented import InstrumentedBackend
from .store import Conflict, UserCache, open_store
from .uploads import InFlightUploads, NodeKeeper
from .users import Location, User, hash_password
from .vfs import Limits, QuotaTracker, UserFS, ensure_location

log = logging.getLogger(__name__)

# Front-end name -> module exposing create_server(gateway) -> FrontEnd. Started
# in this order and stopped in reverse: the admin listener (health checks)
# comes up last and goes first.
FRONTENDS = {"webdav": "gateway.webdav", "sftp": "gateway.sftp", "admin": "gateway.admin"}


class FrontEnd(Protocol):
    """What a protocol front-end gives the server."""

    name: str
    address: tuple[str, int]   # bound (host, port), valid after start()

    def start(self) -> None: ...
    def stop(self) -> None: ...

    # Optional, for the SIGTERM drain (a front-end without them is stopped at
    # once): stop_accepting() closes the listener and keeps open connections
    # served; in_flight() counts what is still under way, by kind.


class Gateway:
    """Everything a front-end needs: users, authentication and per-session file systems."""

    # Set by the supervisor in a worker process before start(): the listening
    # sockets the parent bound, by front-end name (a front-end without one binds
    # its own), and whether this process sweeps the temp files of interrupted
    # uploads (only the first worker's first run: a later sweep would delete the
    # temp files of uploads other workers have in flight).
    listeners: Mapping[str, socket.socket] = MappingProxyType({})
    sweep_at_start = True
    # A supervised worker keeps a journal of its young uploads (uploads.UploadJournal),
    # so that what it leaves when killed is removed without waiting for a restart.
    journal_uploads = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.server.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.backends: dict[str, Backend] = {}
        for name, section in config.backends.items():
            try:
                # Timed for the metrics in one place, whatever the backend.
                self.backends[name] = InstrumentedBackend(name, create_backend(section.type,
                                                                               section.options))
            except GatewayError as exc:
                raise ConfigError(f"{config.path}: [backends.{name}]: {exc}") from None
            except OSError as exc:
                raise ConfigError(f"{config.path}: [backends.{name}]: {exc}") from None
        self.store = open_store(config.store.url, self.state_dir)
        self.users = UserCache(self.store, backends=self.backends.keys())
        self.defender = Defender(config.defender, self.store)
        self.uploads = InFlightUploads(self.store, self.node, self.backends,
                                       journal_dir=self.state_dir / "uploads")
        self.keeper = NodeKeeper(self.store, self.node, self.backends, node_timeout=config.store.node_timeout,
                                 sweep_interval=config.store.sweep_interval, uploads=self.uploads)
        self.auth = Authenticator(self.users, self.defender, stale_after=config.store.feed_stale_after)
        # Sized in start(), once the open-file limit has been raised.
        self.handles = HandleBudget(config.server.max_open_files or 1 << 30,
                                    config.sftp.max_handles_per_user)
        self.sessions = SessionRegistry()
        self.fairness = Fairness(config.server.bulk_share)
        self.users.subscribe(self._users_changed)
        self._follower = StoreFollower(self.store, self.users, self.defender, self.sessions,
                                       feed_stale_after=config.store.feed_stale_after,
                                       session_grace=config.store.session_grace)
        self.keeper.on_swept = self._follower.republish
        self.frontends: list[FrontEnd] = []
        self._quotas: dict[str, tuple[tuple[int, int], QuotaTracker]] = {}
        self._ready: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._open_uploads: weakref.WeakSet[Upload] = weakref.WeakSet()
        self._stopping = threading.Event()
        self._stopped = False
        self._sweepers: list[threading.Thread] = []
        self.limits = Limits(config.server.max_hole_bytes, config.server.max_depth)

    @property
    def node(self) -> str:
        """This process's name in the store (gateway.node: one per process, a forked worker gets its own)."""
        return node_id()

    # -- sessions -------------------------------------------------------------

    def _quota_for(self, user: User) -> QuotaTracker:
        limits = (user.quota_bytes, user.quota_files)
        with self._lock:
            known = self._quotas.get(user.name)
            if known is None or known[0] != limits:
                home = self.backends[user.home.backend]
                tracker = QuotaTracker(user.quota_bytes, user.quota_files,
                                       lambda: home.usage(user.home.path), store=self.store, user=user.name)
                self._quotas[user.name] = (limits, tracker)
                return tracker
            return known[1]

    def open_session(self, user: User, protocol: str, ip: str,
                     on_end: Callable[[], None] | None = None) -> Session:
        """Register a session of `user`, authenticated as the User record given.

        If that record is already out of date in a way that revokes it (the
        watcher saw the change before this session existed), the session is
        ended at once: check after registering, so no change falls in between.
        """
        session = self.sessions.open(user.name, protocol, ip, on_end)
        if revokes(user, self.users.get(user.name)):
            self.sessions.end(session.id)
        return session

    def _users_changed(self, old: dict[str, User], new: dict[str, User]) -> None:
        for name, user in old.items():
            if revokes(user, new.get(name)):
                self.auth.forget(name)
                ended = self.sessions.revoke_user(name)
                log.info("user %r was disabled, removed or got new credentials: %d session(s) ended",
                         name, ended)

    def open_fs(self, user: User, protocol: str, client: str = "",
                session: Session | None = None) -> UserFS:
        """A file system for one session of `user`; creates the home and mount targets on first use.

        When storage cannot do that now (unreachable), the file system is
        returned all the same and its first operation tries again: that
        operation then fails as any would (WebDAV 503, SFTP FAILURE), audited,
        instead of the session failing outside the error mapping.
        With a session, the file system stops working once the session is ended.
        """
        pending = [location for location in [user.home] + [m.target for m in user.mounts]
                   if (location.backend, location.path) not in self._ready]
        prepare = None
        if pending:
            try:
                self._prepare_locations(pending)
            except GatewayError as exc:
                log.warning("home or mounts of %r not ready yet, tried again at its next operation: %s",
                            user.name, exc)
                prepare = functools.partial(self._prepare_locations, pending)
        return UserFS(user, self.backends, quota=self._quota_for(user), protocol=protocol,
                      client=client, open_uploads=self._open_uploads, limits=self.limits,
                      session=session, uploads=self.uploads, prepare=prepare)

    def _prepare_locations(self, locations: list[Location]) -> None:
        """Create the homes and mount targets `locations` where missing (once per process)."""
        for location in locations:
            key = (location.backend, location.path)
            if key not in self._ready:
                ensure_location(self.backends[location.backend], location.path)
                self._ready.add(key)

    def readiness_probes(self) -> dict[str, Callable[[], None]]:
        """What must answer for the gateway to be ready: each returns, or raises with the reason."""
        probes = {f"backend '{name}'": backend.check for name, backend in self.backends.items()}
        # The store holds users, bans and locks: without it no login can be checked.
        probes["store"] = self.store.change_counter
        return probes

    # -- life cycle -----------------------------------------------------------

    def ensure_first_user(self, out=sys.stdout) -> None:
        """On a first run (a store never changed, with no users), create one and print its password once.

        Every process and node may try at once: the first insert wins and only
        its process prints the password.
        """
        if self.store.change_counter() or self.store.list_users():
            return
        backend = next(iter(self.backends))
        password = secrets.token_urlsafe(15)
        user = User("admin", hash_password(password), home=Location(backend, "/admin"),
                    permissions={"/": ALL})
        try:
            self.store.add_user(user)
        except Conflict:
            return
        print(f"Created user 'admin' with password: {password}\n"
              f"(shown once; change it with 'gateway user passwd admin')", file=out, flush=True)

    def start(self) -> None:
        self._follower.start()
        limit = raise_open_file_limit()
        total = self.config.server.max_open_files
        if not total:
            # Every connection the limits allow holds a socket.
            sockets = self.config.defender.max_connections + self.config.sftp.max_unauthenticated
            total = derive_total(limit, sockets)
        self.handles.total = total
        log.info("open file limit %d; SFTP handles: %d in total, %d per user", limit, total,
                 self.handles.per_user)
        if self.journal_uploads:
            self.uploads.open_journal(os.getpid())
        self.keeper.start()
        for backend in self.backends.values() if self.sweep_at_start else ():
            thread = threading.Thread(target=backend.sweep_temp_files, args=(self._stopping,),
                                      name="sweep-temp", daemon=True)
            thread.start()
            self._sweepers.append(thread)
        for name, module_name in FRONTENDS.items():
            section = getattr(self.config, name)
            if not section.enabled:
                continue
            module = importlib.import_module(module_name)
            frontend = module.create_server(self)
            try:
                frontend.start()
            except OSError as exc:
                self.stop()
                raise ConfigError(f"{self.config.path}: [{name}] listen: cannot listen on "
                                  f"{section.listen}: {exc.strerror or exc}") from None
            self.frontends.append(frontend)
            host, port = frontend.address
            log.info("%s listening on %s:%d", name, host, port)

    def reload(self, new: Config) -> None:
        """SIGHUP: apply what can change without dropping a session, from the config `new`.

        That is the log level and drain_timeout, the defender's limits, the
        `[webdav]`/`[sftp]` limits new connections read, the TLS certificates,
        and backends added to the config. Everything that can fail is prepared
        first: if any of it fails, nothing changes.

        Raises:
            ConfigError: one line saying what is wrong.
        """
        added = [name for name in new.backends if name not in self.config.backends]
        backends: dict[str, Backend] = {}
        try:
            for name in added:
                section = new.backends[name]
                backends[name] = InstrumentedBackend(name, create_backend(section.type, section.options))
            steps = [frontend.reload(new) for frontend in self.frontends if hasattr(frontend, "reload")]
        except (GatewayError, OSError, ValueError) as exc:
            for backend in backends.values():
                backend.close()
            raise ConfigError(f"{new.path}: {exc}") from None
        for name in self.config.backends:
            if name not in new.backends:
                log.warning("SIGHUP: backend '%s' was removed from the config: it stays until a restart", name)
            elif new.backends[name] != self.config.backends[name]:
                log.warning("SIGHUP: backend '%s' changed in the config: the change waits for a restart", name)
        for step in steps:
            step()
        apply_log_level(new)
        self.defender.config = new.defender
        self.config = reloaded_config(self.config, new)
        self.backends.update(backends)
        if added:
            try:
                self.users.add_backends(added)
            except GatewayError as exc:
                log.warning("SIGHUP: users of the new backends are read at the next change: %s", exc)
        log.info("SIGHUP: reloaded %s: log level %s%s", new.path, new.server.log_level,
                 f", new backends {', '.join(added)}" if added else "")

    def stop_accepting(self) -> None:
        """SIGTERM: close every listener at once; transfers under way go on.

        A front-end with nothing to drain (the admin listener) is stopped now.
        """
        for frontend in reversed(list(self.frontends)):
            try:
                if hasattr(frontend, "stop_accepting"):
                    frontend.stop_accepting()
                else:
                    frontend.stop()
                    self.frontends.remove(frontend)
            except Exception:
                log.exception("closing the %s listener failed", frontend.name)

    def in_flight(self) -> dict[str, int]:
        """Transfers still under way, by kind (only kinds with any): what a drain waits for."""
        counts: dict[str, int] = {}
        for frontend in self.frontends:
            if hasattr(frontend, "in_flight"):
                counts.update(frontend.in_flight())
        counts["uploads"] = sum(1 for upload in list(self._open_uploads) if not upload.closed)
        return {kind: count for kind, count in counts.items() if count}

    def stop(self) -> None:
        """Stop front-ends, abort what they left open, close backends and the store; once."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._follower.stop()
        for frontend in reversed(self.frontends):
            try:
                frontend.stop()
            except Exception:
                log.exception("stopping %s failed", frontend.name)
        self.frontends.clear()
        # Whatever a front-end left open is aborted: the previous versions stay.
        left = [upload for upload in list(self._open_uploads) if not upload.closed]
        if left:
            log.warning("aborting %d upload(s) still open; the previous versions stay", len(left))
        for upload in left:
            upload.abort()
        self.uploads.close_journal()
        self.keeper.stop()
        # A sweep still walking a large tree stops at its next folder; the
        # backends it uses must outlive it.
        self._stopping.set()
        for thread in self._sweepers:
            thread.join(timeout=30)
        for backend in self.backends.values():
            backend.close()
        self.store.close()


def _log_level(config: Config) -> int:
    return getattr(logging, config.server.log_level.upper(), logging.INFO)


def apply_log_level(config: Config) -> None:
    """SIGHUP: the main log's level from `config` (a worker forked later inherits it)."""
    logging.getLogger().setLevel(_log_level(config))


# What ends or rewrites a line for a log reader: C0 controls but tab, DEL, C1, U+2028/9.
_LINE_BREAKERS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if c != 0x09}
_LINE_BREAKERS.update({0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, whatever values it carries; tracebacks keep theirs.

    Security decision: our call sites log user-controlled values with %r; this
    also holds for the ones that do not (paramiko logs a user name raw at debug),
    so no client can forge a line of the main log.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_LINE_BREAKERS)


def setup_logging(config: Config) -> logging.Handler | None:
    """The main log on stderr, and the audit log where the config says; returns the audit handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=_log_level(config), handlers=[handler])
    try:
        return setup_audit_log(config.server.audit_log)
    except OSError as exc:
        raise ConfigError(f"{config.path}: [server] audit_log: cannot open "
                          f"'{config.server.audit_log}': {exc.strerror or exc}") from None


def _next_signal(signals: "queue.SimpleQueue[int]") -> int:
    """Wait for the next queued signal.

    The wait wakes up every second: a signal the kernel delivers to another
    thread only sets a flag, which the main thread notices when it next runs
    Python code, not while it sleeps in a lock.
    """
    while True:
        try:
            return signals.get(timeout=1.0)
        except queue.Empty:
            continue


def serve(config: Config) -> int:
    """Run until SIGINT or SIGTERM; SIGHUP reopens the audit log. Returns the exit status."""
    audit_handler = setup_logging(config)
    if config.server.workers > 1:
        from .supervisor import Supervisor
        return Supervisor(config, audit_handler).run()
    gateway = Gateway(config)
    gateway.ensure_first_user()
    return run_gateway(gateway, audit_handler)


def run_gateway(gateway: Gateway, audit_handler: logging.Handler | None,
                on_ready: Callable[[], None] | None = None) -> int:
    """Start `gateway` and serve until SIGINT or SIGTERM, then stop it; returns the exit status.

    SIGTERM drains first (see `drain`); SIGINT stops at once. SIGHUP reopens the audit log. Without `on_ready` the listeners and "gateway
    ready" are printed; a worker process passes its own (the supervisor prints
    them once for all).
    """
    # Handlers only queue the signal; the main thread acts on it outside the
    # handler, where taking the logging locks cannot deadlock.
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: signals.put(signum))
    gateway.start()
    if on_ready is not None:
        on_ready()
    else:
        for frontend in gateway.frontends:
            host, port = frontend.address
            print(f"{frontend.name} listening on {host}:{port}", flush=True)
            for notice in getattr(frontend, "notices", ()):
                print(f"  {notice}", flush=True)
        print("gateway ready", flush=True)
    try:
        while (signum := _next_signal(signals)) == signal.SIGHUP:
            reopen_audit_log(audit_handler)
            reload_config(gateway)
        if signum == signal.SIGTERM:
            drain(gateway, gateway.config.server.drain_timeout, signals, audit_handler)
    finally:
        log.info("shutting down")
        gateway.stop()
    return 0


def drain(gateway: Gateway, timeout: float, signals: "queue.SimpleQueue[int]",
          audit_handler: logging.Handler | None) -> None:
    """SIGTERM: close the listeners, then give the transfers in flight up to `timeout` seconds.

    Returns when none is left, when the time is up, or at a second SIGTERM or
    SIGINT; the caller's stop() then aborts what is left (the previous
    versions of the files stay).
    """
    if timeout <= 0:
        return
    gateway.stop_accepting()
    busy = gateway.in_flight()
    if not busy:
        log.info("SIGTERM: listeners closed, no transfer in flight")
        return
    log.info("SIGTERM: listeners closed; waiting up to %gs for %s", timeout, _describe(busy))
    deadline = time.monotonic() + timeout
    while busy:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("drain_timeout (%gs) passed: aborting %s", timeout, _describe(busy))
            return
        try:
            # Short waits: the main thread notices a signal only when it runs.
            signum = signals.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            pass
        else:
            if signum == signal.SIGHUP:
                reopen_audit_log(audit_handler)
            else:
                log.warning("%s while draining: aborting %s", signal.Signals(signum).name,
                            _describe(busy))
                return
        busy = gateway.in_flight()
    log.info("SIGTERM: every transfer in flight finished")


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in counts.items())


def reloaded_config(old: Config, new: Config) -> Config:
    """The config a process runs with after a SIGHUP read `new`: what a reload applies, from `new`; the rest from `old`.

    The supervisor keeps this too, so that a worker it starts after a reload
    runs with the same settings as the workers that reloaded.
    """
    def tls(old_section, new_section) -> dict:
        # Turning TLS on or off waits for a restart; a new certificate does not.
        if (old_section.tls_cert is None) != (new_section.tls_cert is None):
            return {}
        return {"tls_cert": new_section.tls_cert, "tls_key": new_section.tls_key}

    return dataclasses.replace(
        old, defender=new.defender,
        sftp=dataclasses.replace(new.sftp, listen=old.sftp.listen, proxy_protocol=old.sftp.proxy_protocol),
        webdav=dataclasses.replace(old.webdav, header_timeout=new.webdav.header_timeout,
                                   max_header_size=new.webdav.max_header_size, **tls(old.webdav, new.webdav)),
        admin=dataclasses.replace(old.admin, allow_networks=new.admin.allow_networks, **tls(old.admin, new.admin)),
        server=dataclasses.replace(old.server, log_level=new.server.log_level,
                                   drain_timeout=new.server.drain_timeout),
        backends={**old.backends, **{name: section for name, section in new.backends.items()
                                     if name not in old.backends}})


def check_reload(old: Config, new: Config) -> None:
    """Fail as a process's reload of `new` would, without keeping anything open.

    Creates (and closes) the backends `new` adds and loads its certificates.

    Raises:
        ConfigError: one line saying what is wrong.
    """
    try:
        for name, section in new.backends.items():
            if name not in old.backends:
                create_backend(section.type, section.options).close()
        for name in ("webdav", "admin"):
            old_section, new_section = getattr(old, name), getattr(new, name)
            if old_section.tls_cert is not None and new_section.tls_cert is not None:
                BuiltinSSLAdapter(str(new_section.tls_cert), str(new_section.tls_key or new_section.tls_cert))
    except (GatewayError, OSError, ValueError) as exc:
        raise ConfigError(f"{new.path}: {exc}") from None


def reload_config(gateway: Gateway) -> None:
    """SIGHUP: read the config file again and apply what can change; a bad config changes nothing."""
    try:
        gateway.reload(load_config(gateway.config.path))
    except ConfigError as exc:
        log.error("SIGHUP: config not reloaded, nothing changed: %s", exc)


def reopen_audit_log(audit_handler: logging.Handler | None) -> None:
    """SIGHUP: reopen the audit log file (logrotate moved it), if there is one."""
    if isinstance(audit_handler, ReopeningFileHandler):
        audit_handler.reopen()
        log.info("SIGHUP: reopened the audit log %s", audit_handler.baseFilename)
    else:
        log.info("SIGHUP: no audit log file to reopen")
