"""Plain records the store returns: no SQL, no protocol, just values."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenInfo:
    """An admin API token as listed: its name and creation time, never its hash."""

    name: str
    created: float


@dataclass(frozen=True)
class Lock:
    """A write lock on a storage location ("backend:/path"), with or without its subtree."""

    token: str
    root: str
    owner: bytes          # opaque to the store (WebDAV: the client's owner XML)
    scope: str            # "exclusive" or "shared"
    depth: str            # "0" or "infinity"
    principal: str        # the user who holds it
    timeout: float        # seconds, as granted
    expire: float         # time.time() when it lapses


@dataclass(frozen=True)
class Ban:
    key: str              # usually a client address
    until: float


@dataclass(frozen=True)
class Usage:
    bytes: int
    files: int


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    protocol: str
    ip: str
    node: str
    started: float
    touched: float = 0.0
    bytes: int = 0


@dataclass(frozen=True)
class Revocation:
    """Sessions to end: all of `user`'s started before `time`, or the one `session_id`."""

    id: int               # increasing: a reader keeps the last id it has seen
    user: str | None
    session_id: str | None
    time: float


@dataclass(frozen=True)
class InFlightUpload:
    """A multipart upload a node has open in a backend, so another node can abort it if that node dies."""

    id: str
    node: str
    backend: str
    path: str
    upload_id: str
    started: float
