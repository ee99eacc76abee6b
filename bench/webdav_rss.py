"""Server memory during a large WebDAV PUT and GET: RSS growth must stay under 50 MiB.

Runs the gateway in a child process (so only the server's memory is measured),
streams SIZE bytes up and back down with http.client in 1 MiB pieces, and
prints the server's RSS before and its peak (VmHWM) after each transfer.

    python bench/webdav_rss.py [SIZE_MIB]      # default 2048
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1024 * 1024
LIMIT_MIB = 50

SERVER = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from gateway.config import load_config
from gateway.server import Gateway
from gateway.users import Location, User, hash_password
from gateway.permissions import parse_perms
from tests.conftest import write_config
tmp = Path({tmp!r})
gw = Gateway(load_config(write_config(tmp, webdav=True, sftp=False)))
gw.users.add(User("bench", hash_password("bench"), (), Location.parse("local:/bench"), (),
                  {{"/": parse_perms(["*"])}}, 0, 0, False))
gw.start()
print(gw.frontends[0].address[1], flush=True)
sys.stdin.read()
gw.stop()
"""


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def body(size: int, digest):
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    while sent < size:
        piece = block[: min(CHUNK, size - sent)]
        digest.update(piece)
        sent += len(piece)
        yield piece


def main() -> int:
    size = int(sys.argv[1]) * CHUNK if len(sys.argv) > 1 else 2048 * CHUNK
    auth = "Basic " + base64.b64encode(b"bench:bench").decode()
    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.Popen([sys.executable, "-c", SERVER.format(root=str(ROOT), tmp=tmp)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            port = int(child.stdout.readline())
            # Log in once first: argon2 verification briefly takes 64 MiB by design
            # (its memory cost), once per cached login, whatever the body size.
            rss_before, _ = memory(child.pid)
            reset_peak(child.pid)
            warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            warm.request("PROPFIND", "/", headers={"Authorization": auth, "Depth": "0"})
            warm.getresponse().read()
            warm.close()
            print(f"first login: server peak growth {(memory(child.pid)[1] - rss_before) / 1024:.1f} MiB "
                  "(argon2 memory cost)")
            results = {}
            for label in ("PUT", "GET"):
                rss_before, _ = memory(child.pid)
                reset_peak(child.pid)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                started = time.monotonic()
                if label == "PUT":
                    up = hashlib.sha256()
                    conn.request("PUT", "/big.bin", body=body(size, up),
                                 headers={"Authorization": auth, "Content-Length": str(size)})
                    reply = conn.getresponse()
                    reply.read()
                    assert reply.status in (201, 204), reply.status
                else:
                    down = hashlib.sha256()
                    conn.request("GET", "/big.bin", headers={"Authorization": auth})
                    reply = conn.getresponse()
                    assert reply.status == 200, reply.status
                    while piece := reply.read(CHUNK):
                        down.update(piece)
                    assert down.digest() == up.digest(), "content differs after the round trip"
                elapsed = time.monotonic() - started
                conn.close()
                _, peak = memory(child.pid)
                growth = (peak - rss_before) / 1024
                results[label] = growth
                print(f"{label} {size / CHUNK:.0f} MiB in {elapsed:.1f}s ({size / CHUNK / elapsed:.0f} MiB/s): "
                      f"server RSS {rss_before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB, "
                      f"growth {growth:.1f} MiB")
        finally:
            child.stdin.close()
            child.wait(timeout=60)
    worst = max(results.values())
    print(f"worst growth {worst:.1f} MiB (limit {LIMIT_MIB} MiB): {'ok' if worst < LIMIT_MIB else 'FAIL'}")
    return 0 if worst < LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
