"""UserFS: the one permission gate, homes and mounts, quotas, derived operations."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from gateway.errors import (AlreadyExists, DirectoryNotEmpty, InvalidPath, IsADirectory, NotFound,
                            PermissionDenied, QuotaExceeded)
from gateway.permissions import ALL, READ_ONLY, Perm, parse_perms
from gateway.storage.memory import MemoryBackend
from gateway.users import Location, Mount, User
from gateway.store import Store, open_store
from gateway.store import Usage as StoredUsage
from gateway.vfs import Limits, QuotaTracker, UserFS

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def make_fs(user: User | None = None, **backends) -> UserFS:
    backends = backends or {"mem": MemoryBackend(), "other": MemoryBackend()}
    user = user or User("u", home=Location("mem", "/"))
    return UserFS(user, backends)


def put(fs: UserFS, path: str, data: bytes = b"data") -> None:
    with fs.open_write(path) as up:
        up.write(data)


def read(fs: UserFS, path: str) -> bytes:
    with fs.open_read(path) as f:
        return f.read()


# -- guard tests ---------------------------------------------------------------

def test_every_public_method_is_classified_as_read_or_write():
    public = {name for name, _ in inspect.getmembers(UserFS, callable) if not name.startswith("_")}
    assert public == set(UserFS.READ_METHODS) | set(UserFS.WRITE_METHODS)


WRITE_CALLS = {
    "open_write": lambda fs: fs.open_write("/new.txt"),
    "create_file": lambda fs: fs.create_file("/new.txt"),
    "make_dir": lambda fs: fs.make_dir("/newdir"),
    "remove_file": lambda fs: fs.remove_file("/file.txt"),
    "remove_dir": lambda fs: fs.remove_dir("/emptydir"),
    "remove_tree": lambda fs: fs.remove_tree("/dir"),
    "rename": lambda fs: fs.rename("/file.txt", "/renamed.txt"),
    "copy_file": lambda fs: fs.copy_file("/file.txt", "/copy.txt"),
    "copy_tree": lambda fs: fs.copy_tree("/dir", "/dircopy"),
    "set_mtime": lambda fs: fs.set_mtime("/file.txt", 1000.0),
    "truncate": lambda fs: fs.truncate("/file.txt", 0),
    "undo_create_file": lambda fs: fs.undo_create_file("/file.txt", fs.stat("/file.txt")),
    "check_change": lambda fs: fs.check_change("/file.txt"),
    "check_replace": lambda fs: fs.check_replace("/file.txt"),
}


def test_write_call_table_covers_every_write_method():
    assert set(WRITE_CALLS) == set(UserFS.WRITE_METHODS)


@pytest.mark.parametrize("method", sorted(WRITE_CALLS))
def test_every_write_method_denies_a_read_only_user(method):
    backend = MemoryBackend()
    admin = make_fs(mem=backend)
    put(admin, "/file.txt")
    admin.make_dir("/emptydir")
    admin.make_dir("/dir")
    put(admin, "/dir/inner.txt")
    reader = UserFS(User("ro", home=Location("mem", "/"), permissions={"/": READ_ONLY}), {"mem": backend})
    before = sorted(e.name for e in reader.list_dir("/"))
    with pytest.raises(PermissionDenied):
        WRITE_CALLS[method](reader)
    assert sorted(e.name for e in reader.list_dir("/")) == before
    assert read(reader, "/file.txt") == b"data"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_front_ends_never_import_storage():
    checked = 0
    for folder in ("webdav", "sftp"):
        for path in (GATEWAY / folder).rglob("*.py"):
            checked += 1
            for name in _imports(path):
                assert "storage" not in name.split("."), f"{path} imports {name}"
    # The guard must look at something once the front-ends exist.
    assert checked >= 0


def test_import_guard_catches_a_storage_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..storage.local import LocalBackend\nimport gateway.storage\n")
    assert any("storage" in n.split(".") for n in _imports(bad))


def test_check_access_refuses_what_the_matching_operation_would_and_changes_nothing():
    backend = MemoryBackend()
    put(make_fs(mem=backend), "/kept.txt")
    drop = UserFS(User("drop", home=Location("mem", "/"), permissions={"/": parse_perms(["list", "upload"])}),
                  {"mem": backend})
    drop.check_access("/new.txt", write=True)
    for kwargs in ({"read": True}, {"delete": True}):
        with pytest.raises(PermissionDenied):
            drop.check_access("/new.txt", **kwargs)
    with pytest.raises(PermissionDenied):
        drop.check_access("/kept.txt", write=True)      # replacing needs `overwrite`
    with pytest.raises(IsADirectory):
        drop.check_access("/", write=True)
    assert sorted(e.name for e in drop.list_dir("/")) == ["kept.txt"]


# -- homes and mounts ------------------------------------------------------------

@pytest.fixture
def mounted():
    home, other = MemoryBackend(), MemoryBackend()
    home.make_dir("/alice")
    other.make_dir("/team")
    other.make_dir("/team/reports")
    with other.open_write("/team/reports/q1.txt") as up:
        up.write(b"q1")
    user = User("alice", home=Location("home", "/alice"),
                mounts=(Mount("/shared", Location("other", "/team"), READ_ONLY),
                        Mount("/deep/archive", Location("other", "/team/reports"), ALL)))
    return UserFS(user, {"home": home, "other": other}), home, other


def test_home_is_the_root_of_the_users_tree(mounted):
    fs, home, _ = mounted
    put(fs, "/a.txt", b"A")
    assert home.stat("/alice/a.txt").size == 1
    assert fs.stat("/a.txt").name == "a.txt"


def test_mount_points_appear_in_listings(mounted):
    fs, _, _ = mounted
    names = {e.name: e.is_dir for e in fs.list_dir("/")}
    assert names == {"shared": True, "deep": True}
    assert [e.name for e in fs.list_dir("/deep")] == ["archive"]
    assert [e.name for e in fs.list_dir("/shared/reports")] == ["q1.txt"]


def test_mount_has_its_own_permissions(mounted):
    fs, _, _ = mounted
    assert read(fs, "/shared/reports/q1.txt") == b"q1"
    with pytest.raises(PermissionDenied):
        put(fs, "/shared/new.txt")
    put(fs, "/deep/archive/q2.txt", b"q2")
    assert read(fs, "/shared/reports/q2.txt") == b"q2"


def test_mount_points_cannot_be_removed_or_renamed(mounted):
    fs, _, _ = mounted
    for call in (lambda: fs.remove_tree("/deep/archive"), lambda: fs.remove_dir("/deep"),
                 lambda: fs.rename("/deep/archive", "/x"), lambda: fs.rename("/deep", "/x")):
        with pytest.raises(PermissionDenied):
            call()
    with pytest.raises(AlreadyExists):
        fs.make_dir("/deep")


def test_move_across_backends_is_copy_then_delete(mounted):
    fs, home, other = mounted
    fs.make_dir("/project")
    put(fs, "/project/a.txt", b"alpha")
    fs.make_dir("/project/sub")
    put(fs, "/project/sub/b.txt", b"beta")
    fs.rename("/project", "/deep/archive/project")
    assert read(fs, "/deep/archive/project/sub/b.txt") == b"beta"
    assert other.stat("/team/reports/project/a.txt").size == 5
    with pytest.raises(NotFound):
        home.stat("/alice/project")


def test_move_into_itself_is_refused(mounted):
    fs, _, _ = mounted
    fs.make_dir("/d")
    with pytest.raises(InvalidPath):
        fs.rename("/d", "/d/inner")


def test_rename_needs_overwrite_to_replace(mounted):
    fs, _, _ = mounted
    put(fs, "/a", b"a")
    put(fs, "/b", b"b")
    with pytest.raises(AlreadyExists):
        fs.rename("/a", "/b")
    fs.rename("/a", "/b", overwrite=True)
    assert read(fs, "/b") == b"a"


def test_rename_of_a_folder_respects_stricter_rules_inside_it():
    backend = MemoryBackend()
    backend.make_dir("/proj")
    backend.make_dir("/proj/keep")
    fs = UserFS(User("u", home=Location("mem", "/"),
                     permissions={"/": ALL, "/proj/keep": READ_ONLY}), {"mem": backend})
    # A rule covers the path it names and everything below it, the folder included.
    with pytest.raises(PermissionDenied):
        fs.make_dir("/proj/keep/sub")
    with pytest.raises(PermissionDenied):
        fs.rename("/proj", "/moved")
    with pytest.raises(PermissionDenied):
        fs.remove_tree("/proj")
    assert fs.stat("/proj/keep").is_dir


def test_rename_to_itself_is_checked_like_any_rename():
    backend = MemoryBackend()
    with backend.open_write("/hidden.txt") as up:
        up.write(b"h")
    fs = UserFS(User("u", home=Location("mem", "/"), permissions={"/": frozenset({Perm.DOWNLOAD})}),
                {"mem": backend})
    # Without this check, "OK" for an existing path and "no such file" for a
    # missing one tell a user who may not list what the folder holds.
    with pytest.raises(PermissionDenied):
        fs.rename("/hidden.txt", "/hidden.txt")
    with pytest.raises(PermissionDenied):
        fs.rename("/missing.txt", "/missing.txt")


def test_rename_into_a_readable_folder_needs_download_on_the_source():
    backend = MemoryBackend()
    for folder in ("/inbox", "/public", "/sorted"):
        backend.make_dir(folder)
    with backend.open_write("/inbox/secret.txt") as up:
        up.write(b"s")
    write_only = frozenset({Perm.LIST, Perm.UPLOAD, Perm.RENAME})
    fs = UserFS(User("u", home=Location("mem", "/"),
                     permissions={"/": ALL, "/inbox": write_only, "/sorted": write_only}),
                {"mem": backend})
    with pytest.raises(PermissionDenied):
        fs.open_read("/inbox/secret.txt")
    with pytest.raises(PermissionDenied):
        fs.rename("/inbox/secret.txt", "/public/secret.txt")
    with pytest.raises(PermissionDenied):
        fs.rename("/inbox", "/public/inbox")
    assert backend.stat("/inbox/secret.txt").size == 1
    # Between folders that grant no reading, a move reveals nothing.
    fs.rename("/inbox/secret.txt", "/sorted/secret.txt")
    assert backend.stat("/sorted/secret.txt").size == 1


def test_copy_or_move_onto_the_home_or_a_mount_is_refused(mounted):
    fs, _, _ = mounted
    put(fs, "/a.txt", b"A")
    for destination in ("/", "/deep", "/deep/archive", "/shared"):
        with pytest.raises(PermissionDenied):
            fs.check_replace(destination)
    fs.check_replace("/a.txt")
    fs.check_replace("/not-there-yet.txt")


def test_check_change_needs_overwrite_on_an_existing_path(mounted):
    fs, _, _ = mounted
    put(fs, "/a.txt", b"A")
    fs.check_change("/a.txt")
    with pytest.raises(NotFound):
        fs.check_change("/missing.txt")
    with pytest.raises(PermissionDenied):
        fs.check_change("/shared/reports/q1.txt")


def test_locate_and_virtual_path_are_inverse(mounted):
    fs, _, _ = mounted
    assert fs.locate("/a.txt") == ("home", "/alice/a.txt")
    assert fs.locate("/") == ("home", "/alice")
    assert fs.locate("/deep/archive/q1.txt") == ("other", "/team/reports/q1.txt")
    for vpath in ("/a.txt", "/", "/shared/x", "/deep/archive/q1.txt"):
        assert fs.virtual_path(*fs.locate(vpath)) in (vpath, "/shared/reports/q1.txt")
    # /team/reports is seen through two mounts; either name is this user's own.
    assert fs.virtual_path("other", "/team/reports") in ("/deep/archive", "/shared/reports")
    assert fs.virtual_path("home", "/bob/x") is None
    assert fs.virtual_path("other", "/") == "/shared"       # above a mount: its mount point
    # Home storage hidden behind a mount point is not this user's to see.
    assert fs.virtual_path("home", "/alice/shared/x") is None


def test_remove_tree_and_copy_tree(mounted):
    fs, _, _ = mounted
    fs.make_dir("/t")
    fs.make_dir("/t/u")
    put(fs, "/t/u/f.txt", b"f")
    fs.copy_tree("/t", "/t2")
    assert read(fs, "/t2/u/f.txt") == b"f"
    with pytest.raises(AlreadyExists):
        fs.copy_tree("/t", "/t2")
    with pytest.raises(DirectoryNotEmpty):
        fs.remove_dir("/t")
    fs.remove_tree("/t")
    assert not fs.exists("/t")


def test_open_write_on_a_folder_is_an_error(mounted):
    fs, _, _ = mounted
    fs.make_dir("/folder")
    for path in ("/folder", "/", "/deep", "/shared"):
        with pytest.raises(IsADirectory):
            fs.open_write(path)


def test_hostile_paths_never_leave_the_home(mounted):
    fs, home, _ = mounted
    home.make_dir("/bob")
    with home.open_write("/bob/secret.txt") as up:
        up.write(b"bob's")
    for path in ("/../bob/secret.txt", "../../bob/secret.txt", "/shared/../../bob/secret.txt"):
        with pytest.raises(InvalidPath):
            fs.open_read(path)
    assert fs.normalize("/shared/../a") == "/a"


# -- quota ------------------------------------------------------------------------

def test_quota_bytes_refuses_the_write_that_would_pass_it():
    fs = make_fs(User("q", home=Location("mem", "/"), quota_bytes=100))
    put(fs, "/a", b"x" * 60)
    up = fs.open_write("/b")
    up.write(b"y" * 30)
    with pytest.raises(QuotaExceeded):
        up.write(b"y" * 20)
    up.abort()
    assert not fs.exists("/b")
    assert fs.usage().used_bytes == 60
    assert fs.usage().free_bytes == 40


def test_quota_usage_in_the_store_is_shared_by_the_trackers_of_two_processes(tmp_path):
    user = User("q", home=Location("mem", "/"), quota_bytes=1000)
    backend = MemoryBackend()
    store, other = open_store("sqlite:///gateway.db", tmp_path), open_store("sqlite:///gateway.db", tmp_path)
    try:
        store.add_user(user)

        def process(on: Store) -> UserFS:
            tracker = QuotaTracker(1000, 0, lambda: backend.usage("/"), store=on, user="q")
            return UserFS(user, {"mem": backend}, quota=tracker)

        one, two = process(store), process(other)
        put(two, "/a", b"a" * 400)   # each counts the home before the other's upload
        put(one, "/b", b"b" * 400)
        with pytest.raises(QuotaExceeded):
            put(two, "/c", b"c" * 400)
        one.remove_file("/a")
        put(two, "/c", b"c" * 400)
        assert store.get_usage("q") == StoredUsage(800, 2)
        assert one.usage().free_bytes == two.usage().free_bytes == 200
    finally:
        store.close()
        other.close()


class CountingStore:
    """A store that counts its quota-usage reads (the per-upload cost this test is about)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.usage_reads = 0

    def get_usage(self, user: str):
        self.usage_reads += 1
        return self._store.get_usage(user)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def test_uploads_of_a_user_without_limits_read_no_usage_while_it_is_not_counted(tmp_path):
    user = User("q", home=Location("mem", "/"))
    backend = MemoryBackend()
    store = open_store("sqlite:///gateway.db", tmp_path)
    try:
        store.add_user(user)
        counting = CountingStore(store)
        tracker = QuotaTracker(0, 0, lambda: backend.usage("/"), store=counting, user="q")
        fs = UserFS(user, {"mem": backend}, quota=tracker)
        for index in range(5):
            put(fs, f"/f{index}")
        # One look (is it counted?) per QuotaTracker.CACHE_SECONDS, not one per upload.
        assert counting.usage_reads == 1
    finally:
        store.close()


