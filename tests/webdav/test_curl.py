"""curl as the client: exact status codes for the everyday requests, and the 100-continue trap."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PASSWORD

pytestmark = pytest.mark.tools("curl")


def curl(port: int, *args: str, user: str = "alice", password: str = PASSWORD) -> tuple[int, str]:
    """Run curl; return (HTTP status, verbose trace)."""
    result = subprocess.run(["curl", "-sS", "-v", "-o", "/dev/null", "-w", "%{http_code}",
                             "-u", f"{user}:{password}", *args],
                            capture_output=True, text=True, timeout=60)
    return int(result.stdout or 0), result.stderr


@pytest.fixture
def url(dav):
    return f"http://127.0.0.1:{dav.webdav_port}"


def test_everyday_requests_get_their_exact_status(dav, url, tmp_path):
    body = tmp_path / "body.txt"
    body.write_text("hello from curl\n")
    steps = [
        (["-X", "MKCOL", f"{url}/docs/"], 201),
        (["-X", "MKCOL", f"{url}/docs/"], 405),
        (["-X", "MKCOL", f"{url}/no/such/parent/"], 409),
        (["-T", str(body), f"{url}/docs/a.txt"], 201),
        (["-T", str(body), f"{url}/docs/a.txt"], 204),
        (["-T", str(body), f"{url}/missing/a.txt"], 409),
        ([f"{url}/docs/a.txt"], 200),
        (["-r", "0-4", f"{url}/docs/a.txt"], 206),
        ([f"{url}/docs/none.txt"], 404),
        (["-X", "PROPFIND", "-H", "Depth: 1", f"{url}/docs/"], 207),
        (["-X", "PROPFIND", "-H", "Depth: infinity", f"{url}/docs/"], 403),
        (["-X", "COPY", "-H", f"Destination: {url}/docs/b.txt", f"{url}/docs/a.txt"], 201),
        (["-X", "COPY", "-H", f"Destination: {url}/docs/b.txt", "-H", "Overwrite: F",
          f"{url}/docs/a.txt"], 412),
        (["-X", "MOVE", "-H", f"Destination: {url}/docs/c.txt", f"{url}/docs/b.txt"], 201),
        (["-X", "DELETE", f"{url}/docs/c.txt"], 204),
        (["-X", "DELETE", f"{url}/docs/c.txt"], 404),
        (["-X", "OPTIONS", f"{url}/"], 200),
    ]
    for args, expected in steps:
        status, trace = curl(dav.webdav_port, *args)
        assert status == expected, f"curl {' '.join(args)} -> {status}, expected {expected}\n{trace}"
    assert (dav.data / "alice" / "docs" / "a.txt").read_text() == "hello from curl\n"


def test_options_on_the_root_needs_no_credentials(url):
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "OPTIONS",
                             f"{url}/"], capture_output=True, text=True, timeout=60)
    assert result.stdout == "200"


def test_wrong_password_upload_gets_401_without_100_continue(dav, url, tmp_path):
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(64 * 1024 * 1024)   # curl sends Expect: 100-continue for a body this size
    status, trace = curl(dav.webdav_port, "-T", str(big), f"{url}/big.bin", password="wrong")
    assert status == 401
    assert "Expect: 100-continue" in trace
    assert "HTTP/1.1 100 Continue" not in trace
    assert not (dav.data / "alice" / "big.bin").exists()


def test_wrong_password_is_401_with_a_basic_challenge(url, dav):
    status, trace = curl(dav.webdav_port, f"{url}/", password="wrong")
    assert status == 401
    assert 'WWW-Authenticate: Basic realm=' in trace
