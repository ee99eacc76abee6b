"""LocalBackend: a directory on local disk, confined with an openat-style walk.

Every path is resolved one component at a time from a held root directory
descriptor with O_NOFOLLOW, so a symlink planted inside the root (pointing at
/etc or at another user's home) is never followed, and no check-then-use race
with realpath exists. Symbolic links and special files are neither listed nor
served.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import secrets
import socket
import stat as stat_mod
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import paths
from ..errors import (AlreadyExists, BackendUnavailable, DirectoryNotEmpty, GatewayError,
                      InvalidPath, IsADirectory, NotADirectory, NotFound, PermissionDenied,
                      StorageFull, Unsupported)
from .base import TEMP_PREFIX, Backend, Capabilities, Entry, Upload, Usage, check_rename

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 8 * 1024 * 1024

# One table from errno to the error tree.
_ERRNO_TABLE: dict[int, type[GatewayError]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.ENOTDIR: NotADirectory,
    errno.EISDIR: IsADirectory,
    errno.ENOTEMPTY: DirectoryNotEmpty,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: PermissionDenied,
    # O_NOFOLLOW on a symlink: we refuse to follow it.
    errno.ELOOP: PermissionDenied,
    errno.ENAMETOOLONG: InvalidPath,
    errno.EINVAL: InvalidPath,
    errno.EXDEV: Unsupported,
    # A full disk (or the file system's own quota) is not the gateway's quota.
    errno.ENOSPC: StorageFull,
    errno.EDQUOT: StorageFull,
    errno.EIO: BackendUnavailable,
}


def convert_os_error(exc: OSError, path: str) -> GatewayError:
    cls = _ERRNO_TABLE.get(exc.errno or 0, BackendUnavailable)
    if exc.errno == errno.ELOOP:
        return cls(path, f"'{path}' is a symbolic link; links are not followed")
    return cls(path)


@contextlib.contextmanager
def _converted(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise convert_os_error(exc, path) from None


def _entry(name: str, st: os.stat_result, path: str) -> Entry:
    if stat_mod.S_ISLNK(st.st_mode):
        raise PermissionDenied(path, f"'{path}' is a symbolic link; links are not followed")
    if stat_mod.S_ISDIR(st.st_mode):
        return Entry(name, True, 0, st.st_mtime, None)
    if not stat_mod.S_ISREG(st.st_mode):
        raise PermissionDenied(path, f"'{path}' is not a regular file")
    return Entry(name, False, st.st_size, st.st_mtime,
                 f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}")


@dataclass(frozen=True)
class LocalConfig:
    root: str
    fsync: bool = False


class _OwnedFd:
    """A descriptor closed exactly once: by its user, or when dropped unused.

    A listing generator that is never started never runs its `finally`; this
    closes the directory descriptor when the generator is collected instead.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    __del__ = close


class _FileReader(io.BufferedReader):
    """A local file's download stream, which can also hand its bytes to a socket zero-copy."""

    def send_to(self, sock: socket.socket, count: int) -> int:
        """Send up to `count` bytes from the current position to `sock` with sendfile(2).

        The kernel copies from the page cache to the socket: nothing passes
        through Python. The position moves past what was sent; returns how
        much that was, 0 at the end of the file or of the range.
        """
        raw: _RangeReader = self.raw
        position = self.tell()
        if raw.end is not None:
            count = min(count, raw.end - position)
        if count <= 0:
            return 0
        # socket.sendfile honours the socket's timeout and seeks this stream
        # (dropping its read-ahead) to the end of what it sent.
        return sock.sendfile(self, position, count)