def test_a_new_file_upload_of_a_user_with_limits_reads_the_usage_once(tmp_path):
    user = User("q", home=Location("mem", "/"), quota_bytes=1000)
    backend = MemoryBackend()
    store = open_store("sqlite:///gateway.db", tmp_path)
    try:
        store.add_user(user)
        counting = CountingStore(store)
        tracker = QuotaTracker(1000, 0, lambda: backend.usage("/"), store=counting, user="q")
        fs = UserFS(user, {"mem": backend}, quota=tracker)
        put(fs, "/first")   # counts the home: the store has no usage yet
        counting.usage_reads = 0
        put(fs, "/second", b"x" * 100)
        assert counting.usage_reads == 1
        assert store.get_usage("q") == StoredUsage(104, 2)
    finally:
        store.close()


def test_quota_of_a_user_the_store_does_not_know_is_counted_in_process(tmp_path):
    store = open_store("sqlite:///gateway.db", tmp_path)
    try:
        backend = MemoryBackend()
        tracker = QuotaTracker(100, 0, lambda: backend.usage("/"), store=store, user="q")
        fs = UserFS(User("q", home=Location("mem", "/"), quota_bytes=100), {"mem": backend}, quota=tracker)
        put(fs, "/a", b"x" * 60)
        with pytest.raises(QuotaExceeded):
            put(fs, "/b", b"x" * 60)
        assert fs.usage().used_bytes == 60 and store.get_usage("q") is None
    finally:
        store.close()


