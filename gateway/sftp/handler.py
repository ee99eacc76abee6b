"""The SFTP subsystem: SFTP v3 requests answered over one session's UserFS.

GatewaySFTPServer replaces paramiko's request dispatch so that every error
goes through one status table with a message a person can read, a failed
commit on close reaches the client, and the OpenSSH extensions are advertised.
A handle holds one backend stream or a share of the session's pending upload
of its path; per-packet work is only the read or write itself.
"""
from __future__ import annotations

import logging
import stat as stat_mod
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface
from paramiko.message import Message
from paramiko.sftp import (CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY,
                           CMD_FSETSTAT, CMD_FSTAT, CMD_INIT, CMD_LSTAT, CMD_MKDIR, CMD_NAME,
                           CMD_OPEN, CMD_OPENDIR, CMD_READ, CMD_READDIR, CMD_READLINK, CMD_REALPATH,
                           CMD_REMOVE, CMD_RENAME, CMD_RMDIR, CMD_SETSTAT, CMD_STAT, CMD_SYMLINK,
                           CMD_VERSION, CMD_WRITE, SFTP_EOF, SFTP_FAILURE,
                           SFTP_FLAG_APPEND, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ,
                           SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, SFTP_NO_SUCH_FILE, SFTP_OK,
                           SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED, SFTPError)

from ..errors import (AlreadyExists, BackendUnavailable, DirectoryNotEmpty, GatewayError,
                      InvalidPath, IsADirectory, NotADirectory, NotFound, PermissionDenied,
                      QuotaExceeded, Unsupported)
from ..fairness import BULK_AFTER
from ..vfs import UserFS

# UserFS hands out storage Entry records; front-ends never import storage/.
Entry = Any

log = logging.getLogger(__name__)

SFTP_VERSION = 3
READDIR_BATCH = 100
_STATVFS_NAMEMAX = 255
_UNKNOWN_FREE_BYTES = 1 << 50   # reported when storage has no limit (S3 without a quota)
_UNKNOWN_FREE_FILES = 1 << 32

# The one table from the error tree to SFTP v3 status codes. v3 has no code
# for "exists" or "not empty": those are FAILURE with the error's message.
STATUS_TABLE: dict[type[GatewayError], int] = {
    NotFound: SFTP_NO_SUCH_FILE,
    NotADirectory: SFTP_NO_SUCH_FILE,
    PermissionDenied: SFTP_PERMISSION_DENIED,
    Unsupported: SFTP_OP_UNSUPPORTED,
    AlreadyExists: SFTP_FAILURE,
    DirectoryNotEmpty: SFTP_FAILURE,
    IsADirectory: SFTP_FAILURE,
    InvalidPath: SFTP_FAILURE,
    QuotaExceeded: SFTP_FAILURE,
    BackendUnavailable: SFTP_FAILURE,
}


