"""The open-file budget: SFTP handles per user and in total, shared by every session of the process.

Each open file or folder handle may hold a descriptor (a temp file, a
listing); without a budget one session could take the process's last
descriptors and other users' logins and transfers would fail.
"""
from __future__ import annotations

import logging
import resource
import threading
from collections import defaultdict

log = logging.getLogger(__name__)

# Descriptors kept out of the handle budget when it is derived from the limit:
# listeners, the state store, logs, S3 connection pools, and slack.
RESERVED_FILES = 128


class HandleBudget:
    """Counts open handles per user and in total; `acquire` refuses past either limit."""

    def __init__(self, total: int, per_user: int) -> None:
        self.total = total
        self.per_user = per_user
        self._open: dict[str, int] = defaultdict(int)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Handles open now, of all users."""
        return self._count

    def acquire(self, user: str) -> bool:
        with self._lock:
            if self._count >= self.total or self._open[user] >= self.per_user:
                if not self._open[user]:
                    del self._open[user]
                return False
            self._open[user] += 1
            self._count += 1
            return True

    def release(self, user: str, count: int = 1) -> None:
        if count <= 0:
            return
        with self._lock:
            self._open[user] -= count
            if self._open[user] <= 0:
                del self._open[user]
            self._count = max(0, self._count - count)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.info("open file limit raised from %d to %d", soft, hard)
        return hard
    return soft


def derive_total(limit: int, sockets: int) -> int:
    """The handle budget left by an open-file `limit` once `sockets` connections and a reserve are paid."""
    return max(limit - sockets - RESERVED_FILES, 16)
