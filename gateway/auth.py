"""Authentication shared by both protocols: password and key checks, and the defender.

The defender counts failed logins per client address across WebDAV and SFTP
and bans the address for a while past a limit. Per user it only slows
repeated failures down: a user is never locked out, a key login is never
refused, and an address with no recent failures is never slowed down because
other addresses failed for that user.

Failures and bans live in the state store, so they are shared by every
worker and node: failures spread over two nodes ban the address on both. The
ban check runs on every WebDAV request and SSH accept, so it reads a cache of
the bans in force, reloaded whenever the store's change feed reports a change
(every ban bumps it). Connection counts stay per process.

argon2 is deliberately slow and costs 64 MiB per verification, so verified
passwords are cached (the expiry slides while they are used), one credential
is verified once however many requests bring it at the same time, and only
`max_concurrent_verifications` run at once (per process).

Cached users and credentials are trusted only while the change feed keeps
them current: past `stale_after` seconds without it, a login reads the users
from the store first, and is refused when the store cannot be read.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from . import metrics
from .audit import record_login
from .config import DefenderSection
from .store import Store, StoreUnavailable, UserCache
from .users import User, hash_password, verify_password

log = logging.getLogger(__name__)

# A verified credential stays cached this long after its last use; a password
# change, a disabled or removed user drops it at once (Authenticator.forget).
_CACHE_SECONDS = 60.0
# A password check waits at most this long for a verification slot, then is
# refused unverified: a flood must not queue without end.
_VERIFY_WAIT_SECONDS = 30.0
# Past this many cached credentials, expired ones are swept.
_MAX_TRACKED = 10_000
# After a failed read of the users, logins are refused this long without trying again:
# a store that hangs must not hold every login thread for its connect timeout.
_RETRY_USERS_SECONDS = 1.0


def _user_key(user: str) -> str:
    # Failure keys: the bare address (the key a ban and an unban use), or "user:NAME".
    return f"user:{user}"


class Defender:
    """Failed-login counting and bans of addresses (in the store), per-user slow-down and
    connection limits (per process)."""

    def __init__(self, config: DefenderSection, store: Store) -> None:
        self.config = config
        self.store = store
        self._pending: dict[str, int] = defaultdict(int)   # ip -> verifications in flight here
        self._bans: dict[str, float] = {}                  # ip -> until (time.time()), from the store
        self._connections: dict[str, int] = defaultdict(int)
        self._total_connections = 0
        self._lock = threading.Lock()
        # Held from reading an address's count to updating its verifications in
        # flight, and from recording a failure to settling its flight: without
        # it a check could read the count before a failure lands and the
        # flight count after it is settled, and let one guess past the limit.
        self._attempts = threading.RLock()

    def load_bans(self) -> None:
        """Re-read the bans in force from the store (the change feed calls this).

        Raises:
            StoreUnavailable: the store cannot be reached (the cached bans stay).
        """
        bans = {ban.key: ban.until for ban in self.store.list_bans()}
        with self._lock:
            self._bans = bans

    def _exempt(self, ip: str) -> bool:
        return not self.config.enabled or ip in self.config.exempt

    def is_banned(self, ip: str) -> bool:
        """The address is banned. Only addresses are banned, never user names. No store query."""
        if self._exempt(ip):
            return False
        with self._lock:
            until = self._bans.get(ip)
            return until is not None and until > time.time()

    def _recent(self, key: str) -> int:
        """Failures under `key` within the window, on every node."""
        return self.store.count_failures(key, self.config.window)

    def begin_attempt(self, ip: str) -> bool:
        """Count a password verification from `ip` as a failure before it runs.

        False: refuse it without verifying, because the address is banned or
        its recent failures plus the verifications it has in flight here reach
        the ban limit (if those fail, the address is banned anyway), or the
        store cannot be reached to count them. `end_attempt` refunds the count
        on success.
        """
        if self._exempt(ip):
            return True
        if self.is_banned(ip):
            return False
        with self._attempts:
            try:
                # A ban another node just set may not have reached the cache yet
                # (it clears the failures it counted): ask the store too.
                until = self.store.banned_until(ip)
                if until is not None:
                    with self._lock:
                        self._bans[ip] = until
                    return False
                recent = self._recent(ip)
            except StoreUnavailable as exc:
                # Security decision: without the shared count, guesses would go
                # unbounded; refuse password checks until the store is back.
                log.warning("%s; password check from %s refused", exc, ip)
                return False
            with self._lock:
                if recent + self._pending[ip] >= self.config.max_failures:
                    return False
                self._pending[ip] += 1
                return True

    def end_attempt(self, ip: str, user: str | None, ok: bool) -> None:
        """Settle a verification `begin_attempt` let through: the failure lands before the flight ends."""
        if self._exempt(ip):
            return
        with self._attempts:
            if not ok:
                self.record_failure(ip, user)
            with self._lock:
                self._pending[ip] -= 1
                if self._pending[ip] <= 0:
                    del self._pending[ip]

    def record_failure(self, ip: str, user: str | None) -> None:
        """Count a failed login in the store; ban the address once it reaches the limit."""
        if self._exempt(ip):
            return
        with self._attempts:
            self._record_failure(ip, user)

    def _record_failure(self, ip: str, user: str | None) -> None:
        try:
            count = self.store.record_failure(ip, self.config.window)
            if count >= self.config.max_failures:
                until = time.time() + self.config.ban_time
                self.store.ban(ip, until)
                self.store.clear_failures(ip)
                with self._lock:
                    self._bans[ip] = until
                metrics.BANS.inc()
                log.warning("address %s banned for %d s after %d failed logins", ip,
                            self.config.ban_time, count)
            if user:
                self.store.record_failure(_user_key(user), self.config.window)
        except StoreUnavailable as exc:
            log.warning("%s; failed login from %s not counted", exc, ip)

    def purge(self) -> None:
        """Drop failures older than the window, of every key (run now and then)."""
        self.store.purge_failures(self.config.window)

    def delay_for(self, ip: str, user: str) -> float:
        """Seconds a password attempt for `user` from `ip` waits before it is verified.

        Zero from an address with no recent failures, whatever other addresses
        did: repeated failures slow the guesser down, never the user's own
        clean address. Otherwise `failure_delay`, doubling with each recent
        failure for the user, up to `failure_delay_max`.
        """
        if self._exempt(ip) or not self.config.failure_delay:
            return 0.0
        try:
            if not self._recent(ip):
                return 0.0
            failures = self._recent(_user_key(user))
        except StoreUnavailable:
            return 0.0     # begin_attempt refuses the check anyway
        if not failures:
            return 0.0
        return min(self.config.failure_delay_max,
                   self.config.failure_delay * 2 ** min(failures - 1, 32))

    def open_connection(self, ip: str, *, check_ban: bool = True) -> bool:
        """Count a new connection; False when a limit or (with `check_ban`) a ban refuses it.

        WebDAV counts its connections without the ban check, so that a banned
        client still gets a readable 403 on its request. The limits are per
        process (each worker and node counts its own).
        """
        if check_ban and self.is_banned(ip):
            return False
        with self._lock:
            if self.config.max_connections and self._total_connections >= self.config.max_connections:
                return False
            if self.config.max_connections_per_ip and \
                    self._connections[ip] >= self.config.max_connections_per_ip:
                return False
            self._connections[ip] += 1
            self._total_connections += 1
            return True

    def close_connection(self, ip: str) -> None:
        with self._lock:
            self._connections[ip] = max(0, self._connections[ip] - 1)
            if not self._connections[ip]:
                del self._connections[ip]
            self._total_connections = max(0, self._total_connections - 1)


class _Flight:
    """One verification that other checks of the same credential wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok: bool | None = None   # None: refused unverified; the waiters try themselves


