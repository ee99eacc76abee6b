"""UserFS: one user's view of storage, and the only API front-ends use.

Every operation normalizes its path, resolves the home or mount it falls in,
checks the permission it needs exactly once, and delegates to the backend.
Derived operations (copy tree, remove tree, moves across backends) live here.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from . import audit, metrics, paths
from .errors import (AlreadyExists, BackendUnavailable, GatewayError, InvalidPath, IsADirectory,
                     NotADirectory, NotFound, PermissionDenied, QuotaExceeded)
from .permissions import Perm, Policy
from .sessions import Session
from .storage.base import Backend, Entry, Upload, Usage
from .store import Missing, Store, StoreError
from .store import Usage as StoredUsage
from .uploads import InFlightUploads
from .users import Location, User

log = logging.getLogger(__name__)

# When the client's operation running in this thread started: audit lines
# give their duration from it. Operations UserFS runs inside another (truncate
# opens an upload) leave it as the outer one set it.
_op_started: contextvars.ContextVar[float | None] = contextvars.ContextVar("gateway_op_started",
                                                                            default=None)

# UserFS methods whose failures are audited and counted like their successes,
# and the op name they have in the audit log. Reads and listings are not
# audited when they succeed or find nothing (clients probe for files all the
# time), only when storage failed them (FAILED_READ_OPS): in an outage those are
# most of what clients see fail, and the failing-operations alert must see them.
FAILED_READ_OPS = {"stat": "stat", "exists": "stat", "list_dir": "list", "usage": "usage"}
AUDITED_OPS = {"open_read": "download", "open_write": "upload", "create_file": "upload",
               "undo_create_file": "delete",
               "make_dir": "mkdir",
               "remove_file": "delete", "remove_dir": "rmdir", "remove_tree": "delete",
               "rename": "rename", "copy_file": "copy", "copy_tree": "copy",
               "set_mtime": "set_times", "truncate": "truncate"}


def _virtual_errors(method: Callable) -> Callable:
    """Re-raise backend errors with the user's virtual path instead of the storage path."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        fs = self if isinstance(self, UserFS) else self._fs
        try:
            return method(self, *args, **kwargs)
        except GatewayError as exc:
            hints = [a for a in args if isinstance(a, str)] or [getattr(self, "path", "/")]
            raise fs._public_error(exc, hints) from None
    return wrapper


def _shown(path: str | bytes) -> str:
    """A path as the audit log shows it: normalized if it can be, else as the client sent it."""
    try:
        return paths.normalize(path)
    except GatewayError:
        return path.decode("utf-8", "backslashreplace") if isinstance(path, bytes) else path


def _audited(method: Callable, op: str, failures: type[GatewayError] = GatewayError) -> Callable:
    """Time the operation for its audit line, and audit it when it fails with one of `failures`."""
    @functools.wraps(method)
    def wrapper(self: "UserFS", *args, **kwargs):
        if _op_started.get() is not None:
            return method(self, *args, **kwargs)
        token = _op_started.set(time.monotonic())
        try:
            return method(self, *args, **kwargs)
        except failures as exc:
            target = args[1] if len(args) > 1 and op in ("rename", "copy") else kwargs.get("dst", "")
            self._audit(op, _shown(args[0] if args else kwargs.get("path", kwargs.get("src", ""))),
                        audit.result_of(exc), target=_shown(target) if target else "")
            raise
        finally:
            _op_started.reset(token)
    return wrapper