def test_quota_counts_overwrites_as_the_difference():
    fs = make_fs(User("q", home=Location("mem", "/"), quota_bytes=100))
    put(fs, "/a", b"x" * 90)
    put(fs, "/a", b"x" * 95)   # replaces 90 bytes: 95 in use, not 185
    assert fs.usage().used_bytes == 95
    fs.remove_file("/a")
    assert fs.usage().used_bytes == 0


def test_quota_files_refuses_a_new_file():
    fs = make_fs(User("q", home=Location("mem", "/"), quota_files=2))
    put(fs, "/a")
    put(fs, "/b")
    with pytest.raises(QuotaExceeded):
        fs.open_write("/c")
    put(fs, "/a", b"overwrite is fine")


def test_folders_count_toward_quota_files_and_removing_them_gives_the_room_back():
    # Issue 15: uncounted folders, each carrying WebDAV locks and dead properties,
    # were a way around quota_files.
    fs = make_fs(User("q", home=Location("mem", "/"), quota_files=3))
    fs.make_dir("/a")
    fs.make_dir("/a/b")
    put(fs, "/a/f")
    with pytest.raises(QuotaExceeded):
        fs.make_dir("/c")
    with pytest.raises(QuotaExceeded):
        put(fs, "/g")
    assert not fs.exists("/c")
    fs.remove_dir("/a/b")
    fs.make_dir("/c")
    fs.remove_tree("/a")
    assert fs.usage().used_files == 1
    fs.make_dir("/d")
    put(fs, "/e")


