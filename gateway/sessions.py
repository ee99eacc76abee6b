"""Live sessions of every protocol, so a user's access can be taken away while they are connected.

A session is whatever a front-end holds for one authenticated user: an SSH
connection, or one WebDAV request in flight. Ending one sets its `ended` event
(the session's UserFS refuses every further operation and transfer chunk) and
runs the front-end's own way to cut it (an SSH connection closes its transport).
The registry knows no protocol.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .users import User

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Session:
    """One user's session on one protocol; `ended` is set once it has been cut."""

    id: str
    user: str
    protocol: str
    ip: str
    started: float                      # seconds since the epoch
    ended: threading.Event = field(default_factory=threading.Event)
    _on_end: Callable[[], None] | None = None

    def end(self) -> None:
        """Cut the session: idempotent, and safe from any thread."""
        if self.ended.is_set():
            return
        self.ended.set()
        if self._on_end is not None:
            try:
                self._on_end()
            except Exception:
                log.exception("ending the %s session %s of %r failed", self.protocol, self.id, self.user)


class SessionRegistry:
    """The sessions of this process: open, close, list, end one, end all of a user's."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, user: str, protocol: str, ip: str,
             on_end: Callable[[], None] | None = None) -> Session:
        """Register a session; `on_end` cuts it (called at most once, from any thread)."""
        session = Session(secrets.token_hex(8), user, protocol, ip, time.time(), _on_end=on_end)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def close(self, session: Session) -> None:
        """Forget a session that finished on its own. Idempotent."""
        with self._lock:
            self._sessions.pop(session.id, None)

    def list(self) -> list[Session]:
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: s.started)

    def end(self, session_id: str) -> bool:
        """Cut one session; False when no such session is open."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.end()
        return True

    def end_all(self) -> int:
        """Cut every session; returns how many."""
        with self._lock:
            doomed = list(self._sessions.values())
            self._sessions.clear()
        for session in doomed:
            session.end()
        return len(doomed)

    def revoke_user(self, name: str, before: float | None = None) -> int:
        """Cut every session of `name` (with `before`, those started until then); returns how many."""
        with self._lock:
            doomed = [s for s in self._sessions.values()
                      if s.user == name and (before is None or s.started <= before)]
            for session in doomed:
                del self._sessions[session.id]
        for session in doomed:
            session.end()
        return len(doomed)


def _key_blobs(user: User) -> frozenset[str]:
    # The comment after the blob is not part of the key.
    return frozenset(" ".join(key.split()[:2]) for key in user.keys)


def revokes(old: User | None, new: User | None) -> bool:
    """True when going from `old` to `new` must end the sessions `old` opened.

    Removed, disabled, a new password hash or a different set of keys: the
    credentials a session was opened with may no longer be good.
    """
    if old is None:
        return False
    if new is None or new.disabled:
        return True
    return new.password_hash != old.password_hash or _key_blobs(new) != _key_blobs(old)