class QuotaTracker:
    """Bytes, and files and folders, used in one user's home, shared by all of that user's sessions.

    Folders count toward limit_files like files (the backends' usage() counts
    both; on S3 a folder counts once whether a marker key or only the keys
    below it make it).

    With a store, the store's numbers are the truth, shared by every worker
    and node: the first count of the home (a scan) is stored once, and every
    change is added to it atomically. A check reads the store; within one
    upload, a check may use a number read up to CACHE_SECONDS before, so
    uploads running at once on other processes can overshoot the limit by
    what they write in that time, never by more than what is in flight.

    Without a store (or for a user the store does not know), the numbers
    live in this object: the first use scans the home once, and the
    gateway's own operations keep them current.
    """

    CACHE_SECONDS = 1.0

    def __init__(self, limit_bytes: int, limit_files: int, scan: Callable[[], Usage], *,
                 store: "Store | None" = None, user: str = "") -> None:
        self.limit_bytes = limit_bytes
        self.limit_files = limit_files
        self._scan = scan
        self._store = store
        self._user = user
        self._lock = threading.Lock()
        self._used: list[int] | None = None          # in-process numbers (no store)
        self._cached: tuple[int, int] | None = None   # the store's numbers, as last read
        self._cached_at = -math.inf
        self._uncounted_at = -math.inf               # when the store last had no numbers
        # Changes done in storage that the store could not take (it was down):
        # added with the next change or read, so usage ends right.
        self._unsaved = (0, 0)

    def _stored(self, fresh: bool) -> tuple[int, int] | None:
        """The store's numbers (scanning and storing them first if none are stored).

        None when this tracker counts in process: no store, or a user it does not know.
        """
        if self._store is None or self._used is not None:
            return None
        if not fresh and self._cached is not None and time.monotonic() - self._cached_at < self.CACHE_SECONDS:
            return self._cached
        try:
            stored = self._save_unsaved() or self._store.get_usage(self._user)
            if stored is None:
                scanned = self._scan()
                stored = self._store.init_usage(self._user, StoredUsage(scanned.used_bytes, scanned.used_files))
        except Missing:
            scanned = self._scan()
            self._used = [scanned.used_bytes, scanned.used_files]
            return None
        except StoreError as exc:
            raise BackendUnavailable("/", f"quota usage of '{self._user}' cannot be read: {exc}") from None
        self._remember(stored)
        return self._cached

    def _remember(self, stored: "StoredUsage") -> None:
        self._cached = (stored.bytes, stored.files)
        self._cached_at = time.monotonic()

    def _ensure(self, fresh: bool = True) -> tuple[int, int]:
        stored = self._stored(fresh)
        if stored is not None:
            return stored
        if self._used is None:
            usage = self._scan()
            self._used = [usage.used_bytes, usage.used_files]
        return self._used[0], self._used[1]

    @property
    def counting(self) -> bool:
        """True once the numbers are known (scanned): before that, nothing needs counting.

        Asked at every upload's end. For a user without limits the numbers
        only serve display (df, quota properties), and a "not counted yet"
        is trusted for CACHE_SECONDS: another process that counts the home
        meanwhile misses this process's changes of that second, as its scan
        may miss the changes made while it runs. A user with limits is
        counted before any write (check() counts), so this never reads for them.
        """
        if self._used is not None or self._cached is not None:
            return True
        if self._store is None:
            return False
        if not (self.limit_bytes or self.limit_files) and \
                time.monotonic() - self._uncounted_at < self.CACHE_SECONDS:
            return False
        try:
            stored = self._store.get_usage(self._user)
        except StoreError:
            return False
        if stored is None:
            self._uncounted_at = time.monotonic()
            return False
        with self._lock:
            self._remember(stored)
        return True

    def used(self) -> tuple[int, int]:
        with self._lock:
            return self._ensure()

    def check(self, path: str, add_bytes: int = 0, add_files: int = 0, *, fresh: bool = True) -> None:
        """Raise QuotaExceeded if adding this much would pass a limit.

        `fresh=False` allows the store's numbers as read up to CACHE_SECONDS ago.
        """
        if not (self.limit_bytes or self.limit_files):
            return
        with self._lock:
            used = self._ensure(fresh)
            if not fresh and self._over(used, add_bytes, add_files):
                used = self._ensure(True)   # refuse only on current numbers
            if self.limit_bytes and add_bytes > 0 and used[0] + add_bytes > self.limit_bytes:
                raise QuotaExceeded(path, f"quota of {self.limit_bytes} bytes exceeded writing '{path}'")
            if self.limit_files and add_files > 0 and used[1] + add_files > self.limit_files:
                raise QuotaExceeded(path, f"quota of {self.limit_files} files and folders exceeded creating '{path}'")

    def _over(self, used: tuple[int, int], add_bytes: int, add_files: int) -> bool:
        return bool((self.limit_bytes and add_bytes > 0 and used[0] + add_bytes > self.limit_bytes)
                    or (self.limit_files and add_files > 0 and used[1] + add_files > self.limit_files))

    def apply(self, delta_bytes: int, delta_files: int) -> None:
        if not self.counting:
            return
        with self._lock:
            if self._used is not None:
                self._used[0] = max(0, self._used[0] + delta_bytes)
                self._used[1] = max(0, self._used[1] + delta_files)
                return
            self._unsaved = (self._unsaved[0] + delta_bytes, self._unsaved[1] + delta_files)
            stored = self._save_unsaved()
            if stored is not None:
                self._remember(stored)

    def _save_unsaved(self) -> "StoredUsage | None":
        """Add the changes the store has not taken yet; the new numbers, or None (none, or the store failed).

        Called with the lock held. A change that fails stays for the next
        try: the store being down must not leave the usage wrong once it is back.
        """
        delta_bytes, delta_files = self._unsaved
        if not (delta_bytes or delta_files):
            return None
        try:
            stored = self._store.add_usage(self._user, delta_bytes, delta_files)
            self._unsaved = (0, 0)
            if stored.bytes < 0 or stored.files < 0:
                # More was removed than was counted (the scan raced a change): back to zero.
                stored = self._store.add_usage(self._user, -min(0, stored.bytes), -min(0, stored.files))
        except Missing:
            self._unsaved = (0, 0)   # the user is gone, and their count with them
            return None
        except StoreError as exc:
            # The change is done in storage; the count takes it at the next change or read.
            log.warning("quota usage of %r not updated by (%d bytes, %d files) yet: %s",
                        self._user, delta_bytes, delta_files, exc)
            return None
        return stored


@dataclass(frozen=True)
class Limits:
    """Server-wide limits every protocol shares (the [server] section of the config)."""

    max_hole_bytes: int = 64 * 1024 * 1024  # zeros one write or truncate may leave past the end
    max_depth: int = 256                    # names in a path a user may create


@dataclass(frozen=True)
class _Target:
    """Where a virtual path lands: a backend, the path in it, and whether it is the home."""

    backend: Backend
    path: str
    in_home: bool
    root: str  # the virtual path of the home ("/") or mount this path falls in


