"""Small WebDAV PUTs per second: the per-request cost of the gateway, store included.

Starts `python -m gateway serve` from each checkout given (data and state on
/dev/shm, so no disk sets the pace), then times 4 KiB PUTs: N in sequence on
one keep-alive connection, and N spread over 8 concurrent clients (one
keep-alive connection each). Checkouts are run in turn, alternating, and each
number is the median of --repeat runs with the min-max beside it; the last
column is the ratio to the first checkout (the box is shared: compare ratios
from one run, not numbers from different runs).

Usage: python bench/small_puts.py [--count 600] [--repeat 3] CHECKOUT [CHECKOUT ...]
(without a checkout: this one). Add --quota to give the user a quota (the
quota check then runs on every PUT), --profile SECONDS to record a py-spy
profile of the first checkout's server while it takes sequential PUTs.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w

USER, PASSWORD = "bench", "bench-password-123"
BODY = os.urandom(4096)
CLIENTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


class Gateway:
    """One gateway process run from `checkout`, serving a fresh folder on /dev/shm."""

    def __init__(self, checkout: Path, quota: bool) -> None:
        self.checkout = checkout
        self.work = Path(tempfile.mkdtemp(prefix="small-puts-", dir="/dev/shm"))
        self.port = free_port()
        config = {
            "server": {"state_dir": str(self.work / "state"), "log_level": "warning"},
            "webdav": {"listen": f"127.0.0.1:{self.port}"},
            "sftp": {"enabled": False, "listen": "127.0.0.1:0"},
            "admin": {"enabled": False},
            "backends": {"local": {"type": "local", "root": str(self.work / "data")}},
        }
        (self.work / "data").mkdir()
        self.config = self.work / "gateway.toml"
        self.config.write_text(tomli_w.dumps(config))
        add = [sys.executable, "-m", "gateway", "user", "add", USER, "--password-stdin",
               "--config", str(self.config)]
        if quota:
            add += ["--quota-bytes", str(1 << 40)]
        subprocess.run(add, input=PASSWORD + "\n", text=True, check=True, cwd=checkout, capture_output=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                                     cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)


HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def put_many(port: int, folder: str, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("MKCOL", f"/{folder}/", headers=HEADERS)
        conn.getresponse().read()
        for i in range(count):
            conn.request("PUT", f"/{folder}/f{i}.bin", body=BODY, headers=HEADERS)
            response = conn.getresponse()
            response.read()
            if response.status not in (201, 204):
                raise RuntimeError(f"PUT {folder}/f{i}.bin -> {response.status}")
    finally:
        conn.close()


def sequential(port: int, count: int, run: int) -> float:
    """PUTs per second on one connection (the MKCOL is not timed: it is one request of many)."""
    put_many(port, f"warm{run}", 20)
    start = time.perf_counter()
    put_many(port, f"seq{run}", count)
    return count / (time.perf_counter() - start)


def concurrent(port: int, count: int, run: int) -> float:
    """PUTs per second over CLIENTS connections at once."""
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            put_many(port, f"con{run}-{index}", count // CLIENTS)
        except BaseException as exc:   # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return (count // CLIENTS) * CLIENTS / elapsed


def profile(checkout: Path, quota: bool, count: int, seconds: int, out: Path) -> None:
    gateway = Gateway(checkout, quota)
    try:
        stop = threading.Event()

        def load() -> None:
            run = 0
            while not stop.is_set():
                put_many(gateway.port, f"prof{run}", count)
                run += 1

        loader = threading.Thread(target=load)
        loader.start()
        subprocess.run(["py-spy", "record", "-p", str(gateway.proc.pid), "-d", str(seconds), "-f", "raw",
                        "-o", str(out), "--nonblocking"], check=True, capture_output=True)
        stop.set()
        loader.join()
    finally:
        gateway.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="*", type=Path, default=[Path(__file__).resolve().parent.parent])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quota", action="store_true", help="give the user a (large) quota")
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS")
    parser.add_argument("--profile-out", type=Path, default=Path("small_puts.prof.txt"))
    args = parser.parse_args()
    if args.profile:
        profile(args.checkouts[0], args.quota, args.count, args.profile, args.profile_out)
        return 0
    results: dict[tuple[int, str], list[float]] = {}
    for run in range(args.repeat):
        # Alternate the order so that neither checkout always runs on a warmer (or busier) box.
        order = list(enumerate(args.checkouts))
        if run % 2:
            order.reverse()
        for index, checkout in order:
            gateway = Gateway(checkout, args.quota)
            try:
                results.setdefault((index, "sequential"), []).append(sequential(gateway.port, args.count, run))
                results.setdefault((index, f"{CLIENTS} clients"), []).append(
                    concurrent(gateway.port, args.count, run))
            finally:
                gateway.stop()
    print(f"| checkout | workload | PUT 4 KiB/s median (min-max) | ratio to {args.checkouts[0]} |")
    print("|---|---|---|---|")
    for workload in ("sequential", f"{CLIENTS} clients"):
        base = statistics.median(results[(0, workload)])
        for index, checkout in enumerate(args.checkouts):
            values = results[(index, workload)]
            med = statistics.median(values)
            print(f"| {checkout} | {workload} | {med:,.0f} ({min(values):,.0f}-{max(values):,.0f}) "
                  f"| {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