class SFTPStatus(Exception):
    """A protocol-level refusal (bad handle, handle limit) answered with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(exc: BaseException) -> tuple[int, str]:
    """Map an exception raised while serving a request to (status code, message)."""
    if isinstance(exc, SFTPStatus):
        return exc.code, exc.message
    if isinstance(exc, GatewayError):
        code = SFTP_FAILURE
        for cls in type(exc).__mro__:
            if cls in STATUS_TABLE:
                code = STATUS_TABLE[cls]
                break
        return code, exc.message
    log.exception("unexpected error serving an SFTP request")
    return SFTP_FAILURE, "internal server error"


def attributes(entry: Entry) -> SFTPAttributes:
    """SFTP attributes for an entry from UserFS: type bits, size and times."""
    return _attributes(entry.name, entry.is_dir, entry.size, entry.mtime)


def _attributes(name: str, is_dir: bool, size: int, mtime: float) -> SFTPAttributes:
    attr = SFTPAttributes()
    attr.filename = name
    attr.st_size = size
    attr.st_mode = (stat_mod.S_IFDIR | 0o755) if is_dir else (stat_mod.S_IFREG | 0o644)
    # paramiko sends times only when both are set; atime is not tracked.
    attr.st_mtime = attr.st_atime = int(mtime)
    return attr


def _has(attr: SFTPAttributes, flag: int) -> bool:
    return bool(attr._flags & flag)


# -- handles -------------------------------------------------------------------


class FileHandle(SFTPHandle):
    """An open file. Methods raise GatewayError or SFTPStatus; the server maps them."""

    def __init__(self, fs: UserFS, path: str) -> None:
        super().__init__()
        self.fs = fs
        self.path = path
        self.moved = 0          # bytes read or written through this handle (fairness.BULK_AFTER)

    def read(self, offset: int, length: int) -> bytes:
        raise SFTPStatus(SFTP_PERMISSION_DENIED, f"'{self.path}' is not open for reading")

    def write(self, offset: int, data: bytes) -> None:
        raise SFTPStatus(SFTP_PERMISSION_DENIED, f"'{self.path}' is not open for writing")

    def stat(self) -> SFTPAttributes:
        return attributes(self.fs.stat(self.path))

    def set_attributes(self, attr: SFTPAttributes) -> None:
        raise SFTPStatus(SFTP_PERMISSION_DENIED, f"'{self.path}' is not open for writing")

    def close(self) -> None:
        """Finish with the file; for an upload, commit it. Idempotent.

        Raises:
            GatewayError: the commit failed; the previous version is intact.
        """

    def abort(self) -> None:
        """The session ended without closing this handle: drop anything pending."""
        self.close()


class ReadHandle(FileHandle):
    """One backend stream per handle, repositioned only when the client's offset jumps."""

    def __init__(self, fs: UserFS, path: str) -> None:
        super().__init__(fs, path)
        self._stream = fs.open_read(path)
        self._pos = 0

    def read(self, offset: int, length: int) -> bytes:
        if self._stream is None:
            raise SFTPStatus(SFTP_FAILURE, f"'{self.path}' is closed")
        if offset != self._pos:
            if self._stream.seekable():
                self._stream.seek(offset)
            else:
                self._stream.close()
                self._stream = self.fs.open_read(self.path, offset)
            self._pos = offset
        data = self._stream.read(length)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()


class SharedUpload:
    """One session's pending upload of one path, shared by every handle the session has on it.

    sshfs sends a file's CLOSE after the application's next OPEN of it (FUSE
    releases asynchronously), and some clients write one file through several
    handles: every handle of the session sees the bytes written so far, and the
    new version is committed when the last handle closes. Other sessions see
    the previous version until then.

    A failed write or truncate poisons it: clients that pipeline WRITEs learn
    of a failure only at CLOSE, so every later write, the RENAME that would
    settle it and the last CLOSE fail with the first error, and the previous
    version stays.
    """

    def __init__(self, fs: UserFS, path: str, *, truncate: bool, existed: bool,
                 on_done: Callable[["SharedUpload"], None]) -> None:
        self.fs = fs
        self.path = path
        self._on_done = on_done
        self._upload: Any = None
        self._open(truncate)
        # A new file or a truncation is a change even without a single write;
        # a read-write open that writes nothing must not rewrite the file.
        self._changed = truncate or not existed
        self._mtime: float | None = None
        self._refs = 0
        self._detached = False
        self._done = False
        self._failure: GatewayError | None = None

    def _open(self, truncate: bool) -> Any:
        self._upload = self.fs.open_write(self.path, truncate=truncate)
        self._pos = 0                       # where the upload's plain write() lands
        self._size = self._upload.size
        return self._upload

    def _current(self) -> Any:
        """The upload, reopened from the stored file after settle() committed it."""
        if self._done:
            raise SFTPStatus(SFTP_FAILURE, f"'{self.path}' is closed")
        if self._failure is not None:
            raise self._failure
        return self._upload if self._upload is not None else self._open(False)

    @contextmanager
    def _changing(self) -> Iterator[Any]:
        """The upload, for a change to its content; a change that fails poisons it."""
        upload = self._current()
        try:
            yield upload
        except GatewayError as exc:
            self._failure = exc
            raise
        self._changed = True

    def join(self) -> "SharedUpload":
        self._refs += 1
        return self

    @property
    def size(self) -> int:
        return self._size if self._upload is not None else self.fs.stat(self.path).size

    def read_at(self, offset: int, length: int) -> bytes:
        return self._current().read_at(offset, length)

    def write(self, offset: int | None, data: bytes) -> None:
        """Write at `offset`, or at the end of the shared content when None (append)."""
        with self._changing() as upload:
            if offset is None:
                offset = self._size
            if offset == self._pos:
                upload.write(data)
            else:
                upload.write_at(offset, data)
        self._pos = offset + len(data)
        self._size = max(self._size, self._pos)

    def truncate(self, size: int) -> None:
        with self._changing() as upload:
            if size == 0:
                # A fresh empty upload instead: S3 cannot cut parts it already sent.
                self._open(True)
                upload.abort()
            else:
                upload.truncate(size)
                self._size = size

    def set_mtime(self, mtime: float) -> None:
        if self._upload is None and not (self._done or self._detached):
            self.fs.set_mtime(self.path, mtime)     # settled: the stored file is current
            return
        # Applied after the commit: the file being timed does not exist yet.
        self._mtime = mtime

    def attributes(self) -> SFTPAttributes:
        return _attributes(self.path.rsplit("/", 1)[-1], False, self.size,
                           self._mtime if self._mtime is not None else time.time())

    def settle(self) -> None:
        """Commit what is pending now (a RENAME needs the file in storage); later writes reopen it."""
        if self._failure is not None:
            raise self._failure
        upload, self._upload = self._upload, None
        if upload is None:
            return
        if not self._changed:
            upload.abort()
            return
        self._changed = False
        upload.commit()
        self._apply_mtime()

    def detach(self) -> None:
        """The path was removed or replaced within the session: like an unlinked file, the
        handles keep working and the content is dropped at the last close."""
        self._detached = True
        self._on_done(self)

    def release(self) -> None:
        """One handle closed; the last one commits.

        Raises:
            GatewayError: the commit failed; the previous version is intact.
        """
        self._refs -= 1
        if self._refs > 0 or self._done:
            return
        self._done = True
        self._on_done(self)
        upload, self._upload = self._upload, None
        if upload is None:
            return
        if self._detached or not self._changed or self._failure is not None:
            upload.abort()
            if self._failure is not None and not self._detached:
                raise self._failure
            return
        upload.commit()
        self._apply_mtime()

    def _apply_mtime(self) -> None:
        if self._mtime is None:
            return
        try:
            self.fs.set_mtime(self.path, self._mtime)
        except GatewayError as exc:
            # The data is committed; a time the user may not set is not worth failing for.
            log.info("not applying the mtime of %r: %s", self.path, exc)

    def abort(self) -> None:
        """The session ended with handles open: drop everything pending."""
        if self._done:
            return
        self._done = True
        self._on_done(self)
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.abort()


