"""The wsgidav provider over UserFS: every request sees only its own user's tree.

Resources carry the Entry they were built from, so a PROPFIND of a folder costs
one listing, not one stat per child. Gateway errors become HTTP statuses in one
table (`_STATUS`), following the error table in DESIGN.md.
"""
from __future__ import annotations

import contextlib
import email.utils
import fnmatch
import logging
import math
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO
from urllib.parse import quote, unquote, urlparse

from wsgidav.dav_error import PRECONDITION_CODE_LockConflict, DAVError
from wsgidav.dav_provider import DAVCollection, DAVNonCollection, DAVProvider
from wsgidav.xml_tools import etree

from .. import paths
from ..errors import (AlreadyExists, BackendUnavailable, DirectoryNotEmpty, GatewayError,
                      InvalidPath, IsADirectory, NotADirectory, NotFound, PermissionDenied,
                      QuotaExceeded, Unsupported)
from ..vfs import Entry, Upload, UserFS
from . import propfind
from .error_page import UNEXPECTED_ERROR
from .http import DOWNLOAD

log = logging.getLogger(__name__)

# The one mapping of the error tree to HTTP (DESIGN.md). Per-method entries
# override the default where RFC 4918 asks for a different code.
_STATUS: dict[type[GatewayError], int] = {
    NotFound: 404,
    PermissionDenied: 403,
    AlreadyExists: 405,
    DirectoryNotEmpty: 409,
    NotADirectory: 409,
    IsADirectory: 405,
    InvalidPath: 400,
    QuotaExceeded: 507,
    Unsupported: 501,
    BackendUnavailable: 503,
}
_METHOD_STATUS: dict[tuple[str, type[GatewayError]], int] = {
    ("PUT", NotFound): 409,          # missing parent
    ("MKCOL", NotFound): 409,
    ("COPY", NotFound): 409,
    ("COPY", AlreadyExists): 412,    # Overwrite: F
    ("MOVE", AlreadyExists): 412,
    ("PROPPATCH", Unsupported): 403,
}

WIN32_LASTMOD = "{urn:schemas-microsoft-com:}Win32LastModifiedTime"
# Windows sets these after every copy; accepting them (and storing nothing)
# is what keeps Explorer from reporting the copy as failed.
_WIN32_IGNORED = ("{urn:schemas-microsoft-com:}Win32FileAttributes",
                  "{urn:schemas-microsoft-com:}Win32CreationTime",
                  "{urn:schemas-microsoft-com:}Win32LastAccessTime")
_QUOTA_PROPS = ("{DAV:}quota-used-bytes", "{DAV:}quota-available-bytes")
MACOS_PATTERNS = ("._*", ".DS_Store")
_READ_ONLY = frozenset({"GET", "HEAD"})
# environ key: (path, resource) of a GET's or HEAD's last lookup.
_LOOKED_UP = "gateway.looked_up"

# Unlistable names the provider remembers having logged: a bound, so a
# folder of odd names cannot grow that memory without end.
_UNNAMEABLE_LOG_MAX = 10_000

# Client-set modification times must fit every place a time goes: SFTP v3
# carries mtime as an unsigned 32-bit number, and LocalBackend hands
# nanoseconds to utime (int64). Times before 1970 are refused for the same reason.
MAX_CLIENT_MTIME = 2**32 - 1

# Security (stored XSS): files are other users' content on our origin, and
# browsers resend Basic credentials to it. Every file response forbids type
# sniffing and runs in a sandbox (no script, unique origin); types a browser
# would render as an active document are downloaded instead of shown.
_FILE_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", "sandbox")]
_ACTIVE_EXTENSIONS = frozenset({".html", ".htm", ".shtml", ".xhtml", ".xht", ".svg", ".svgz",
                                ".xml", ".xsl", ".xslt", ".js", ".mjs"})
_ACTIVE_TYPES = frozenset({"text/html", "image/svg+xml", "application/xml", "text/xml",
                           "text/xsl", "application/xhtml+xml"})
# RFC 5987 attr-char: what filename*= may carry unencoded.
_ATTR_CHARS = "!#$&+-.^_`|~"


