"""A failed write poisons an upload at the gate every face uses (UserFS), whatever the backend.

Clients that pipeline their writes learn of a failed one only when they
finish the upload: committing what the failure left would replace the
previous version with a hole or a truncated file.
"""
from __future__ import annotations

import pytest

from gateway.errors import BackendUnavailable, QuotaExceeded, StorageFull
from gateway.storage.local import LocalBackend, LocalConfig
from gateway.storage.memory import MemoryBackend, MemoryUpload
from gateway.users import Location, User
from gateway.vfs import Limits, UserFS


class FailingUpload(MemoryUpload):
    """A memory upload whose `fail_at`-th write raises, as a backend that went away would."""

    def __init__(self, *args, fail_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._writes = 0
        self._fail_at = fail_at
        self.committed = False

    def write(self, data: bytes) -> None:
        self._writes += 1
        if self._writes == self._fail_at:
            raise BackendUnavailable(self.path, f"storage unavailable for '{self.path}'")
        super().write(data)

    def commit(self):
        self.committed = True
        return super().commit()


class FlakyBackend(MemoryBackend):
    """Hands out uploads whose second write fails."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[FailingUpload] = []

    def open_write(self, path, *, offset=0, truncate=True):
        plain = super().open_write(path, offset=offset, truncate=truncate)
        upload = FailingUpload(self, path, bytes(plain._buf), plain._pos, fail_at=2)
        plain.abort()
        self.uploads.append(upload)
        return upload


def _fs(backend, **limits) -> UserFS:
    return UserFS(User("u", home=Location("mem", "/")), {"mem": backend}, limits=Limits(**limits))


def _read(fs: UserFS, path: str) -> bytes:
    with fs.open_read(path) as f:
        return f.read()


def _seed(fs: UserFS, path: str, data: bytes) -> None:
    upload = fs.open_write(path)
    upload.write(data)
    upload.commit()


def test_a_failed_write_makes_the_commit_fail_and_keeps_the_previous_version():
    backend = FlakyBackend()
    fs = _fs(backend)
    upload = fs.open_write("/kept.txt")
    upload.write(b"version one")
    upload.commit()
    upload = fs.open_write("/kept.txt")
    upload.write(b"first block ")
    with pytest.raises(BackendUnavailable):
        upload.write(b"lost block ")
    with pytest.raises(BackendUnavailable, match="storage unavailable for '/kept.txt'"):
        upload.commit()
    assert not backend.uploads[-1].committed
    assert _read(fs, "/kept.txt") == b"version one"


def test_writes_after_a_failed_one_keep_failing_with_the_first_error():
    backend = FlakyBackend()
    fs = _fs(backend)
    upload = fs.open_write("/new.txt")
    upload.write(b"a")
    with pytest.raises(BackendUnavailable):
        upload.write(b"b")
    # A pipelining client goes on writing: nothing after the hole may land.
    with pytest.raises(BackendUnavailable):
        upload.write(b"c")
    with pytest.raises(BackendUnavailable):
        upload.write_at(5, b"d")
    with pytest.raises(BackendUnavailable):
        upload.truncate(0)
    with pytest.raises(BackendUnavailable):
        upload.commit()
    assert not fs.exists("/new.txt")


def test_a_refused_write_poisons_the_upload_like_a_failed_one():
    # The hole check refuses before the backend sees the write: the client's bytes
    # are still missing, so what follows must not be committed either.
    fs = _fs(MemoryBackend(), max_hole_bytes=16)
    _seed(fs, "/kept.txt", b"version one")
    upload = fs.open_write("/kept.txt")
    upload.write(b"0123")
    with pytest.raises(QuotaExceeded):
        upload.write_at(1000, b"far away")
    with pytest.raises(QuotaExceeded):
        upload.write(b"4567")
    with pytest.raises(QuotaExceeded):
        upload.commit()
    assert _read(fs, "/kept.txt") == b"version one"


def test_an_upload_used_as_a_context_manager_after_a_caught_failure_is_not_committed():
    fs = _fs(FlakyBackend())
    with pytest.raises(BackendUnavailable):
        with fs.open_write("/new.txt") as upload:
            upload.write(b"a")
            try:
                upload.write(b"b")
            except BackendUnavailable:
                pass                # a careless caller carries on
    assert not fs.exists("/new.txt")


def test_a_full_local_disk_says_no_space_left_not_quota(small_disk):
    backend = LocalBackend(LocalConfig(str(small_disk.root)))
    try:
        fs = UserFS(User("u", home=Location("local", "/")), {"local": backend})
        _seed(fs, "/kept.txt", b"version one")
        small_disk.fill()
        upload = fs.open_write("/kept.txt")
        with pytest.raises(StorageFull, match="no space left on the storage writing '/kept.txt'"):
            for _ in range(64):
                upload.write(b"x" * 65536)
        with pytest.raises(StorageFull):
            upload.commit()
        assert _read(fs, "/kept.txt") == b"version one"
        assert sorted(p.name for p in small_disk.root.iterdir()) == ["filler", "kept.txt"]
    finally:
        backend.close()
