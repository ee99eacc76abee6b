"""Files served to browsers: one user's upload never runs as script for another (stored XSS)."""
from __future__ import annotations

import re
import subprocess
from urllib.parse import quote, urljoin

import pytest

from tests.conftest import PASSWORD
from tests.webdav.conftest import DavClient

SCRIPT_PAGE = (b"<html><body><p id=x>static</p>"
               b"<script>document.getElementById('x').textContent = 'ran' + 'script'</script></body></html>")


@pytest.fixture
def running(make_gateway):
    """alice and bob, each with a read-write mount /shared on the same folder."""
    running = make_gateway(webdav=True)
    (running.data / "shared").mkdir()
    for name in ("alice", "bob"):
        running.add_user(name, mounts={"/shared": ("local:/shared", ["*"])})
    return running


@pytest.fixture
def shared(running):
    """(alice, bob): alice writes into the shared mount, bob reads."""
    return DavClient(running.webdav_port, "alice"), DavClient(running.webdav_port, "bob")


@pytest.mark.parametrize("name", ["evil.html", "evil.htm", "evil.xhtml", "evil.svg", "evil.xml",
                                  "evil.js", "evil.mjs", "EVIL.HTML"])
def test_active_file_from_another_user_is_served_as_a_sandboxed_download(shared, name):
    writer, reader = shared
    assert writer.put(f"/shared/{name}", SCRIPT_PAGE).status == 201
    for method in ("GET", "HEAD"):
        reply = reader.request(method, f"/shared/{name}")
        assert reply.status == 200
        assert reply.header("X-Content-Type-Options") == "nosniff"
        assert reply.header("Content-Security-Policy") == "sandbox"
        assert reply.header("Content-Disposition") == f'attachment; filename="{name}"'
    assert reader.get(f"/shared/{name}").body == SCRIPT_PAGE


def test_range_request_of_an_active_file_carries_the_same_headers(shared):
    writer, reader = shared
    writer.put("/shared/page.html", SCRIPT_PAGE)
    reply = reader.get("/shared/page.html", Range="bytes=0-9")
    assert reply.status == 206
    assert reply.body == SCRIPT_PAGE[:10]
    assert reply.header("Content-Security-Policy") == "sandbox"
    assert reply.header("Content-Disposition") == 'attachment; filename="page.html"'


def test_plain_file_is_shown_inline_but_sandboxed_and_never_sniffed(shared):
    alice, _ = shared
    alice.put("/notes.txt", SCRIPT_PAGE)
    alice.put("/no-extension", SCRIPT_PAGE)
    for path in ("/notes.txt", "/no-extension"):
        reply = alice.get(path)
        assert reply.status == 200
        assert reply.header("X-Content-Type-Options") == "nosniff"
        assert reply.header("Content-Security-Policy") == "sandbox"
        assert reply.header("Content-Disposition") is None
    assert alice.get("/notes.txt").header("Content-Type").startswith("text/plain")


def test_non_ascii_name_gets_an_rfc_6266_filename(shared):
    alice, _ = shared
    name = 'grüße "€".svg'
    assert alice.put("/" + quote(name), SCRIPT_PAGE).status == 201
    reply = alice.get("/" + quote(name))
    assert reply.status == 200
    assert reply.header("Content-Disposition") == (
        'attachment; filename="gr__e \\"_\\".svg"; '
        "filename*=UTF-8''gr%C3%BC%C3%9Fe%20%22%E2%82%AC%22.svg")


def test_folder_listing_is_not_sandboxed(shared):
    writer, reader = shared
    writer.put("/shared/page.html", SCRIPT_PAGE)
    reply = reader.get("/shared/")
    assert reply.status == 200
    assert reply.header("Content-Type").startswith("text/html")
    assert reply.header("Content-Security-Policy") is None
    assert reply.header("Content-Disposition") is None
    assert b'href="page.html"' in reply.body


def _dump_dom(url: str, profile) -> str:
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.tools("chromium")
def test_browser_renders_the_listing_follows_its_link_and_shows_html_in_a_text_file_as_text(
        running, shared, tmp_path):
    writer, _ = shared
    writer.put("/shared/page.txt", SCRIPT_PAGE)
    base = f"http://bob:{quote(PASSWORD)}@127.0.0.1:{running.webdav_port}/shared/"
    listing = _dump_dom(base, tmp_path / "profile")
    assert "Index of /shared" in listing
    link = re.search(r'<a class="[^"]*" href="([^"]+)">\s*page\.txt', listing)
    assert link is not None, listing
    shown = _dump_dom(urljoin(base, link.group(1)), tmp_path / "profile")
    assert "&lt;script&gt;" in shown          # shown as text, in the browser's <pre>
    assert "ranscript" not in shown