def test_the_running_count_of_files_and_folders_agrees_with_a_fresh_scan():
    home, other = MemoryBackend(), MemoryBackend()
    user = User("q", home=Location("home", "/"), quota_files=100,
                mounts=(Mount("/ext", Location("other", "/"), ALL),))
    fs = UserFS(user, {"home": home, "other": other})
    fs.make_dir("/d")
    fs.make_dir("/d/e")
    put(fs, "/d/e/f")
    fs.copy_tree("/d", "/copy")
    fs.make_dir("/ext/m")
    fs.make_dir("/ext/m/n")
    put(fs, "/ext/m/n/x")
    fs.rename("/ext/m", "/m")             # into the home from a mount: m, n and x
    fs.rename("/d/e", "/ext/e")           # out of it: e and f
    fs.remove_tree("/copy/e")
    assert fs.usage().used_files == home.usage("/").used_files == 5   # d, copy, m, m/n, m/n/x


def test_quota_is_scanned_from_existing_content():
    backend = MemoryBackend()
    with backend.open_write("/old") as up:
        up.write(b"z" * 70)
    fs = UserFS(User("q", home=Location("mem", "/"), quota_bytes=100), {"mem": backend})
    with pytest.raises(QuotaExceeded):
        put(fs, "/new", b"z" * 40)