def dav_error(exc: GatewayError, method: str) -> DAVError:
    """Translate one gateway error into the DAVError the request should answer."""
    status = _METHOD_STATUS.get((method, type(exc)))
    if status is None:
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 500)
    return DAVError(status, context_info=exc.message)


def is_macos_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MACOS_PATTERNS)


def parse_client_mtime(text: str) -> float:
    """Seconds since the epoch from `X-OC-Mtime` (Nextcloud and rclone send whole seconds).

    Raises:
        DAVError: 400 for anything but a finite number from 0 to MAX_CLIENT_MTIME.
    """
    try:
        mtime = float(text.strip())
    except ValueError:
        mtime = math.nan
    if not 0 <= mtime <= MAX_CLIENT_MTIME:   # also false for nan
        raise DAVError(400, context_info=f"X-OC-Mtime must be a Unix time in seconds from 0 "
                                         f"to {MAX_CLIENT_MTIME}; nothing was stored")
    return mtime


def is_active_content(path: str, content_type: str) -> bool:
    """True for what a browser would run as a document or script (HTML, SVG, XML, JavaScript)."""
    media = content_type.partition(";")[0].strip().lower()
    return (posixpath.splitext(path)[1].lower() in _ACTIVE_EXTENSIONS or media in _ACTIVE_TYPES
            or media.endswith("+xml") or "javascript" in media or "ecmascript" in media
            or "xhtml" in media)


def attachment_disposition(name: str) -> str:
    """`Content-Disposition: attachment` naming the file as RFC 6266 says.

    An ASCII `filename` for old clients (non-ASCII characters become "_")
    and, when the name is not plain ASCII, `filename*=UTF-8''...` for the rest.
    """
    ascii_name = "".join(c if " " <= c < "\x7f" else "_" for c in name)
    quoted = ascii_name.replace("\\", "\\\\").replace('"', '\\"')
    value = f'attachment; filename="{quoted}"'
    if ascii_name != name:
        value += "; filename*=UTF-8''" + quote(name, safe=_ATTR_CHARS)
    return value


def parse_http_date(text: str) -> float:
    """Seconds since the epoch from an RFC 1123 date (getlastmodified, Win32LastModifiedTime).

    Raises:
        DAVError: 400 when the text is not a date.
    """
    try:
        return email.utils.parsedate_to_datetime(text.strip()).timestamp()
    except (TypeError, ValueError, AttributeError):
        raise DAVError(400, context_info=f"not an HTTP date: {text!r}") from None


class _BodyWriter:
    """What wsgidav's PUT writes the request body into: one UserFS upload, bytes counted."""

    def __init__(self, upload: Upload, method: str, environ: dict) -> None:
        self.upload = upload
        self.written = 0
        self._method = method
        self._environ = environ

    def write(self, data: bytes) -> None:
        try:
            self.upload.write(data)
        except GatewayError as exc:
            raise dav_error(exc, self._method) from None
        self.written += len(data)

    def writelines(self, stream: Iterator[bytes]) -> None:
        """wsgidav hands over its body stream here: a plain-HTTP body skips it (http.py, body.py).

        The body then comes from the socket into one reused buffer, written
        block by block through the upload (quota, revocation and counts as
        for any write; backends copy what they keep). The stream is drained
        afterwards: it reads nothing more, and marks the input as consumed.
        """
        body = self._environ.get("wsgi.input")
        if getattr(body, "direct", False):
            block = max(int(self._environ.get("wsgidav.config", {}).get("block_size") or 0), 65536)
            view = memoryview(bytearray(block))
            while count := body.readinto(view):
                self.write(view[:count])
        for data in stream:
            self.write(data)

    def close(self) -> None:
        # wsgidav calls close() only on success; commit or abort is end_write's job.
        return None