class _RangeReader(io.RawIOBase):
    """A seekable read-only view of an open file descriptor, limited to `length`."""

    def __init__(self, fd: int, start: int, length: int | None) -> None:
        self._fd = fd
        self._pos = start
        self.end = None if length is None else start + length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = len(buffer)
        if self.end is not None:
            want = max(0, min(want, self.end - self._pos))
        if want == 0:
            return 0
        data = os.pread(self._fd, want, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(_COPY_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        if self.end is not None:
            size = max(0, min(size, self.end - self._pos))
        if size == 0:
            return b""
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            end = self.end if self.end is not None else os.fstat(self._fd).st_size
            self._pos = end + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class LocalUpload(Upload):
    """A temp file beside the target, moved over it with os.replace on commit."""

    def __init__(self, backend: "LocalBackend", path: str, dir_fd: int, name: str,
                 start_from: int | None, offset: int) -> None:
        self.path = path
        self._backend = backend
        self._dir_fd = dir_fd
        self._name = name
        self._tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        self._lock = threading.Lock()
        self._closed = False
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o644, dir_fd=dir_fd)
        try:
            if start_from is not None:
                self._copy_from(start_from)
        except BaseException:
            self.abort()
            raise
        self._pos = offset

    def _copy_from(self, src_fd: int) -> None:
        st = os.fstat(src_fd)
        os.fchmod(self._fd, stat_mod.S_IMODE(st.st_mode))
        remaining, pos = st.st_size, 0
        while remaining > 0:
            try:
                copied = os.copy_file_range(src_fd, self._fd, min(remaining, 1 << 30), pos, pos)
            except OSError:
                copied = os.pwrite(self._fd, os.pread(src_fd, min(remaining, _COPY_CHUNK), pos), pos)
            if copied == 0:
                break
            pos += copied
            remaining -= copied

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"upload of {self.path} is already closed")

    def write(self, data: bytes) -> None:
        with self._lock:
            self._check_open()
            with _converted(self.path):
                view = memoryview(data)
                while view:
                    written = os.pwrite(self._fd, view, self._pos)
                    self._pos += written
                    view = view[written:]

    def write_at(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._check_open()
            with _converted(self.path):
                view, pos = memoryview(data), offset
                while view:
                    written = os.pwrite(self._fd, view, pos)
                    pos += written
                    view = view[written:]
            self._pos = pos

    def read_at(self, offset: int, length: int) -> bytes:
        self._check_open()
        with _converted(self.path):
            return os.pread(self._fd, length, offset)

    def truncate(self, size: int) -> None:
        self._check_open()
        with _converted(self.path):
            os.ftruncate(self._fd, size)

    @property
    def size(self) -> int:
        if self._closed:
            return 0
        return os.fstat(self._fd).st_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend_id(self) -> str | None:
        return None if self._closed else self._tmp

    def commit(self) -> Entry:
        with self._lock:
            if self._closed:
                raise ValueError(f"upload of {self.path} is already closed")
            try:
                with _converted(self.path):
                    if self._backend.config.fsync:
                        os.fsync(self._fd)
                    try:
                        st = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
                    else:
                        if stat_mod.S_ISDIR(st.st_mode):
                            raise IsADirectory(self.path)
                    os.replace(self._tmp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
                    st = os.fstat(self._fd)
            except BaseException:
                self._discard()
                raise
            self._closed = True
            os.close(self._fd)
            os.close(self._dir_fd)
            return _entry(self._name, st, self.path)

    def abort(self) -> None:
        with self._lock:
            if not self._closed:
                self._discard()

    def _discard(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self._tmp, dir_fd=self._dir_fd)
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)

    def __del__(self) -> None:
        # An upload dropped without commit or abort (a crashed handler) must
        # not leave a temp file or a descriptor behind.
        if not getattr(self, "_closed", True):
            self.abort()


class LocalBackend(Backend):
    """Files under one root directory on a local file system."""

    capabilities = Capabilities()

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.root = Path(config.root)
        self._root_fd = os.open(self.root, _DIR_FLAGS)

    # -- walking --------------------------------------------------------------

    def _open_dir(self, path: str) -> int:
        """Open the directory at `path` without following any symlink."""
        fd = os.dup(self._root_fd)
        if path == "/":
            return fd
        try:
            for segment in path.strip("/").split("/"):
                try:
                    next_fd = os.open(segment, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_DIRECTORY|O_NOFOLLOW says ENOTDIR for a symlink too; tell them apart.
                    st = os.stat(segment, dir_fd=fd, follow_symlinks=False)
                    if stat_mod.S_ISLNK(st.st_mode):
                        raise OSError(errno.ELOOP, "symbolic link") from None
                    raise
                os.close(fd)
                fd = next_fd
        except OSError as exc:
            os.close(fd)
            raise convert_os_error(exc, path) from None
        return fd

    @contextlib.contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """Yield (parent directory fd, final name) for a non-root path."""
        parent, name = paths.split(path)
        if not name:
            raise PermissionDenied(path, "the root cannot be changed")
        fd = self._open_dir(parent)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _lstat(self, dir_fd: int, name: str, path: str) -> os.stat_result:
        with _converted(path):
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    # -- contract -------------------------------------------------------------

    def stat(self, path: str) -> Entry:
        if path == "/":
            with _converted(path):
                return _entry("", os.fstat(self._root_fd), path)
        # The walk of _parent and _lstat without their context managers: stat
        # runs several times per request.
        parent, name = paths.split(path)
        if not name:
            raise PermissionDenied(path, "the root cannot be changed")
        fd = self._open_dir(parent)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            raise convert_os_error(exc, path) from None
        finally:
            os.close(fd)
        return _entry(name, st, path)

    def list_dir(self, path: str) -> Iterator[Entry]:
        return self._iter_dir(_OwnedFd(self._open_dir(path)), path)

    def _iter_dir(self, owned: "_OwnedFd", path: str) -> Iterator[Entry]:
        try:
            # DirEntry.stat() works relative to the descriptor: keep it open while iterating.
            with _converted(path), os.scandir(owned.fd) as it:
                for item in it:
                    if item.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    mode = st.st_mode
                    if stat_mod.S_ISDIR(mode) or stat_mod.S_ISREG(mode):
                        yield _entry(item.name, st, paths.join(path, item.name))
        finally:
            owned.close()

    def _open_file(self, path: str) -> int:
        """Open a regular file for reading without following links; the caller closes it."""
        with self._parent(path) as (dir_fd, name):
            with _converted(path):
                # O_NONBLOCK so a planted FIFO cannot hang the thread.
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectory(path)
            if not stat_mod.S_ISREG(st.st_mode):
                raise PermissionDenied(path, f"'{path}' is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        fd = self._open_file(path)
        return _FileReader(_RangeReader(fd, offset, length), buffer_size=256 * 1024)

    def open_write(self, path: str, *, offset: int = 0, truncate: bool = True) -> Upload:
        parent, name = paths.split(path)
        if not name:
            raise IsADirectory(path)
        dir_fd = self._open_dir(parent)
        try:
            src_fd = None
            try:
                src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=dir_fd)
                st = os.fstat(src_fd)
                if not stat_mod.S_ISREG(st.st_mode):
                    os.close(src_fd)
                    if stat_mod.S_ISDIR(st.st_mode):
                        raise IsADirectory(path)
                    raise PermissionDenied(path, f"'{path}' is not a regular file")
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise convert_os_error(exc, path) from None
            try:
                with _converted(path):
                    return LocalUpload(self, path, dir_fd, name,
                                       None if truncate else src_fd, offset)
            finally:
                if src_fd is not None:
                    os.close(src_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(dir_fd)
            raise

    def make_dir(self, path: str) -> None:
        with self._parent(path) as (fd, name), _converted(path):
            os.mkdir(name, 0o777, dir_fd=fd)

    def remove_file(self, path: str) -> None:
        with self._parent(path) as (fd, name):
            st = self._lstat(fd, name, path)
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectory(path)
            with _converted(path):
                os.unlink(name, dir_fd=fd)

    def remove_dir(self, path: str) -> None:
        with self._parent(path) as (fd, name):
            st = self._lstat(fd, name, path)
            if not stat_mod.S_ISDIR(st.st_mode):
                raise NotADirectory(path)
            with _converted(path):
                os.rmdir(name, dir_fd=fd)

    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        if check_rename(src, dst):
            return
        with self._parent(src) as (sfd, sname), self._parent(dst) as (dfd, dname):
            src_st = self._lstat(sfd, sname, src)
            _entry(sname, src_st, src)  # refuses links and special files
            try:
                dst_st = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                dst_st = None
            except OSError as exc:
                raise convert_os_error(exc, dst) from None
            if dst_st is not None:
                if stat_mod.S_ISDIR(dst_st.st_mode) or stat_mod.S_ISDIR(src_st.st_mode) or not overwrite:
                    raise AlreadyExists(dst)
            with _converted(dst):
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

    def copy_file(self, src: str, dst: str) -> None:
        src_fd = self._open_file(src)
        try:
            upload = self.open_write(dst)
            try:
                upload._copy_from(src_fd)  # same backend: kernel-side copy
            except BaseException:
                upload.abort()
                raise
            upload.commit()
        finally:
            os.close(src_fd)

    def create_file(self, path: str) -> Entry:
        # O_EXCL: one step that never replaces what another client created meanwhile.
        parent, name = paths.split(path)
        if not name:
            raise AlreadyExists(path)
        dir_fd = self._open_dir(parent)
        try:
            with _converted(path):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=dir_fd)
                try:
                    if self.config.fsync:
                        os.fsync(fd)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
        return _entry(name, st, path)

    def set_mtime(self, path: str, mtime: float) -> None:
        if path == "/":
            raise PermissionDenied(path, "the root cannot be changed")
        with self._parent(path) as (fd, name):
            st = self._lstat(fd, name, path)
            _entry(name, st, path)
            with _converted(path):
                os.utime(name, ns=(st.st_atime_ns, int(mtime * 1e9)), dir_fd=fd,
                         follow_symlinks=False)

    def usage(self, path: str = "/") -> Usage:
        used = super().usage(path)
        total, free = self.capacity()
        return Usage(used.used_bytes, used.used_files, total, free)

    def capacity(self) -> tuple[int, int]:
        vfs = os.statvfs(self._root_fd)
        return vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize

    def check(self) -> None:
        """The root path must still lead to the directory opened at start.

        Every operation goes through the descriptor opened at start, which
        keeps working on a root that was removed, replaced or unmounted
        underneath: compare it with what the path shows now.
        """
        try:
            now = os.stat(self.root)
        except OSError as exc:
            raise BackendUnavailable("/", f"root '{self.root}' cannot be reached: {exc.strerror}") from None
        opened = os.fstat(self._root_fd)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise BackendUnavailable("/", f"root '{self.root}' is no longer the directory opened at "
                                          "start (removed, replaced or unmounted); restart the gateway")

    def abort_stale_upload(self, path: str, upload_id: str) -> None:
        # Security: the id comes from the store; only a temp file beside `path`
        # may be removed, never a name that could be user data or elsewhere.
        if not upload_id.startswith(TEMP_PREFIX) or "/" in upload_id or "\0" in upload_id:
            raise InvalidPath(path, f"'{upload_id}' is not an upload of this storage")
        try:
            fd = self._open_dir(paths.split(path)[0])
        except (NotFound, NotADirectory):
            return
        try:
            os.unlink(upload_id, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise convert_os_error(exc, path) from None
        finally:
            os.close(fd)

    def sweep_temp_files(self, stop: threading.Event | None = None) -> int:
        """Delete temp files left by a crash; returns how many were removed."""
        # Not os.fwalk: it recurses (RecursionError past ~1,000 nested folders)
        # and holds a descriptor per level. An explicit stack of paths, each
        # opened with the confined walk, holds one descriptor at a time.
        removed = 0
        pending = ["/"]
        while pending and not (stop is not None and stop.is_set()):
            path = pending.pop()
            try:
                fd = self._open_dir(path)
            except GatewayError:
                continue  # removed or replaced since it was listed
            try:
                with os.scandir(fd) as it:
                    for item in it:
                        with contextlib.suppress(OSError):
                            if item.is_dir(follow_symlinks=False):
                                pending.append(paths.join(path, item.name))
                            elif item.name.startswith(TEMP_PREFIX) and item.is_file(follow_symlinks=False):
                                os.unlink(item.name, dir_fd=fd)
                                removed += 1
            except OSError as exc:
                log.warning("sweeping temp files: cannot list %r: %s", path, exc)
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d temp files of interrupted uploads under %s", removed, self.root)
        return removed

    def close(self) -> None:
        # Once only: a second os.close of the same number, in a process full
        # of threads, closes whatever descriptor took that number meanwhile
        # (seen: the next gateway's sweep lost its folder mid-listing).
        fd, self._root_fd = self._root_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