class GuardedUpload(Upload):
    """Wraps a backend upload: enforces the quota while writing, counts and audits on commit.

    Any failed write poisons the upload: the client's bytes are not all there,
    and a pipelining client (paramiko, most SFTP clients) learns of a failed
    WRITE only at CLOSE. Every later write and the commit raise the first
    failure, and the commit aborts, so the previous version survives.
    """

    def __init__(self, fs: "UserFS", vpath: str, inner: Upload, old_size: int | None,
                 track: bool, offset: int, record: str | None = None, checked: bool = False) -> None:
        self.path = vpath
        self._fs = fs
        self._inner = inner
        self._old_size = old_size
        self._track = track
        self._pos = offset
        self._high = inner.size
        self._started = time.monotonic()
        self._written = 0
        self._settled = False
        self._record = record          # this upload in the store's uploads in flight
        self._checked = checked        # the quota was checked on current numbers once
        self._failure: GatewayError | None = None
        metrics.child(metrics.UPLOADS_IN_FLIGHT, fs.protocol).inc()

    @property
    def failure(self) -> GatewayError | None:
        """The first error a write raised, if any: such an upload can only be aborted."""
        return self._failure

    @contextlib.contextmanager
    def _poisoning(self) -> Iterator[None]:
        """Run a change to the content; if it fails, every later write and the commit fail too."""
        if self._failure is not None:
            raise self._failure
        try:
            yield
        except GatewayError as exc:
            self._failure = exc
            raise
        except BaseException:
            # Not one of ours (a bug, an interrupted thread): still, the content is unknown.
            self._failure = BackendUnavailable(self.path, f"writing '{self.path}' failed")
            raise

    def _settle(self, result: str) -> None:
        """Audit and count the upload once, however it ends."""
        if self._settled:
            return
        self._settled = True
        metrics.child(metrics.UPLOADS_IN_FLIGHT, self._fs.protocol).dec()
        self._fs._audit("upload", self.path, result, self._written,
                        duration=time.monotonic() - self._started, direction="in")

    def _check(self, start: int, end: int) -> None:
        """Refuse a write from `start` to `end` that leaves too big a gap or passes the quota.

        `_high` is the size of the pending content, so `start - _high` is the
        run of zeros the write would leave past the end of the file.
        """
        gap = start - self._high
        limit = self._fs.limits.max_hole_bytes
        if gap > limit:
            # Zeros are not free: a copy writes them, and S3 uploads them. A
            # quota-like refusal (FAILURE / 507) tells the client it asked for too
            # much space, and nothing of the write is applied.
            raise QuotaExceeded(self.path, f"writing at offset {start} would leave {gap} bytes of zeros "
                                           f"past the end of '{self.path}' (at most {limit} allowed)")
        if self._track and end > self._high:
            # Growth of this file over its previous version; other uploads in
            # flight are not reserved, so concurrent uploads can overshoot a little.
            self._fs._quota.check(self.path, end - (self._old_size or 0), fresh=not self._checked)
            self._checked = True
        self._high = max(self._high, end)
        if self._record is not None:
            self._fs._uploads.grown(self._record, self._high)

    @_virtual_errors
    def write(self, data: bytes) -> None:
        with self._poisoning():
            self._fs._check_live()
            self._check(self._pos, self._pos + len(data))
            self._inner.write(data)
        self._pos += len(data)
        self._written += len(data)

    @_virtual_errors
    def write_at(self, offset: int, data: bytes) -> None:
        with self._poisoning():
            self._fs._check_live()
            self._check(offset, offset + len(data))
            self._inner.write_at(offset, data)
        self._pos = offset + len(data)
        self._written += len(data)

    @_virtual_errors
    def read_at(self, offset: int, length: int) -> bytes:
        return self._inner.read_at(offset, length)

    @_virtual_errors
    def truncate(self, size: int) -> None:
        with self._poisoning():
            self._fs._check_live()
            self._check(size, size)
            self._inner.truncate(size)
        self._high = size

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def closed(self) -> bool:
        return self._inner.closed

    @_virtual_errors
    def commit(self) -> Entry:
        # The delta is taken from what the commit really replaces, not from what
        # was there at open: the file may have been deleted or replaced since
        # (an open without truncate, then a delete, must not shrink the count).
        if self._failure is not None:
            # Never commit what a failed write left behind: keep the previous version.
            self._settle(audit.result_of(self._failure))
            self.abort()
            raise self._failure
        track = self._track and self._fs._quota.counting
        replaced = self._fs._replaced_size(self.path, self._old_size) if track else None
        try:
            self._fs._check_live()
            entry = self._inner.commit()
        except GatewayError as exc:
            self._settle(audit.result_of(exc))
            raise
        finally:
            self._forget()
        if track:
            self._fs._quota.apply(entry.size - (replaced or 0), 0 if replaced is not None else 1)
        self._settle("ok")
        return entry

    def abort(self) -> None:
        if not self._inner.closed:
            self._inner.abort()
        self._settle("aborted")
        self._forget()

    def _forget(self) -> None:
        """Drop the store's record once the backend upload has ended (committed or aborted)."""
        if self._record is not None and self._inner.closed:
            record, self._record = self._record, None
            self._fs._uploads.forget(record)

    def __del__(self) -> None:
        # Dropped without commit or abort (a handler that crashed): the record
        # must not outlive the backend upload, which aborts itself when dropped.
        if getattr(self, "_record", None) is not None:
            with contextlib.suppress(Exception):
                self.abort()


# Bytes per sendfile step of a download: the session is checked between steps.
_SEND_STEP = 8 * 1024 * 1024


class _MeteredReader(io.BufferedIOBase):
    """A download stream: it stops at its next read once its session has been ended,
    and audits and counts the download when it is closed."""

    def __init__(self, fs: "UserFS", vpath: str, inner: BinaryIO) -> None:
        super().__init__()
        self._fs = fs
        self._path = vpath
        self._inner = inner
        self._started = time.monotonic()
        self._sent = 0
        self._result = "ok"
        self._handed_off = False

    @property
    def handed_out(self) -> int:
        """Bytes read or sent so far."""
        return self._sent

    @property
    def can_send(self) -> bool:
        """Whether `send_to` can send this stream zero-copy (a local file)."""
        return hasattr(self._inner, "send_to")

    def send_to(self, sock, count: int) -> int:
        """Send the next `count` bytes to the plain TCP socket `sock` with sendfile.

        Checked against the session and counted as reads are. Afterwards the
        stream reads as ended, so a reader that goes on (wsgidav's GET loop,
        for a range too) sends nothing twice. Returns the bytes sent: fewer
        when the file ended first.

        Raises:
            io.UnsupportedOperation: the backend's stream cannot (`can_send`); nothing sent.
            PermissionDenied: the session has been ended.
            OSError: from the socket (a timeout, a client gone).
        """
        send = getattr(self._inner, "send_to", None)
        if send is None:
            raise io.UnsupportedOperation("send_to")
        self._handed_off = True
        sent = 0
        try:
            while sent < count:
                self._fs._check_live()
                step = send(sock, min(_SEND_STEP, count - sent))
                if not step:
                    break
                sent += step
        except GatewayError as exc:
            self._failed(exc)
            raise
        finally:
            self._sent += sent
        return sent

    def _count(self, data: bytes) -> bytes:
        self._sent += len(data)
        return data

    def _failed(self, exc: BaseException) -> None:
        self._result = audit.result_of(exc)

    def read(self, size: int | None = -1) -> bytes:
        if self._handed_off:
            return b""
        try:
            self._fs._check_live()
            return self._count(self._inner.read(size))
        except GatewayError as exc:
            self._failed(exc)
            raise

    def read1(self, size: int = -1) -> bytes:
        if self._handed_off:
            return b""
        reader = getattr(self._inner, "read1", self._inner.read)
        try:
            self._fs._check_live()
            return self._count(reader(size))
        except GatewayError as exc:
            self._failed(exc)
            raise

    def readinto(self, buffer) -> int:
        if self._handed_off:
            return 0
        try:
            self._fs._check_live()
            n = self._inner.readinto(buffer)
        except GatewayError as exc:
            self._failed(exc)
            raise
        self._sent += n or 0
        return n

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
        finally:
            super().close()
            self._fs._audit("download", self._path, self._result, self._sent,
                            duration=time.monotonic() - self._started, direction="out")