def test_quota_follows_moves_between_home_and_mount():
    home, other = MemoryBackend(), MemoryBackend()
    user = User("q", home=Location("home", "/"), quota_bytes=1000,
                mounts=(Mount("/ext", Location("other", "/"), ALL),))
    fs = UserFS(user, {"home": home, "other": other})
    put(fs, "/ext/big", b"b" * 600)
    assert fs.usage().used_bytes == 0        # mounts are not counted
    fs.rename("/ext/big", "/big")
    assert fs.usage().used_bytes == 600
    put(fs, "/ext/second", b"s" * 600)
    with pytest.raises(QuotaExceeded):
        fs.rename("/ext/second", "/second")
    assert fs.exists("/ext/second")
    fs.rename("/big", "/ext/big")
    assert fs.usage().used_bytes == 0


def test_quota_holds_for_a_move_from_a_mount_on_the_home_backend():
    backend = MemoryBackend()
    backend.make_dir("/home")
    backend.make_dir("/team")
    user = User("q", home=Location("mem", "/home"), quota_bytes=1000,
                mounts=(Mount("/team", Location("mem", "/team"), ALL),))
    fs = UserFS(user, {"mem": backend})
    put(fs, "/team/big", b"b" * 1500)
    with pytest.raises(QuotaExceeded):
        fs.rename("/team/big", "/big")
    assert fs.exists("/team/big") and not fs.exists("/big")
    assert fs.usage().used_bytes == 0