class _Resource:
    """What files and folders share: the session's UserFS, the virtual path and the entry."""

    environ: dict
    path: str
    is_collection: bool
    provider: "UserFSProvider"

    def _setup(self, fs: UserFS, vpath: str, entry: Entry | None) -> None:
        self.fs = fs
        self.vpath = vpath
        self.entry = entry

    @property
    def method(self) -> str:
        return self.environ.get("REQUEST_METHOD", "")

    @contextmanager
    def mapped(self) -> Iterator[None]:
        try:
            yield
        except GatewayError as exc:
            raise dav_error(exc, self.method) from None
        except Exception as exc:
            # wsgidav turns some exceptions into a 500 or a multistatus entry
            # without logging them: keep it for the error log (error_page.py).
            self.environ.setdefault(UNEXPECTED_ERROR, exc)
            raise

    # -- identity: locks and dead properties are keyed by this ----------------

    def get_ref_url(self) -> str:
        # The storage location, not the URL: users who share a mount see each
        # other's locks, and two users' own /a.txt are two resources.
        return self.provider.ref_url(self.fs, self.vpath)

    # -- live properties --------------------------------------------------------

    def get_creation_date(self) -> float | None:
        return None

    def get_display_name(self) -> str:
        return self.name

    def get_last_modified(self) -> float | None:
        return self.entry.mtime if self.entry else None

    def get_used_bytes(self) -> int | None:
        return self._usage()[0] if self.is_collection else None

    def get_available_bytes(self) -> int | None:
        return self._usage()[1] if self.is_collection else None

    def _usage(self) -> tuple[int | None, int | None]:
        cached = self.environ.get("gateway.usage")
        if cached is None:
            try:
                usage = self.fs.usage()
                cached = (usage.used_bytes, usage.free_bytes)
            except GatewayError:
                cached = (None, None)
            self.environ["gateway.usage"] = cached
        return cached

    def get_property_names(self, *, is_allprop: bool) -> list[str]:
        names = super().get_property_names(is_allprop=is_allprop)  # type: ignore[misc]
        if is_allprop:
            # RFC 4331: quota properties are not part of allprop (they cost a scan).
            names = [n for n in names if n not in _QUOTA_PROPS]
        return names

    def set_property_value(self, name: str, value, *, dry_run: bool = False):
        if name in (WIN32_LASTMOD, "{DAV:}getlastmodified"):
            if value is None:
                return True
            return self.set_last_modified(self.path, value.text or "", dry_run=dry_run)
        if name in _WIN32_IGNORED:
            return True
        if not name.startswith("{DAV:}"):
            # A dead property: wsgidav would store it for anyone who can read.
            with self.mapped():
                self.fs.check_change(self.vpath)
            if value is not None:
                self._check_property_room(name, value)
        return super().set_property_value(name, value, dry_run=dry_run)  # type: ignore[misc]

    def _check_property_room(self, name: str, value) -> None:
        """507 (RFC 4918 9.2.1: no room for the property) past the size or count limit."""
        provider = self.provider
        size = len(etree.tostring(value))
        if size > provider.max_property_bytes:
            raise DAVError(507, context_info=f"property {name} is {size} bytes; at most "
                                             f"{provider.max_property_bytes} bytes are kept per property")
        # Names this request sets count before they are stored: PROPPATCH tries
        # every property (dry run) before it writes any.
        pending = self.environ.setdefault("gateway.properties_set", set())
        pending.add(name)
        stored = set(provider.prop_manager.get_properties(self.get_ref_url(), self.environ)) \
            if provider.prop_manager else set()
        if len(stored | pending) > provider.max_properties:
            raise DAVError(507, context_info=f"at most {provider.max_properties} dead properties "
                                             f"are kept per resource")

    # -- locking ------------------------------------------------------------------

    def prevent_locking(self) -> bool:
        # wsgidav asks this before it locks an existing resource (and when it lists
        # live properties). A lock keeps everyone else from writing, so it needs
        # the right to write; a LOCK that creates a file needs `upload` instead.
        if self.method == "LOCK":
            with self.mapped():
                self.fs.check_change(self.vpath)
        return False

    def set_last_modified(self, dest_path: str, time_stamp, *, dry_run: bool) -> bool:
        mtime = float(time_stamp) if isinstance(time_stamp, (int, float)) else parse_http_date(time_stamp)
        if not 0 <= mtime <= MAX_CLIENT_MTIME:
            raise DAVError(400, context_info=f"modification time out of range: {time_stamp!r}")
        with self.mapped():
            self.fs.set_mtime(self.provider.to_vpath(dest_path), mtime, dry_run=dry_run)
        return True

    # -- removal, copy, move ---------------------------------------------------

    def get_descendants(self, *, collections: bool = True, resources: bool = True,
                        depth_first: bool = False, depth: str = "infinity",
                        add_self: bool = False) -> list[_Resource]:
        """wsgidav's tree listing (DELETE, COPY, MOVE), in its order, without recursion.

        wsgidav's own version recurses once per level: 1,101 nested folders made
        DELETE and MOVE answer 500 (RecursionError). `depth_first` lists a
        folder after its contents, else before them.
        """
        assert depth in ("0", "1", "infinity")

        def wanted(res) -> bool:
            return (collections and res.is_collection) or (resources and not res.is_collection)

        found: list[_Resource] = []
        if add_self and not depth_first:
            found.append(self)
        if depth != "0" and self.is_collection:
            done = object()
            # One (folder, its members still to visit) per level below self.
            stack = [(self, iter(self.get_member_list()))]
            while stack:
                parent, members = stack[-1]
                child = next(members, done)
                if child is done:
                    stack.pop()
                    if depth_first and parent is not self and wanted(parent):
                        found.append(parent)
                    continue
                if not depth_first and wanted(child):
                    found.append(child)
                if child.is_collection and depth == "infinity":
                    stack.append((child, iter(child.get_member_list())))
                elif depth_first and wanted(child):
                    found.append(child)
        if add_self and depth_first:
            found.append(self)
        return found

    @contextmanager
    def _done_already(self, what: str) -> Iterator[None]:
        """State-store bookkeeping after storage made a change: a store failure is logged, not answered.

        The change happened; answering 5xx would have the client retry or
        report a failure of something that succeeded.
        """
        try:
            yield
        except BackendUnavailable as exc:
            log.warning("%s of %r done, but its locks and properties were not updated: %s",
                        what, self.vpath, exc)

    def _forget(self) -> None:
        """Drop the dead properties and locks of this resource and everything below it."""
        ref = self.get_ref_url()
        with self._done_already("delete"):
            if self.provider.prop_manager:
                self.provider.prop_manager.remove_properties(ref, self.environ, recursive=True)
            if self.provider.lock_manager:
                self.provider.lock_manager.remove_all_locks_from_url(ref, recursive=True)

    def delete(self) -> None:
        with self.mapped():
            self.fs.remove_tree(self.vpath)
        self._forget()

    def handle_copy(self, dest_path: str, *, depth_infinity: bool) -> bool:
        self._check_destination(dest_path)
        return False  # wsgidav carries on: clears the destination, then copies

    def handle_move(self, dest_path: str) -> bool | list:
        self._check_destination(dest_path)
        if self.is_collection or not self._is_file(dest_path):
            return False
        # A file over a file: one atomic rename. wsgidav would DELETE the
        # destination first, and a failure between the two (storage or store
        # down, a killed worker) would lose the destination's acknowledged version.
        return self._move(dest_path, replaced=True)

    def _is_file(self, dest_path: str) -> bool:
        with self.mapped():
            try:
                return not self.fs.stat(self.provider.to_vpath(dest_path)).is_dir
            except NotFound:
                return False

    def _check_destination(self, dest_path: str) -> None:
        # wsgidav deletes an existing destination (Overwrite: T) before it copies
        # or moves: refuse a destination that must never be replaced before that.
        with self.mapped():
            self.fs.check_replace(self.provider.to_vpath(dest_path))

    def support_recursive_move(self, dest_path: str) -> bool:
        # Also asked of files: the base class asserts is_collection (a 500 on a file MOVE).
        return True

    def move_recursive(self, dest_path: str) -> list:
        return self._move(dest_path, replaced=False)

    def _move(self, dest_path: str, *, replaced: bool) -> list:
        """Rename to `dest_path`, then carry the dead properties along; `replaced`: a file was there."""
        dest = self.provider.to_vpath(dest_path)
        with self.mapped():
            self.fs.rename(self.vpath, dest, overwrite=True)
        with self._done_already("move"):
            dest_ref = self.provider.ref_url(self.fs, dest)
            if replaced:
                # What the DELETE of the destination would have dropped: its properties and locks.
                if self.provider.prop_manager:
                    self.provider.prop_manager.remove_properties(dest_ref, self.environ)
                if self.provider.lock_manager:
                    self.provider.lock_manager.remove_all_locks_from_url(dest_ref, recursive=False)
            if self.provider.prop_manager:
                self.provider.prop_manager.move_properties(self.get_ref_url(), dest_ref, True, self.environ)
            if self.provider.lock_manager:
                # RFC 4918 9.9.4: a lock is not moved with the resource.
                self.provider.lock_manager.remove_all_locks_from_url(self.get_ref_url(), recursive=True)
        return []

    def copy_move_single(self, dest_path: str, *, is_move: bool) -> None:
        if not is_move and self.environ.get("HTTP_DEPTH") == "0" \
                and self.provider.to_vpath(self.environ["PATH_INFO"]) != self.vpath:
            return  # wsgidav lists the whole tree even for a Depth: 0 COPY
        dest = self.provider.to_vpath(dest_path)
        with self.mapped():
            if self.is_collection:
                try:
                    self.fs.make_dir(dest)
                except AlreadyExists:
                    pass
            else:
                self.fs.copy_file(self.vpath, dest)
        with self._done_already("copy"):
            if self.provider.prop_manager:
                self.provider.prop_manager.copy_properties(
                    self.get_ref_url(), self.provider.ref_url(self.fs, dest), self.environ)