class Authenticator:
    """Checks credentials against the users, through the defender."""

    # The cache's clock; tests move it instead of waiting.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, users: UserCache, defender: Defender, *, stale_after: float = 5.0) -> None:
        self.users = users
        self.defender = defender
        self.stale_after = stale_after
        self._users_failed_at: float | None = None
        self._cache: dict[str, tuple[str, float]] = {}    # digest -> (user name, expires)
        self._flights: dict[str, _Flight] = {}
        self._cache_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        # Each argon2id verification holds 64 MiB: bound how many run at once.
        self._verifying = threading.BoundedSemaphore(max(1, defender.config.max_concurrent_verifications))
        # Unknown users are checked against this hash so that both answers take
        # the same time and a timing probe cannot list user names.
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))

    def _digest(self, name: str, password_hash: str, password: str) -> str:
        material = f"{name}\0{password_hash}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._cache_key, material, hashlib.sha256).hexdigest()

    def _cached(self, digest: str) -> bool:
        """A verified credential in the cache; using it keeps it there (sliding expiry)."""
        now = self.clock()
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None or entry[1] <= now:
                return False
            self._cache[digest] = (entry[0], now + _CACHE_SECONDS)
            return True

    def _remember(self, digest: str, name: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._cache) > _MAX_TRACKED:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            self._cache[digest] = (name, now + _CACHE_SECONDS)

    def _confirm_users(self) -> None:
        """Return if the cached users may be trusted: the change feed read the store lately, or a read now works.

        Raises:
            StoreUnavailable: they cannot be confirmed; the login must be refused.
        """
        if self.users.current_within(self.stale_after):
            return
        failed_at = self._users_failed_at
        if failed_at is not None and time.monotonic() - failed_at < _RETRY_USERS_SECONDS:
            raise StoreUnavailable(self._unconfirmed)
        try:
            self.users.refresh()
        except StoreUnavailable as exc:
            # Security decision: a user disabled on another node would still log in here.
            self._users_failed_at = time.monotonic()
            log.warning("%s; logins refused until the users can be read again", exc)
            raise StoreUnavailable(self._unconfirmed) from None
        self._users_failed_at = None

    _unconfirmed = "the store cannot be reached to confirm the user; try again shortly"

    def forget(self, name: str) -> None:
        """Drop every cached credential of `name` (disabled, removed, password or keys changed)."""
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if v[0] != name}

    def check_password(self, name: str, password: str, ip: str, *, protocol: str = "",
                       method: str = "password", count_cached: bool = True) -> User | None:
        """Return the user when `password` is right, else None (and count a failure).

        Each answer is audited as a login of `protocol` by `method`; one from
        the cache only with `count_cached` (WebDAV sends the credential with
        every request: there only a verification is a login).

        Raises:
            StoreUnavailable: the store cannot confirm the cached users (see
                `stale_after`): no login opens, the client should try again later.
        """
        def login(ok: bool) -> None:
            record_login(user=name, protocol=protocol, ip=ip, method=method, ok=ok)

        if self.defender.is_banned(ip):
            login(False)
            return None
        try:
            self._confirm_users()
        except StoreUnavailable:
            login(False)
            raise
        user = self.users.get(name)
        password_hash = user.password_hash if user is not None and not user.disabled else None
        digest = self._digest(name, password_hash or "", password)
        if password_hash and self._cached(digest):
            if count_cached:
                login(True)
            return user
        delay = self.defender.delay_for(ip, name)
        if delay:
            time.sleep(delay)
        ok = self._verify_once(digest, name, password_hash, password, ip)
        login(ok)
        return user if ok else None

    def _verify_once(self, digest: str, name: str, password_hash: str | None, password: str,
                     ip: str) -> bool:
        """Verify, or wait for a verification of the same credential already running."""
        while True:
            with self._lock:
                flight = self._flights.get(digest)
                leader = flight is None
                if leader:
                    flight = self._flights[digest] = _Flight()
            if leader:
                break
            flight.done.wait()
            if flight.ok is None:
                continue   # the other check was refused unverified: this one may still run
            if not flight.ok:
                self.defender.record_failure(ip, name)
            return flight.ok
        try:
            flight.ok = self._verify(name, password_hash, password, ip)
            if flight.ok:
                self._remember(digest, name)
        finally:
            with self._lock:
                del self._flights[digest]
            flight.done.set()
        return bool(flight.ok)

    def _verify(self, name: str, password_hash: str | None, password: str, ip: str) -> bool | None:
        """One argon2 verification within the limits; None when refused without verifying."""
        if not self._verifying.acquire(timeout=_VERIFY_WAIT_SECONDS):
            return None
        try:
            if not self.defender.begin_attempt(ip):
                return None
            ok = False
            try:
                ok = verify_password(password_hash or self._dummy_hash, password) and bool(password_hash)
            finally:
                self.defender.end_attempt(ip, name, ok)
            return ok
        finally:
            self._verifying.release()

    def check_key(self, name: str, key_line: str, ip: str) -> User | None:
        """Return the user when `key_line` ("type base64") is one of their keys, else None.

        A key offered that is not listed is not a failed login: SSH clients
        offer every key they hold, one after the other. Failed passwords for
        the user never stop a key login; only a banned address does.

        Raises:
            StoreUnavailable: the store cannot confirm the cached users (see `stale_after`).
        """
        if self.defender.is_banned(ip):
            return None
        self._confirm_users()
        user = self.users.get(name)
        if user is None or user.disabled:
            return None
        wanted = " ".join(key_line.split()[:2])
        for key in user.keys:
            if hmac.compare_digest(" ".join(key.split()[:2]), wanted):
                return user
        return None

    def record_failure(self, name: str | None, ip: str) -> None:
        self.defender.record_failure(ip, name)
