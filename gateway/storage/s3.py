"""S3Backend: files as objects under a prefix of one bucket, over boto3.

Any S3-compatible server works (AWS, MinIO, Ceph, R2, moto). Directories are
marker objects ("dir/") or implied by keys below them; uploads stream into
multipart uploads in bounded memory, random writes and resumes spool locally.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from .. import paths
from ..config import ConfigError
from ..errors import (AlreadyExists, BackendUnavailable, DirectoryNotEmpty, GatewayError,
                      InvalidPath, IsADirectory, NotADirectory, NotFound, PermissionDenied,
                      QuotaExceeded, Unsupported)
from .base import TEMP_PREFIX, Backend, Capabilities, Entry, Upload, Usage, check_rename
from .local import convert_os_error

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB          # S3: every part but the last
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 * GiB          # S3: CopyObject and one UploadPartCopy part
MTIME_KEY = "mtime"              # x-amz-meta-mtime, seconds since the epoch (as rclone)
_READ_SKIP = 256 * 1024          # a forward seek this short reads on instead of a new GET
_DELETE_BATCH = 1000             # DeleteObjects limit

# One table from S3 error codes (or botocore exception names) to the error
# tree, each with the line a person reads. {path}, {bucket}, {endpoint},
# {code} and {detail} are filled in.
_ERROR_TABLE: dict[str, tuple[type[GatewayError], str]] = {
    "NoSuchKey": (NotFound, "'{path}' not found"),
    "404": (NotFound, "'{path}' not found"),
    "NotFound": (NotFound, "'{path}' not found"),
    "NoSuchUpload": (BackendUnavailable, "the upload of '{path}' was aborted on the S3 side"),
    "NoSuchBucket": (BackendUnavailable, "bucket '{bucket}' does not exist at {endpoint}"),
    "AccessDenied": (PermissionDenied, "S3 denied access to '{path}' in bucket '{bucket}' (check the "
                                       "credentials' policy)"),
    "403": (PermissionDenied, "S3 denied access to '{path}' in bucket '{bucket}'"),
    "AllAccessDisabled": (PermissionDenied, "all access to bucket '{bucket}' is disabled"),
    "InvalidAccessKeyId": (BackendUnavailable, "S3 rejected the credentials: unknown access key id "
                                               "({endpoint})"),
    "SignatureDoesNotMatch": (BackendUnavailable, "S3 rejected the credentials: wrong secret access key "
                                                  "({endpoint})"),
    "ExpiredToken": (BackendUnavailable, "S3 rejected the credentials: the session token expired"),
    "InvalidToken": (BackendUnavailable, "S3 rejected the credentials: invalid session token"),
    "NoCredentialsError": (BackendUnavailable, "no S3 credentials found: set access_key_id and "
                                               "secret_access_key or the standard AWS environment"),
    "PartialCredentialsError": (BackendUnavailable, "incomplete S3 credentials: {detail}"),
    "SlowDown": (BackendUnavailable, "S3 is throttling requests (SlowDown) on '{path}'"),
    "ServiceUnavailable": (BackendUnavailable, "S3 is unavailable (ServiceUnavailable) on '{path}'"),
    "InternalError": (BackendUnavailable, "S3 internal error on '{path}'"),
    "RequestTimeout": (BackendUnavailable, "S3 timed out waiting for data of '{path}'"),
    "PreconditionFailed": (BackendUnavailable, "'{path}' changed on S3 while it was being read"),
    "InvalidRange": (BackendUnavailable, "'{path}' changed on S3 while it was being read"),
    "EntityTooLarge": (QuotaExceeded, "'{path}' is larger than S3 accepts"),
    "QuotaExceeded": (QuotaExceeded, "S3 quota exceeded writing '{path}'"),
    "KeyTooLongError": (InvalidPath, "path too long for an S3 key: '{path}'"),
    "InvalidStorageClass": (BackendUnavailable, "S3 refused the configured storage_class"),
    "NotImplemented": (Unsupported, "S3 endpoint {endpoint} does not implement this request for '{path}'"),
    "501": (Unsupported, "S3 endpoint {endpoint} does not implement this request for '{path}'"),
    "EndpointConnectionError": (BackendUnavailable, "cannot reach S3 endpoint {endpoint}"),
    "ConnectTimeoutError": (BackendUnavailable, "cannot reach S3 endpoint {endpoint} (connect timeout)"),
    "ConnectionClosedError": (BackendUnavailable, "S3 endpoint {endpoint} closed the connection"),
    "ReadTimeoutError": (BackendUnavailable, "S3 endpoint {endpoint} stopped answering (read timeout)"),
    "ResponseStreamingError": (BackendUnavailable, "S3 endpoint {endpoint} broke off a transfer of "
                                                   "'{path}'"),
    "IncompleteReadError": (BackendUnavailable, "S3 endpoint {endpoint} broke off a transfer of '{path}'"),
    "ProxyConnectionError": (BackendUnavailable, "cannot reach the proxy for S3 endpoint {endpoint}"),
    "SSLError": (BackendUnavailable, "TLS error talking to S3 endpoint {endpoint}: {detail}"),
}


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""                        # keys are prefix + path without its leading "/"
    endpoint_url: str | None = None         # None: AWS
    region: str | None = None
    access_key_id: str | None = None        # None: the standard boto3 credential chain
    secret_access_key: str | None = None
    session_token: str | None = None
    addressing_style: str = "auto"          # auto | path | virtual
    part_size: int = 8 * MiB
    parts_in_flight: int = 4                # per upload: memory is part_size x (parts_in_flight + 1)
    storage_class: str | None = None        # e.g. STANDARD_IA
    sse: str | None = None                  # AES256 | aws:kms
    sse_kms_key_id: str | None = None
    connect_timeout: float = 5.0
    # Seconds without an answer before a request fails (BackendUnavailable):
    # request_timeout for requests that carry no content (HEAD, List, Delete,
    # folder markers), read_timeout for content going either way (GetObject,
    # PutObject, UploadPart: a large part needs its time), slow_read_timeout for
    # what the server does before it answers at all. A request that timed out
    # is not retried: a frozen server would freeze the next attempt too.
    request_timeout: float = 10.0
    read_timeout: float = 30.0
    slow_read_timeout: float = 300.0        # CopyObject, UploadPartCopy, CompleteMultipartUpload
    # After a timeout, requests fail at once for this many seconds instead of
    # each waiting out its own; then one request at a time tries the server again.
    unanswered_pause: float = 5.0
    max_attempts: int = 3                   # per request, first try included
    max_pool_connections: int = 16
    list_page_size: int = 1000
    # "metadata": listings HEAD each entry to show the mtime clients set (as stat does);
    # "server": listings show S3's LastModified and cost no HEAD (for very large folders).
    listing_mtime: str = "metadata"
    max_copy_size: int = MAX_COPY_SIZE      # larger objects are copied part by part
    spool_dir: Path | None = None           # None: <state_dir>/s3-spool (system temp outside a gateway)
    abandoned_upload_age: float = 86400.0   # sweep aborts multipart uploads older than this

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}: {why}")
        if len(self.bucket) < 3:
            raise bad("bucket", f"expected a bucket name, got {self.bucket!r}")
        if ".." in self.prefix.split("/"):
            raise bad("prefix", "must not contain '..'")
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise bad("addressing_style", f"expected auto, path or virtual, got {self.addressing_style!r}")
        if not MIN_PART_SIZE <= self.part_size <= MAX_COPY_SIZE:
            raise bad("part_size", f"must be between {MIN_PART_SIZE} and {MAX_COPY_SIZE} bytes")
        for key in ("connect_timeout", "request_timeout", "read_timeout", "slow_read_timeout"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be a number of seconds above 0")
        if self.unanswered_pause < 0:
            raise bad("unanswered_pause", "must be 0 or more seconds")
        if self.parts_in_flight < 1 or self.max_attempts < 1 or self.max_pool_connections < 1:
            raise bad("parts_in_flight/max_attempts/max_pool_connections", "must be at least 1")
        if not 1 <= self.list_page_size <= 1000:
            raise bad("list_page_size", "must be between 1 and 1000")
        if not MIN_PART_SIZE <= self.max_copy_size <= MAX_COPY_SIZE:
            raise bad("max_copy_size", f"must be between {MIN_PART_SIZE} and {MAX_COPY_SIZE} bytes")
        if self.listing_mtime not in ("metadata", "server"):
            raise bad("listing_mtime", f"expected metadata or server, got {self.listing_mtime!r}")
        if self.sse not in (None, "AES256", "aws:kms"):
            raise bad("sse", f"expected AES256 or aws:kms, got {self.sse!r}")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise bad("access_key_id", "set both access_key_id and secret_access_key, or neither")


_SLOW_OPERATIONS = frozenset({"copy_object", "upload_part_copy", "complete_multipart_upload"})
_TRANSFER_OPERATIONS = frozenset({"get_object", "put_object", "upload_part"})
# What a server that stopped answering raises: a connection refused fails fast
# and holds no thread, so only these pause the endpoint (see _Answering).
_UNANSWERED = (ReadTimeoutError, ConnectTimeoutError)


def _no_retry_after_timeout(caught_exception: BaseException | None = None, **_kwargs: Any) -> None:
    """botocore `needs-retry` hook, run before its own: a timeout ends the request at once.

    Raising here is the only way to veto botocore's retry; the caller gets the
    timeout as if no retry had been configured. Other errors (5xx, throttling,
    a refused or reset connection) keep the configured attempts.
    """
    if isinstance(caught_exception, _UNANSWERED):
        raise caught_exception


class _Answering:
    """Whether an S3 endpoint answers: after a timeout, requests fail at once for a pause.

    Without it, every thread that reaches a frozen server waits out its own
    timeout, and a frozen S3 holds every WebDAV and SFTP worker, local homes'
    requests included. After the pause one request at a time goes through; the
    first answer of any kind (a 404 too) opens the way for all again.
    """

    def __init__(self, endpoint: str, pause: float) -> None:
        self._endpoint = endpoint
        self._pause = pause
        self._lock = threading.Lock()
        self._until: float | None = None    # monotonic time; None while the endpoint answers
        self._trying = False                # a request is finding out whether it answers again
        self._reason = ""

    @contextlib.contextmanager
    def request(self, path: str) -> Iterator[None]:
        """Around one request: refused at once while paused, and its outcome recorded.

        Raises:
            BackendUnavailable: the endpoint is paused after a timeout.
        """
        trying = False
        with self._lock:
            if self._until is not None:
                if self._trying or time.monotonic() < self._until:
                    raise BackendUnavailable(path, f"S3 endpoint {self._endpoint} is not answering "
                                                   f"({self._reason}); '{path}' not tried")
                self._trying = trying = True
        try:
            yield
        except BackendUnavailable:
            raise      # a timeout was recorded by timed_out(); other failures change nothing
        except BaseException:
            self.answered()
            raise
        else:
            self.answered()
        finally:
            if trying:
                with self._lock:
                    self._trying = False

    def answered(self) -> None:
        if self._until is not None:
            with self._lock:
                if self._until is not None:
                    log.info("S3 endpoint %s answers again", self._endpoint)
                self._until = None

    def timed_out(self, exc: BaseException) -> None:
        with self._lock:
            if self._until is None:
                log.warning("S3 endpoint %s did not answer in time (%s): requests fail at once "
                            "for %gs, then one tries again", self._endpoint, type(exc).__name__,
                            self._pause)
            self._until = time.monotonic() + self._pause
            self._reason = f"{type(exc).__name__} {self._pause:g}s ago or less"


def _multipart_etag(parts: list[dict]) -> str:
    digests = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in parts)
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _parts_of(size: int, max_part: int) -> list[tuple[int, int]]:
    """Split [0, size) into even (start, end) ranges of at most max_part bytes and, where
    the size allows, at least MIN_PART_SIZE (S3's floor for every part but the last)."""
    count = max(1, min(-(-size // max_part), size // MIN_PART_SIZE))
    step = -(-size // count)
    return [(start, min(size, start + step)) for start in range(0, size, step)] or [(0, 0)]


class S3Backend(Backend):
    """Objects under `prefix` in one bucket; see the module docstring for the model."""

    # Directory renames are a copy and delete per object; random writes and
    # resumes go through a local spool file.
    capabilities = Capabilities(atomic_rename=False, random_write=False)

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        prefix = config.prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = config.endpoint_url or "AWS S3"
        session = boto3.session.Session(
            aws_access_key_id=config.access_key_id, aws_secret_access_key=config.secret_access_key,
            aws_session_token=config.session_token, region_name=config.region)
        boto_config = BotoConfig(
            connect_timeout=config.connect_timeout,
            retries={"mode": "standard", "total_max_attempts": config.max_attempts},
            max_pool_connections=config.max_pool_connections,
            s3={"addressing_style": config.addressing_style},
            # S3-compatible servers reject the CRC headers newer botocore sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="file-gateway")
        def client(read_timeout: float):
            made = session.client("s3", endpoint_url=config.endpoint_url,
                                  config=boto_config.merge(BotoConfig(read_timeout=read_timeout)))
            made.meta.events.register_first("needs-retry.s3", _no_retry_after_timeout)
            return made

        self.client = client(config.request_timeout)
        # Content takes its time to cross (a large part): read_timeout.
        self.transfer_client = client(config.read_timeout)
        # Server-side copies and completing a large upload answer only when
        # done (minutes for large objects on AWS): they get a longer read timeout.
        self.slow_client = client(config.slow_read_timeout)
        self.answering = _Answering(self.endpoint, config.unanswered_pause)
        self.spool_dir = Path(config.spool_dir or Path(tempfile.gettempdir()) / "gateway-s3-spool")
        self._pool = ThreadPoolExecutor(max_workers=config.max_pool_connections,
                                        thread_name_prefix="s3-io")
        self.put_args: dict[str, str] = {}
        if config.storage_class:
            self.put_args["StorageClass"] = config.storage_class
        if config.sse:
            self.put_args["ServerSideEncryption"] = config.sse
        if config.sse_kms_key_id:
            self.put_args["SSEKMSKeyId"] = config.sse_kms_key_id

    # -- keys and errors ------------------------------------------------------

    def key(self, path: str) -> str:
        """The object key of a normalized non-root path."""
        segments = path.split("/")[1:]
        # S3 treats ".." as a literal key segment: normalized paths never carry
        # one, and this guard keeps any caller from addressing keys outside the prefix.
        if not path.startswith("/") or path == "/" or any(s in ("", ".", "..") for s in segments):
            raise InvalidPath(path, f"not a normalized path: {path!r}")
        return self.prefix + path[1:]

    def dir_prefix(self, path: str) -> str:
        """The key prefix of everything inside the directory `path`."""
        return self.prefix if path == "/" else self.key(path) + "/"

    def convert_error(self, exc: Exception, path: str) -> GatewayError:
        """Translate a botocore error through the one table."""
        if isinstance(exc, ClientError):
            code = _code(exc)
            found = _ERROR_TABLE.get(code) or _ERROR_TABLE.get(str(_status(exc)))
            detail = exc.response.get("Error", {}).get("Message", "") or code
            if found is None:
                found = (BackendUnavailable, f"S3 error {code or _status(exc)} on '{{path}}': {{detail}}")
        else:
            code, detail = type(exc).__name__, str(exc)
            found = _ERROR_TABLE.get(code, (BackendUnavailable, "S3 request for '{path}' failed: {detail}"))
        cls, template = found
        return cls(path, template.format(path=path, bucket=self.bucket, endpoint=self.endpoint,
                                         code=code, detail=detail))

    @contextlib.contextmanager
    def converted(self, path: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, _UNANSWERED):
                self.answering.timed_out(exc)
            raise self.convert_error(exc, path) from None

    def call(self, operation: str, path: str, **kwargs: Any) -> dict:
        """One S3 request on this bucket, with errors converted."""
        if operation in _SLOW_OPERATIONS:
            client = self.slow_client
        elif operation in _TRANSFER_OPERATIONS:
            client = self.transfer_client
        else:
            client = self.client
        with self.answering.request(path), self.converted(path):
            return getattr(client, operation)(Bucket=self.bucket, **kwargs)

    def complete(self, key: str, upload_id: str, parts: list[dict], path: str) -> None:
        """CompleteMultipartUpload, surviving a retry whose first attempt already succeeded."""
        with self.answering.request(path):
            self._complete(key, upload_id, parts, path)

    def _complete(self, key: str, upload_id: str, parts: list[dict], path: str) -> None:
        try:
            self.slow_client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
        except ClientError as exc:
            # The retried request finds the upload gone: the object's ETag
            # (MD5 of the part MD5s, "-N") tells whether the first attempt made it ours.
            if _code(exc) == "NoSuchUpload":
                head = self._head(key, path)
                if head is not None and head.get("ETag", "").strip('"') == _multipart_etag(parts):
                    return
            raise self.convert_error(exc, path) from None
        except BotoCoreError as exc:
            if isinstance(exc, _UNANSWERED):
                self.answering.timed_out(exc)
            raise self.convert_error(exc, path) from None

    # -- probes ---------------------------------------------------------------

    def head(self, key: str, path: str) -> dict | None:
        """HEAD an object; None when it does not exist."""
        with self.answering.request(path):
            return self._head(key, path)

    def _head(self, key: str, path: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise self.convert_error(exc, path) from None
        except BotoCoreError as exc:
            if isinstance(exc, _UNANSWERED):
                self.answering.timed_out(exc)
            raise self.convert_error(exc, path) from None

    def has_keys(self, prefix: str, path: str) -> bool:
        """True when any key (a marker included) starts with `prefix`."""
        page = self.call("list_objects_v2", path, Prefix=prefix, MaxKeys=1)
        return bool(page.get("KeyCount") or page.get("Contents"))

    def is_dir(self, path: str) -> bool:
        return path == "/" or self.has_keys(self.key(path) + "/", path)

    def require_parent(self, path: str) -> None:
        """Raise unless the parent of `path` is an existing directory."""
        parent = paths.split(path)[0]
        if parent == "/" or self.is_dir(parent):
            return
        if self.head(self.key(parent), parent) is not None:
            raise NotADirectory(path)
        raise NotFound(path)

    def missing(self, path: str) -> GatewayError:
        """The error for a path that is not a file."""
        return IsADirectory(path) if self.is_dir(path) else NotFound(path)

    def mtime_of(self, head: dict) -> float:
        """The client-set mtime from metadata, else the object's LastModified."""
        value = head.get("Metadata", {}).get(MTIME_KEY)
        if value is not None:
            try:
                return float(value)
            except ValueError:
                pass
        return head["LastModified"].timestamp()

    def file_entry(self, name: str, head: dict) -> Entry:
        return Entry(name, False, int(head["ContentLength"]), self.mtime_of(head),
                     head.get("ETag", "").strip('"') or None)

    def dir_entry(self, name: str, key: str, path: str) -> Entry:
        """A directory's entry: its marker's mtime, or 0 for a directory implied by keys."""
        marker = self.head(key + "/", path)
        return Entry(name, True, 0, self.mtime_of(marker) if marker else 0.0)

    # -- contract: reading ----------------------------------------------------

    def stat(self, path: str) -> Entry:
        if path == "/":
            return Entry("", True, 0, 0.0)
        key, name = self.key(path), paths.split(path)[1]
        head = self.head(key, path)
        if head is not None:
            return self.file_entry(name, head)
        marker = self.head(key + "/", path)
        if marker is not None:
            return Entry(name, True, 0, self.mtime_of(marker))
        if self.has_keys(key + "/", path):
            return Entry(name, True, 0, 0.0)
        raise NotFound(path)

    def pages(self, prefix: str, path: str, delimiter: str | None = "/") -> Iterator[dict]:
        """ListObjectsV2 pages under `prefix`, fetched one at a time as the caller advances."""
        args: dict[str, Any] = {"Prefix": prefix, "MaxKeys": self.config.list_page_size}
        if delimiter:
            args["Delimiter"] = delimiter
        while True:
            page = self.call("list_objects_v2", path, **args)
            yield page
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def list_dir(self, path: str) -> Iterator[Entry]:
        prefix = self.dir_prefix(path)
        pages = self.pages(prefix, path)
        first = next(pages)
        if path != "/" and not (first.get("Contents") or first.get("CommonPrefixes")):
            if self.head(self.key(path), path) is not None:
                raise NotADirectory(path)
            raise NotFound(path)
        return self._entries(path, prefix, first, pages)

    def _entries(self, path: str, prefix: str, first: dict, rest: Iterator[dict]) -> Iterator[Entry]:
        # Listings carry no metadata, so each entry is HEADed (in parallel, one
        # page at a time) to report the same mtime stat does.
        page: dict | None = first
        while page is not None:
            jobs: list[tuple[str, str, bool]] = []
            for item in page.get("CommonPrefixes", []):
                name = item["Prefix"][len(prefix):].rstrip("/")
                if _listable(name):
                    jobs.append((name, item["Prefix"][:-1], True))
            files = set()
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if _listable(name):
                    files.add(name)
                    jobs.append((name, item["Key"], False))
            # A key that is both a file and a prefix shows as the file, as stat does.
            jobs = [job for job in jobs if not (job[2] and job[0] in files)]
            if self.config.listing_mtime == "server":
                listed = {item["Key"]: item for item in page.get("Contents", [])}
                yield from (self._listed_entry(name, listed.get(key), is_dir) for name, key, is_dir in jobs)
            else:
                for entry in self._pool.map(lambda job: self._entry_for(path, *job), jobs):
                    if entry is not None:
                        yield entry
            page = next(rest, None)

    @staticmethod
    def _listed_entry(name: str, item: dict | None, is_dir: bool) -> Entry:
        """An entry from the listing alone: LastModified, no request of its own."""
        if is_dir or item is None:
            return Entry(name, True, 0, 0.0)
        return Entry(name, False, int(item["Size"]), item["LastModified"].timestamp(),
                     item.get("ETag", "").strip('"') or None)

    def _entry_for(self, parent: str, name: str, key: str, is_dir: bool) -> Entry | None:
        child = paths.join(parent, name)
        if is_dir:
            return self.dir_entry(name, key, child)
        head = self.head(key, child)
        return None if head is None else self.file_entry(name, head)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        if path == "/":
            raise IsADirectory(path)
        key = self.key(path)
        head = self.head(key, path)
        if head is None:
            raise self.missing(path)
        size = int(head["ContentLength"])
        end = size if length is None else min(size, offset + length)
        raw = _RangeReader(self, path, key, head.get("ETag"), offset, end)
        return io.BufferedReader(raw, buffer_size=256 * 1024)  # type: ignore[return-value]

    def usage(self, path: str = "/") -> Usage:
        """One listing of every key below `path`: the files, and the folders a listing shows.

        A folder counts once whether it has a marker key ("d/") or is only
        implied by the keys below it ("d/f" with no "d/"): list_dir shows
        both, and a tool other than the gateway makes the second kind. Keys
        no path can name ("//", ".", "..") are not counted, as list_dir
        does not show them; an upload's temp object counts as neither.
        """
        used_bytes = used_files = 0
        folders: set[str] = set()
        prefix = self.dir_prefix(path)
        for page in self.pages(prefix, path, delimiter=None):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                segments = name.split("/")
                is_marker = name.endswith("/")
                if is_marker:
                    segments.pop()
                if not name or any(s in ("", ".", "..") for s in segments):
                    continue
                # Every folder on the way, and the marker's own folder.
                for depth in range(1, len(segments) + (1 if is_marker else 0)):
                    folders.add("/".join(segments[:depth]))
                if not is_marker and not segments[-1].startswith(TEMP_PREFIX):
                    used_bytes += int(item["Size"])
                    used_files += 1
        return Usage(used_bytes, used_files + len(folders))

    # -- contract: writing ----------------------------------------------------

    def open_write(self, path: str, *, offset: int = 0, truncate: bool = True) -> Upload:
        if path == "/":
            raise IsADirectory(path)
        key = self.key(path)
        self.require_parent(path)
        if self.is_dir(path):
            raise IsADirectory(path)
        base = None
        if not truncate:
            head = self.head(key, path)
            if head is not None:
                base = (int(head["ContentLength"]), head.get("ETag"))
        return S3Upload(self, path, key, base, offset)

    def make_dir(self, path: str) -> None:
        if path == "/":
            raise AlreadyExists(path)
        key = self.key(path)
        if self.head(key, path) is not None or self.is_dir(path):
            raise AlreadyExists(path)
        self.require_parent(path)
        self.call("put_object", path, Key=key + "/", Body=b"", **self.put_args)

    def keep_parent(self, path: str) -> None:
        """Leave a marker when removing `path` emptied an implied parent directory."""
        parent = paths.split(path)[0]
        if parent != "/" and not self.has_keys(self.key(parent) + "/", parent):
            self.call("put_object", parent, Key=self.key(parent) + "/", Body=b"", **self.put_args)

    def remove_file(self, path: str) -> None:
        if path == "/":
            raise PermissionDenied(path, "the root cannot be changed")
        key = self.key(path)
        if self.head(key, path) is None:
            raise self.missing(path)
        self.call("delete_object", path, Key=key)
        self.keep_parent(path)

    def remove_dir(self, path: str) -> None:
        if path == "/":
            raise PermissionDenied(path, "the root cannot be changed")
        prefix = self.key(path) + "/"
        keys = [item["Key"] for item in
                self.call("list_objects_v2", path, Prefix=prefix, MaxKeys=2).get("Contents", [])]
        if not keys:
            if self.head(self.key(path), path) is not None:
                raise NotADirectory(path)
            raise NotFound(path)
        if any(k != prefix for k in keys):
            raise DirectoryNotEmpty(path)
        self.call("delete_object", path, Key=prefix)
        self.keep_parent(path)

    def copy_object(self, src_key: str, dst_key: str, size: int, path: str,
                    metadata: dict[str, str] | None, content_type: str | None = None) -> None:
        """Server-side copy; `metadata` None keeps the source's, a dict replaces it.

        Objects above max_copy_size go part by part (UploadPartCopy), and a
        failed multipart copy is aborted.
        """
        source = {"Bucket": self.bucket, "Key": src_key}
        if size <= self.config.max_copy_size:
            if metadata is None:
                self.call("copy_object", path, Key=dst_key, CopySource=source, MetadataDirective="COPY",
                          **self.put_args)
            else:
                self.call("copy_object", path, Key=dst_key, CopySource=source, MetadataDirective="REPLACE",
                          Metadata=metadata, **self.put_args, **_content_type(content_type))
            return
        if metadata is None:
            head = self.call("head_object", path, Key=src_key)
            metadata, content_type = head.get("Metadata", {}), head.get("ContentType")
        extra = {**self.put_args, **_content_type(content_type)}
        upload_id = self.call("create_multipart_upload", path, Key=dst_key, Metadata=metadata,
                              **extra)["UploadId"]
        try:
            parts = []
            for number, (start, end) in enumerate(_parts_of(size, self.config.max_copy_size), 1):
                result = self.call("upload_part_copy", path, Key=dst_key, UploadId=upload_id,
                                   PartNumber=number, CopySource=source,
                                   CopySourceRange=f"bytes={start}-{end - 1}")
                parts.append({"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]})
            self.complete(dst_key, upload_id, parts, path)
        except BaseException:
            self.abort_quietly(dst_key, upload_id, path)
            raise

    def abort_quietly(self, key: str, upload_id: str, path: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not abort the multipart upload of %r (%s); the sweep will retry", path, exc)

    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        if check_rename(src, dst):
            return
        src_key, dst_key = self.key(src), self.key(dst)
        head = self.head(src_key, src)
        if head is None and not self.is_dir(src):
            raise NotFound(src)
        self.require_parent(dst)
        dst_head = self.head(dst_key, dst)
        if dst_head is not None or self.is_dir(dst):
            if head is None or dst_head is None or not overwrite:
                raise AlreadyExists(dst)
        if head is not None:
            self.copy_object(src_key, dst_key, int(head["ContentLength"]), src, None)
            self.call("delete_object", src, Key=src_key)
        else:
            self._rename_tree(src, src_key + "/", dst_key + "/")
        self.keep_parent(src)

    def _rename_tree(self, src: str, src_prefix: str, dst_prefix: str) -> None:
        # Not atomic: each page of keys is copied, then deleted. A failure
        # midway leaves some objects at the old name and some at the new one,
        # never an object at neither.
        for page in self.pages(src_prefix, src, delimiter=None):
            items = page.get("Contents", [])

            def copy(item: dict) -> None:
                target = dst_prefix + item["Key"][len(src_prefix):]
                self.copy_object(item["Key"], target, int(item["Size"]), src, None)

            list(self._pool.map(copy, items))
            self.delete_keys([item["Key"] for item in items], src)

    def delete_keys(self, keys: list[str], path: str) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            result = self.call("delete_objects", path,
                               Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if result.get("Errors"):
                error = result["Errors"][0]
                raise BackendUnavailable(path, f"S3 could not delete '{error.get('Key')}': "
                                               f"{error.get('Code')} {error.get('Message', '')}")

    def copy_file(self, src: str, dst: str) -> None:
        if src == "/":
            raise IsADirectory(src)
        src_key, dst_key = self.key(src), self.key(dst)
        head = self.head(src_key, src)
        if head is None:
            raise self.missing(src)
        self.require_parent(dst)
        if self.is_dir(dst):
            raise IsADirectory(dst)
        # A copy is new content: it gets a fresh mtime, not the source's.
        self.copy_object(src_key, dst_key, int(head["ContentLength"]), src, {},
                         head.get("ContentType"))

    def set_mtime(self, path: str, mtime: float) -> None:
        if path == "/":
            raise PermissionDenied(path, "the root cannot be changed")
        key = self.key(path)
        head = self.head(key, path)
        if head is None:
            marker = self.head(key + "/", path)
            if marker is None:
                if not self.is_dir(path):
                    raise NotFound(path)
                self.call("put_object", path, Key=key + "/", Body=b"",
                          Metadata={MTIME_KEY: repr(float(mtime))}, **self.put_args)
                return
            head, key = marker, key + "/"
        metadata = {**head.get("Metadata", {}), MTIME_KEY: repr(float(mtime))}
        # S3 cannot change metadata in place: copy the object onto itself.
        self.copy_object(key, key, int(head["ContentLength"]), path, metadata, head.get("ContentType"))

    # -- operations -----------------------------------------------------------

    def check(self) -> None:
        self.call("list_objects_v2", "/", Prefix=self.prefix, MaxKeys=1)

    def abort_stale_upload(self, path: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key(path), UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) != "NoSuchUpload":
                raise self.convert_error(exc, path) from None
        except BotoCoreError as exc:
            raise self.convert_error(exc, path) from None

    def sweep_temp_files(self, stop: threading.Event | None = None) -> int:
        """Abort multipart uploads under the prefix older than abandoned_upload_age.

        Uploads younger than that may belong to a live upload on another node
        sharing the bucket, so they are left alone.
        """
        cutoff = time.time() - self.config.abandoned_upload_age
        aborted = 0
        args: dict[str, Any] = {"Prefix": self.prefix}
        try:
            while True:
                page = self._upload_page(args)
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() <= cutoff:
                        self.abort_quietly(upload["Key"], upload["UploadId"], upload["Key"])
                        aborted += 1
                if not page.get("IsTruncated") or (stop is not None and stop.is_set()):
                    break
                args.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
        except Unsupported:
            log.warning("abandoned multipart uploads in bucket %s cannot be swept: S3 endpoint %s does not "
                        "implement ListMultipartUploads", self.bucket, self.endpoint)
        except GatewayError as exc:
            log.warning("sweeping abandoned S3 uploads failed: %s", exc)
        if aborted:
            log.info("aborted %d abandoned multipart uploads in bucket %s", aborted, self.bucket)
        return aborted

    def _upload_page(self, args: dict[str, Any]) -> dict:
        """One page of ListMultipartUploads under the prefix, errors through the table."""
        try:
            return self.client.list_multipart_uploads(Bucket=self.bucket, **args)
        except ClientError as exc:
            if _code(exc) == "NoSuchUpload":
                # rclone serve s3 (gofakes3) answers a listing of a bucket without
                # uploads this way: nothing to sweep, and no upload was aborted.
                return {}
            raise self.convert_error(exc, "/") from None
        except BotoCoreError as exc:
            raise self.convert_error(exc, "/") from None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        self.transfer_client.close()
        self.slow_client.close()


def _content_type(value: str | None) -> dict[str, str]:
    return {"ContentType": value} if value else {}


def _listable(name: str) -> bool:
    """Keys a listing shows: not the marker itself, no upload temp names, nothing a path cannot name."""
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith(TEMP_PREFIX)


class _RangeReader(io.RawIOBase):
    """A seekable view of one object: one streaming ranged GET, reopened only on a jump.

    Every GET is pinned to the ETag seen at open, so a reader never mixes two
    versions of an object that is overwritten while it is read.
    """

    def __init__(self, backend: S3Backend, path: str, key: str, etag: str | None, start: int, end: int) -> None:
        self._backend = backend
        self._path = path
        self._key = key
        self._etag = etag
        self._pos = start
        self._end = end
        self._body: Any = None
        self._body_pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _open_body(self) -> None:
        self._drop_body()
        args: dict[str, Any] = {"Key": self._key, "Range": f"bytes={self._pos}-{self._end - 1}"}
        if self._etag:
            args["IfMatch"] = self._etag
        self._body = self._backend.call("get_object", self._path, **args)["Body"]
        self._body_pos = self._pos

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._end - self._pos)
        if want <= 0:
            return 0
        with self._backend.converted(self._path):
            if self._body is not None and 0 < self._pos - self._body_pos <= _READ_SKIP:
                skip = self._pos - self._body_pos
                while skip:
                    chunk = self._body.read(min(skip, 64 * 1024))
                    if not chunk:
                        break
                    skip -= len(chunk)
                    self._body_pos += len(chunk)
            if self._body is None or self._body_pos != self._pos:
                self._open_body()
            data = self._body.read(want)
        if not data:
            raise BackendUnavailable(self._path, f"S3 ended the transfer of '{self._path}' early")
        buffer[:len(data)] = data
        self._pos += len(data)
        self._body_pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._end + offset
        if self._pos < 0:
            raise ValueError("negative seek position")
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop_body()
        super().close()


class S3Upload(Upload):
    """An upload that streams into a multipart upload and spools only when it must.

    Sequential writes fill a buffer; each full part goes to S3 on the
    backend's pool with at most parts_in_flight parts outstanding, so memory
    stays near part_size x (parts_in_flight + 1): the parts plus the buffer. Nothing is visible until
    CompleteMultipartUpload (or the single PutObject of a small file).

    A write at another offset, a truncate, or a resume switches to a spool:
    content = base + spool file, where the base is either the existing object
    (copied server-side with UploadPartCopy at commit when S3 allows, else
    downloaded) or the parts this upload already sent. Parts already sent
    cannot be read back or rewritten: such a write raises Unsupported.
    """

    def __init__(self, backend: S3Backend, path: str, key: str, base: tuple[int, str | None] | None,
                 offset: int) -> None:
        self.path = path
        self._b = backend
        self._key = key
        self._part_size = backend.config.part_size
        self._lock = threading.RLock()
        self._closed = False
        # One part-sized buffer filled in place: no reallocation while it grows.
        self._buffer = bytearray()
        self._fill = 0
        self._pos = 0                 # streaming: bytes written so far
        self._sent = 0                # bytes handed to parts
        self._upload_id: str | None = None
        self._next_part = 1
        self._parts: list[Future] = []
        self._slots = threading.Semaphore(backend.config.parts_in_flight)
        self._spool: io.BufferedRandom | None = None
        self._base_size = 0           # bytes of content before the spool file
        self._base_object: tuple[int, str | None] | None = None  # (size, etag) of the old version
        if base is not None or offset != 0:
            self._start_spool()
            if base is not None:
                self._base_object = base
                self._base_size = base[0]
        self._pos = offset

    # -- streaming ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"upload of {self.path} is already closed")

    def _failed_part(self) -> BaseException | None:
        for future in self._parts:
            if future.done() and future.exception() is not None:
                return future.exception()
        return None

    def _reserve(self) -> int:
        """Wait for a free slot (at most parts_in_flight outstanding) and return a part number."""
        if self._upload_id is None:
            self._upload_id = self._b.call("create_multipart_upload", self.path, Key=self._key,
                                           **self._b.put_args)["UploadId"]
            if self.on_backend_id is not None:
                self.on_backend_id(self._upload_id)
        error = self._failed_part()
        if error is not None:
            raise error
        if self._next_part > MAX_PARTS:
            raise QuotaExceeded(self.path, f"'{self.path}' needs more than {MAX_PARTS} parts: raise part_size")
        self._slots.acquire()
        self._next_part += 1
        return self._next_part - 1

    def _send(self, number: int, fn: Callable[..., dict], **kwargs: Any) -> None:
        """Run one part request on the pool; its slot is released when it ends."""

        def run() -> dict:
            try:
                with self._b.converted(self.path):
                    result = fn(Bucket=self._b.bucket, Key=self._key, UploadId=self._upload_id,
                                PartNumber=number, **kwargs)
                etag = result["ETag"] if "ETag" in result else result["CopyPartResult"]["ETag"]
                return {"PartNumber": number, "ETag": etag}
            finally:
                kwargs.clear()  # drop the part's bytes before its slot frees up
                self._slots.release()

        try:
            self._parts.append(self._b.submit(run))
        except BaseException:
            self._slots.release()
            raise

    def _send_data(self, number: int, data: bytes) -> None:
        self._send(number, self._b.transfer_client.upload_part, Body=data, ContentLength=len(data))
        self._sent += len(data)

    def _buffer_data(self, data: bytes) -> None:
        if not self._buffer:
            self._buffer = bytearray(self._part_size)
        with memoryview(data) as view:
            while view:
                count = min(len(view), self._part_size - self._fill)
                self._buffer[self._fill:self._fill + count] = view[:count]
                self._fill += count
                view = view[count:]
                if self._fill == self._part_size:
                    # The slot comes first, so a part leaves the buffer only when it
                    # can be sent at once: memory stays at part_size x (parts_in_flight + 1).
                    number = self._reserve()
                    self._fill = 0
                    self._send_data(number, bytes(self._buffer))

    def write(self, data: bytes) -> None:
        with self._lock:
            self._check_open()
            if self._spool is None:
                self._buffer_data(data)
                self._pos += len(data)
            else:
                self._spool_write(self._pos, data)
                self._pos += len(data)

    def write_at(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._check_open()
            if self._spool is None and offset == self._pos:
                self.write(data)
                return
            self._start_spool()
            self._spool_write(offset, data)
            self._pos = offset + len(data)

    def read_at(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._check_open()
            if self._spool is None:
                if offset < self._sent:
                    raise Unsupported(self.path, "S3 cannot read back the parts of an upload in progress")
                start = offset - self._sent
                return bytes(self._buffer[start:min(start + length, self._fill)])
            end = min(offset + length, self.size)
            chunks = []
            if offset < self._base_size:
                if self._base_object is None:
                    raise Unsupported(self.path, "S3 cannot read back the parts of an upload in progress")
                upto = min(end, self._base_size)
                with self._read_base(offset, upto) as reader:
                    chunks.append(reader.read())
                offset = upto
            if offset < end:
                self._spool.seek(offset - self._base_size)
                chunks.append(self._spool.read(end - offset))
            return b"".join(chunks)

    def truncate(self, size: int) -> None:
        with self._lock:
            self._check_open()
            self._start_spool()
            if size < self._base_size:
                if self._base_object is None:
                    raise Unsupported(self.path, "S3 cannot cut into parts already uploaded")
                self._materialize(limit=size)
            with self._spool_errors():
                self._spool.truncate(size - self._base_size)

    @property
    def size(self) -> int:
        if self._spool is None:
            return self._pos
        with self._spool_errors():
            self._spool.flush()
            return self._base_size + os.fstat(self._spool.fileno()).st_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend_id(self) -> str | None:
        return self._upload_id

    # -- spooling -------------------------------------------------------------

    @contextlib.contextmanager
    def _spool_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise convert_os_error(exc, self.path) from None

    def _new_spool_file(self) -> io.BufferedRandom:
        with self._spool_errors():
            self._b.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Unlinked at once (or never linked): a crash leaves nothing to sweep.
            return tempfile.TemporaryFile(dir=self._b.spool_dir, prefix=TEMP_PREFIX)  # type: ignore[return-value]

    def _start_spool(self) -> None:
        """Switch from streaming to spooling; the parts already sent become the base."""
        if self._spool is not None:
            return
        self._spool = self._new_spool_file()
        self._base_size = self._sent
        with self._spool_errors():
            self._spool.write(memoryview(self._buffer)[:self._fill])
        self._buffer, self._fill = bytearray(), 0

    def _spool_write(self, offset: int, data: bytes) -> None:
        if offset < self._base_size:
            if self._base_object is None:
                raise Unsupported(self.path, f"S3 cannot rewrite the first {self._base_size} bytes of "
                                             f"'{self.path}': they are already uploaded")
            self._materialize()
        with self._spool_errors():
            self._spool.seek(offset - self._base_size)
            self._spool.write(data)

    def _read_base(self, start: int, end: int) -> io.BufferedReader:
        """Read the old version this upload resumes, pinned to the ETag seen at open."""
        assert self._base_object is not None
        raw = _RangeReader(self._b, self.path, self._key, self._base_object[1], start, end)
        return io.BufferedReader(raw, buffer_size=MiB)

    def _materialize(self, limit: int | None = None) -> None:
        """Download the old version's bytes into the spool (up to `limit`)."""
        assert self._spool is not None and self._base_object is not None
        upto = self._base_size if limit is None else min(limit, self._base_size)
        fresh = self._new_spool_file()
        try:
            with self._spool_errors():
                if upto:
                    with self._read_base(0, upto) as reader:
                        while chunk := reader.read(MiB):
                            fresh.write(chunk)
                if limit is None or limit >= self._base_size:
                    self._spool.seek(0)
                    while chunk := self._spool.read(MiB):
                        fresh.write(chunk)
        except BaseException:
            fresh.close()
            raise
        self._spool.close()
        self._spool = fresh
        self._base_object = None
        self._base_size = 0

    # -- commit and abort -----------------------------------------------------

    def _wait_parts(self) -> list[dict]:
        wait(self._parts)
        error = self._failed_part()
        if error is not None:
            raise error
        return sorted((f.result() for f in self._parts), key=lambda p: p["PartNumber"])

    def _finish(self) -> None:
        """Send whatever is not sent yet and complete the upload (or PUT a small file)."""
        if self._spool is None:
            if self._upload_id is None:
                self._b.call("put_object", self.path, Key=self._key, Body=bytes(memoryview(self._buffer)[:self._fill]),
                             **self._b.put_args)
                return
            if self._fill:
                self._send_data(self._reserve(), bytes(self._buffer[:self._fill]))
                self._buffer, self._fill = bytearray(), 0
        else:
            if self._base_object is not None:
                if self._base_size < MIN_PART_SIZE:
                    self._materialize()
                else:
                    # Resume: the old version's bytes are copied on the S3 side.
                    source = {"Bucket": self._b.bucket, "Key": self._key}
                    if self._base_object[1]:
                        source_args = {"CopySourceIfMatch": self._base_object[1]}
                    else:
                        source_args = {}
                    for start, end in _parts_of(self._base_size, self._b.config.max_copy_size):
                        self._send(self._reserve(), self._b.slow_client.upload_part_copy, CopySource=source,
                                   CopySourceRange=f"bytes={start}-{end - 1}", **source_args)
                    self._base_object = None
            if self._upload_id is None and self.size <= self._part_size:
                with self._spool_errors():
                    self._spool.seek(0)
                    body = self._spool.read()
                self._b.call("put_object", self.path, Key=self._key, Body=body, **self._b.put_args)
                return
            remaining = self.size - self._base_size
            with self._spool_errors():
                self._spool.seek(0)
                while remaining > 0:
                    number = self._reserve()
                    chunk = self._spool.read(min(self._part_size, remaining))
                    if not chunk:
                        self._slots.release()
                        break
                    remaining -= len(chunk)
                    self._send_data(number, chunk)
        parts = self._wait_parts()
        self._b.complete(self._key, self._upload_id, parts, self.path)
        self._upload_id = None

    def commit(self) -> Entry:
        with self._lock:
            self._check_open()
            try:
                self._finish()
            except BaseException:
                self._discard()
                raise
            self._closed = True
            self._release_spool()
        head = self._b.head(self._key, self.path)
        if head is None:
            raise BackendUnavailable(self.path, f"'{self.path}' vanished right after its upload")
        return self._b.file_entry(paths.split(self.path)[1], head)

    def abort(self) -> None:
        with self._lock:
            if not self._closed:
                self._discard()

    def _discard(self) -> None:
        self._closed = True
        self._buffer, self._fill = bytearray(), 0
        if self._parts:
            wait(self._parts)
        if self._upload_id is not None:
            self._b.abort_quietly(self._key, self._upload_id, self.path)
            self._upload_id = None
        self._release_spool()

    def _release_spool(self) -> None:
        self._parts = []
        if self._spool is not None:
            with contextlib.suppress(OSError):
                self._spool.close()
            self._spool = None

    def __del__(self) -> None:
        # An upload dropped without commit or abort (a crashed handler) must
        # not leave a multipart upload behind.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.abort()