class FileResource(_Resource, DAVNonCollection):
    """A file; `entry` is None for a PUT target that does not exist until its upload commits."""

    def __init__(self, path: str, environ: dict, fs: UserFS, vpath: str, entry: Entry | None) -> None:
        DAVNonCollection.__init__(self, path, environ)
        self._setup(fs, vpath, entry)
        self._writer: _BodyWriter | None = None

    def get_content_length(self) -> int:
        return self.entry.size if self.entry else 0

    def get_etag(self) -> str | None:
        if self.entry is None:
            return None
        return self.entry.etag or f"{self.entry.size:x}-{int(self.entry.mtime * 1000):x}"

    def support_etag(self) -> bool:
        return True

    def support_ranges(self) -> bool:
        # wsgidav opens the content and seeks to the range start.
        return True

    def get_content(self) -> BinaryIO:
        with self.mapped():
            stream = self.fs.open_read(self.vpath)
        # The HTTP layer may send the rest of a GET's body from it zero-copy (http.py).
        self.environ[DOWNLOAD] = stream
        return stream

    def begin_write(self, *, content_type: str | None = None) -> _BodyWriter:
        with self.mapped():
            upload = self.fs.open_write(self.vpath)
        self._writer = _BodyWriter(upload, self.method, self.environ)
        return self._writer

    def _expected_length(self) -> int | None:
        environ = self.environ
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            # macOS Finder streams chunked and states the real size here.
            text = environ.get("HTTP_X_EXPECTED_ENTITY_LENGTH", "")
        else:
            text = environ.get("CONTENT_LENGTH", "")
        return int(text) if text.strip().isdigit() else None

    def end_write(self, *, with_errors: bool) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        expected = self._expected_length()
        if with_errors or (expected is not None and writer.written != expected):
            # A client that closes early looks like a clean end of body to
            # wsgidav: count, and never commit a truncated file.
            writer.upload.abort()
            if with_errors:
                return
            raise DAVError(400, context_info=f"request body ended after {writer.written} "
                                             f"of {expected} bytes; nothing was stored")
        with self.mapped():
            self.entry = writer.upload.commit()
        self._apply_client_mtime()

    def _apply_client_mtime(self) -> None:
        text = self.environ.get("HTTP_X_OC_MTIME", "").strip()
        if not text:
            return
        mtime = parse_client_mtime(text)   # checked before the body was read
        try:
            self.fs.set_mtime(self.vpath, mtime)
        except GatewayError as exc:
            # The content is stored; a refused time is not worth failing the PUT for.
            log.info("X-OC-Mtime on %r not applied: %s", self.vpath, exc)
            return
        self.environ["gateway.mtime_accepted"] = True
        with self.mapped():
            self.entry = self.fs.stat(self.vpath)