def test_quota_counts_a_move_that_replaces_a_file_in_the_home():
    home, other = MemoryBackend(), MemoryBackend()
    user = User("q", home=Location("home", "/"), quota_bytes=1000,
                mounts=(Mount("/ext", Location("other", "/"), ALL),))
    fs = UserFS(user, {"home": home, "other": other})
    put(fs, "/a", b"a" * 700)
    put(fs, "/b", b"b" * 100)
    fs.rename("/b", "/a", overwrite=True)
    assert (fs.usage().used_bytes, fs.usage().used_files) == (100, 1)
    put(fs, "/ext/c", b"c" * 900)
    fs.rename("/ext/c", "/a", overwrite=True)   # 900 replaces 100: within the quota
    assert (fs.usage().used_bytes, fs.usage().used_files) == (900, 1)


def test_quota_tracks_a_file_deleted_while_an_upload_to_it_is_open():
    backend = MemoryBackend()
    fs = UserFS(User("q", home=Location("mem", "/"), quota_bytes=10_000), {"mem": backend})
    put(fs, "/f", b"x" * 1000)
    for _ in range(3):
        up = fs.open_write("/f", truncate=False)
        fs.remove_file("/f")
        up.write_at(0, b"y" * 1000)
        up.commit()
    assert (fs.usage().used_bytes, fs.usage().used_files) == (1000, 1)
    assert backend.usage("/").used_bytes == 1000


def test_errors_name_the_users_path_not_the_storage_path(mounted):
    fs, _, _ = mounted
    with pytest.raises(NotFound) as info:
        fs.open_read("/missing.txt")
    assert info.value.path == "/missing.txt" and "/alice" not in str(info.value)
    with pytest.raises(NotFound) as info:
        fs.open_read("/shared/reports/none.txt")
    assert info.value.path == "/shared/reports/none.txt" and "/team" not in str(info.value)
    with pytest.raises(NotFound) as info:
        list(fs.list_dir("/nowhere"))
    assert "/alice" not in str(info.value)


def test_set_mtime_dry_run_checks_everything_and_changes_nothing():
    backend = MemoryBackend()
    with backend.open_write("/f") as up:
        up.write(b"f")
    before = backend.stat("/f").mtime
    writer = UserFS(User("w", home=Location("mem", "/")), {"mem": backend})
    writer.set_mtime("/f", 1000.0, dry_run=True)
    assert backend.stat("/f").mtime == before
    with pytest.raises(NotFound):
        writer.set_mtime("/missing", 1000.0, dry_run=True)
    reader = UserFS(User("r", home=Location("mem", "/"), permissions={"/": READ_ONLY}), {"mem": backend})
    with pytest.raises(PermissionDenied):
        reader.set_mtime("/f", 1000.0, dry_run=True)


