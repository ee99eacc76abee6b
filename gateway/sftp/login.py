"""SSH authentication for one connection: password, keyboard-interactive and public key.

Every check goes through gateway.auth with the client IP, so the defender
sees SFTP and WebDAV failures alike. Unknown, disabled and banned users get
the same answer (AUTH_FAILED) after the same work.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import paramiko
from paramiko import (AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
                      OPEN_SUCCEEDED, InteractiveQuery)

from ..audit import record_login
from ..users import User
from ..vfs import UserFS

if TYPE_CHECKING:
    from .listener import SFTPFrontEnd

log = logging.getLogger(__name__)

# Channels running the SFTP subsystem at once on one connection; each is a thread.
MAX_SESSIONS_PER_CONNECTION = 8


class LoginServer(paramiko.ServerInterface):
    """paramiko's server hooks for one connection, answered from the users file."""

    def __init__(self, frontend: "SFTPFrontEnd", ip: str) -> None:
        self.frontend = frontend
        self.config = frontend.config
        self.ip = ip
        self.transport: paramiko.Transport | None = None
        self.last_activity = time.monotonic()
        self.handlers: list[threading.Thread] = []
        self._verified: dict[str, User] = {}
        self._interactive_user = ""
        self._method = ""     # the last authentication method tried
        self._lock = threading.Lock()

    # -- bookkeeping ----------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    @property
    def username(self) -> str:
        return (self.transport.get_username() if self.transport else None) or ""

    def open_fs(self) -> UserFS:
        """The UserFS of the user this connection authenticated as."""
        # Keyed by the name paramiko authenticated: a key merely accepted for
        # one name (before its signature) never grants a session to another.
        user = self._verified[self.username]
        return self.frontend.gateway.open_fs(user, "sftp", self.ip)

    def _accept(self, user: User | None, username: str) -> int:
        self.touch()
        if user is None:
            return AUTH_FAILED
        self._verified[username] = user
        return AUTH_SUCCESSFUL

    # -- authentication -------------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password,keyboard-interactive"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        self._method = "password"
        return self._accept(self.frontend.gateway.auth.check_password(
            username, password, self.ip, protocol="sftp", method="password"), username)

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # paramiko asks once without a signature and verifies the signature
        # itself before it counts the connection as authenticated.
        line = f"{key.get_name()} {key.get_base64()}"
        self._method = "publickey"
        return self._accept(self.frontend.gateway.auth.check_key(username, line, self.ip), username)

    def check_auth_interactive(self, username: str, submethods: str):
        self.touch()
        self._method = "keyboard-interactive"
        self._interactive_user = username
        return InteractiveQuery("", "", ("Password: ", False))

    def check_auth_interactive_response(self, responses) -> int:
        username = self._interactive_user
        if len(responses) != 1:
            self.frontend.gateway.auth.record_failure(username, self.ip)
            record_login(user=username, protocol="sftp", ip=self.ip, method="keyboard-interactive",
                         ok=False)
            return AUTH_FAILED
        return self._accept(self.frontend.gateway.auth.check_password(
            username, responses[0], self.ip, protocol="sftp", method="keyboard-interactive"), username)

    def authenticated(self) -> None:
        """The connection has logged in: audit a key login (passwords are audited as checked).

        A key is only known good once paramiko has verified its signature,
        after check_auth_publickey; unlisted keys are not failed logins.
        """
        if self._method == "publickey":
            record_login(user=self.username, protocol="sftp", ip=self.ip, method="publickey", ok=True)

    def enable_auth_gssapi(self) -> bool:
        return False

    # -- channels -------------------------------------------------------------

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            return False
        with self._lock:
            self.handlers = [t for t in self.handlers if t.is_alive()]
            if len(self.handlers) >= MAX_SESSIONS_PER_CONNECTION:
                log.info("refusing another SFTP session from %s: %d open", self.ip, len(self.handlers))
                return False
        try:
            return super().check_channel_subsystem_request(channel, name)
        except Exception:
            # The home could not be prepared (storage down): refuse this channel only.
            log.exception("starting an SFTP session for %r from %s failed", self.username, self.ip)
            return False

    def register_handler(self, handler: threading.Thread) -> None:
        with self._lock:
            self.handlers.append(handler)

