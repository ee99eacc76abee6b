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


class TooManyLocks(StoreError):
    """A lock would pass a limit: `per` is "location" (locks on one resource) or "principal" (one user's)."""

    def __init__(self, root: str, per: str, limit: int) -> None:
        what = f"'{root}' holds" if per == "location" else "the user holds"
        super().__init__(f"{what} {limit} lock(s) already, the most allowed")
        self.per = per
        self.limit = limit


class OverBudget(StoreError):
    """A property write would take its owner past their budget of `budget` bytes (`used` in use before it)."""

    def __init__(self, owner: str, used: int, budget: int) -> None:
        super().__init__(f"the dead properties of '{owner}' would pass {budget} bytes ({used} in use)")
        self.used = used
        self.budget = budget