class UserFS:
    """One session's file system: confine, authorize, delegate.

    Once its session has been ended (the user was disabled, removed, or their
    credentials changed), every operation, upload chunk and read raises
    PermissionDenied.
    """

    # The guard test holds every public method to exactly one of these lists,
    # so a new write method cannot slip in without a permission check.
    READ_METHODS = ("stat", "exists", "list_dir", "open_read", "usage", "normalize",
                    "check_access", "locate", "virtual_path")
    WRITE_METHODS = ("open_write", "create_file", "undo_create_file", "make_dir", "remove_file", "remove_dir", "remove_tree",
                     "rename", "copy_file", "copy_tree", "set_mtime", "truncate",
                     "check_change", "check_replace")

    def __init__(self, user: User, backends: Mapping[str, Backend], *,
                 quota: QuotaTracker | None = None, protocol: str = "", client: str = "",
                 open_uploads: "weakref.WeakSet[Upload] | None" = None,
                 limits: Limits = Limits(), session: Session | None = None,
                 uploads: InFlightUploads | None = None,
                 prepare: Callable[[], None] | None = None) -> None:
        self.user = user
        # Creates the home and mount targets on first use (Gateway.open_fs):
        # run by the first operation, so a storage failure is that
        # operation's error, mapped and audited like any other.
        self._prepare = prepare
        self._uploads = uploads
        self.limits = limits
        self.session = session
        self._open_uploads = open_uploads
        self.protocol = protocol
        self.client = client
        self._backends = backends
        self._policy: Policy = user.policy()
        # Longest mount path first: the first match decides.
        self._mounts = sorted(user.mounts, key=lambda m: len(m.path), reverse=True)
        # (storage path, virtual path) pairs, most specific first, to rewrite errors.
        self._places = sorted([(user.home.path, "/")] + [(m.target.path, m.path) for m in user.mounts],
                              key=lambda place: len(place[0]), reverse=True)
        home = self._backend(user.home)
        self._quota = quota or QuotaTracker(user.quota_bytes, user.quota_files,
                                            lambda: home.usage(user.home.path))

    # -- resolution -----------------------------------------------------------

    def _backend(self, location: Location) -> Backend:
        return self._backends[location.backend]

    def _check_live(self) -> None:
        if self.session is not None and self.session.ended.is_set():
            raise PermissionDenied("/", f"the session of '{self.user.name}' was ended: "
                                        "access revoked or credentials changed")

    def _public_error(self, exc: GatewayError, hints: list[str] = ()) -> GatewayError:
        """The same error naming the user's path: the storage layout is not the client's business.

        `hints` are the paths the call named; where two mounts show the same
        storage, the one the call went through is the name to use.
        """
        if not exc.path:
            return exc
        places = [p for p in self._places if paths.is_within(exc.path, p[0])]
        preferred = [p for p in places
                     if any(h.startswith("/") and paths.is_within(h, p[1]) for h in hints)]
        for real, virtual in preferred + places:
            if paths.is_within(exc.path, real):
                vpath = paths.rebase(exc.path, real, virtual)
                if vpath == exc.path:
                    return exc
                return type(exc)(vpath, exc.message.replace(f"'{exc.path}'", f"'{vpath}'"))
        return exc

    @staticmethod
    def normalize(path: str | bytes) -> str:
        """The one normalizer (gateway.paths.normalize), exposed for front-ends."""
        return paths.normalize(path)

    def _place(self, vpath: str) -> tuple[Location, str, bool]:
        """The location a virtual path falls in, the virtual root of it, and whether it is the home."""
        for mount in self._mounts:
            if paths.is_within(vpath, mount.path):
                return mount.target, mount.path, False
        return self.user.home, "/", True

    def _prepared(self) -> None:
        """Run the pending preparation of the home and mounts; it stays pending if it fails."""
        prepare = self._prepare
        if prepare is not None:
            prepare()
            self._prepare = None

    def _resolve(self, vpath: str) -> _Target:
        # Every operation resolves its paths: the one place a revoked session stops.
        self._check_live()
        self._prepared()
        location, root, in_home = self._place(vpath)
        return _Target(self._backend(location), paths.rebase(vpath, root, location.path), in_home, root)

    def _replaced_size(self, vpath: str, fallback: int | None) -> int | None:
        """Size of the file an upload's commit will replace now (None: it creates one)."""
        target = self._resolve(vpath)
        try:
            entry = target.backend.stat(target.path)
        except NotFound:
            return None
        except GatewayError:
            return fallback
        return None if entry.is_dir else entry.size

    def locate(self, path: str | bytes) -> tuple[str, str]:
        """The storage location a virtual path names: (backend name, path in that backend).

        Front-ends key state that everyone who sees the same file must share
        with it (WebDAV locks and dead properties). It is never shown to a
        client, so no permission is needed.
        """
        vpath = paths.normalize(path)
        location, root, _ = self._place(vpath)
        return location.backend, paths.rebase(vpath, root, location.path)

    def virtual_path(self, backend: str, path: str) -> str | None:
        """This user's path for a storage location, or None where the user cannot see it.

        The inverse of `locate`. A location above the home's or a mount's
        target (a lock on a parent folder that only another user sees) maps to
        the nearest place this user sees it from: "/" or the mount point.
        """
        places = sorted([(self.user.home, "/")] + [(m.target, m.path) for m in self._mounts],
                        key=lambda place: len(place[0].path), reverse=True)
        for location, root in places:
            if location.backend == backend and paths.is_within(path, location.path):
                vpath = paths.rebase(path, location.path, root)
                # Home storage below a mount point is hidden behind the mount.
                if self.locate(vpath) == (backend, path):
                    return vpath
        for location, root in reversed(places):   # the highest target is the nearest view
            if location.backend == backend and paths.is_within(location.path, path):
                return root
        return None

    def _is_mount_point(self, vpath: str) -> bool:
        return any(m.path == vpath for m in self._mounts)

    def _is_mount_ancestor(self, vpath: str) -> bool:
        return any(paths.is_within(m.path, vpath) and m.path != vpath for m in self._mounts)

    def _refuse_too_deep(self, vpath: str) -> None:
        """Refuse to create anything whose path has more names than `max_depth`.

        Only creation is capped: a deeper tree that already exists (restored
        on disk, or made before the limit) stays readable and deletable.
        """
        depth = vpath.count("/") if vpath != "/" else 0
        if depth > self.limits.max_depth:
            raise InvalidPath(vpath, f"cannot create '{paths.split(vpath)[1]}': it would be {depth} levels "
                                     f"deep, and at most {self.limits.max_depth} are allowed")

    def _refuse_structural(self, vpath: str, op: str) -> None:
        """Mount points and the folders that hold them are not the user's to change."""
        if vpath == "/" or self._is_mount_point(vpath) or self._is_mount_ancestor(vpath):
            raise PermissionDenied(vpath, f"cannot {op} '{vpath}': it is the home or holds a mount")

    def _audit(self, op: str, path: str, result: str, size: int | None = None, target: str = "", *,
               duration: float | None = None, direction: str = "") -> None:
        """The one audit point: every file operation's line and metrics come through here."""
        if duration is None:
            started = _op_started.get()
            duration = None if started is None else time.monotonic() - started
        # The session registry (gateway.sessions) gives a UserFS its session where there is one.
        session = getattr(getattr(self, "session", None), "id", "")
        audit.record_operation(user=self.user.name, protocol=self.protocol, ip=self.client,
                               session=session, op=op, path=path, result=result, size=size,
                               duration=duration, target=target, direction=direction)

    def _stat_target(self, vpath: str) -> Entry:
        target = self._resolve(vpath)
        try:
            entry = target.backend.stat(target.path)
        except NotFound:
            if self._is_mount_ancestor(vpath):
                return Entry(paths.split(vpath)[1], True, 0, 0.0)
            raise
        name = paths.split(vpath)[1]
        return entry if entry.name == name else Entry(name, entry.is_dir, entry.size, entry.mtime, entry.etag)

    def _exists(self, vpath: str) -> Entry | None:
        try:
            return self._stat_target(vpath)
        except NotFound:
            return None

    # -- reading --------------------------------------------------------------

    def stat(self, path: str | bytes) -> Entry:
        """Describe one path; needs `list` on its parent folder, or any permission on the path.

        The second case lets a drop box (upload only) or a no-list folder with
        `download` work with clients that look before they act.

        Raises:
            NotFound, PermissionDenied, InvalidPath
        """
        vpath = paths.normalize(path)
        if vpath != "/" and not self._policy.perms_for(vpath) \
                and not self._policy.allows(Perm.LIST, paths.split(vpath)[0]):
            raise PermissionDenied(vpath, f"permission 'list' denied on '{paths.split(vpath)[0]}'")
        return self._stat_target(vpath)

    def exists(self, path: str | bytes) -> bool:
        try:
            self.stat(path)
            return True
        except NotFound:
            return False

    def list_dir(self, path: str | bytes) -> Iterator[Entry]:
        """Stream a folder's entries, mount points included; needs `list`.

        Raises:
            NotFound, NotADirectory, PermissionDenied, InvalidPath
        """
        vpath = paths.normalize(path)
        self._policy.require(Perm.LIST, vpath)
        target = self._resolve(vpath)
        mounted = {paths.split(m.path)[1]: m for m in self._mounts
                   if m.path != vpath and paths.split(m.path)[0] == vpath}
        # Folders on the way to a deeper mount ("/a" for a mount at "/a/b").
        for m in self._mounts:
            if paths.is_within(m.path, vpath) and m.path != vpath:
                first = paths.relative_to(m.path, vpath).split("/")[1]
                mounted.setdefault(first, None)
        try:
            entries = target.backend.list_dir(target.path)
        except NotFound:
            if not mounted:
                raise
            entries = iter(())
        return self._merge_listing(entries, mounted, vpath)

    def _merge_listing(self, entries: Iterator[Entry], mounted: dict, vpath: str) -> Iterator[Entry]:
        try:
            for entry in entries:
                if entry.name not in mounted:
                    yield entry
        except GatewayError as exc:
            if isinstance(exc, BackendUnavailable):
                # Past list_dir's own audit: a later page of the listing failed.
                self._audit("list", vpath, audit.result_of(exc))
            raise self._public_error(exc, [vpath]) from None
        for name in mounted:
            try:
                yield self._stat_target(paths.join(vpath, name))
            except GatewayError:
                yield Entry(name, True, 0, 0.0)

    def open_read(self, path: str | bytes, offset: int = 0, length: int | None = None) -> BinaryIO:
        """Open a file for reading; needs `download`.

        Raises:
            NotFound, IsADirectory, PermissionDenied, InvalidPath
        """
        vpath = paths.normalize(path)
        self._policy.require(Perm.DOWNLOAD, vpath)
        target = self._resolve(vpath)
        stream = target.backend.open_read(target.path, offset, length)
        return _MeteredReader(self, vpath, stream)

    def usage(self) -> Usage:
        """Space for quota reporting (statvfs, RFC 4331): the quota if set, else the storage's."""
        self._prepared()
        used_bytes, used_files = self._quota.used()
        if self.user.quota_bytes:
            return Usage(used_bytes, used_files, self.user.quota_bytes,
                         max(0, self.user.quota_bytes - used_bytes))
        capacity = self._backend(self.user.home).capacity()
        if capacity is None:
            return Usage(used_bytes, used_files)
        return Usage(used_bytes, used_files, capacity[0], capacity[1])

    # -- writing --------------------------------------------------------------

    def open_write(self, path: str | bytes, *, offset: int = 0, truncate: bool = True) -> Upload:
        """Start an upload; needs `upload` for a new file, `overwrite` for an existing one.

        Nothing is visible until the returned upload is committed.

        Raises:
            NotFound (parent), IsADirectory, PermissionDenied, QuotaExceeded, InvalidPath
        """
        vpath = paths.normalize(path)
        target, existing = self._write_target(vpath)
        self._policy.require(Perm.OVERWRITE if existing else Perm.UPLOAD, vpath)
        if existing is None:
            self._refuse_too_deep(vpath)
        checked = target.in_home and existing is None
        if checked:
            # On current numbers: the upload's first write may use them (see GuardedUpload._check).
            self._quota.check(vpath, 0, 1)
        inner = target.backend.open_write(target.path, offset=offset, truncate=truncate)
        record = self._uploads.register(target.backend, target.path, inner) if self._uploads else None
        upload = GuardedUpload(self, vpath, inner, existing.size if existing else None,
                               target.in_home, offset, record, checked)
        if self._open_uploads is not None:
            # The server aborts whatever is still open when it shuts down.
            self._open_uploads.add(upload)
        return upload

    def create_file(self, path: str | bytes) -> Entry:
        """Create an empty file where nothing exists yet; needs `upload`.

        What a WebDAV LOCK on a new name does (RFC 4918 7.3). It is audited and
        counted as an upload of 0 bytes, without the temp file and in-flight
        record of open_write: the backend creates the file in one step, so
        nothing is left half done to clean up.

        Raises:
            AlreadyExists, NotFound (parent), PermissionDenied, QuotaExceeded, InvalidPath
        """
        vpath = paths.normalize(path)
        if vpath == "/" or self._is_mount_point(vpath) or self._is_mount_ancestor(vpath):
            raise AlreadyExists(vpath)
        self._policy.require(Perm.UPLOAD, vpath)
        self._refuse_too_deep(vpath)
        target = self._resolve(vpath)
        if target.in_home:
            self._quota.check(vpath, 0, 1)
        entry = target.backend.create_file(target.path)
        if target.in_home and self._quota.counting:
            self._quota.apply(0, 1)
        self._audit("upload", vpath, "ok", 0, direction="in")
        return entry

    def undo_create_file(self, path: str | bytes, created: Entry) -> bool:
        """Remove the empty file `create_file` returned as `created`, for a request that then failed.

        Needs `upload`, as the creation did, not `delete`: it takes back only
        what this request made. Nothing is removed unless the file is still
        that one, empty: a client that wrote to it since keeps its bytes.
        Returns whether it was removed.

        Raises:
            PermissionDenied, BackendUnavailable
        """
        vpath = paths.normalize(path)
        self._refuse_structural(vpath, "delete")
        self._policy.require(Perm.UPLOAD, vpath)
        target = self._resolve(vpath)
        try:
            now = target.backend.stat(target.path)
        except NotFound:
            return False
        if now.is_dir or now.size != 0 or now.etag != created.etag:
            return False
        target.backend.remove_file(target.path)
        if target.in_home:
            self._quota.apply(0, -1)
        self._audit("delete", vpath, "ok", 0)
        return True

    def _write_target(self, vpath: str) -> tuple[_Target, Entry | None]:
        """Where an upload of `vpath` lands and what is there now; a folder is refused."""
        if vpath == "/" or self._is_mount_point(vpath) or self._is_mount_ancestor(vpath):
            raise IsADirectory(vpath)
        target = self._resolve(vpath)
        try:
            existing = target.backend.stat(target.path)
        except NotFound:
            existing = None
        if existing is not None and existing.is_dir:
            raise IsADirectory(vpath)
        return target, existing

    def check_access(self, path: str | bytes, *, read: bool = False, write: bool = False,
                     delete: bool = False) -> None:
        """Refuse what open_read, open_write or remove_file would refuse, doing nothing.

        For an operation on content that is not in storage yet: an SFTP
        session's further handles on a file it is still uploading share that
        upload, and each still needs the permission its own open would:
        `download` to read, `overwrite` (existing file) or `upload` (new) to
        write, `delete` to remove.

        Raises:
            IsADirectory, PermissionDenied, InvalidPath
        """
        vpath = paths.normalize(path)
        if read:
            self._policy.require(Perm.DOWNLOAD, vpath)
        if write:
            _, existing = self._write_target(vpath)
            self._policy.require(Perm.OVERWRITE if existing else Perm.UPLOAD, vpath)
        if delete:
            self._refuse_structural(vpath, "delete")
            self._policy.require(Perm.DELETE, vpath)

    def truncate(self, path: str | bytes, size: int) -> None:
        """Cut or extend a file to `size` bytes; needs `overwrite`."""
        vpath = paths.normalize(path)
        with self.open_write(vpath, truncate=False) as upload:
            upload.truncate(size)

    def make_dir(self, path: str | bytes) -> None:
        """Create one folder; needs `mkdir`. In the home it counts toward quota_files, as a file does.

        Raises:
            AlreadyExists, NotFound (parent), PermissionDenied, QuotaExceeded, InvalidPath
        """
        vpath = paths.normalize(path)
        if vpath == "/" or self._is_mount_point(vpath) or self._is_mount_ancestor(vpath):
            raise AlreadyExists(vpath)
        self._policy.require(Perm.MKDIR, vpath)
        self._refuse_too_deep(vpath)
        target = self._resolve(vpath)
        if target.in_home:
            # A folder costs the store what a file does (WebDAV locks and dead
            # properties on it): uncounted, they were a way around the quota.
            self._quota.check(vpath, 0, 1)
        target.backend.make_dir(target.path)
        if target.in_home:
            self._quota.apply(0, 1)
        self._audit("mkdir", vpath, "ok")

    def remove_file(self, path: str | bytes) -> None:
        """Remove a file; needs `delete`."""
        vpath = paths.normalize(path)
        self._refuse_structural(vpath, "delete")
        self._policy.require(Perm.DELETE, vpath)
        target = self._resolve(vpath)
        size = target.backend.stat(target.path).size if target.in_home else 0
        target.backend.remove_file(target.path)
        if target.in_home:
            self._quota.apply(-size, -1)
        self._audit("delete", vpath, "ok", size)

    def remove_dir(self, path: str | bytes) -> None:
        """Remove an empty folder; needs `delete`."""
        vpath = paths.normalize(path)
        self._refuse_structural(vpath, "delete")
        self._policy.require(Perm.DELETE, vpath)
        target = self._resolve(vpath)
        target.backend.remove_dir(target.path)
        if target.in_home:
            self._quota.apply(0, -1)
        self._audit("rmdir", vpath, "ok")

    def remove_tree(self, path: str | bytes) -> None:
        """Remove a file or a folder with everything in it; needs `delete` on all of it."""
        vpath = paths.normalize(path)
        self._refuse_structural(vpath, "delete")
        self._policy.require_tree(Perm.DELETE, vpath)
        target = self._resolve(vpath)
        self._remove_tree_unchecked(target, vpath)

    def _remove_tree_unchecked(self, target: _Target, vpath: str) -> None:
        # An explicit stack, not recursion: a tree can be deeper than Python's
        # recursion limit (1,101 nested folders made DELETE answer 500).
        # Entries: (storage path, virtual path, entry, whether its contents are gone).
        backend = target.backend
        stack = [(target.path, vpath, backend.stat(target.path), False)]
        while stack:
            path, vp, entry, emptied = stack.pop()
            if not entry.is_dir:
                backend.remove_file(path)
                if target.in_home:
                    self._quota.apply(-entry.size, -1)
                self._audit("delete", vp, "ok", entry.size)
            elif emptied:
                backend.remove_dir(path)
                if target.in_home:
                    self._quota.apply(0, -1)
                self._audit("rmdir", vp, "ok")
            else:
                # The folder comes back once everything pushed after it is gone.
                stack.append((path, vp, entry, True))
                for child in list(backend.list_dir(path)):
                    stack.append((paths.join(path, child.name), paths.join(vp, child.name), child, False))

    def rename(self, src: str | bytes, dst: str | bytes, *, overwrite: bool = False) -> None:
        """Move a file or folder; needs `rename` on both sides (and `overwrite` to replace).

        A move must not make readable what was not: when the destination grants
        `download` (on it or on any rule below it), the whole source needs
        `download` too. A move within places without `download` (a drop box
        renaming its uploads) needs no `download`.

        Within one backend this is the backend's rename; across backends it is
        a copy followed by a delete of the source. Either way a move into the
        home is held to the quota.

        Raises:
            NotFound, AlreadyExists, PermissionDenied, QuotaExceeded, InvalidPath
        """
        vsrc, vdst = paths.normalize(src), paths.normalize(dst)
        self._refuse_structural(vsrc, "rename")
        self._refuse_structural(vdst, "replace")
        # Permissions come before the same-path answer: "OK" for a path the
        # user may not touch would confirm that it exists.
        self._policy.require_tree(Perm.RENAME, vsrc)
        self._policy.require_tree(Perm.RENAME, vdst)
        if self._policy.grants_within(Perm.DOWNLOAD, vdst):
            self._policy.require_tree(Perm.DOWNLOAD, vsrc)
        if vsrc == vdst:
            self._stat_target(vsrc)
            return
        if paths.is_within(vdst, vsrc):
            raise InvalidPath(vdst, f"cannot move '{vsrc}' into itself")
        st, dt = self._resolve(vsrc), self._resolve(vdst)
        entry = st.backend.stat(st.path)
        existing = self._exists(vdst)
        if existing is not None:
            if existing.is_dir or entry.is_dir or not overwrite:
                raise AlreadyExists(vdst)
            self._policy.require(Perm.OVERWRITE, vdst)
        else:
            self._refuse_too_deep(vdst)
        # The file a move replaces leaves the home's usage.
        replaced = (existing.size, 1) if existing is not None and dt.in_home else (0, 0)
        if dt.in_home and not st.in_home:
            size, files = self._tree_usage(st, entry)
            self._quota.check(vdst, size - replaced[0], files - replaced[1])
        if st.backend is dt.backend:
            st.backend.rename(st.path, dt.path, overwrite=overwrite)
            if st.in_home != dt.in_home:
                self._quota_move(st, dt, vdst, entry)
        else:
            self._copy_unchecked(st, dt, vsrc, vdst)
            if dt.in_home:
                self._quota.apply(*self._tree_usage(dt, entry))
            # Removing the source counts its bytes out of the home if it was there.
            self._remove_tree_unchecked(st, vsrc)
        self._quota.apply(-replaced[0], -replaced[1])
        self._audit("rename", vsrc, "ok", target=vdst)

    def _tree_usage(self, target: _Target, entry: Entry) -> tuple[int, int]:
        """(bytes, files and folders) of a file or of a folder with all it holds, itself included."""
        if not entry.is_dir:
            return entry.size, 1
        usage = target.backend.usage(target.path)
        return usage.used_bytes, usage.used_files + 1

    def _quota_move(self, st: _Target, dt: _Target, vdst: str, entry: Entry) -> None:
        size, files = self._tree_usage(dt, entry)
        sign = 1 if dt.in_home else -1
        self._quota.apply(sign * size, sign * files)

    def copy_file(self, src: str | bytes, dst: str | bytes) -> None:
        """Copy one file; needs `download` on the source, `upload`/`overwrite` on the destination."""
        vsrc, vdst = paths.normalize(src), paths.normalize(dst)
        self._policy.require(Perm.DOWNLOAD, vsrc)
        st, dt = self._resolve(vsrc), self._resolve(vdst)
        entry = st.backend.stat(st.path)
        if entry.is_dir:
            raise IsADirectory(vsrc)
        existing = self._exists(vdst)
        if existing is not None and existing.is_dir:
            raise IsADirectory(vdst)
        self._policy.require(Perm.OVERWRITE if existing else Perm.UPLOAD, vdst)
        if existing is None:
            self._refuse_too_deep(vdst)
        if dt.in_home:
            self._quota.check(vdst, entry.size - (existing.size if existing else 0),
                              0 if existing else 1)
        self._copy_file_unchecked(st, dt, entry)
        if dt.in_home:
            self._quota.apply(entry.size - (existing.size if existing else 0), 0 if existing else 1)
        self._audit("copy", vsrc, "ok", entry.size, target=vdst)

    def _copy_file_unchecked(self, st: _Target, dt: _Target, entry: Entry) -> None:
        if st.backend is dt.backend:
            st.backend.copy_file(st.path, dt.path)
            return
        with st.backend.open_read(st.path) as reader, dt.backend.open_write(dt.path) as upload:
            while chunk := reader.read(1024 * 1024):
                upload.write(chunk)
        try:
            dt.backend.set_mtime(dt.path, entry.mtime)
        except GatewayError:
            pass

    def copy_tree(self, src: str | bytes, dst: str | bytes) -> None:
        """Copy a file or folder with all it holds to a destination that does not exist yet.

        Needs `download` on all of the source and `upload`/`mkdir` on the destination.

        Raises:
            NotFound, AlreadyExists, PermissionDenied, InvalidPath
        """
        vsrc, vdst = paths.normalize(src), paths.normalize(dst)
        if paths.is_within(vdst, vsrc):
            raise InvalidPath(vdst, f"cannot copy '{vsrc}' into itself")
        self._policy.require_tree(Perm.DOWNLOAD, vsrc)
        st, dt = self._resolve(vsrc), self._resolve(vdst)
        entry = st.backend.stat(st.path)
        if self._exists(vdst) is not None:
            raise AlreadyExists(vdst)
        self._policy.require(Perm.MKDIR if entry.is_dir else Perm.UPLOAD, vdst)
        self._refuse_too_deep(vdst)
        if dt.in_home:
            self._quota.check(vdst, *self._tree_usage(st, entry))
        self._copy_unchecked(st, dt, vsrc, vdst)
        if dt.in_home:
            self._quota.apply(*self._tree_usage(dt, entry))
        self._audit("copy", vsrc, "ok", target=vdst)

    def _copy_unchecked(self, st: _Target, dt: _Target, vsrc: str, vdst: str) -> None:
        # Top-down with an explicit stack (trees can be deeper than the
        # recursion limit); each folder is made before anything inside it.
        stack = [(st, dt, vdst)]
        while stack:
            src, dst, vd = stack.pop()
            entry = src.backend.stat(src.path)
            self._refuse_too_deep(vd)
            if not entry.is_dir:
                self._copy_file_unchecked(src, dst, entry)
                continue
            dst.backend.make_dir(dst.path)
            for child in list(src.backend.list_dir(src.path)):
                stack.append((_Target(src.backend, paths.join(src.path, child.name), src.in_home, src.root),
                              _Target(dst.backend, paths.join(dst.path, child.name), dst.in_home, dst.root),
                              paths.join(vd, child.name)))

    def check_change(self, path: str | bytes) -> None:
        """Check that the user may change an existing file or folder in place; needs `overwrite`.

        For what changes a resource without writing its content: WebDAV dead
        properties, and locks (a lock keeps every other user from writing).

        Raises:
            NotFound, PermissionDenied, InvalidPath
        """
        vpath = paths.normalize(path)
        self._policy.require(Perm.OVERWRITE, vpath)
        self._stat_target(vpath)

    def check_replace(self, path: str | bytes) -> None:
        """Check that a copy or move may replace whatever is at `path`.

        WebDAV deletes an existing destination before it copies (Overwrite: T),
        so this runs first. The home, a mount point and a folder that holds one
        are never replaced (they cannot be deleted either); anything else that
        exists needs `overwrite`.

        Raises:
            PermissionDenied, InvalidPath
        """
        vpath = paths.normalize(path)
        self._refuse_structural(vpath, "replace")
        if self._exists(vpath) is not None:
            self._policy.require(Perm.OVERWRITE, vpath)

    def set_mtime(self, path: str | bytes, mtime: float, *, dry_run: bool = False) -> None:
        """Set a file's or folder's modification time; needs `set_times`.

        With `dry_run` only the checks run (WebDAV PROPPATCH is all or nothing:
        every property is tried before any is set).
        """
        vpath = paths.normalize(path)
        if vpath == "/" or self._is_mount_point(vpath) or self._is_mount_ancestor(vpath):
            raise PermissionDenied(vpath, f"cannot change the times of '{vpath}'")
        self._policy.require(Perm.SET_TIMES, vpath)
        target = self._resolve(vpath)
        if dry_run:
            target.backend.stat(target.path)
            return
        target.backend.set_mtime(target.path, mtime)
        self._audit("set_times", vpath, "ok")


for _name in UserFS.READ_METHODS + UserFS.WRITE_METHODS:
    if _name != "normalize":
        setattr(UserFS, _name, _virtual_errors(getattr(UserFS, _name)))
    if _name in AUDITED_OPS:
        setattr(UserFS, _name, _audited(getattr(UserFS, _name), AUDITED_OPS[_name]))
    elif _name in FAILED_READ_OPS:
        setattr(UserFS, _name, _audited(getattr(UserFS, _name), FAILED_READ_OPS[_name],
                                        BackendUnavailable))


def ensure_location(backend: Backend, path: str) -> None:
    """Create a home or mount target (and its parents) if it does not exist yet."""
    missing: list[str] = []
    while path != "/":
        try:
            entry = backend.stat(path)
        except NotFound:
            missing.append(path)
            path = paths.split(path)[0]
            continue
        if not entry.is_dir:
            raise NotADirectory(path)
        break
    for path in reversed(missing):
        try:
            backend.make_dir(path)
        except AlreadyExists:
            pass
