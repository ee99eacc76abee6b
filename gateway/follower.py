"""What one process shares through the state store: it follows the store's change feed and
publishes its live sessions.

One watcher thread per process reloads the users and the bans and reads new
revocations whenever any process or node changes something (PostgreSQL
LISTEN/NOTIFY, or the change counter polled every second on SQLite), so a
change reaches every process within about a second. A second thread writes
this process's sessions to the store's sessions table once a second, so that
every node's sessions can be listed and ended by id (`Store.revoke`).
Sessions shorter than that (most WebDAV requests) never cost a write.
"""
from __future__ import annotations

import logging
import threading
import time

from .auth import Defender
from .node import node_id
from .sessions import SessionRegistry
from .store import Conflict, Store, UserCache
from .store import Session as SessionRow

log = logging.getLogger(__name__)

# How often this process's sessions are written to the store.
SYNC_SECONDS = 1.0
# How often failures older than the defender's window are deleted for every address.
PURGE_SECONDS = 60.0


class StoreFollower:
    """Keeps `users`, the defender's bans and `sessions` in step with the store, from two threads."""

    def __init__(self, store: Store, users: UserCache, defender: Defender,
                 sessions: SessionRegistry) -> None:
        self.store = store
        self.node = ""     # named at start(): a worker forked after __init__ is a node of its own
        self.users = users
        self.defender = defender
        self.sessions = sessions
        self._cursor = 0
        self._published: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Read users, bans and the revocation cursor, then follow the change feed.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        self.node = node_id()
        # The counter first: whatever changes after it is reported by the watch.
        since = self.store.change_counter()
        self.users.follow()
        self.users.load()
        self.defender.load_bans()
        self._cursor = self.store.last_revocation_id()
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self.store.watch, args=(self._changed, self._stop),
                             kwargs={"since": since}, name="store-watch", daemon=True),
            threading.Thread(target=self._sync, name="store-sync", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads and take this process's sessions out of the store. Idempotent."""
        if not self._threads:
            return
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []
        try:
            self.store.remove_node_sessions(self.node)
        except Exception:
            log.exception("removing this node's sessions from the store failed")
        self._published.clear()

    def _changed(self, counter: int) -> None:
        """The change feed moved: each part is tried on its own, so one failing skips no other."""
        for what, step in (("users", lambda: self.users.changed(counter)),
                           ("bans", self.defender.load_bans),
                           ("revocations", self._revocations)):
            try:
                step()
            except Exception:
                log.exception("reloading the %s from the store failed", what)

    def _revocations(self) -> None:
        for revocation in self.store.revocations_after(self._cursor):
            self._cursor = revocation.id
            if revocation.session_id is not None:
                if self.sessions.end(revocation.session_id):
                    log.info("session %s ended on request", revocation.session_id)
            elif revocation.user is not None:
                ended = self.sessions.revoke_user(revocation.user, before=revocation.time)
                if ended:
                    log.info("%d session(s) of %r ended on request", ended, revocation.user)

    def _sync(self) -> None:
        purged = time.monotonic()
        while not self._stop.wait(SYNC_SECONDS):
            try:
                self._publish()
                if time.monotonic() - purged >= PURGE_SECONDS:
                    purged = time.monotonic()
                    self.defender.purge()
            except Exception as exc:
                log.warning("writing sessions to the store failed: %s", exc)

    def _publish(self) -> None:
        live = {session.id: session for session in self.sessions.list()}
        for session_id in self._published - live.keys():
            self.store.remove_session(session_id)
            self._published.discard(session_id)
        for session_id in live.keys() - self._published:
            session = live[session_id]
            try:
                self.store.add_session(SessionRow(session.id, session.user, session.protocol,
                                                  session.ip, self.node, session.started))
            except Conflict:
                pass   # written by an earlier sync whose answer was lost
            self._published.add(session_id)
