"""The one path normalizer: virtual paths in, absolute normalized POSIX paths out.

No I/O happens here. Every path a client sends passes through `normalize`
before any permission check or backend call sees it.
"""
from __future__ import annotations

import re

from .errors import InvalidPath

MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4096
# Backends name their in-flight uploads with this prefix, hide such names from
# listings and usage, and delete them at start-up: a user's own file by that
# name would be invisible and then lost, so no client path may use it.
RESERVED_PREFIX = ".gw-upload-"


# Any character _check_segment refuses: one C-level search clears a whole
# path of them, and only a path it flags takes the per-character walk that
# names the error.
_SUSPECT = re.compile("[\x00-\x1f\x7f\\\\\ud800-\udfff]")


def _check_segment(segment: str, original: str) -> None:
    for ch in segment:
        code = ord(ch)
        # Control characters break listings, logs and terminal clients; NUL
        # truncates paths in C APIs below us.
        if code < 0x20 or code == 0x7F:
            raise InvalidPath(original, f"control character {code:#04x} in path")
        # Lone surrogates come from bytes that were not valid UTF-8.
        if 0xD800 <= code <= 0xDFFF:
            raise InvalidPath(original, "path is not valid UTF-8")
    # A backslash is a separator to every Windows client; a name containing one
    # could never be addressed from there, and it is a classic traversal vector.
    if "\\" in segment:
        raise InvalidPath(original, "backslash in path")
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise InvalidPath(original, f"name longer than {MAX_SEGMENT_BYTES} bytes")
    if segment.startswith(RESERVED_PREFIX):
        raise InvalidPath(original, f"names starting with '{RESERVED_PREFIX}' are reserved")


def normalize(path: str | bytes) -> str:
    """Return the absolute normalized form of a virtual path.

    `.` and `..` are resolved lexically; a relative path is taken from `/`.
    Names are kept exactly as given (no Unicode normalization: an NFD name
    stays NFD).

    Raises:
        InvalidPath: the path is not valid UTF-8, contains a control character
            or a backslash, climbs above `/`, is too long, or has a name with
            the reserved prefix `.gw-upload-`.
    """
    if isinstance(path, bytes):
        try:
            path = path.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPath(path.decode("utf-8", "replace"), "path is not valid UTF-8") from None
    _check_length(path)
    suspect = _SUSPECT.search(path) is not None
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            # Anti path traversal: climbing above the root is an error, not a
            # silent clamp, so a hostile path never aliases a real one.
            if not parts:
                raise InvalidPath(path, "path climbs above the root")
            parts.pop()
            continue
        _check_flagged(segment, path, suspect)
        parts.append(segment)
    return "/" + "/".join(parts)


def _check_length(path: str) -> None:
    if len(path) * 4 > MAX_PATH_BYTES and len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidPath(path[:64] + "...", f"path longer than {MAX_PATH_BYTES} bytes")


def _check_flagged(segment: str, original: str, suspect: bool) -> None:
    """_check_segment, for a name that `suspect` (a _SUSPECT match), its length or its prefix flags."""
    if suspect or segment.startswith(RESERVED_PREFIX) \
            or (len(segment) * 4 > MAX_SEGMENT_BYTES and len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES):
        _check_segment(segment, original)


def check_name(name: str, path: str) -> None:
    """Refuse `name`, the last name of the normalized path `path`, as `normalize(path)` would.

    For names read from a listing (made outside the gateway): the checks of
    one name and of the path's length, without rebuilding the whole path.

    Raises:
        InvalidPath: as `normalize`.
    """
    _check_length(path)
    if name in ("", ".", ".."):
        raise InvalidPath(path, f"'{name}' is not a name")
    _check_flagged(name, path, _SUSPECT.search(name) is not None)


def split(path: str) -> tuple[str, str]:
    """Split a normalized path into (parent, name); the root splits into ("/", "")."""
    if path == "/":
        return "/", ""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


def join(parent: str, name: str) -> str:
    """Join a normalized directory path and a single name."""
    return parent.rstrip("/") + "/" + name if name else parent


def is_within(path: str, prefix: str) -> bool:
    """True when `path` equals `prefix` or lies below it (both normalized)."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def relative_to(path: str, prefix: str) -> str:
    """Return `path` re-rooted below `prefix` as an absolute path ("/" for equal)."""
    if not is_within(path, prefix):
        raise ValueError(f"{path!r} is not within {prefix!r}")
    if prefix == "/":
        return path
    rest = path[len(prefix):]
    return rest or "/"


def rebase(path: str, old_prefix: str, new_prefix: str) -> str:
    """Move `path` from below `old_prefix` to the same place below `new_prefix`."""
    rest = relative_to(path, old_prefix)
    if rest == "/":
        return new_prefix
    return new_prefix.rstrip("/") + rest
