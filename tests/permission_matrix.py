"""One permission scenario table that every protocol runs and must answer alike.

`seed` lays out a user's home on disk; each Scenario names an operation, the
paths, and whether it is allowed. `effect_visible` checks on disk that an
allowed operation really happened and a denied one changed nothing.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

USER = "matrix"

PERMS = {
    "/": ["list", "download"],
    "/rw": ["*"],
    "/rw/locked": ["list", "download"],
    "/upload-only": ["list", "upload"],
    "/no-list": ["download"],
    "/no-delete": ["list", "download", "upload", "overwrite", "mkdir", "rename", "set_times"],
    "/no-download": ["list", "upload", "rename"],
}

FILES = ["/file.txt", "/rw/file.txt", "/rw/locked/file.txt", "/upload-only/existing.txt",
         "/no-list/file.txt", "/no-delete/file.txt", "/no-download/file.txt"]
DIRS = ["/rw/dir", "/no-delete/dir"]
CONTENT = b"original content\n"
NEW_CONTENT = b"new content written by the client\n"
MTIME = 1_000_000_000  # 2001-09-09, far from "now"


def seed(home: Path) -> None:
    """Recreate the matrix user's home from scratch."""
    if home.exists():
        shutil.rmtree(home)
    for d in ["/rw", "/rw/locked", "/upload-only", "/no-list", "/no-delete", "/no-download"] + DIRS:
        (home / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for f in FILES:
        (home / f.lstrip("/")).write_bytes(CONTENT)


@dataclass(frozen=True)
class Scenario:
    op: str            # list, download, upload, overwrite, delete, mkdir, rmdir, rename, set_times
    path: str
    allowed: bool
    dest: str = ""

    @property
    def id(self) -> str:
        target = f"->{self.dest}" if self.dest else ""
        return f"{self.op}:{self.path}{target}:{'ok' if self.allowed else 'denied'}"


SCENARIOS = [
    Scenario("list", "/", True),
    Scenario("list", "/rw", True),
    Scenario("list", "/no-list", False),
    Scenario("download", "/file.txt", True),
    Scenario("download", "/no-list/file.txt", True),
    Scenario("download", "/rw/locked/file.txt", True),
    Scenario("upload", "/new.txt", False),
    Scenario("upload", "/rw/new.txt", True),
    Scenario("upload", "/upload-only/new.txt", True),
    Scenario("upload", "/rw/locked/new.txt", False),
    Scenario("overwrite", "/rw/file.txt", True),
    Scenario("overwrite", "/file.txt", False),
    Scenario("overwrite", "/upload-only/existing.txt", False),
    Scenario("overwrite", "/no-delete/file.txt", True),
    Scenario("delete", "/rw/file.txt", True),
    Scenario("delete", "/file.txt", False),
    Scenario("delete", "/no-delete/file.txt", False),
    Scenario("delete", "/rw/locked/file.txt", False),
    Scenario("mkdir", "/rw/newdir", True),
    Scenario("mkdir", "/newdir", False),
    Scenario("mkdir", "/upload-only/newdir", False),
    Scenario("rmdir", "/rw/dir", True),
    Scenario("rmdir", "/no-delete/dir", False),
    Scenario("rename", "/rw/file.txt", True, "/rw/renamed.txt"),
    Scenario("rename", "/no-delete/file.txt", True, "/no-delete/renamed.txt"),
    Scenario("rename", "/rw/file.txt", False, "/moved.txt"),
    Scenario("rename", "/file.txt", False, "/rw/moved.txt"),
    Scenario("rename", "/rw/locked/file.txt", False, "/rw/moved.txt"),
    # A move must not make readable what was not (the destination grants download).
    Scenario("rename", "/no-download/file.txt", False, "/rw/moved.txt"),
    Scenario("rename", "/no-download/file.txt", True, "/no-download/renamed.txt"),
    # Onto itself: still a rename, checked before the "nothing to do" answer.
    Scenario("rename", "/no-list/file.txt", False, "/no-list/file.txt"),
    Scenario("set_times", "/rw/file.txt", True),
    Scenario("set_times", "/file.txt", False),
]


def effect_visible(home: Path, s: Scenario) -> bool:
    """True when the scenario's operation took effect on disk."""
    p = home / s.path.lstrip("/")
    if s.op in ("list", "download"):
        return True  # read-only: the client's answer is what counts
    if s.op == "upload":
        return p.exists() and p.read_bytes() == NEW_CONTENT
    if s.op == "overwrite":
        return p.read_bytes() == NEW_CONTENT
    if s.op in ("delete", "rmdir"):
        return not p.exists()
    if s.op == "mkdir":
        return p.is_dir()
    if s.op == "rename":
        return not p.exists() and (home / s.dest.lstrip("/")).exists()
    if s.op == "set_times":
        return int(os.stat(p).st_mtime) == MTIME
    raise ValueError(s.op)


def unchanged(home: Path, s: Scenario) -> bool:
    """True when a denied operation left everything as `seed` made it."""
    for f in FILES:
        p = home / f.lstrip("/")
        if not p.is_file() or p.read_bytes() != CONTENT or int(os.stat(p).st_mtime) == MTIME:
            return False
    for d in DIRS:
        if not (home / d.lstrip("/")).is_dir():
            return False
    extra = [home / x.lstrip("/") for x in ("/new.txt", "/rw/locked/new.txt", "/newdir",
                                            "/upload-only/newdir", "/moved.txt", "/rw/moved.txt")]
    return not any(p.exists() for p in extra)
