"""A backend proxy that times every call of the backend contract for Prometheus.

The gateway wraps each configured backend once, so no backend carries metrics
code. Attributes outside the contract (an S3 backend's client, a local root)
are passed through.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from .. import metrics
from .base import Backend, Capabilities, Entry, Upload, Usage


class _Timer:
    """Observes one call's duration, and its error class if it raised."""

    def __init__(self, backend: str, op: str) -> None:
        self.backend = backend
        self.op = op

    def __enter__(self) -> "_Timer":
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        elapsed = time.perf_counter() - self._started
        metrics.child(metrics.BACKEND_SECONDS, self.backend, self.op).observe(elapsed)
        if exc_type is not None:
            metrics.BACKEND_ERRORS.labels(self.backend, self.op, metrics.error_label(exc_type)).inc()


class InstrumentedUpload(Upload):
    """An upload whose commit and abort are timed; writes pass straight through."""

    def __init__(self, name: str, inner: Upload) -> None:
        self.path = inner.path
        self._name = name
        self._inner = inner

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def write_at(self, offset: int, data: bytes) -> None:
        self._inner.write_at(offset, data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self._inner.read_at(offset, length)

    def truncate(self, size: int) -> None:
        self._inner.truncate(size)

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def closed(self) -> bool:
        return self._inner.closed

    # The base class defines these, so __getattr__ would never forward them:
    # the store's record of a multipart upload needs the real upload's id.
    @property
    def backend_id(self) -> str | None:
        return self._inner.backend_id

    @property
    def on_backend_id(self):
        return self._inner.on_backend_id

    @on_backend_id.setter
    def on_backend_id(self, hook) -> None:
        self._inner.on_backend_id = hook

    def commit(self) -> Entry:
        with _Timer(self._name, "commit"):
            return self._inner.commit()

    def abort(self) -> None:
        with _Timer(self._name, "abort"):
            self._inner.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class InstrumentedBackend(Backend):
    """Times each contract call of `inner` under the backend's configured name."""

    def __init__(self, name: str, inner: Backend) -> None:
        self.name = name
        self.inner = inner

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class does not define.
        return getattr(self.inner, name)

    def _timed(self, op: str) -> _Timer:
        return _Timer(self.name, op)

    def stat(self, path: str) -> Entry:
        with self._timed("stat"):
            return self.inner.stat(path)

    def list_dir(self, path: str) -> Iterator[Entry]:
        # A listing streams (S3 pages it): the time observed runs until the
        # caller has read all of it or let it go.
        timer = self._timed("list_dir")
        timer.__enter__()
        try:
            entries = self.inner.list_dir(path)
        except BaseException as exc:
            timer.__exit__(type(exc), exc, None)
            raise
        return self._stream(entries, timer)

    @staticmethod
    def _stream(entries: Iterator[Entry], timer: _Timer) -> Iterator[Entry]:
        error: BaseException | None = None
        try:
            yield from entries
        except BaseException as exc:
            error = exc
            raise
        finally:
            timer.__exit__(type(error) if error is not None else None, error, None)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        with self._timed("open_read"):
            return self.inner.open_read(path, offset, length)

    def open_write(self, path: str, *, offset: int = 0, truncate: bool = True) -> Upload:
        with self._timed("open_write"):
            return InstrumentedUpload(self.name, self.inner.open_write(path, offset=offset,
                                                                       truncate=truncate))

    def create_file(self, path: str) -> Entry:
        with self._timed("create_file"):
            return self.inner.create_file(path)

    def make_dir(self, path: str) -> None:
        with self._timed("make_dir"):
            self.inner.make_dir(path)

    def remove_file(self, path: str) -> None:
        with self._timed("remove_file"):
            self.inner.remove_file(path)

    def remove_dir(self, path: str) -> None:
        with self._timed("remove_dir"):
            self.inner.remove_dir(path)

    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        with self._timed("rename"):
            self.inner.rename(src, dst, overwrite=overwrite)

    def copy_file(self, src: str, dst: str) -> None:
        with self._timed("copy_file"):
            self.inner.copy_file(src, dst)

    def set_mtime(self, path: str, mtime: float) -> None:
        with self._timed("set_mtime"):
            self.inner.set_mtime(path, mtime)

    def usage(self, path: str = "/") -> Usage:
        with self._timed("usage"):
            return self.inner.usage(path)

    def capacity(self) -> tuple[int, int] | None:
        with self._timed("capacity"):
            return self.inner.capacity()

    def check(self) -> None:
        with self._timed("check"):
            self.inner.check()

    def sweep_temp_files(self, stop: threading.Event | None = None) -> int:
        return self.inner.sweep_temp_files(stop)

    def abort_stale_upload(self, path: str, upload_id: str) -> None:
        with self._timed("abort_stale_upload"):
            self.inner.abort_stale_upload(path, upload_id)

    def close(self) -> None:
        self.inner.close()
