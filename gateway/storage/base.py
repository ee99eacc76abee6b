"""The backend contract: what every storage backend implements.

Backends know nothing of users, permissions or protocols. Paths given to a
backend are normalized absolute paths (see gateway.paths) relative to the
backend's own root. Derived operations (copy tree, remove tree, moves across
backends) live in UserFS, not here.
"""
from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import AlreadyExists, InvalidPath, NotADirectory, NotFound, PermissionDenied, Unsupported
from .. import paths

# Every backend hides names with this prefix from listings: they are its
# in-flight uploads, never user data (the normalizer refuses it in client paths).
TEMP_PREFIX = paths.RESERVED_PREFIX


@dataclass(frozen=True)
class Entry:
    """One file or directory as a backend sees it."""

    name: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do natively; UserFS derives the rest or refuses."""

    atomic_rename: bool = True     # rename of a file or directory is one atomic step
    random_write: bool = True      # Upload.write_at at any offset without spooling
    append: bool = True            # open_write(truncate=False) keeps existing data
    real_dirs: bool = True         # directories exist on their own (not only as prefixes)
    truncate: bool = True          # Upload.truncate
    read_while_writing: bool = True  # Upload.read_at


@dataclass(frozen=True)
class Usage:
    """Space used below a path, and the backend's capacity where it has one.

    `used_files` counts files and folders (not the path itself): folders
    count toward a user's quota_files like files.
    """

    used_bytes: int
    used_files: int
    total_bytes: int | None = None
    free_bytes: int | None = None


def check_rename(src: str, dst: str) -> bool:
    """The argument checks every backend's rename starts with.

    Returns True when `src` and `dst` are the same path: nothing to do.

    Raises:
        PermissionDenied: either side is the root.
        InvalidPath: `dst` lies inside `src`.
    """
    if src == "/" or dst == "/":
        raise PermissionDenied("/", "the root cannot be changed")
    if paths.is_within(dst, src):
        if dst == src:
            return True
        raise InvalidPath(dst, f"cannot move '{src}' into itself")
    return False


class Upload(abc.ABC):
    """A write in progress. Nothing is visible until `commit()`.

    `abort()` drops the new content and leaves any previous version untouched.
    Both are idempotent, and `abort()` after `commit()` (or the reverse) does
    nothing, so front-ends can call them from cleanup paths without care.
    Used as a context manager it commits on success and aborts on error.
    """

    path: str
    # Set by whoever records uploads in flight: called with `backend_id` when
    # the upload gets one after it was opened (S3 starts its multipart upload
    # with the first full part).
    on_backend_id: Callable[[str], None] | None = None

    @property
    def backend_id(self) -> str | None:
        """What this upload keeps in storage until it ends, named so that
        `Backend.abort_stale_upload` can remove it if this process dies: a
        temp file's name, a multipart upload's id. None while there is nothing.
        """
        return None

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append `data` at the current position.

        `data` may be a memoryview of a buffer the caller reuses (WebDAV PUT
        bodies): copy what you keep, never hold on to it.
        """

    def write_at(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset`, growing the file with zeros if needed.

        Raises:
            Unsupported: the backend cannot write at this offset.
        """
        raise Unsupported(self.path, "random writes are not supported by this storage")

    def read_at(self, offset: int, length: int) -> bytes:
        """Read back from the upload in progress (SFTP read-write handles)."""
        raise Unsupported(self.path, "reading an upload in progress is not supported by this storage")

    def truncate(self, size: int) -> None:
        """Cut or extend the pending content to `size` bytes."""
        raise Unsupported(self.path, "truncate is not supported by this storage")

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Current size of the pending content."""

    @abc.abstractmethod
    def commit(self) -> Entry:
        """Make the new content visible atomically and return its entry."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the new content; the previous version stays as it was."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once committed or aborted."""

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Backend(abc.ABC):
    """Storage behind the gateway. One instance serves every user and thread."""

    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def stat(self, path: str) -> Entry:
        """Describe one path. The root's entry has the name "".

        Raises:
            NotFound: nothing exists at `path`.
        """

    @abc.abstractmethod
    def list_dir(self, path: str) -> Iterator[Entry]:
        """Stream the entries of a directory (no particular order).

        Raises:
            NotFound: the directory does not exist.
            NotADirectory: `path` is a file.
        """

    @abc.abstractmethod
    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        """Open a file for reading from `offset`, at most `length` bytes.

        The stream is seekable where the backend allows (ranged reads on S3).
        It may offer `send_to(sock, count) -> int`: send up to `count` bytes
        from its position to a plain TCP socket without copying them through
        Python (sendfile), moving past them; 0 at the end.

        Raises:
            NotFound: the file does not exist.
            IsADirectory: `path` is a directory.
        """

    @abc.abstractmethod
    def open_write(self, path: str, *, offset: int = 0, truncate: bool = True) -> Upload:
        """Start an upload of `path`, visible only on `Upload.commit()`.

        With `truncate` the upload starts empty; without it the upload starts
        from the existing content (resume, append, random writes), and the
        write position is `offset`.

        Raises:
            NotFound: the parent directory does not exist.
            NotADirectory: the parent is a file.
            IsADirectory: `path` is a directory.
        """

    def create_file(self, path: str) -> Entry:
        """Create an empty file where nothing exists yet, and describe it.

        The default goes through an upload; backends that can create a file
        in one step (and refuse an existing one atomically) override it.

        Raises:
            AlreadyExists: something exists at `path`.
            NotFound: the parent directory does not exist.
            NotADirectory: the parent is a file.
        """
        try:
            self.stat(path)
        except NotFound:
            pass
        else:
            raise AlreadyExists(path)
        upload = self.open_write(path)
        try:
            return upload.commit()
        finally:
            if not upload.closed:
                upload.abort()

    @abc.abstractmethod
    def make_dir(self, path: str) -> None:
        """Create one directory.

        Raises:
            AlreadyExists: something exists at `path`.
            NotFound: the parent does not exist.
            NotADirectory: the parent is a file.
        """

    @abc.abstractmethod
    def remove_file(self, path: str) -> None:
        """Remove a file.

        Raises:
            NotFound: the file does not exist.
            IsADirectory: `path` is a directory.
        """

    @abc.abstractmethod
    def remove_dir(self, path: str) -> None:
        """Remove an empty directory.

        Raises:
            NotFound: the directory does not exist.
            NotADirectory: `path` is a file.
            DirectoryNotEmpty: the directory has entries.
        """

    @abc.abstractmethod
    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        """Move a file or directory within this backend.

        With `overwrite`, an existing destination file is replaced (atomically
        where the backend can); an existing destination directory is never
        replaced.

        Raises:
            NotFound: `src` or the destination's parent does not exist.
            AlreadyExists: `dst` exists and `overwrite` is false, or `dst` is a directory.
            InvalidPath: `dst` lies inside `src`.
        """

    @abc.abstractmethod
    def copy_file(self, src: str, dst: str) -> None:
        """Copy one file, replacing an existing destination file.

        Raises:
            NotFound: `src` or the destination's parent does not exist.
            IsADirectory: `src` or `dst` is a directory.
        """

    @abc.abstractmethod
    def set_mtime(self, path: str, mtime: float) -> None:
        """Set the modification time a client asked for.

        Raises:
            NotFound: nothing exists at `path`.
        """

    def usage(self, path: str = "/") -> Usage:
        """Bytes of the files below `path`, and how many files and folders are there; capacity where known.

        `path` itself is not counted. The default walks the tree with
        list_dir; backends override it with something cheaper, counting
        the same entries a list_dir walk shows.
        """
        used_bytes = used_files = 0
        pending = [path]
        while pending:
            current = pending.pop()
            try:
                entries = list(self.list_dir(current))
            except (NotFound, NotADirectory, PermissionDenied):
                continue
            for entry in entries:
                used_files += 1
                if entry.is_dir:
                    pending.append(paths.join(current, entry.name))
                else:
                    used_bytes += entry.size
        return Usage(used_bytes, used_files)

    def sweep_temp_files(self, stop: threading.Event | None = None) -> int:
        """Remove what interrupted uploads left behind; runs once at start-up.

        Returns how many leftovers were removed. Stops early once `stop` is set.
        """
        return 0

    def abort_stale_upload(self, path: str, upload_id: str) -> None:
        """Remove what an upload of `path` left in storage when its process died.

        `upload_id` is that upload's `backend_id`. The previous version of
        `path` stays untouched, and the upload can no longer be committed.
        Nothing happens when it is gone already (committed, aborted, or
        removed by another node). The default suits backends whose uploads
        live only in the process.

        Raises:
            InvalidPath: `upload_id` cannot be one of this backend's uploads.
            BackendUnavailable: the storage cannot be reached (try again later).
        """

    def capacity(self) -> tuple[int, int] | None:
        """(total bytes, free bytes) of the storage, or None where it has no limit."""
        return None

    def check(self) -> None:
        """Verify the storage is reachable and usable (for `gateway check` and start-up).

        Raises:
            BackendUnavailable: with a message a person can act on.
        """
        self.stat("/")

    def close(self) -> None:
        """Release connections and background resources."""
