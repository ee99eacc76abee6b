"""The SFTP listener: accepts sockets and runs one paramiko Transport per connection.

A single accept thread hands each socket to its own Transport thread; a reaper
thread closes connections that have not logged in within `login_timeout`,
channels that start no subsystem within `channel_setup_timeout`, and
connections idle for longer than `idle_timeout`. stop() closes every
connection (open uploads are aborted by the subsystem) and joins all threads
it started.

A connection that has not logged in counts against `max_unauthenticated` (in
total and per address) only; it takes one of the defender's connection slots,
which WebDAV shares, once it has logged in. A connection over those limits
waits, unanswered, up to `unauthenticated_wait` seconds for a slot (clients
behind one NAT address dial many at once) in a short queue served by its own
thread; only then is it refused.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import paramiko

from .. import metrics
from ..config import SFTPSection
from ..proxy_protocol import ProxyProtocol
from .handler import GatewaySFTPServer, UserFSInterface
from .hostkey import describe, load_host_keys
from .login import LoginServer

log = logging.getLogger(__name__)

# Offered in this order. The client's list decides, so this is mostly about
# what we refuse: no CBC, no 3DES, no SHA-1 or MD5 MACs.
CIPHERS = ("aes128-ctr", "aes256-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
           "aes192-ctr")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256",
        "hmac-sha2-512")
_JOIN_TIMEOUT = 10.0
_NO_BANNER = "sftp connection from %s closed before it sent an SSH banner (a port probe?)"


class _Transport(paramiko.Transport):
    """A server Transport that tells the front-end when its thread ends, however it ends."""

    def __init__(self, sock: socket.socket, frontend: "SFTPFrontEnd", login: LoginServer) -> None:
        config = frontend.config
        disabled = {} if config.allow_ssh_rsa_sha1 else {"pubkeys": ["ssh-rsa"], "keys": ["ssh-rsa"]}
        # Before paramiko's __init__: _log below reads them.
        self._login = login
        self._non_ssh_lines: list[str] = []   # lines a client sent before an SSH banner
        self._end_said = False                # _log said why the connection ended
        super().__init__(sock, default_window_size=config.window_size,
                         default_max_packet_size=config.max_packet_size,
                         disabled_algorithms=disabled)
        self._frontend = frontend
        self.name = f"sftp-conn-{login.ip}"
        # paramiko's own waits for the banner and each key exchange; the
        # reaper enforces the deadline for the whole login.
        self.banner_timeout = self.handshake_timeout = config.login_timeout

    def _auth_trigger(self) -> None:
        # paramiko's only signal that a login succeeded, whatever the method
        # (private: re-check on a paramiko upgrade).
        super()._auth_trigger()
        self._login.authenticated()
        if not self._frontend._logged_in(self._login):
            log.info("sftp login of %r from %s refused: connection limit", self.get_username(),
                     self._login.ip)
            self.close()

    def _log(self, level: int, msg: Any, *args: Any) -> None:
        """paramiko's one log path: say how a connection ended in one line, at its level.

        paramiko logs every end it did not ask for at ERROR: a port probe or a
        client that never sends its banner as a 30-line traceback, every reset
        disconnect as "Socket exception". Those are classified here by the
        exception being handled; only an unknown exception (a bug of ours)
        stays at ERROR, its traceback in one record.
        """
        if isinstance(msg, list):
            # util.tb_strings(): the traceback of the line logged just before.
            if self._end_said:
                return
            msg = "\n".join(msg).rstrip()
        elif isinstance(msg, str):
            if msg.startswith("Banner: "):
                self._non_ssh_lines.append(msg[len("Banner: "):])
            elif level >= logging.ERROR and msg.startswith(("Exception (server): ", "Socket exception: ")):
                level, msg, args = self._how_it_ended(sys.exc_info()[1])
                self._end_said = True
            elif msg == "EOF in transport thread":
                level, msg, args = self._how_it_ended(sys.exc_info()[1])
            elif msg.startswith("Channel request for unknown channel"):
                level, msg, args = logging.WARNING, "sftp connection from %s: %s", (self._login.ip, msg)
        super()._log(level, msg, *args)

    def _how_it_ended(self, exc: BaseException | None) -> tuple[int, str, tuple[Any, ...]]:
        ip = self._login.ip
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            # How many clients end every session: the session's end is logged already.
            return logging.DEBUG, "sftp connection from %s reset by the client", (ip,)
        if isinstance(exc, OSError):
            return logging.INFO, "sftp connection from %s failed: %s", (ip, exc)
        if isinstance(exc, EOFError):
            if not self.remote_version:
                return logging.INFO, _NO_BANNER, (ip,)
            return logging.DEBUG, "sftp connection from %s closed by the client", (ip,)
        if str(exc).startswith("Error reading SSH protocol banner"):
            if self._non_ssh_lines:
                return (logging.WARNING, "sftp connection from %s sent %d line(s) that are not SSH, "
                        "the first %.80r", (ip, len(self._non_ssh_lines), self._non_ssh_lines[0]))
            if isinstance(exc.__context__, TimeoutError):
                return logging.INFO, "sftp connection from %s sent no SSH banner within %ds", \
                    (ip, self.banner_timeout)
            return logging.INFO, _NO_BANNER, (ip,)
        # A handshake gone wrong: garbage, no common algorithm, a bad MAC.
        return logging.WARNING, "sftp connection from %s dropped: %s", (ip, exc)

    def run(self) -> None:
        try:
            super().run()
        finally:
            # A handshake that failed leaves paramiko's handshake timer thread
            # running for its full timeout; a flood of garbage would pile them up.
            self.packetizer.complete_handshake()
            self._frontend._connection_ended(self._login)


class SFTPFrontEnd:
    """The `sftp` front-end: host keys, listener, connections."""

    name = "sftp"

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.config: SFTPSection = gateway.config.sftp
        self.address: tuple[str, int] = (self.config.listen.host, self.config.listen.port)
        self.notices: list[str] = []
        self._host_keys: list[paramiko.PKey] = []
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        # Set by stop_accepting() (SIGTERM drain): no new connection, no new session.
        self.draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: set[LoginServer] = set()
        self._unauthenticated: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        # Connections waiting for an unauthenticated slot: (socket, address, deadline), oldest first.
        self._waiting: deque[tuple[socket.socket, str, float]] = deque()
        self._slot_freed = threading.Condition(self._lock)
        self._proxy = ProxyProtocol.for_section(self.config, "sftp")
        # Connections of a trusted proxy whose PROXY header is being read, each
        # in a thread of its own (so a silent one holds up no other), by thread.
        self._header_reads: dict[threading.Thread, socket.socket] = {}

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Load or create the host keys, bind, and serve in background threads.

        Raises:
            OSError: the listen address cannot be bound or the state dir written.
        """
        self._host_keys = load_host_keys(self.gateway.state_dir, self.gateway.store)
        self.notices = [f"host key {describe(key)}" for key in self._host_keys]
        for line in self.notices:
            log.info("sftp %s", line)
        if self.config.allow_ssh_rsa_sha1 and "ssh-rsa" not in paramiko.RSAKey.HASHES:
            log.warning("[sftp] allow_ssh_rsa_sha1: paramiko %s has no ssh-rsa (SHA-1) signatures; "
                        "clients must use rsa-sha2-256/512", paramiko.__version__)
        # Worker processes share the listening socket the supervisor bound.
        self._sock = self.gateway.listeners.get(self.name)
        if self._sock is None:
            host, port = self.config.listen.host, self.config.listen.port
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, port), family=family, backlog=128)
        # accept() wakes up now and then to notice stop(). On a shared socket
        # another worker may win a connection: accept() then waits on quietly.
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self._stopping.clear()
        self.draining.clear()
        self._threads = [threading.Thread(target=self._accept_loop, name="sftp-accept", daemon=True),
                         threading.Thread(target=self._reap_loop, name="sftp-idle", daemon=True),
                         threading.Thread(target=self._queue_loop, name="sftp-queue", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop_accepting(self) -> None:
        """SIGTERM drain: close the listener and refuse new sessions; open sessions keep working."""
        self.draining.set()
        # The accept thread is the first; it ends within its accept() timeout.
        if self._threads:
            self._threads[0].join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def reload(self, config) -> Callable[[], None]:
        """SIGHUP: the limits new connections and sessions read from `[sftp]`; returns the step that applies them.

        The listen address and PROXY protocol setting stay until a restart.
        """
        section = dataclasses.replace(config.sftp, listen=self.config.listen,
                                      proxy_protocol=self.config.proxy_protocol)

        def apply() -> None:
            self.config = section
            self.gateway.handles.per_user = section.max_handles_per_user
        return apply

    def in_flight(self) -> dict[str, int]:
        """What a drain waits for: SFTP file and folder handles still open."""
        return {"sftp handles": self.gateway.handles.in_use}

    def stop(self) -> None:
        """Stop accepting, close every connection, and join every thread."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        self._threads = []
        with self._lock:
            header_reads = dict(self._header_reads)
        for sock in header_reads.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)   # ends the header read at once
            except OSError:
                pass
        for thread in header_reads:
            thread.join(_JOIN_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            connections = list(self._connections)
        for login in connections:
            if login.transport is not None:
                login.transport.close()
        for login in connections:
            if login.transport is not None:
                login.transport.join(_JOIN_TIMEOUT)
            for handler in list(login.handlers):
                handler.join(_JOIN_TIMEOUT)

    # -- connections ----------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set() and not self.draining.is_set():
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.warning("sftp accept failed: %s", exc)
                self._stopping.wait(0.5)
                continue
            if self._proxy is None:
                self._open_connection(sock, addr[0])
            else:
                self._read_proxy_header(sock, addr)

    def _read_proxy_header(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Behind a load balancer: read the PROXY header in a thread of its own, then open the connection.

        The accept loop must not wait for it: a trusted proxy's silent
        connection would hold up every other client for the header timeout.
        """
        if not self._proxy.trusts(peer[0]):
            self._proxy.client_address(sock, peer)   # refuses, logs and closes
            return
        with self._lock:
            busy = len(self._header_reads) >= self.config.max_unauthenticated
        if busy:
            log.info("sftp connection from %s refused: %d PROXY headers already being read", peer[0],
                     self.config.max_unauthenticated)
            sock.close()
            return

        def read() -> None:
            try:
                # The client the header names (None: refused, and closed).
                client = self._proxy.client_address(sock, peer)
                if client is None:
                    return
                if self._stopping.is_set() or self.draining.is_set():
                    sock.close()
                    return
                self._open_connection(sock, client[0])
            finally:
                with self._lock:
                    self._header_reads.pop(thread, None)

        thread = threading.Thread(target=read, name=f"sftp-proxy-{peer[0]}", daemon=True)
        with self._lock:
            self._header_reads[thread] = sock
        thread.start()

    def _open_connection(self, sock: socket.socket, ip: str) -> None:
        if self.gateway.defender.is_banned(ip):
            log.info("sftp connection from %s refused (banned)", ip)
            sock.close()
            return
        with self._lock:
            login = self._take_slot(ip)
            queued = login is None and self._enqueue(sock, ip)
        if login is not None:
            self._start_transport(sock, login)
        elif not queued:
            log.info("sftp connection from %s refused (unauthenticated limit, queue full)", ip)
            sock.close()

    def _enqueue(self, sock: socket.socket, ip: str) -> bool:
        """Queue a connection over the unauthenticated limits (lock held); False when it must be refused."""
        wait = self.config.unauthenticated_wait
        if self._stopping.is_set():
            return False   # the queue's thread is gone or going
        # The queue is short: as many as may be unauthenticated, and per address as many as it may have.
        if not wait or len(self._waiting) >= self.config.max_unauthenticated or \
                sum(1 for _, queued, _ in self._waiting if queued == ip) >= self.config.max_unauthenticated_per_ip:
            return False
        self._waiting.append((sock, ip, time.monotonic() + wait))
        return True

    def _queue_loop(self) -> None:
        """Give freed unauthenticated slots to waiting connections, oldest first; refuse those past their wait."""
        while not self._stopping.is_set():
            admitted, refused = [], []
            with self._lock:
                self._slot_freed.wait(0.25)
                now, left = time.monotonic(), deque()
                ending = self._stopping.is_set() or self.draining.is_set()
                for sock, ip, deadline in self._waiting:
                    login = None if ending else self._take_slot(ip)
                    if login is not None:
                        admitted.append((sock, login))
                    elif ending or deadline <= now:
                        refused.append((sock, ip))
                    else:
                        left.append((sock, ip, deadline))
                self._waiting = left
            for sock, login in admitted:
                self._start_transport(sock, login)
            for sock, ip in refused:
                log.info("sftp connection from %s refused (unauthenticated limit; no slot within %gs)", ip,
                         self.config.unauthenticated_wait)
                sock.close()
        with self._lock:
            waiting, self._waiting = self._waiting, deque()
        for sock, _, _ in waiting:
            sock.close()

    def _start_transport(self, sock: socket.socket, login: LoginServer) -> None:
        """Run the SSH server for a connection that holds an unauthenticated slot, in its own thread."""
        ip = login.ip
        metrics.CONNECTIONS.labels("sftp").inc()
        metrics.CONNECTIONS_OPEN.labels("sftp").inc()
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = _Transport(sock, self, login)
            login.transport = transport
            for key in self._host_keys:
                transport.add_server_key(key)
            options = transport.get_security_options()
            options.ciphers = [c for c in CIPHERS if c in options.ciphers]
            options.digests = [m for m in MACS if m in options.digests]
            transport.set_subsystem_handler("sftp", GatewaySFTPServer, UserFSInterface)
            # With an event, start_server returns at once; the handshake runs in
            # the transport's own thread so a slow client never stalls accept().
            transport.start_server(event=threading.Event(), server=login)
        except Exception:
            log.exception("sftp connection from %s could not start", ip)
            self._connection_ended(login)
            sock.close()

    def _take_slot(self, ip: str) -> LoginServer | None:
        """A new connection counted as not logged in (lock held); None over `max_unauthenticated` (total or per address)."""
        total = sum(self._unauthenticated.values())
        if total >= self.config.max_unauthenticated or \
                self._unauthenticated.get(ip, 0) >= self.config.max_unauthenticated_per_ip:
            return None
        login = LoginServer(self, ip)
        self._unauthenticated[ip] += 1
        login.slot = "unauthenticated"
        self._connections.add(login)
        return login

    def _release_unauthenticated(self, ip: str) -> None:
        """Give back an unauthenticated slot (lock held), to the oldest connection waiting for one."""
        self._unauthenticated[ip] -= 1
        if self._unauthenticated[ip] <= 0:
            del self._unauthenticated[ip]
        self._slot_freed.notify()

    def _logged_in(self, login: LoginServer) -> bool:
        """Move a connection that logged in to a defender slot; False when the limits refuse it."""
        with self._lock:
            if login.slot != "unauthenticated":
                return login.slot == "authenticated"
            self._release_unauthenticated(login.ip)
            login.slot = None
            # The defender's lock nests inside ours, never the other way round.
            if self.gateway.defender.open_connection(login.ip):
                login.slot = "authenticated"
                return True
            return False

    def _connection_ended(self, login: LoginServer) -> None:
        with self._lock:
            if login not in self._connections:
                return
            self._connections.discard(login)
            slot, login.slot = login.slot, None
            if slot == "unauthenticated":
                self._release_unauthenticated(login.ip)
        login.close_sessions()
        metrics.CONNECTIONS_OPEN.labels("sftp").dec()
        if slot == "authenticated":
            self.gateway.defender.close_connection(login.ip)

    def _reap_loop(self) -> None:
        config = self.config
        timeouts = [config.login_timeout, config.channel_setup_timeout] + \
            ([config.idle_timeout] if config.idle_timeout else [])
        interval = min(max(min(timeouts) / 4, 0.1), 30.0)
        while not self._stopping.wait(interval):
            self._reap(time.monotonic())

    def _reap(self, now: float) -> None:
        config = self.config
        with self._lock:
            connections = list(self._connections)
        for login in connections:
            if login.transport is None:
                continue
            if login.slot != "authenticated" and now - login.accepted_at > config.login_timeout:
                log.info("closing sftp connection from %s: not logged in within %ds", login.ip,
                         config.login_timeout)
                login.transport.close()
            elif config.idle_timeout and now - login.last_activity > config.idle_timeout:
                log.info("closing sftp connection of %r from %s: idle for %ds",
                         login.username, login.ip, config.idle_timeout)
                login.transport.close()
            else:
                login.close_idle_channels(now - config.channel_setup_timeout)
