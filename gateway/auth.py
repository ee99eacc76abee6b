"""Authentication shared by both protocols: password and key checks, and the defender.

The defender counts failed logins per client IP and per user name across
WebDAV and SFTP and bans for a while past a limit. Verified passwords are
cached briefly because argon2 is deliberately slow and WebDAV clients send
credentials with every request.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

from . import metrics
from .audit import record_login
from .config import DefenderSection
from .users import User, UserStore, hash_password, verify_password

_CACHE_SECONDS = 60.0


class Defender:
    """Failed-login counting and temporary bans, keyed by IP and by user name."""

    def __init__(self, config: DefenderSection) -> None:
        self.config = config
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._banned_until: dict[str, float] = {}
        self._connections: dict[str, int] = defaultdict(int)
        self._total_connections = 0
        self._lock = threading.Lock()

    def is_banned(self, ip: str, user: str | None = None) -> bool:
        if not self.config.enabled or ip in self.config.exempt:
            return False
        now = time.monotonic()
        with self._lock:
            for key in (f"ip:{ip}", f"user:{user}" if user else None):
                if key and self._banned_until.get(key, 0) > now:
                    return True
        return False

    def record_failure(self, ip: str, user: str | None) -> None:
        if not self.config.enabled or ip in self.config.exempt:
            return
        now = time.monotonic()
        with self._lock:
            for key in (f"ip:{ip}", f"user:{user}" if user else None):
                if not key:
                    continue
                times = self._failures[key]
                times.append(now)
                while times and times[0] < now - self.config.window:
                    times.popleft()
                if len(times) >= self.config.max_failures:
                    self._banned_until[key] = now + self.config.ban_time
                    metrics.BANS.inc()
                    times.clear()

    def open_connection(self, ip: str) -> bool:
        """Count a new connection; False when a limit or a ban refuses it."""
        if self.is_banned(ip):
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


class Authenticator:
    """Checks credentials against the users file, through the defender."""

    def __init__(self, users: UserStore, defender: Defender) -> None:
        self.users = users
        self.defender = defender
        self._cache: dict[str, float] = {}
        self._cache_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        # Unknown users are checked against this hash so that both answers take
        # the same time and a timing probe cannot list user names.
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))

    def _digest(self, user: User, password: str) -> str:
        material = f"{user.name}\0{user.password_hash}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._cache_key, material, hashlib.sha256).hexdigest()

    def check_password(self, name: str, password: str, ip: str, *, protocol: str = "",
                       method: str = "password", count_cached: bool = True) -> User | None:
        """Return the user when `password` is right, else None (and count a failure).

        Each answer is audited as a login of `protocol` by `method`; one from
        the cache only with `count_cached` (WebDAV sends the credential with
        every request: there only a verification is a login).
        """
        def login(ok: bool) -> None:
            record_login(user=name, protocol=protocol, ip=ip, method=method, ok=ok)

        if self.defender.is_banned(ip, name):
            login(False)
            return None
        user = self.users.get(name)
        if user is None or user.disabled or not user.password_hash:
            verify_password(self._dummy_hash, password)
            self.defender.record_failure(ip, name)
            login(False)
            return None
        digest = self._digest(user, password)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest, 0) > now
        if cached:
            if count_cached:
                login(True)
            return user
        if not verify_password(user.password_hash, password):
            self.defender.record_failure(ip, name)
            login(False)
            return None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v > now}
            self._cache[digest] = now + _CACHE_SECONDS
        login(True)
        return user

    def check_key(self, name: str, key_line: str, ip: str) -> User | None:
        """Return the user when `key_line` ("type base64") is one of their keys, else None.

        A key offered that is not listed is not a failed login: SSH clients
        offer every key they hold, one after the other.
        """
        if self.defender.is_banned(ip, name):
            return None
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