# -- holes and depth -------------------------------------------------------------

def deep_memory_tree(levels: int) -> tuple[MemoryBackend, str]:
    backend = MemoryBackend()
    path = ""
    for _ in range(levels):
        path += "/d"
        backend.make_dir(path)
    with backend.open_write(path + "/f") as up:
        up.write(b"bottom")
    return backend, path


def test_remove_tree_removes_folders_nested_deeper_than_the_recursion_limit():
    backend, _ = deep_memory_tree(1101)
    fs = make_fs(mem=backend)
    fs.remove_tree("/d")
    assert list(fs.list_dir("/")) == []


def test_copy_tree_copies_folders_nested_deeper_than_the_recursion_limit_within_a_raised_cap():
    backend, bottom = deep_memory_tree(1101)
    fs = UserFS(User("u", home=Location("mem", "/")), {"mem": backend}, limits=Limits(max_depth=2000))
    fs.copy_tree("/d", "/e")
    assert read(fs, "/e" + bottom[2:] + "/f") == b"bottom"


def test_copy_tree_deeper_than_max_depth_raises_invalid_path():
    backend, _ = deep_memory_tree(10)
    fs = UserFS(User("u", home=Location("mem", "/")), {"mem": backend}, limits=Limits(max_depth=5))
    with pytest.raises(InvalidPath, match="at most 5 are allowed"):
        fs.copy_tree("/d", "/e")
    with pytest.raises(InvalidPath, match="at most 5 are allowed"):
        fs.make_dir("/d/d/d/d/d/x")
    fs.make_dir("/d/d/d/d/x")


def test_a_gap_past_the_end_over_max_hole_bytes_raises_quota_exceeded_and_commits_nothing():
    fs = UserFS(User("u", home=Location("mem", "/")), {"mem": MemoryBackend()},
                limits=Limits(max_hole_bytes=10))
    put(fs, "/f", b"abc")
    up = fs.open_write("/f", truncate=False)
    with pytest.raises(QuotaExceeded, match="11 bytes of zeros"):
        up.write_at(14, b"x")
    # The refused bytes are missing from the upload: it can no longer be committed.
    with pytest.raises(QuotaExceeded, match="11 bytes of zeros"):
        up.write_at(13, b"y")
    with pytest.raises(QuotaExceeded, match="11 bytes of zeros"):
        up.commit()
    assert read(fs, "/f") == b"abc"
    up = fs.open_write("/f", truncate=False)
    with pytest.raises(QuotaExceeded):
        up.truncate(14)
    up.abort()
    up = fs.open_write("/g", offset=11)
    with pytest.raises(QuotaExceeded):
        up.write(b"x")
    up.abort()
    assert not fs.exists("/g")


def test_a_gap_past_the_end_up_to_max_hole_bytes_is_written_as_zeros():
    fs = UserFS(User("u", home=Location("mem", "/")), {"mem": MemoryBackend()},
                limits=Limits(max_hole_bytes=10))
    put(fs, "/f", b"abc")
    with fs.open_write("/f", truncate=False) as up:
        up.write_at(13, b"y")
        up.truncate(24)
    assert read(fs, "/f") == b"abc" + b"\0" * 10 + b"y" + b"\0" * 10


def test_undo_create_file_removes_only_the_empty_file_it_was_given():
    fs = make_fs()
    created = fs.create_file("/lock-null.txt")
    assert fs.undo_create_file("/lock-null.txt", created) is True
    assert not fs.exists("/lock-null.txt")
    created = fs.create_file("/written.txt")
    put(fs, "/written.txt", b"a client wrote here since")
    assert fs.undo_create_file("/written.txt", created) is False
    assert read(fs, "/written.txt") == b"a client wrote here since"
    assert fs.undo_create_file("/gone.txt", created) is False