class FolderResource(_Resource, DAVCollection):
    """A folder, listed once per request."""

    def __init__(self, path: str, environ: dict, fs: UserFS, vpath: str, entry: Entry | None) -> None:
        DAVCollection.__init__(self, path, environ)
        self._setup(fs, vpath, entry)

    def get_etag(self) -> None:
        return None

    def support_etag(self) -> bool:
        return False

    def _entries(self) -> list[Entry]:
        """The folder's members that a request path can name, sorted by name.

        A name made outside the gateway (an S3 tool, another process) that
        no request could carry, such as one with a backslash or a control
        character, is left out and logged once, as S3 listings leave out
        "//", "." and ".." keys: one such name must not make the whole
        folder unlistable (wsgidav answers 400 for any member it cannot name).
        """
        with self.mapped():
            entries = list(self.fs.list_dir(self.vpath))
        if self.provider.macos_files != "allow":
            entries = [e for e in entries if not is_macos_name(e.name)]
        base = self.vpath.rstrip("/") + "/"
        return sorted((e for e in entries if self.provider.nameable(e.name, base + e.name, self.get_ref_url())),
                      key=lambda e: e.name)

    def _child_path(self, name: str) -> str:
        return self.path.rstrip("/") + "/" + name

    def get_member_names(self) -> list[str]:
        return [e.name for e in self._entries()]

    def get_member_list(self) -> list[_Resource]:
        return [self.provider.make_resource(self._child_path(e.name), self.environ, self.fs,
                                            self.provider.to_vpath(self._child_path(e.name)), e)
                for e in self._entries()]

    def get_member(self, name: str) -> _Resource | None:
        return self.provider.get_resource_inst(self._child_path(name), self.environ)

    def create_empty_resource(self, name: str) -> FileResource:
        path = self._child_path(name)
        vpath = self.provider.to_vpath(path)
        res = FileResource(path, self.environ, self.fs, vpath, None)
        if self.method != "PUT":
            # LOCK on an unmapped URL creates an empty file (RFC 4918 7.3);
            # a PUT target appears only when its upload commits.
            with self.mapped():
                res.entry = self.fs.create_file(vpath)
            # Taken back if the LOCK then fails (a conflict, a limit, the store down).
            self.environ["gateway.created"] = (self.fs, vpath, res.entry)
        return res

    def create_collection(self, name: str) -> None:
        with self.mapped():
            self.fs.make_dir(self.provider.to_vpath(self._child_path(name)))

    def support_recursive_delete(self) -> bool:
        return True


