"""The backend contract (gateway/storage/base.py), run against every backend.

Each failure asserts the exact error class the contract's docstrings name.
"""
from __future__ import annotations

import io

import pytest

from gateway.errors import (AlreadyExists, DirectoryNotEmpty, GatewayError, InvalidPath, IsADirectory,
                            NotADirectory, NotFound, PermissionDenied)
from gateway.storage.base import TEMP_PREFIX, Backend

MTIME = 1_600_000_000.5


def put(backend: Backend, path: str, data: bytes) -> None:
    with backend.open_write(path) as upload:
        upload.write(data)


def get(backend: Backend, path: str) -> bytes:
    with backend.open_read(path) as stream:
        return stream.read()


def names(backend: Backend, path: str) -> list[str]:
    return sorted(entry.name for entry in backend.list_dir(path))


class TestBackendContract:
    # -- reading --------------------------------------------------------------

    def test_root_is_an_empty_directory(self, backend):
        entry = backend.stat("/")
        assert entry.is_dir and entry.name == ""
        assert names(backend, "/") == []

    def test_stat_of_missing_path_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.stat("/nothing")

    def test_stat_describes_a_file(self, backend):
        put(backend, "/a.txt", b"hello")
        entry = backend.stat("/a.txt")
        assert (entry.name, entry.is_dir, entry.size) == ("a.txt", False, 5)
        assert entry.mtime > 0 and entry.etag

    def test_etag_changes_when_content_changes(self, backend):
        put(backend, "/a.txt", b"one")
        first = backend.stat("/a.txt").etag
        put(backend, "/a.txt", b"two!")
        assert backend.stat("/a.txt").etag != first

    def test_open_read_returns_the_content(self, backend):
        put(backend, "/a.bin", bytes(range(256)) * 100)
        assert get(backend, "/a.bin") == bytes(range(256)) * 100

    def test_open_read_with_offset_and_length_reads_a_range(self, backend):
        put(backend, "/a.txt", b"0123456789")
        with backend.open_read("/a.txt", 3, 4) as stream:
            assert stream.read() == b"3456"
        with backend.open_read("/a.txt", 7) as stream:
            assert stream.read() == b"789"

    def test_open_read_stream_seeks_back_and_forth(self, backend):
        data = bytes(i % 251 for i in range(300_000))
        put(backend, "/a.bin", data)
        with backend.open_read("/a.bin") as stream:
            assert stream.seekable()
            stream.seek(200_000)
            assert stream.read(10) == data[200_000:200_010]
            stream.seek(5)
            assert stream.read(10) == data[5:15]
            stream.seek(-4, io.SEEK_END)
            assert stream.read() == data[-4:]

    def test_open_read_past_the_end_reads_nothing(self, backend):
        put(backend, "/a.txt", b"abc")
        with backend.open_read("/a.txt", 10) as stream:
            assert stream.read() == b""

    def test_open_read_of_an_empty_file_reads_nothing(self, backend):
        put(backend, "/empty", b"")
        assert backend.stat("/empty").size == 0
        assert get(backend, "/empty") == b""

    def test_open_read_of_missing_file_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.open_read("/missing")

    def test_open_read_of_directory_raises_is_a_directory(self, backend):
        backend.make_dir("/d")
        with pytest.raises(IsADirectory):
            backend.open_read("/d")

    def test_list_dir_of_missing_directory_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.list_dir("/missing")

    def test_list_dir_of_a_file_raises_not_a_directory(self, backend):
        put(backend, "/f", b"x")
        with pytest.raises(NotADirectory):
            backend.list_dir("/f")

    def test_list_dir_shows_files_and_directories_one_level_deep(self, backend):
        backend.make_dir("/d")
        backend.make_dir("/d/sub")
        put(backend, "/d/a.txt", b"aa")
        put(backend, "/d/sub/deep.txt", b"x")
        entries = {e.name: e for e in backend.list_dir("/d")}
        assert sorted(entries) == ["a.txt", "sub"]
        assert entries["sub"].is_dir and not entries["a.txt"].is_dir
        assert entries["a.txt"].size == 2

    def test_list_dir_pages_through_many_entries(self, backend):
        backend.make_dir("/many")
        expected = [f"file-{i:04d}" for i in range(120)]
        for name in expected:
            put(backend, f"/many/{name}", name.encode())
        listed = list(backend.list_dir("/many"))
        assert sorted(e.name for e in listed) == expected
        assert all(e.size == len(e.name) for e in listed)

    def test_names_with_spaces_and_unicode_round_trip(self, backend):
        backend.make_dir("/dossier été")
        put(backend, "/dossier été/naïve file #1 [x].txt", b"ok")
        assert names(backend, "/dossier été") == ["naïve file #1 [x].txt"]
        assert get(backend, "/dossier été/naïve file #1 [x].txt") == b"ok"

    # -- uploads --------------------------------------------------------------

    def test_upload_is_invisible_before_commit(self, backend):
        upload = backend.open_write("/new.txt")
        upload.write(b"partial")
        with pytest.raises(NotFound):
            backend.stat("/new.txt")
        assert names(backend, "/") == []
        entry = upload.commit()
        assert (entry.name, entry.size) == ("new.txt", 7)
        assert names(backend, "/") == ["new.txt"]

    def test_listing_hides_in_flight_uploads_of_existing_files(self, backend):
        put(backend, "/a.txt", b"old")
        upload = backend.open_write("/a.txt")
        upload.write(b"new content")
        assert [(e.name, e.size) for e in backend.list_dir("/")] == [("a.txt", 3)]
        assert get(backend, "/a.txt") == b"old"
        upload.abort()

    def test_abort_keeps_the_previous_version(self, backend):
        put(backend, "/a.txt", b"old")
        upload = backend.open_write("/a.txt")
        upload.write(b"new")
        upload.abort()
        assert get(backend, "/a.txt") == b"old"
        assert upload.closed

    def test_abort_of_a_new_file_leaves_nothing(self, backend):
        upload = backend.open_write("/a.txt")
        upload.write(b"data")
        upload.abort()
        assert names(backend, "/") == []

    def test_upload_context_manager_aborts_on_error(self, backend):
        put(backend, "/a.txt", b"old")
        with pytest.raises(RuntimeError):
            with backend.open_write("/a.txt") as upload:
                upload.write(b"new")
                raise RuntimeError("client went away")
        assert get(backend, "/a.txt") == b"old"

    def test_abort_after_commit_changes_nothing(self, backend):
        upload = backend.open_write("/a.txt")
        upload.write(b"kept")
        upload.commit()
        upload.abort()
        assert get(backend, "/a.txt") == b"kept"

    def test_write_after_commit_raises(self, backend):
        upload = backend.open_write("/a.txt")
        upload.commit()
        with pytest.raises(ValueError):
            upload.write(b"late")

    def test_upload_size_follows_writes(self, backend):
        upload = backend.open_write("/a.txt")
        upload.write(b"abc")
        upload.write(b"de")
        assert upload.size == 5
        upload.abort()

    def test_write_at_fills_gaps_with_zeros(self, backend):
        with backend.open_write("/a.bin") as upload:
            upload.write_at(0, b"head")
            upload.write_at(10, b"tail")
            upload.write_at(2, b"XY")
        assert get(backend, "/a.bin") == b"heXY\0\0\0\0\0\0tail"

    def test_read_at_reads_the_pending_content(self, backend):
        upload = backend.open_write("/a.txt")
        upload.write(b"hello world")
        assert upload.read_at(6, 5) == b"world"
        upload.abort()

    def test_truncate_shrinks_and_extends_the_pending_content(self, backend):
        with backend.open_write("/a.txt") as upload:
            upload.write(b"abcdef")
            upload.truncate(3)
            assert upload.size == 3
            upload.truncate(5)
        assert get(backend, "/a.txt") == b"abc\0\0"

    def test_resume_continues_an_existing_file(self, backend):
        put(backend, "/a.txt", b"first half,")
        with backend.open_write("/a.txt", offset=11, truncate=False) as upload:
            upload.write(b" second half")
        assert get(backend, "/a.txt") == b"first half, second half"

    def test_write_at_inside_an_existing_file_keeps_the_rest(self, backend):
        put(backend, "/a.txt", b"0123456789")
        with backend.open_write("/a.txt", truncate=False) as upload:
            upload.write_at(4, b"AB")
            assert upload.read_at(0, 10) == b"0123AB6789"
        assert get(backend, "/a.txt") == b"0123AB6789"

    def test_truncate_of_an_existing_file(self, backend):
        put(backend, "/a.txt", b"0123456789")
        with backend.open_write("/a.txt", truncate=False) as upload:
            upload.truncate(4)
        assert get(backend, "/a.txt") == b"0123"

    def test_open_write_without_truncate_on_a_missing_file_starts_empty(self, backend):
        with backend.open_write("/a.txt", truncate=False) as upload:
            upload.write(b"new")
        assert get(backend, "/a.txt") == b"new"

    def test_open_write_with_missing_parent_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.open_write("/missing/a.txt")

    def test_open_write_under_a_file_raises_not_a_directory(self, backend):
        put(backend, "/f", b"x")
        with pytest.raises(NotADirectory):
            backend.open_write("/f/a.txt")

    def test_open_write_on_a_directory_raises_is_a_directory(self, backend):
        backend.make_dir("/d")
        with pytest.raises(IsADirectory):
            backend.open_write("/d")

    def test_create_file_makes_an_empty_file_and_describes_it(self, backend):
        entry = backend.create_file("/new.txt")
        assert (entry.name, entry.is_dir, entry.size) == ("new.txt", False, 0)
        assert backend.stat("/new.txt").size == 0
        assert get(backend, "/new.txt") == b""
        assert names(backend, "/") == ["new.txt"]

    def test_create_file_on_an_existing_path_raises_already_exists_and_keeps_it(self, backend):
        put(backend, "/f", b"keep me")
        backend.make_dir("/d")
        with pytest.raises(AlreadyExists):
            backend.create_file("/f")
        with pytest.raises(AlreadyExists):
            backend.create_file("/d")
        assert get(backend, "/f") == b"keep me"
        assert backend.stat("/d").is_dir

    def test_create_file_with_missing_parent_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.create_file("/missing/a.txt")

    # -- directories ----------------------------------------------------------

    def test_make_dir_creates_an_empty_directory(self, backend):
        backend.make_dir("/d")
        assert backend.stat("/d").is_dir
        assert names(backend, "/d") == []
        assert names(backend, "/") == ["d"]

    def test_make_dir_on_existing_path_raises_already_exists(self, backend):
        backend.make_dir("/d")
        put(backend, "/f", b"x")
        with pytest.raises(AlreadyExists):
            backend.make_dir("/d")
        with pytest.raises(AlreadyExists):
            backend.make_dir("/f")

    def test_make_dir_with_missing_parent_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.make_dir("/a/b")

    def test_make_dir_under_a_file_raises_not_a_directory(self, backend):
        put(backend, "/f", b"x")
        with pytest.raises(NotADirectory):
            backend.make_dir("/f/d")

    def test_writes_under_more_missing_folders_than_the_recursion_limit_raise_not_found(self, backend):
        deep = "/d" * 1101
        with pytest.raises(NotFound):
            backend.make_dir(deep)
        with pytest.raises(NotFound):
            backend.open_write(deep + "/f")

    def test_writes_below_a_file_many_levels_up_raise_an_error(self, backend):
        put(backend, "/f", b"x")
        with pytest.raises((NotFound, NotADirectory)):
            backend.make_dir("/f" + "/d" * 1101)

    def test_remove_dir_removes_an_empty_directory(self, backend):
        backend.make_dir("/d")
        backend.remove_dir("/d")
        with pytest.raises(NotFound):
            backend.stat("/d")

    def test_remove_dir_not_empty_raises(self, backend):
        backend.make_dir("/d")
        put(backend, "/d/f", b"x")
        with pytest.raises(DirectoryNotEmpty):
            backend.remove_dir("/d")
        assert names(backend, "/d") == ["f"]

    def test_remove_dir_of_a_file_raises_not_a_directory(self, backend):
        put(backend, "/f", b"x")
        with pytest.raises(NotADirectory):
            backend.remove_dir("/f")

    def test_remove_dir_of_missing_directory_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.remove_dir("/missing")

    def test_remove_dir_of_the_root_raises_permission_denied(self, backend):
        with pytest.raises(PermissionDenied):
            backend.remove_dir("/")

    # -- files ----------------------------------------------------------------

    def test_remove_file_removes_it(self, backend):
        put(backend, "/f", b"x")
        backend.remove_file("/f")
        with pytest.raises(NotFound):
            backend.stat("/f")

    def test_remove_file_of_missing_file_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.remove_file("/missing")

    def test_remove_file_of_a_directory_raises_is_a_directory(self, backend):
        backend.make_dir("/d")
        with pytest.raises(IsADirectory):
            backend.remove_file("/d")

    def test_removing_the_last_file_keeps_its_directory(self, backend):
        backend.make_dir("/d")
        put(backend, "/d/f", b"x")
        backend.remove_file("/d/f")
        assert backend.stat("/d").is_dir
        assert names(backend, "/d") == []

    def test_copy_file_copies_content(self, backend):
        put(backend, "/a.txt", b"content")
        backend.make_dir("/d")
        backend.copy_file("/a.txt", "/d/b.txt")
        assert get(backend, "/d/b.txt") == b"content"
        assert get(backend, "/a.txt") == b"content"

    def test_copy_file_replaces_an_existing_file(self, backend):
        put(backend, "/a.txt", b"new")
        put(backend, "/b.txt", b"old content")
        backend.copy_file("/a.txt", "/b.txt")
        assert get(backend, "/b.txt") == b"new"

    def test_copy_file_errors(self, backend):
        backend.make_dir("/d")
        put(backend, "/a.txt", b"x")
        with pytest.raises(NotFound):
            backend.copy_file("/missing", "/b")
        with pytest.raises(IsADirectory):
            backend.copy_file("/d", "/b")
        with pytest.raises(IsADirectory):
            backend.copy_file("/a.txt", "/d")
        with pytest.raises(NotFound):
            backend.copy_file("/a.txt", "/missing/b")

    # -- rename ---------------------------------------------------------------

    def test_rename_moves_a_file(self, backend):
        put(backend, "/a.txt", b"data")
        backend.make_dir("/d")
        backend.rename("/a.txt", "/d/b.txt")
        assert get(backend, "/d/b.txt") == b"data"
        assert names(backend, "/") == ["d"]

    def test_rename_onto_an_existing_file_needs_overwrite(self, backend):
        put(backend, "/a", b"new")
        put(backend, "/b", b"old")
        with pytest.raises(AlreadyExists):
            backend.rename("/a", "/b")
        assert get(backend, "/b") == b"old"
        backend.rename("/a", "/b", overwrite=True)
        assert get(backend, "/b") == b"new"
        assert names(backend, "/") == ["b"]

    def test_rename_never_replaces_a_directory(self, backend):
        put(backend, "/a", b"x")
        backend.make_dir("/d")
        backend.make_dir("/e")
        with pytest.raises(AlreadyExists):
            backend.rename("/a", "/d", overwrite=True)
        with pytest.raises(AlreadyExists):
            backend.rename("/e", "/d", overwrite=True)
        with pytest.raises(AlreadyExists):
            backend.rename("/e", "/a", overwrite=True)

    def test_rename_of_missing_source_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.rename("/missing", "/b")

    def test_rename_into_a_missing_directory_raises_not_found(self, backend):
        put(backend, "/a", b"x")
        with pytest.raises(NotFound):
            backend.rename("/a", "/missing/b")

    def test_rename_moves_a_directory_tree(self, backend):
        backend.make_dir("/src")
        backend.make_dir("/src/empty")
        backend.make_dir("/src/sub")
        put(backend, "/src/a", b"a")
        put(backend, "/src/sub/b", b"b")
        backend.rename("/src", "/dst")
        assert names(backend, "/") == ["dst"]
        assert names(backend, "/dst") == ["a", "empty", "sub"]
        assert names(backend, "/dst/empty") == []
        assert get(backend, "/dst/sub/b") == b"b"

    def test_rename_into_itself_raises_invalid_path(self, backend):
        backend.make_dir("/d")
        with pytest.raises(InvalidPath):
            backend.rename("/d", "/d/inner")

    def test_rename_keeps_the_mtime(self, backend):
        put(backend, "/a", b"x")
        backend.set_mtime("/a", MTIME)
        backend.rename("/a", "/b")
        assert backend.stat("/b").mtime == pytest.approx(MTIME)

    # -- times and usage ------------------------------------------------------

    def test_set_mtime_round_trips_through_stat_and_list_dir(self, backend):
        backend.make_dir("/d")
        put(backend, "/d/f", b"content")
        backend.set_mtime("/d/f", MTIME)
        backend.set_mtime("/d", MTIME + 60)
        assert backend.stat("/d/f").mtime == pytest.approx(MTIME)
        assert backend.stat("/d").mtime == pytest.approx(MTIME + 60)
        assert [e.mtime for e in backend.list_dir("/d")] == [pytest.approx(MTIME)]
        assert [e.mtime for e in backend.list_dir("/")] == [pytest.approx(MTIME + 60)]
        assert get(backend, "/d/f") == b"content"

    def test_set_mtime_of_missing_path_raises_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.set_mtime("/missing", MTIME)

    def test_a_new_version_gets_a_new_mtime(self, backend):
        put(backend, "/f", b"x")
        backend.set_mtime("/f", MTIME)
        put(backend, "/f", b"y")
        assert backend.stat("/f").mtime > MTIME + 1

    def test_usage_counts_bytes_and_the_files_and_folders_below_a_path(self, backend):
        backend.make_dir("/d")
        backend.make_dir("/d/sub")
        backend.make_dir("/d/empty")
        put(backend, "/d/a", b"12345")
        put(backend, "/d/sub/b", b"123")
        put(backend, "/other", b"1234567")
        usage = backend.usage("/d")
        assert (usage.used_bytes, usage.used_files) == (8, 4)     # a, sub, sub/b, empty
        usage = backend.usage("/")
        assert (usage.used_bytes, usage.used_files) == (15, 6)    # and d, other

    def test_check_passes_on_a_working_backend(self, backend):
        backend.check()

    # -- uploads left by a process that died ------------------------------------

    def test_abort_stale_upload_removes_a_dead_upload_and_keeps_the_old_version(self, backend):
        put(backend, "/a.bin", b"old")
        upload = backend.open_write("/a.bin")
        announced: list[str] = []
        upload.on_backend_id = announced.append
        # Past one S3 part (8 MiB): the multipart upload exists in storage.
        upload.write(b"x" * (9 * 1024 * 1024))
        upload_id = upload.backend_id
        assert announced in ([], [upload_id])
        if upload_id is not None:
            # Another node aborts it, twice (two sweepers racing): no error.
            backend.abort_stale_upload("/a.bin", upload_id)
            backend.abort_stale_upload("/a.bin", upload_id)
            with pytest.raises(GatewayError):
                upload.commit()
        upload.abort()
        assert get(backend, "/a.bin") == b"old"
        assert names(backend, "/") == ["a.bin"]

    def test_abort_stale_upload_of_one_that_is_gone_does_nothing(self, backend):
        backend.abort_stale_upload("/missing/dir/f", f"{TEMP_PREFIX}0123456789abcdef")
        put(backend, "/f", b"kept")
        backend.abort_stale_upload("/f", f"{TEMP_PREFIX}0123456789abcdef")
        assert get(backend, "/f") == b"kept"
