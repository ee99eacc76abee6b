"""The path normalizer: a table of hostile and odd inputs and what each becomes."""
from __future__ import annotations

import unicodedata

import pytest

from gateway import paths
from gateway.errors import InvalidPath

NFC = unicodedata.normalize("NFC", "/café.txt")
NFD = unicodedata.normalize("NFD", "/café.txt")

# input -> normalized path, or InvalidPath
TABLE: list[tuple[object, object]] = [
    ("/", "/"),
    ("", "/"),
    (".", "/"),
    ("./", "/"),
    ("a", "/a"),
    ("/a/b/c", "/a/b/c"),
    ("//a//b//", "/a/b"),
    ("/a/b/", "/a/b"),
    ("/a/./b/.", "/a/b"),
    ("/a/b/..", "/a"),
    ("/a/b/../..", "/"),
    ("/a/../b", "/b"),
    ("a/b/../../c", "/c"),
    ("/..", InvalidPath),
    ("..", InvalidPath),
    ("../etc/passwd", InvalidPath),
    ("/../../etc/passwd", InvalidPath),
    ("/a/../../etc", InvalidPath),
    ("/a/b/../../../x", InvalidPath),
    ("/a/.../b", "/a/.../b"),          # three dots is an ordinary name
    ("/a/..b/c", "/a/..b/c"),
    ("/a/b..", "/a/b.."),
    ("/.hidden", "/.hidden"),
    ("/a\x00b", InvalidPath),
    ("/a\x00/../b", InvalidPath),
    ("/\x00", InvalidPath),
    ("/a\nb", InvalidPath),
    ("/a\rb", InvalidPath),
    ("/a\tb", InvalidPath),
    ("/a\x1bb", InvalidPath),
    ("/a\x7fb", InvalidPath),
    ("/a\\b", InvalidPath),
    ("\\..\\..\\etc", InvalidPath),
    ("/..\\..\\etc", InvalidPath),
    ("/%2e%2e/etc", "/%2e%2e/etc"),    # no URL decoding here: the front-end decodes once
    ("/" + "x" * 255, "/" + "x" * 255),
    ("/" + "x" * 256, InvalidPath),
    ("/" + "é" * 127, "/" + "é" * 127),   # 254 bytes
    ("/" + "é" * 128, InvalidPath),       # 256 bytes: the limit counts bytes, not characters
    ("/" + "/".join(["abcdefgh"] * 455), "/" + "/".join(["abcdefgh"] * 455)),  # 4095 bytes
    ("/" + "/".join(["abcdefgh"] * 456), InvalidPath),                         # 4104 bytes
    ("/Ünïcödé/文件/файл.txt", "/Ünïcödé/文件/файл.txt"),
    (NFC, NFC),
    (NFD, NFD),                        # NFD kept as given, not folded to NFC
    ("/emoji 😀.txt", "/emoji 😀.txt"),
    ("/with space/ and trailing ", "/with space/ and trailing "),
    ("/a\udcff", InvalidPath),          # lone surrogate from undecodable bytes
    (b"/bytes/ok", "/bytes/ok"),
    (b"/bad/\xff\xfe", InvalidPath),
    (b"/\xc0\xae\xc0\xae/etc", InvalidPath),  # overlong UTF-8 for ".."
    ("/a/b/c/../../../../", InvalidPath),
    ("C:\\Windows", InvalidPath),
    ("/C:/Windows", "/C:/Windows"),
    ("/.gw-upload-0123abcd", InvalidPath),     # the backends' temp prefix is reserved
    ("/a/.gw-upload-x/b.txt", InvalidPath),    # in every segment
    ("/.gw-upload-x/..", InvalidPath),         # even where a later ".." would drop it
    ("/x.gw-upload-y", "/x.gw-upload-y"),      # only as a prefix
    ("/.gw-uploads", "/.gw-uploads"),
]


def test_table_has_at_least_forty_cases():
    assert len(TABLE) >= 40


@pytest.mark.parametrize("raw,expected", TABLE, ids=[repr(t[0])[:40] for t in TABLE])
def test_normalize(raw, expected):
    if expected is InvalidPath:
        with pytest.raises(InvalidPath):
            paths.normalize(raw)
    else:
        assert paths.normalize(raw) == expected


def test_normalize_is_idempotent_on_its_own_output():
    for raw, expected in TABLE:
        if isinstance(expected, str):
            assert paths.normalize(expected) == expected


def test_nfc_and_nfd_names_stay_distinct():
    assert paths.normalize(NFC) != paths.normalize(NFD)


def test_split_and_join_round_trip():
    assert paths.split("/") == ("/", "")
    assert paths.split("/a") == ("/", "a")
    assert paths.split("/a/b") == ("/a", "b")
    assert paths.join("/", "a") == "/a"
    assert paths.join("/a", "b") == "/a/b"


def test_is_within_does_not_match_sibling_prefixes():
    assert paths.is_within("/a/b", "/a")
    assert paths.is_within("/a", "/a")
    assert not paths.is_within("/ab", "/a")
    assert paths.is_within("/anything", "/")


def test_rebase_moves_below_new_prefix():
    assert paths.rebase("/a/b/c", "/a", "/x") == "/x/b/c"
    assert paths.rebase("/a", "/a", "/x") == "/x"
    assert paths.rebase("/c", "/", "/home/u") == "/home/u/c"


@pytest.mark.parametrize("name", [
    "plain.txt", "ü-ß", "a b", "x\x00y", "tab\there", "del\x7f", "back\\slash", "lone\udc80", ".gw-upload-x",
    "n" * 255, "n" * 256, "ü" * 127, "ü" * 128, ".", "..", "",
])
@pytest.mark.parametrize("parent", ["/", "/d", "/" + "p/" * 1900 + "p"])
def test_check_name_refuses_exactly_what_normalize_refuses(parent, name):
    path = parent.rstrip("/") + "/" + name
    try:
        # A name normalize would drop or resolve ("", ".", "..") is no name either.
        plain = paths.normalize(path) == path and name not in ("", ".", "..")
    except InvalidPath:
        plain = False
    if plain:
        paths.check_name(name, path)
    else:
        with pytest.raises(InvalidPath):
            paths.check_name(name, path)
