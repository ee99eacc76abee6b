"""The SFTP listener: accepts sockets and runs one paramiko Transport per connection.

A single accept thread hands each socket to its own Transport thread; a reaper
thread closes connections idle for longer than `idle_timeout`. stop() closes
every connection (open uploads are aborted by the subsystem) and joins all
threads it started.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import paramiko

from .. import metrics
from ..config import SFTPSection
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


class _Transport(paramiko.Transport):
    """A server Transport that tells the front-end when its thread ends, however it ends."""

    def __init__(self, sock: socket.socket, frontend: "SFTPFrontEnd", login: LoginServer) -> None:
        config = frontend.config
        disabled = {} if config.allow_ssh_rsa_sha1 else {"pubkeys": ["ssh-rsa"], "keys": ["ssh-rsa"]}
        super().__init__(sock, default_window_size=config.window_size,
                         default_max_packet_size=config.max_packet_size,
                         disabled_algorithms=disabled)
        self._frontend = frontend
        self._login = login
        self.name = f"sftp-conn-{login.ip}"

    def run(self) -> None:
        try:
            super().run()
        finally:
            # A handshake that failed leaves paramiko's handshake timer thread
            # running for its full timeout; a flood of garbage would pile them up.
            self.packetizer.complete_handshake()
            self._frontend._connection_ended(self._login)

    def _auth_trigger(self) -> None:
        # paramiko's only signal that a login succeeded, whatever the method.
        super()._auth_trigger()
        self._login.authenticated()


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
        self._threads: list[threading.Thread] = []
        self._connections: set[LoginServer] = set()
        self._lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Load or create the host keys, bind, and serve in background threads.

        Raises:
            OSError: the listen address cannot be bound or the state dir written.
        """
        self._host_keys = load_host_keys(self.gateway.state_dir)
        self.notices = [f"host key {describe(key)}" for key in self._host_keys]
        for line in self.notices:
            log.info("sftp %s", line)
        if self.config.allow_ssh_rsa_sha1 and "ssh-rsa" not in paramiko.RSAKey.HASHES:
            log.warning("[sftp] allow_ssh_rsa_sha1: paramiko %s has no ssh-rsa (SHA-1) signatures; "
                        "clients must use rsa-sha2-256/512", paramiko.__version__)
        host, port = self.config.listen.host, self.config.listen.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=128)
        # accept() wakes up now and then to notice stop().
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._accept_loop, name="sftp-accept", daemon=True),
                         threading.Thread(target=self._reap_loop, name="sftp-idle", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop accepting, close every connection, and join every thread."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        self._threads = []
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
        while not self._stopping.is_set():
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.warning("sftp accept failed: %s", exc)
                self._stopping.wait(0.5)
                continue
            self._open_connection(sock, addr[0])

    def _open_connection(self, sock: socket.socket, ip: str) -> None:
        if not self.gateway.defender.open_connection(ip):
            log.info("sftp connection from %s refused (limit or ban)", ip)
            sock.close()
            return
        login = LoginServer(self, ip)
        with self._lock:
            self._connections.add(login)
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

    def _connection_ended(self, login: LoginServer) -> None:
        with self._lock:
            if login not in self._connections:
                return
            self._connections.discard(login)
        metrics.CONNECTIONS_OPEN.labels("sftp").dec()
        self.gateway.defender.close_connection(login.ip)

    def _reap_loop(self) -> None:
        timeout = self.config.idle_timeout
        if not timeout:
            self._stopping.wait()
            return
        interval = min(max(timeout / 4, 0.1), 30.0)
        while not self._stopping.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [c for c in self._connections if now - c.last_activity > timeout]
            for login in idle:
                log.info("closing sftp connection of %r from %s: idle for %ds",
                         login.username, login.ip, timeout)
                if login.transport is not None:
                    login.transport.close()