class _AnonymousRoot(DAVCollection):
    """Stands in for any path on an OPTIONS request without credentials (Windows asks first)."""

    def get_member_names(self) -> list[str]:
        return []


class UserFSProvider(DAVProvider):
    """Maps request paths to the authenticated user's UserFS."""

    # PROPFIND at Depth 0 and 1 through propfind.py (False: wsgidav answers every one).
    fast_propfind = True

    def __init__(self, open_fs, macos_files: str = "allow", *, max_properties: int = 100,
                 max_property_bytes: int = 64 * 1024) -> None:
        super().__init__()
        self._open_fs = open_fs
        self.macos_files = macos_files
        self.max_properties = max_properties
        self.max_property_bytes = max_property_bytes
        # Storage locations of names left out of listings, each logged once (see nameable).
        self._unnameable_logged: set[str] = set()
        # The request this thread serves: wsgidav turns lock roots back into
        # paths (ref_url_to_path) without passing the request along.
        self._request = threading.local()

    def __repr__(self) -> str:
        return "UserFSProvider"

    def is_readonly(self) -> bool:
        return False

    @staticmethod
    def to_vpath(path: str) -> str:
        """The UserFS path for a wsgidav path (already URL-decoded).

        Raises:
            DAVError: 400 for a path the normalizer refuses.
        """
        try:
            return UserFS.normalize(path)
        except InvalidPath as exc:
            raise DAVError(400, context_info=exc.message) from None

    @staticmethod
    def ref_url(fs: UserFS, vpath: str) -> str:
        """The key of a resource's locks and dead properties: "/BACKEND/storage/path", quoted."""
        backend, path = fs.locate(vpath)
        return "/" + quote(backend, safe="") + (quote(path) if path != "/" else "")

    def ref_url_to_path(self, ref_url: str) -> str:
        """The current user's path for a key (a lock root), or the nearest one they see."""
        backend, _, rest = ref_url.lstrip("/").partition("/")
        environ = getattr(self._request, "environ", None)
        fs = self.fs_for(environ) if environ is not None else None
        if fs is None:
            return "/"
        return fs.virtual_path(unquote(backend), "/" + unquote(rest)) or "/"

    def nameable(self, name: str, vpath: str, folder_ref: str) -> bool:
        """True when a member `name` (at `vpath`) can be named by a request path; else log it once.

        Logged once per storage location (`folder_ref` is the folder's ref
        URL), whichever user's listing meets it first.
        """
        try:
            paths.check_name(name, vpath)
        except InvalidPath as exc:
            key = folder_ref.rstrip("/") + "/" + name
            if key not in self._unnameable_logged and len(self._unnameable_logged) < _UNNAMEABLE_LOG_MAX:
                self._unnameable_logged.add(key)
                log.warning("WebDAV listings leave out %r (at %r): %s", name, unquote(folder_ref), exc.message)
            return False
        return True

    def fs_for(self, environ: dict) -> UserFS | None:
        fs = environ.get("gateway.fs")
        if fs is None and environ.get("gateway.user") is not None:
            fs = self._open_fs(environ["gateway.user"], environ.get("REMOTE_ADDR", ""))
            environ["gateway.fs"] = fs
        return fs

    def make_resource(self, path: str, environ: dict, fs: UserFS, vpath: str, entry: Entry) -> _Resource:
        cls = FolderResource if entry.is_dir else FileResource
        return cls(path, environ, fs, vpath, entry)

    def get_resource_inst(self, path: str | None, environ: dict):
        if environ.get("REQUEST_METHOD") not in _READ_ONLY:
            return self._resource(path, environ)
        # A GET or HEAD looks its path up twice (the folder browser, then the
        # handler) and changes nothing in between: the second lookup reuses the first.
        known = environ.get(_LOOKED_UP)
        if known is not None and known[0] == path:
            return known[1]
        resource = self._resource(path, environ)
        environ[_LOOKED_UP] = (path, resource)
        return resource

    def _resource(self, path: str | None, environ: dict):
        if path is None:
            return None   # wsgidav asks for the parent of "/" (DELETE, COPY, MOVE, LOCK)
        fs = self.fs_for(environ)
        if fs is None:
            if environ.get("REQUEST_METHOD") == "OPTIONS":
                return _AnonymousRoot(path, environ)
            raise DAVError(401)
        vpath = self.to_vpath(path)
        try:
            entry = fs.stat(vpath)
        except (NotFound, NotADirectory):
            return None
        except GatewayError as exc:
            raise dav_error(exc, environ.get("REQUEST_METHOD", "")) from None
        return self.make_resource(path, environ, fs, vpath, entry)

    def custom_request_handler(self, environ: dict, start_response, default_handler):
        # wsgidav's own refusal of Depth: infinity (403 + propfind-finite-depth):
        # a whole-tree PROPFIND is a denial of service on a large share.
        default_handler.__self__.allow_propfind_infinite = False
        method = environ.get("REQUEST_METHOD")
        self._refuse_root_change(environ, method)
        if method in ("GET", "HEAD"):
            # Folders never get here: the dir browser answers GET/HEAD on them.
            start_response = _file_response(environ, start_response)
            if self._not_modified_since(environ):
                start_response("304 Not Modified", [("Content-Length", "0")])
                return [b""]
        if method == "PUT" and environ.get("HTTP_X_OC_MTIME", "").strip():
            # Before the body is read: a refused time stores nothing (Nextcloud
            # answers 400 too, but only after storing the file).
            parse_client_mtime(environ["HTTP_X_OC_MTIME"])
        if environ.get("HTTP_X_OC_MTIME"):
            start_response = _mtime_acknowledging(environ, start_response)
        self._request.environ = environ
        storage = getattr(self.lock_manager, "storage", None)
        scope = storage.request_scope() if hasattr(storage, "request_scope") else contextlib.nullcontext()
        try:
            with scope, self._undone_on_failure(environ):
                if method == "PROPFIND":
                    if self.fast_propfind:
                        answered = propfind.answer(self, environ, start_response)
                        if answered is not None:
                            return answered
                    propfind.propname_for_wsgidav(environ)
                return default_handler(environ, start_response)
        except GatewayError as exc:
            # Raised where wsgidav calls the state store itself (lock checks,
            # properties): a store that is down is a 503, as for storage.
            raise dav_error(exc, method or "") from None
        except DAVError as exc:
            # Lock conflicts name the locks by their keys (storage locations):
            # the client must see its own URLs.
            condition = exc.err_condition
            if condition is not None and condition.condition_code == PRECONDITION_CODE_LockConflict:
                condition.hrefs = [quote(self.ref_url_to_path(href)) for href in condition.hrefs]
            raise
        finally:
            self._request.environ = None

    @staticmethod
    @contextlib.contextmanager
    def _undone_on_failure(environ: dict) -> Iterator[None]:
        """A request that created an empty file (LOCK on a new name) and then failed removes it."""
        try:
            yield
        except BaseException:
            created = environ.pop("gateway.created", None)
            if created is not None:
                fs, vpath, entry = created
                try:
                    fs.undo_create_file(vpath, entry)
                except GatewayError as exc:
                    log.warning("the empty file %r of a failed LOCK stays: %s", vpath, exc)
            raise

    def _refuse_root_change(self, environ: dict, method: str | None) -> None:
        """403 for DELETE of "/" and COPY/MOVE onto "/" (RFC 4918 9.6.1, 9.8.5).

        UserFS refuses these too; answering here keeps wsgidav from asking for
        the parent of "/" or answering 409 ("parent is not a collection").
        """
        if method == "DELETE" and self.to_vpath(environ["PATH_INFO"]) == "/":
            raise DAVError(403, context_info="the root folder cannot be deleted")
        if method in ("COPY", "MOVE") and environ.get("HTTP_DESTINATION"):
            dest = urlparse(unquote(environ["HTTP_DESTINATION"]), allow_fragments=False).path
            if self.to_vpath(dest or "/") == "/":
                raise DAVError(403, context_info="the root folder cannot be replaced")

    def _not_modified_since(self, environ: dict) -> bool:
        """If-Modified-Since alone, compared as RFC 9110 says (wsgidav answers 200 on equal times)."""
        text = environ.get("HTTP_IF_MODIFIED_SINCE")
        if not text or "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ:
            return False
        res = self.get_resource_inst(environ["PATH_INFO"], environ)
        if res is None or res.is_collection or res.get_last_modified() is None:
            return False
        try:
            since = parse_http_date(text)
        except DAVError:
            return False
        return int(res.get_last_modified()) <= since


def _file_response(environ: dict, start_response):
    """Add the file-response security headers (see _FILE_HEADERS) to a GET or HEAD."""
    def wrapped(status, headers, exc_info=None):
        headers = list(headers) + _FILE_HEADERS
        if status.startswith(("2", "304")):
            content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
            path = environ.get("PATH_INFO", "")
            if is_active_content(path, content_type):
                headers.append(("Content-Disposition",
                                attachment_disposition(path.rstrip("/").rpartition("/")[2])))
        return start_response(status, headers, exc_info)
    return wrapped


def _mtime_acknowledging(environ: dict, start_response):
    """Add Nextcloud's `X-OC-MTime: accepted` when the client's mtime was applied."""
    def wrapped(status, headers, exc_info=None):
        if environ.get("gateway.mtime_accepted"):
            headers = list(headers) + [("X-OC-MTime", "accepted")]
        return start_response(status, headers, exc_info)
    return wrapped