class UploadHandle(FileHandle):
    """A handle on the session's pending upload of a path; its own open flags decide what it may do."""

    def __init__(self, shared: SharedUpload, *, readable: bool, writable: bool, append: bool) -> None:
        super().__init__(shared.fs, shared.path)
        self._shared = shared.join()
        self._readable = readable
        self._writable = writable
        self._append = append
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise SFTPStatus(SFTP_FAILURE, f"'{self.path}' is closed")
        # The path follows a rename within the session, for messages too.
        self.path = self._shared.path

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if not self._readable:
            return super().read(offset, length)
        return self._shared.read_at(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check_open()
        if not self._writable:
            return super().write(offset, data)
        self._shared.write(None if self._append else offset, data)

    def stat(self) -> SFTPAttributes:
        self._check_open()
        return self._shared.attributes()

    def set_attributes(self, attr: SFTPAttributes) -> None:
        self._check_open()
        if not self._writable:
            return super().set_attributes(attr)
        if _has(attr, SFTPAttributes.FLAG_SIZE):
            self._shared.truncate(attr.st_size)
        if _has(attr, SFTPAttributes.FLAG_AMTIME):
            self._shared.set_mtime(attr.st_mtime)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shared.release()

    def abort(self) -> None:
        self._closed = True
        self._shared.abort()


class FolderHandle(SFTPHandle):
    """A directory listing streamed in batches from UserFS.list_dir."""

    def __init__(self, entries: Iterator[Entry]) -> None:
        super().__init__()
        self._entries: Iterator[Entry] | None = entries
        # Pull the first batch now: errors belong to OPENDIR, and a started
        # generator releases its backend resources when dropped.
        self._pending = self._take(READDIR_BATCH)

    def _take(self, count: int) -> list[Entry]:
        batch: list[Entry] = []
        while self._entries is not None and len(batch) < count:
            try:
                batch.append(next(self._entries))
            except StopIteration:
                self._entries = None
        return batch

    def next_batch(self) -> list[Entry]:
        batch, self._pending = self._pending, []
        return batch or self._take(READDIR_BATCH)

    def close(self) -> None:
        entries, self._entries = self._entries, None
        close = getattr(entries, "close", None)
        if close is not None:
            close()


# -- path operations -------------------------------------------------------------


def _clamp(path: bytes | str) -> str:
    """Resolve a client path for REALPATH: '..' at the root stays at the root, as on any server."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    return "/" + "/".join(parts)


class UserFSInterface(SFTPServerInterface):
    """Path operations of one SFTP session over its UserFS.

    Unlike paramiko's convention these raise instead of returning status
    codes: GatewaySFTPServer maps every exception through STATUS_TABLE.
    """

    def __init__(self, server, *args, **kwargs) -> None:
        super().__init__(server)
        self.fs: UserFS = server.open_fs()
        # Uploads this session has open, by path. A file a client created must
        # exist for that client (sshfs stats it right after creating it, cp sets
        # its times before closing) although others see it only after close.
        self.uploads: dict[str, SharedUpload] = {}

    def _pending(self, path: bytes | str) -> SharedUpload | None:
        return self.uploads.get(self.fs.normalize(path)) if self.uploads else None

    def _forget(self, shared: SharedUpload) -> None:
        if self.uploads.get(shared.path) is shared:
            del self.uploads[shared.path]

    def open(self, path: bytes, pflags: int, attr: SFTPAttributes) -> FileHandle:
        vpath = self.fs.normalize(path)
        writing = bool(pflags & (SFTP_FLAG_WRITE | SFTP_FLAG_APPEND | SFTP_FLAG_TRUNC))
        shared = self.uploads.get(vpath)
        if shared is not None:
            return self._join(shared, pflags, writing)
        if not writing and not pflags & SFTP_FLAG_CREATE:
            return ReadHandle(self.fs, vpath)
        try:
            entry = self.fs.stat(vpath)
        except NotFound:
            entry = None
        if entry is not None:
            if entry.is_dir:
                raise IsADirectory(vpath)
            if pflags & SFTP_FLAG_CREATE and pflags & SFTP_FLAG_EXCL:
                raise AlreadyExists(vpath)
            if not writing:
                return ReadHandle(self.fs, vpath)
            if pflags & SFTP_FLAG_READ:
                # A read-write handle reads the old content back: that is a download.
                self.fs.open_read(vpath, 0, 0).close()
        elif not pflags & SFTP_FLAG_CREATE:
            raise NotFound(vpath)
        # Without O_TRUNC the upload starts from the existing content, so a
        # client resuming (reput, FileZilla, WinSCP) continues where it stopped.
        shared = SharedUpload(self.fs, vpath, truncate=bool(pflags & SFTP_FLAG_TRUNC),
                              existed=entry is not None, on_done=self._forget)
        self.uploads[vpath] = shared
        return UploadHandle(shared, readable=bool(pflags & SFTP_FLAG_READ), writable=True,
                            append=bool(pflags & SFTP_FLAG_APPEND))

    def _join(self, shared: SharedUpload, pflags: int, writing: bool) -> UploadHandle:
        """Another handle on a file this session is still uploading: it sees the pending bytes."""
        if pflags & SFTP_FLAG_CREATE and pflags & SFTP_FLAG_EXCL:
            raise AlreadyExists(shared.path)
        readable = bool(pflags & SFTP_FLAG_READ) or not writing
        # Sharing skips no gate: this handle needs what its own open would need.
        self.fs.check_access(shared.path, read=readable, write=writing)
        handle = UploadHandle(shared, readable=readable, writable=writing,
                              append=bool(pflags & SFTP_FLAG_APPEND))
        if pflags & SFTP_FLAG_TRUNC:
            try:
                shared.truncate(0)
            except BaseException:
                handle.close()
                raise
        return handle

    def list_folder(self, path: bytes) -> FolderHandle:
        return FolderHandle(self.fs.list_dir(path))

    def stat(self, path: bytes) -> SFTPAttributes:
        pending = self._pending(path)
        if pending is not None:
            return pending.attributes()
        return attributes(self.fs.stat(path))

    # Links are never listed or followed, so lstat and stat agree.
    lstat = stat

    def remove(self, path: bytes) -> None:
        """Remove a file; one this session is still uploading goes as an unlinked file would:
        its handles keep working, and their last close stores nothing."""
        vpath = self.fs.normalize(path)
        pending = self.uploads.get(vpath)
        if pending is None:
            self.fs.remove_file(vpath)
            return
        self.fs.check_access(vpath, delete=True)
        try:
            self.fs.remove_file(vpath)
        except NotFound:
            pass    # a new file: only the pending upload exists
        pending.detach()

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        # SFTP v3 rename refuses an existing target; posix-rename replaces it.
        self._rename(oldpath, newpath, overwrite=False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, overwrite=True)

    def _rename(self, oldpath: bytes, newpath: bytes, *, overwrite: bool) -> None:
        """Rename, as POSIX does for open files: a pending source is stored first and its
        handles follow it to the new name; a pending target is replaced like an unlinked file."""
        old, new = self.fs.normalize(oldpath), self.fs.normalize(newpath)
        source, target = self.uploads.get(old), self.uploads.get(new)
        if old == new or (source is None and target is None):
            self.fs.rename(old, new, overwrite=overwrite)
            return
        if target is not None and not overwrite:
            raise AlreadyExists(new)
        if source is not None:
            # The source must be in storage to be renamed. If the rename is then
            # refused, the content is stored early, as its close would have.
            source.settle()
        self.fs.rename(old, new, overwrite=overwrite)
        if target is not None:
            target.detach()
        if source is not None:
            del self.uploads[old]
            source.path = new
            self.uploads[new] = source

    def mkdir(self, path: bytes, attr: SFTPAttributes) -> None:
        self.fs.make_dir(path)

    def rmdir(self, path: bytes) -> None:
        self.fs.remove_dir(path)

    def chattr(self, path: bytes, attr: SFTPAttributes) -> None:
        """Apply size and times; permission bits and owners are accepted and ignored."""
        vpath = self.fs.normalize(path)
        pending = self._pending(vpath)
        if pending is not None:
            if _has(attr, SFTPAttributes.FLAG_SIZE):
                pending.truncate(attr.st_size)
            if _has(attr, SFTPAttributes.FLAG_AMTIME):
                pending.set_mtime(attr.st_mtime)
            return
        changed = False
        if _has(attr, SFTPAttributes.FLAG_SIZE):
            self.fs.truncate(vpath, attr.st_size)
            changed = True
        if _has(attr, SFTPAttributes.FLAG_AMTIME):
            self.fs.set_mtime(vpath, attr.st_mtime)
            changed = True
        if not changed:
            self.fs.stat(vpath)

    def canonicalize(self, path: bytes) -> str:
        return self.fs.normalize(_clamp(path))

    def readlink(self, path: bytes) -> str:
        raise Unsupported(self.fs.normalize(path), "symbolic links are not supported")

    def symlink(self, target_path: bytes, path: bytes) -> None:
        raise Unsupported(self.fs.normalize(path), "symbolic links are not supported")

    def statvfs(self) -> tuple[int, ...]:
        """The statvfs@openssh.com fields from the user's quota or the storage's capacity."""
        usage = self.fs.usage()
        block = 4096
        free = usage.free_bytes if usage.free_bytes is not None else _UNKNOWN_FREE_BYTES
        total = usage.total_bytes if usage.total_bytes is not None else usage.used_bytes + free
        blocks, bfree = total // block, free // block
        files = usage.used_files + _UNKNOWN_FREE_FILES
        return (block, block, blocks, bfree, bfree, files, _UNKNOWN_FREE_FILES, _UNKNOWN_FREE_FILES,
                0, 0, _STATVFS_NAMEMAX)


# -- the subsystem -----------------------------------------------------------------


class GatewaySFTPServer(SFTPServer):
    """paramiko's SFTP subsystem with our own dispatch, limits and end-of-session handling."""

    def __init__(self, channel, name, server, sftp_si=UserFSInterface, *args, **kwargs) -> None:
        super().__init__(channel, name, server, sftp_si, *args, **kwargs)
        self.session = server          # the LoginServer of this connection
        server.register_handler(self)
        config = server.config
        self.max_handles = config.max_handles
        # Handles of all sessions share the process's descriptors: see budget.py.
        self.budget = server.frontend.gateway.handles
        self.fairness = server.frontend.gateway.fairness
        self.max_length = max(config.max_packet_size, 34000)
        # A length word above this is garbage or abuse; OpenSSH clients stay below max_length.
        self.max_request = max(4 * self.max_length, 1 << 20)
        self._inbuf = bytearray()
        # More than the channel's pipe can hold: one recv takes all of it.
        self._recv_size = config.window_size + 2 * self.max_length
        self._handlers: dict[int, Callable[[int, Message], None]] = {
            CMD_OPEN: self._open, CMD_CLOSE: self._close, CMD_READ: self._read,
            CMD_WRITE: self._write, CMD_LSTAT: self._lstat, CMD_FSTAT: self._fstat,
            CMD_SETSTAT: self._setstat, CMD_FSETSTAT: self._fsetstat, CMD_OPENDIR: self._opendir,
            CMD_READDIR: self._readdir, CMD_REMOVE: self._remove, CMD_MKDIR: self._mkdir,
            CMD_RMDIR: self._rmdir, CMD_REALPATH: self._realpath, CMD_STAT: self._stat,
            CMD_RENAME: self._rename, CMD_READLINK: self._readlink, CMD_SYMLINK: self._symlink,
            CMD_EXTENDED: self._extended,
        }
        self._extensions: dict[str, Callable[[int, Message], None]] = {
            "posix-rename@openssh.com": self._posix_rename,
            "statvfs@openssh.com": self._statvfs,
            "fstatvfs@openssh.com": self._fstatvfs,
            "limits@openssh.com": self._limits,
        }

    # -- packets ----------------------------------------------------------------

    def _read_all(self, n: int) -> bytes:
        # Trap: paramiko's BufferedPipe keeps a channel's unread data in an
        # array and `del`s what each recv takes from its front, a memmove of
        # everything still buffered (up to the 16 MiB window). Reading an SFTP
        # packet as two exact-size recvs made every packet pay that twice: 40%
        # of the process's GIL time under 16 uploads. Taking the whole pipe in
        # one recv (a request larger than what it holds empties it without a
        # move) and slicing packets from our own buffer leaves paramiko one
        # copy per arrival; deleting from a bytearray's front does not move it.
        buf = self._inbuf
        while len(buf) < n:
            chunk = self.sock.recv(max(n - len(buf), self._recv_size))
            if not chunk:
                raise EOFError()
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _read_packet(self) -> tuple[int, bytes]:
        (size,) = struct.unpack(">I", self._read_all(4))
        if size == 0 or size > self.max_request:
            raise SFTPError(f"SFTP packet of {size} bytes refused")
        data = self._read_all(size)
        return data[0], data[1:]

    def _send_server_version(self) -> int:
        t, data = self._read_packet()
        if t != CMD_INIT or len(data) < 4:
            raise SFTPError("expected SFTP INIT")
        msg = Message()
        msg.add_int(SFTP_VERSION)
        for name, version in (("posix-rename@openssh.com", "1"), ("statvfs@openssh.com", "2"),
                              ("fstatvfs@openssh.com", "2"), ("limits@openssh.com", "1")):
            msg.add_string(name)
            msg.add_string(version)
        self._send_packet(CMD_VERSION, msg)
        return struct.unpack(">I", data[:4])[0]

    def start_subsystem(self, name, transport, channel) -> None:
        self.sock = channel
        try:
            self._send_server_version()
            self.server.session_started()
            while True:
                t, data = self._read_packet()
                msg = Message(data)
                request_number = msg.get_int()
                self.session.touch()
                self._process(t, request_number, msg)
        except EOFError:
            return
        except (OSError, SFTPError) as exc:
            log.info("SFTP session of %r from %s ended: %s", self.session.username,
                     self.session.ip, exc)

    def finish_subsystem(self) -> None:
        # Trap: paramiko's finish_subsystem closes every handle still open as if
        # the client had closed it. A handle still open here belongs to a client
        # that went away mid-transfer: abort it so the old version stays.
        for handle in list(self.file_table.values()):
            try:
                handle.abort()
            except Exception:
                log.exception("aborting an open handle failed")
        for handle in list(self.folder_table.values()):
            handle.close()
        self.budget.release(self.session.username, len(self.file_table) + len(self.folder_table))
        self.file_table.clear()
        self.folder_table.clear()
        self._send_exit_status()
        super().finish_subsystem()

    def _send_exit_status(self) -> None:
        """OpenSSH scp exits 1 without an exit-status; PuTTY aborts if it comes after its close."""
        channel = self.sock
        with channel.lock:
            if not channel.active or channel.closed:
                return
            try:
                channel.send_exit_status(0)
            except (OSError, EOFError):
                pass

    def _process(self, t: int, request_number: int, msg: Message) -> None:
        handler = self._handlers.get(t)
        try:
            if handler is None:
                raise SFTPStatus(SFTP_OP_UNSUPPORTED, f"request type {t} is not supported")
            handler(request_number, msg)
        except (EOFError, OSError):
            raise
        except Exception as exc:   # includes a malformed request or a bug: answer, keep serving
            self._send_status(request_number, *status_for(exc))

    def _send_status(self, request_number: int, code: int, desc: str | None = None) -> None:
        super()._send_status(request_number, code, desc if desc is not None else "")

    def _ok(self, request_number: int) -> None:
        self._send_status(request_number, SFTP_OK, "OK")

    def _send_attrs(self, request_number: int, attr: SFTPAttributes) -> None:
        self._response(request_number, CMD_ATTRS, attr)

    def _file(self, msg: Message) -> FileHandle:
        handle = self.file_table.get(msg.get_binary())
        if handle is None:
            raise SFTPStatus(SFTP_FAILURE, "invalid handle")
        return handle

    def _register(self, request_number: int, handle: SFTPHandle, folder: bool) -> None:
        self._send_handle_response(request_number, handle, folder)

    def _check_handle_limit(self) -> None:
        if len(self.file_table) + len(self.folder_table) >= self.max_handles:
            raise SFTPStatus(SFTP_FAILURE, f"too many open handles (limit {self.max_handles})")

    def _open_budgeted(self, request_number: int, folder: bool, open_handle: Callable[[], SFTPHandle]) -> None:
        """Open and register a handle within the session's limit and the user's and process's budget."""
        self._check_handle_limit()
        user = self.session.username
        if not self.budget.acquire(user):
            log.info("refusing another handle for %r from %s: open-file budget spent", user,
                     self.session.ip)
            raise SFTPStatus(SFTP_FAILURE, "too many open files")
        try:
            handle = open_handle()
        except BaseException:
            self.budget.release(user)
            raise
        self._register(request_number, handle, folder)

    def _release_budget(self) -> None:
        self.budget.release(self.session.username)

    # -- requests ------------------------------------------------------------------

    def _open(self, request_number: int, msg: Message) -> None:
        path, pflags = msg.get_string(), msg.get_int()
        attr = SFTPAttributes._from_msg(msg)
        self._open_budgeted(request_number, False, lambda: self.server.open(path, pflags, attr))

    def _close(self, request_number: int, msg: Message) -> None:
        key = msg.get_binary()
        if key in self.folder_table:
            handle = self.folder_table.pop(key)
            self._release_budget()
            handle.close()
        elif key in self.file_table:
            handle = self.file_table.pop(key)
            self._release_budget()
            # Trap: paramiko answers OK whatever close() does; here a failed
            # commit raises and the client gets the error.
            handle.close()
        else:
            raise SFTPStatus(SFTP_FAILURE, "invalid handle")
        self._ok(request_number)

    def _read(self, request_number: int, msg: Message) -> None:
        handle = self._file(msg)
        offset, length = msg.get_int64(), msg.get_int()
        length = min(length, self.max_length)
        with self._moving(handle, length):
            data = handle.read(offset, length)
            if not data:
                self._send_status(request_number, SFTP_EOF, "end of file")
            else:
                self._response(request_number, CMD_DATA, data)

    def _write(self, request_number: int, msg: Message) -> None:
        handle = self._file(msg)
        offset, data = msg.get_int64(), msg.get_binary()
        with self._moving(handle, len(data)):
            handle.write(offset, data)
        self._ok(request_number)

    def _moving(self, handle: FileHandle, size: int) -> AbstractContextManager:
        """The fairness gate for a read or write of `size` bytes: only once the handle is a bulk transfer.

        A small file's few packets stay interactive, like a WebDAV request;
        rationing them made p99 of 64 mixed clients 6.5 s instead of 0.8 s.
        """
        moved = handle.moved = handle.moved + size
        return self.fairness.bulk() if moved > BULK_AFTER else nullcontext()

    def _stat(self, request_number: int, msg: Message) -> None:
        self._send_attrs(request_number, self.server.stat(msg.get_string()))

    def _lstat(self, request_number: int, msg: Message) -> None:
        self._send_attrs(request_number, self.server.lstat(msg.get_string()))

    def _fstat(self, request_number: int, msg: Message) -> None:
        self._send_attrs(request_number, self._file(msg).stat())

    def _setstat(self, request_number: int, msg: Message) -> None:
        path = msg.get_string()
        self.server.chattr(path, SFTPAttributes._from_msg(msg))
        self._ok(request_number)

    def _fsetstat(self, request_number: int, msg: Message) -> None:
        handle = self._file(msg)
        handle.set_attributes(SFTPAttributes._from_msg(msg))
        self._ok(request_number)

    def _opendir(self, request_number: int, msg: Message) -> None:
        path = msg.get_string()
        self._open_budgeted(request_number, True, lambda: self.server.list_folder(path))

    def _readdir(self, request_number: int, msg: Message) -> None:
        folder = self.folder_table.get(msg.get_binary())
        if folder is None:
            raise SFTPStatus(SFTP_FAILURE, "invalid handle")
        names = []
        for entry in folder.next_batch():
            try:
                names.append((entry.name.encode("utf-8"), attributes(entry)))
            except UnicodeEncodeError:
                continue   # not valid UTF-8 on disk: no client could address it
        if not names:
            self._send_status(request_number, SFTP_EOF, "end of directory")
            return
        out = Message()
        out.add_int(request_number)
        out.add_int(len(names))
        for name, attr in names:
            out.add_string(name)
            out.add_string(str(attr))
            attr._pack(out)
        self._send_packet(CMD_NAME, out)

    def _remove(self, request_number: int, msg: Message) -> None:
        self.server.remove(msg.get_string())
        self._ok(request_number)

    def _rename(self, request_number: int, msg: Message) -> None:
        old, new = msg.get_string(), msg.get_string()
        self.server.rename(old, new)
        self._ok(request_number)

    def _mkdir(self, request_number: int, msg: Message) -> None:
        path = msg.get_string()
        self.server.mkdir(path, SFTPAttributes._from_msg(msg))
        self._ok(request_number)

    def _rmdir(self, request_number: int, msg: Message) -> None:
        self.server.rmdir(msg.get_string())
        self._ok(request_number)

    def _realpath(self, request_number: int, msg: Message) -> None:
        path = self.server.canonicalize(msg.get_string())
        self._response(request_number, CMD_NAME, 1, path, path, SFTPAttributes())

    def _readlink(self, request_number: int, msg: Message) -> None:
        self.server.readlink(msg.get_string())

    def _symlink(self, request_number: int, msg: Message) -> None:
        target, path = msg.get_string(), msg.get_string()
        self.server.symlink(target, path)

    def _extended(self, request_number: int, msg: Message) -> None:
        name = msg.get_string().decode("utf-8", "replace")
        handler = self._extensions.get(name)
        if handler is None:
            raise SFTPStatus(SFTP_OP_UNSUPPORTED, f"extension '{name}' is not supported")
        handler(request_number, msg)

    def _posix_rename(self, request_number: int, msg: Message) -> None:
        old, new = msg.get_string(), msg.get_string()
        self.server.posix_rename(old, new)
        self._ok(request_number)

    def _reply_uint64s(self, request_number: int, values: tuple[int, ...]) -> None:
        out = Message()
        out.add_int(request_number)
        for value in values:
            out.add_int64(value)
        self._send_packet(CMD_EXTENDED_REPLY, out)

    def _statvfs(self, request_number: int, msg: Message) -> None:
        self.server.stat(msg.get_string())
        self._reply_uint64s(request_number, self.server.statvfs())

    def _fstatvfs(self, request_number: int, msg: Message) -> None:
        self._file(msg)
        self._reply_uint64s(request_number, self.server.statvfs())

    def _limits(self, request_number: int, msg: Message) -> None:
        # max packet, max read, max write, max open handles: OpenSSH sizes its
        # requests from these instead of its 32 KiB default.
        length = self.max_length - 1024
        self._reply_uint64s(request_number, (self.max_length, length, length, self.max_handles))
