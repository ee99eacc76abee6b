"""What one process shares through the state store: it follows the store's change feed and
publishes its live sessions.

One watcher thread per process reloads the users and the bans and reads new
revocations whenever any process or node changes something (PostgreSQL
LISTEN/NOTIFY, or the change counter polled every second on SQLite), so a
change reaches every process within about a second. A second thread writes
this process's sessions to the store's sessions table once a second, so that
every node's sessions can be listed and ended by id (`Store.revoke`).
Sessions shorter than that (most WebDAV requests) never cost a write.

A process cut off from the store cannot learn that a user was disabled
elsewhere: once the feed has not read the store for `feed_stale_after`
seconds the Authenticator stops trusting cached users (a login reads the
store first, or is refused), and once it has been silent for `session_grace`
more, the sync thread ends every session of this process.
"""
from __future__ import annotations

import logging
import threading
import time

from .auth import Defender
from .node import node_id
from .sessions import SessionRegistry
from .store import Conflict, Store, StoreUnavailable, UserCache
from .store import Session as SessionRow

log = logging.getLogger(__name__)

# How often this process's sessions are written to the store.
SYNC_SECONDS = 1.0
# How often failures older than the defender's window are deleted for every address.
PURGE_SECONDS = 60.0


class StoreFollower:
    """Keeps `users`, the defender's bans and `sessions` in step with the store, from two threads."""

    def __init__(self, store: Store, users: UserCache, defender: Defender,
                 sessions: SessionRegistry, *, feed_stale_after: float = 5.0,
                 session_grace: float = 10.0) -> None:
        self.store = store
        self.feed_stale_after = feed_stale_after
        self.session_grace = session_grace
        self.node = ""     # named at start(): a worker forked after __init__ is a node of its own
        self.users = users
        self.defender = defender
        self.sessions = sessions
        self._cursor = 0
        self._published: set[str] = set()
        self._republish = threading.Event()
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
            # The counter is read several times per feed_stale_after even when nothing changes
            # (PostgreSQL's NOTIFY alone would not tell a silent feed from a dead one).
            threading.Thread(target=self.store.watch, args=(self._changed, self._stop),
                             kwargs={"since": since, "alive": self.users.confirm,
                                     "poll_interval": min(1.0, self.feed_stale_after / 4)},
                             name="store-watch", daemon=True),
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

    def republish(self) -> None:
        """Write every live session to the store again (another node swept them: see NodeKeeper)."""
        self._republish.set()

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
                self._end_unverifiable()
                if self._republish.is_set():
                    self._republish.clear()
                    self._published.clear()
                self._publish()
                if time.monotonic() - purged >= PURGE_SECONDS:
                    purged = time.monotonic()
                    self.defender.purge()
            except Exception as exc:
                log.warning("writing sessions to the store failed: %s", exc)

    def _end_unverifiable(self) -> None:
        """End every session once the users could not be read for feed_stale_after + session_grace."""
        if self.users.current_within(self.feed_stale_after + self.session_grace):
            return
        try:
            self.users.refresh()
            return
        except StoreUnavailable as exc:
            reason = exc
        # Security decision: a user disabled elsewhere meanwhile would keep their sessions here.
        ended = self.sessions.end_all()
        if ended:
            log.warning("%s; %d session(s) ended: the users cannot be checked for over %ss",
                        reason, ended, self.feed_stale_after + self.session_grace)

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
