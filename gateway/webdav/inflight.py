"""Each client address and each user may hold only a share of the worker threads.

cheroot serves a request on one worker thread from the moment its headers
are complete until its response is sent. One user with more slow uploads (or
unread downloads) in flight than there are threads used to hold every
thread, and every other client waited. `InFlight` counts the requests being
served per client address (admitted before the application runs) and per
user (admitted by `UserShare`, right after wsgidav's authentication, before
any body is read). Over its share, an address or user may still borrow idle
threads while a quarter of the pool stays free for everyone else (twenty
clients behind one NAT address are not refused while nothing else runs);
beyond that a request is answered at once with 503 and Retry-After, which
costs its thread a moment only.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict

from wsgidav.mw.base_mw import BaseMiddleware

log = logging.getLogger(__name__)

# Seconds a refused client is asked to wait before it tries again.
RETRY_AFTER = 2
_ADDRESS = "gateway.inflight.address"
_USER = "gateway.inflight.user"


class InFlight:
    """Requests being served, per client address and per user, out of `threads`; 0 for a share means no limit."""

    def __init__(self, per_address: int, per_user: int, threads: int) -> None:
        self.per_address = per_address
        self.per_user = per_user
        # Requests in flight over all addresses may borrow up to this many threads.
        self.ceiling = threads - max(1, threads // 4)
        self._lock = threading.Lock()
        self._addresses: dict[str, int] = defaultdict(int)
        self._users: dict[str, int] = defaultdict(int)
        self._total = 0   # every request admitted by address

    def _enter(self, counts: dict[str, int], key: str, share: int, new: int) -> bool:
        """Count one more for `key`, and `new` more in the total: within its share, or while a quarter stays free."""
        with self._lock:
            held = counts.get(key, 0)
            if share and held >= share and self._total + new > self.ceiling:
                return False
            counts[key] = held + 1
            self._total += new
            return True

    def _leave(self, counts: dict[str, int], key: str) -> None:
        with self._lock:
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

    def enter_address(self, environ: dict) -> bool:
        """Count the request against its client address; False (nothing counted) when it may not run now."""
        ip = environ.get("REMOTE_ADDR", "")
        if not self._enter(self._addresses, ip, self.per_address, 1):
            log.info("webdav request from %s refused: %d or more requests of this address in flight, "
                     "%d in all", ip, self.per_address, self._total)
            return False
        environ[_ADDRESS] = ip
        return True

    def enter_user(self, environ: dict, user: str) -> bool:
        """Count the request against its user; False (nothing counted) when it may not run now."""
        # This request is in the total already (admitted by address first).
        if not self._enter(self._users, user, self.per_user, 0):
            log.info("webdav request of %r from %s refused: %d or more requests of this user in flight, "
                     "%d in all", user, environ.get("REMOTE_ADDR", ""), self.per_user, self._total)
            return False
        environ[_USER] = user
        return True

    def leave(self, environ: dict) -> None:
        """The request's response is done: give back what it counted (once)."""
        ip = environ.pop(_ADDRESS, None)
        if ip is not None:
            self._leave(self._addresses, ip)
            with self._lock:
                self._total -= 1
        user = environ.pop(_USER, None)
        if user is not None:
            self._leave(self._users, user)

    def held(self, *, address: str | None = None, user: str | None = None) -> int:
        """Requests in flight for an address or a user (for tests and metrics)."""
        with self._lock:
            if address is not None:
                return self._addresses.get(address, 0)
            return self._users.get(user or "", 0)


def busy(start_response, what: str) -> list[bytes]:
    """The 503 answer for a request over its share."""
    body = f"too many requests of this {what} in progress; try again shortly\n".encode()
    start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8"),
                                               ("Content-Length", str(len(body))),
                                               ("Retry-After", str(RETRY_AFTER))])
    return [body]


class UserShare(BaseMiddleware):
    """wsgidav middleware after HTTPAuthenticator: a user over their share of the threads gets 503."""

    def __init__(self, wsgidav_app, next_app, config: dict) -> None:
        super().__init__(wsgidav_app, next_app, config)
        self.inflight: InFlight = config["gateway"]["inflight"]

    def __call__(self, environ: dict, start_response):
        user = environ.get("wsgidav.auth.user_name")
        if user and not self.inflight.enter_user(environ, user):
            return busy(start_response, "user")
        return self.next_app(environ, start_response)
