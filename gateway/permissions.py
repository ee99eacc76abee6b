"""Permissions: the Perm set, per-path rules, and the one check every operation passes.

Rules map a virtual path prefix to a set of permissions; the longest prefix
that contains a path decides for it. Only UserFS calls `Policy.require`.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from . import paths
from .errors import PermissionDenied


class Perm(enum.Enum):
    LIST = "list"
    DOWNLOAD = "download"
    UPLOAD = "upload"          # create a new file
    OVERWRITE = "overwrite"    # replace or modify an existing file
    DELETE = "delete"
    RENAME = "rename"
    MKDIR = "mkdir"
    SET_TIMES = "set_times"


ALL = frozenset(Perm)
READ_ONLY = frozenset({Perm.LIST, Perm.DOWNLOAD})


def parse_perms(words: Iterable[str]) -> frozenset[Perm]:
    """Turn names like ["list", "download"] or ["*"] into a permission set.

    Raises:
        ValueError: a name is not a permission.
    """
    result: set[Perm] = set()
    for word in words:
        word = word.strip()
        if word == "*":
            return ALL
        try:
            result.add(Perm(word))
        except ValueError:
            known = ", ".join(p.value for p in Perm)
            raise ValueError(f"unknown permission '{word}' (known: {known}, *)") from None
    return frozenset(result)


def format_perms(perms: frozenset[Perm]) -> list[str]:
    if perms == ALL:
        return ["*"]
    return sorted(p.value for p in perms)


class Policy:
    """Longest-prefix permission rules for one user's virtual tree."""

    def __init__(self, rules: Mapping[str, frozenset[Perm]]) -> None:
        normalized = {paths.normalize(prefix): perms for prefix, perms in rules.items()}
        normalized.setdefault("/", ALL)
        # Longest prefix first, so the first match is the decisive one.
        self._rules = sorted(normalized.items(), key=lambda item: len(item[0]), reverse=True)

    def perms_for(self, path: str) -> frozenset[Perm]:
        for prefix, perms in self._rules:
            if paths.is_within(path, prefix):
                return perms
        return frozenset()

    def allows(self, perm: Perm, path: str) -> bool:
        return perm in self.perms_for(path)

    def require(self, perm: Perm, path: str) -> None:
        """Raise PermissionDenied unless `perm` is granted on `path`."""
        if perm not in self.perms_for(path):
            raise PermissionDenied(path, f"permission '{perm.value}' denied on '{path}'")

    def grants_within(self, perm: Perm, path: str) -> bool:
        """True when `perm` is granted on `path` or by any rule for something below it."""
        if self.allows(perm, path):
            return True
        return any(prefix != path and paths.is_within(prefix, path) and perm in perms
                   for prefix, perms in self._rules)

    def require_tree(self, perm: Perm, path: str) -> None:
        """Require `perm` on `path` and on every rule that governs something below it.

        Deleting or renaming a directory acts on everything inside it, so a
        stricter rule deeper down must not be bypassed by acting on a parent.
        """
        self.require(perm, path)
        for prefix, perms in self._rules:
            if prefix != path and paths.is_within(prefix, path) and perm not in perms:
                raise PermissionDenied(prefix, f"permission '{perm.value}' denied on '{prefix}'")
