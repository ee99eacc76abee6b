"""MemoryBackend: a whole tree in a dict, for tests and development.

It implements the full contract so the contract suite can hold every other
backend to the same answers.
"""
from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .. import paths
from ..errors import (AlreadyExists, DirectoryNotEmpty, IsADirectory,
                      NotADirectory, NotFound, PermissionDenied)
from .base import Backend, Capabilities, Entry, Upload, check_rename


@dataclass(frozen=True)
class MemoryConfig:
    pass


class _Node:
    __slots__ = ("is_dir", "data", "mtime", "version")

    def __init__(self, is_dir: bool, data: bytes = b"") -> None:
        self.is_dir = is_dir
        self.data = data
        self.mtime = time.time()
        self.version = 0


class MemoryUpload(Upload):
    def __init__(self, backend: "MemoryBackend", path: str, initial: bytes, offset: int) -> None:
        self.path = path
        self._backend = backend
        self._buf = bytearray(initial)
        self._pos = offset
        self._closed = False

    def write(self, data: bytes) -> None:
        self.write_at(self._pos, data)

    def write_at(self, offset: int, data: bytes) -> None:
        if self._closed:
            raise ValueError(f"upload of {self.path} is already closed")
        if offset > len(self._buf):
            self._buf.extend(b"\0" * (offset - len(self._buf)))
        self._buf[offset:offset + len(data)] = data
        self._pos = offset + len(data)

    def read_at(self, offset: int, length: int) -> bytes:
        return bytes(self._buf[offset:offset + length])

    def truncate(self, size: int) -> None:
        if size < len(self._buf):
            del self._buf[size:]
        else:
            self._buf.extend(b"\0" * (size - len(self._buf)))

    @property
    def size(self) -> int:
        return len(self._buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def commit(self) -> Entry:
        if self._closed:
            raise ValueError(f"upload of {self.path} is already closed")
        self._closed = True
        return self._backend._store(self.path, bytes(self._buf))

    def abort(self) -> None:
        self._closed = True
        self._buf = bytearray()


class MemoryBackend(Backend):
    capabilities = Capabilities()

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self._nodes: dict[str, _Node] = {"/": _Node(True)}
        self._lock = threading.RLock()

    def _get(self, path: str) -> _Node:
        node = self._nodes.get(path)
        if node is None:
            self._check_parent(path)
            raise NotFound(path)
        return node

    def _check_parent(self, path: str) -> None:
        """Raise the error the parent chain of `path` deserves, if any."""
        # Climb (without recursion: paths can be deeper than the recursion
        # limit) to the nearest ancestor that exists; `below` is its child.
        below = None
        while path != "/":
            node = self._nodes.get(paths.split(path)[0])
            if node is None:
                below, path = path, paths.split(path)[0]
                continue
            if not node.is_dir:
                raise NotADirectory(path)
            break
        if below is not None:
            raise NotFound(below)

    def _entry(self, path: str, node: _Node) -> Entry:
        name = paths.split(path)[1]
        if node.is_dir:
            return Entry(name, True, 0, node.mtime)
        return Entry(name, False, len(node.data), node.mtime, f"m{id(node):x}-{node.version}")

    def _store(self, path: str, data: bytes) -> Entry:
        with self._lock:
            self._check_parent(path)
            node = self._nodes.get(path)
            if node is not None and node.is_dir:
                raise IsADirectory(path)
            new = _Node(False, data)
            new.version = (node.version + 1) if node else 0
            self._nodes[path] = new
            return self._entry(path, new)

    def stat(self, path: str) -> Entry:
        with self._lock:
            return self._entry(path, self._get(path))

    def list_dir(self, path: str) -> Iterator[Entry]:
        with self._lock:
            node = self._get(path)
            if not node.is_dir:
                raise NotADirectory(path)
            prefix = path.rstrip("/") + "/"
            found = [self._entry(p, n) for p, n in self._nodes.items()
                     if p != "/" and p.startswith(prefix) and "/" not in p[len(prefix):]]
        return iter(found)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        with self._lock:
            node = self._get(path)
            if node.is_dir:
                raise IsADirectory(path)
            data = node.data
        end = None if length is None else offset + length
        stream = io.BytesIO(data[:end] if end is not None else data)
        stream.seek(offset)
        return stream

    def open_write(self, path: str, *, offset: int = 0, truncate: bool = True) -> Upload:
        with self._lock:
            if path == "/":
                raise IsADirectory(path)
            self._check_parent(path)
            node = self._nodes.get(path)
            if node is not None and node.is_dir:
                raise IsADirectory(path)
            initial = b"" if truncate or node is None else node.data
        return MemoryUpload(self, path, initial, offset)

    def make_dir(self, path: str) -> None:
        with self._lock:
            if path in self._nodes:
                raise AlreadyExists(path)
            self._check_parent(path)
            self._nodes[path] = _Node(True)

    def remove_file(self, path: str) -> None:
        with self._lock:
            if self._get(path).is_dir:
                raise IsADirectory(path)
            del self._nodes[path]

    def remove_dir(self, path: str) -> None:
        with self._lock:
            if path == "/":
                raise PermissionDenied(path, "the root cannot be changed")
            if not self._get(path).is_dir:
                raise NotADirectory(path)
            if any(True for _ in self.list_dir(path)):
                raise DirectoryNotEmpty(path)
            del self._nodes[path]

    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        with self._lock:
            if check_rename(src, dst):
                return
            node = self._get(src)
            self._check_parent(dst)
            existing = self._nodes.get(dst)
            if existing is not None and (existing.is_dir or node.is_dir or not overwrite):
                raise AlreadyExists(dst)
            moved = {p: n for p, n in self._nodes.items() if paths.is_within(p, src)}
            for p in moved:
                del self._nodes[p]
            for p, n in moved.items():
                self._nodes[paths.rebase(p, src, dst)] = n

    def copy_file(self, src: str, dst: str) -> None:
        with self._lock:
            node = self._get(src)
            if node.is_dir:
                raise IsADirectory(src)
            self._store(dst, node.data)

    def set_mtime(self, path: str, mtime: float) -> None:
        with self._lock:
            if path == "/":
                raise PermissionDenied(path, "the root cannot be changed")
            self._get(path).mtime = mtime
