"""The store's errors: each message is one line and never contains a password."""
from __future__ import annotations

from ..errors import BackendUnavailable


class StoreError(Exception):
    """The store cannot do what was asked; the message says why in one line."""


class StoreUnavailable(StoreError, BackendUnavailable):
    """The database cannot be reached or failed (connection, disk, lock timeout).

    Also a BackendUnavailable: to a client, a store that is down is storage
    that is down (WebDAV 503, SFTP FAILURE with the message), through the
    faces' one error table each.
    """

    def __init__(self, message: str) -> None:
        BackendUnavailable.__init__(self, "", message)


class Conflict(StoreError):
    """The record exists already, or a lock conflicts with one that is held."""


class Missing(StoreError):
    """No such record (user, token, lock)."""


class LockConflict(Conflict):
    """A lock cannot be taken: `roots` are the locations of the locks in the way."""

    def __init__(self, root: str, roots: list[str]) -> None:
        super().__init__(f"'{root}' is locked: conflicts with the lock(s) on {', '.join(roots)}")
        self.roots = roots
