"""SSH authentication for one connection: password, keyboard-interactive and public key.

Every check goes through gateway.auth with the client IP, so the defender
sees SFTP and WebDAV failures alike. Unknown, disabled and banned users get
the same answer (AUTH_FAILED) after the same work.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import paramiko
from paramiko import (AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
                      OPEN_SUCCEEDED, InteractiveQuery)

from ..audit import record_login
from ..errors import BackendUnavailable
from ..sessions import Session
from ..users import User
from ..vfs import UserFS

if TYPE_CHECKING:
    from ..auth import Authenticator
    from .listener import SFTPFrontEnd

log = logging.getLogger(__name__)


class LoginServer(paramiko.ServerInterface):
    """paramiko's server hooks for one connection, answered from the users file."""

    def __init__(self, frontend: "SFTPFrontEnd", ip: str) -> None:
        self.frontend = frontend
        self.config = frontend.config
        self.ip = ip
        self.transport: paramiko.Transport | None = None
        self.accepted_at = self.last_activity = time.monotonic()
        # Which of the front-end's counts holds this connection: "unauthenticated",
        # "authenticated" (a defender slot) or None; the front-end keeps it.
        self.slot: str | None = None
        self.handlers: list[threading.Thread] = []
        # Channels opened that have not started a subsystem yet: id -> when opened.
        self._unstarted_channels: dict[int, float] = {}
        self._verified: dict[str, User] = {}
        # One registered session per user name accepted on this connection;
        # ending it closes the whole connection (no new channels either).
        self._sessions: dict[str, Session] = {}
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
        return self.frontend.gateway.open_fs(user, "sftp", self.ip,
                                            session=self._sessions.get(self.username))

    def _accept_checked(self, check: Callable[["Authenticator"], User | None], username: str) -> int:
        """Run one credential check and accept its user; a store that cannot confirm users refuses."""
        try:
            user = check(self.frontend.gateway.auth)
        except BackendUnavailable as exc:
            # SSH has no "try again later" for a login: it fails, and says why in the log.
            log.warning("SFTP login of %r from %s refused: %s", username, self.ip, exc.message)
            user = None
        return self._accept(user, username)

    def _accept(self, user: User | None, username: str) -> int:
        self.touch()
        if user is None:
            return AUTH_FAILED
        with self._lock:
            session = self._sessions.get(username)
            if session is None:
                # Registered as soon as the credentials check out (for a key,
                # before paramiko verifies the signature): a revocation racing
                # the login must find this connection.
                session = self._sessions[username] = self.frontend.gateway.open_session(
                    user, "sftp", self.ip, on_end=self._close_transport)
        if session.ended.is_set():
            return AUTH_FAILED
        self._verified[username] = user
        return AUTH_SUCCESSFUL

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_sessions(self) -> None:
        """The connection is gone: forget its sessions."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            self.frontend.gateway.sessions.close(session)

    # -- authentication -------------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password,keyboard-interactive"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        self._method = "password"
        return self._accept_checked(lambda auth: auth.check_password(
            username, password, self.ip, protocol="sftp", method="password"), username)

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # paramiko asks once without a signature and verifies the signature
        # itself before it counts the connection as authenticated.
        line = f"{key.get_name()} {key.get_base64()}"
        self._method = "publickey"
        return self._accept_checked(lambda auth: auth.check_key(username, line, self.ip), username)

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
        return self._accept_checked(lambda auth: auth.check_password(
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
        if self.frontend.draining.is_set():
            log.info("refusing a new channel from %s: the gateway is stopping", self.ip)
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        session = self._sessions.get(self.username)
        if session is None or session.ended.is_set():
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        # Each open channel may buffer up to a window of unread data and runs
        # a thread once its subsystem starts: cap them like OpenSSH's MaxSessions.
        # paramiko offers no public count of a transport's open channels.
        open_channels = len(self.transport._channels) if self.transport is not None else 0
        if open_channels >= self.config.max_channels:
            log.info("refusing another channel from %s: %d open", self.ip, open_channels)
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        with self._lock:
            self._unstarted_channels[chanid] = time.monotonic()
        return OPEN_SUCCEEDED

    def close_idle_channels(self, opened_before: float) -> None:
        """Close channels opened before `opened_before` that have not started a subsystem."""
        with self._lock:
            late = [c for c, opened in self._unstarted_channels.items() if opened < opened_before]
            for chanid in late:
                del self._unstarted_channels[chanid]
        for chanid in late:
            channel = self.transport._channels.get(chanid) if self.transport is not None else None
            if channel is not None:
                log.info("closing a channel from %s: no subsystem started within %ds", self.ip,
                         self.config.channel_setup_timeout)
                channel.close()

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            return False
        with self._lock:
            self._unstarted_channels.pop(channel.get_id(), None)
        try:
            return super().check_channel_subsystem_request(channel, name)
        except Exception:
            # The home could not be prepared (storage down): refuse this channel only.
            log.exception("starting an SFTP session for %r from %s failed", self.username, self.ip)
            return False

    def register_handler(self, handler: threading.Thread) -> None:
        with self._lock:
            self.handlers.append(handler)

