"""The gateway with `[server] workers = 1` beside `workers = 2`, in one run.

Both gateways run at once (local backend, on tmpfs unless --disk) and are
measured in alternating order: the rate of 4 KiB PUTs from many keep-alive
clients at once (client processes of several threads, one http.client
connection each), a large WebDAV PUT (curl -T) and a large SFTP upload
(OpenSSH sftp). Prints a Markdown table of medians.

The clients run on the same machine as the servers: on a small VM they take
a good share of the CPU, equally for both.

Usage: python bench/workers.py [--clients 16] [--seconds 15] [--size-mb 256] [--repeat 3] [--disk]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PASSWORD, USER, Server, curl, sftp_batch, start_gateway  # noqa: E402

AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
PROCESSES = 4   # client processes; --clients connections are spread over them


def _put_loop(port: int, prefix: str, seconds: float, threads: int, out: multiprocessing.Queue) -> None:
    """One client process: `threads` keep-alive connections PUTting 4 KiB files until the time is up."""
    body = os.urandom(4096)
    counts = [0] * threads
    start = threading.Barrier(threads)

    def loop(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            conn.request("PUT", f"/{prefix}-{n}-{i % 500}.bin", body=body, headers=AUTH)
            response = conn.getresponse()
            response.read()
            if response.status not in (201, 204):
                raise RuntimeError(f"PUT -> {response.status}")
            counts[n] += 1
            i += 1
        conn.close()

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put(sum(counts))


def small_put_rate(server: Server, clients: int, seconds: float, tag: str) -> float:
    """4 KiB PUTs per second from `clients` keep-alive connections at once."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    per_process = [clients // PROCESSES + (1 if i < clients % PROCESSES else 0) for i in range(PROCESSES)]
    procs = [multiprocessing.Process(target=_put_loop, args=(server.http_port, f"{tag}-{i}", seconds, n, queue))
             for i, n in enumerate(per_process) if n]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--disk", action="store_true", help="data in a temp dir on disk, not /dev/shm")
    args = parser.parse_args()
    base = None if args.disk or not Path("/dev/shm").is_dir() else "/dev/shm"
    work = Path(tempfile.mkdtemp(prefix="gw-workers-", dir=base))
    servers: dict[int, Server] = {}
    results: dict[tuple[int, str], list[float]] = {}
    try:
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        known_hosts = work / "known_hosts"
        payload = work / "payload.bin"
        with open(payload, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(1 << 20))
        for workers in (1, 2):
            (work / f"w{workers}").mkdir()
            servers[workers] = start_gateway(work / f"w{workers}", key.with_suffix(".pub"),
                                             [f"server.workers={workers}"])
        for round_ in range(args.repeat):
            order = (1, 2) if round_ % 2 == 0 else (2, 1)
            for workers in order:
                server = servers[workers]
                subprocess.run(["sync"], check=True)
                rate = small_put_rate(server, args.clients, args.seconds, f"r{round_}")
                results.setdefault((workers, "4 KiB PUT /s"), []).append(rate)
                for name in ("big-dav.bin", "big-sftp.bin"):
                    (server.root / name).unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)
                seconds = curl(server, ["-T", str(payload), f"http://127.0.0.1:{server.http_port}/big-dav.bin"])
                results.setdefault((workers, f"{args.size_mb} MiB WebDAV PUT MB/s"), []).append(
                    args.size_mb * 1.048576 / seconds)
                subprocess.run(["sync"], check=True)
                seconds = sftp_batch(server, key, known_hosts, [f"put {payload} big-sftp.bin"], work)
                results.setdefault((workers, f"{args.size_mb} MiB SFTP upload MB/s"), []).append(
                    args.size_mb * 1.048576 / seconds)
                for name in ("big-dav.bin", "big-sftp.bin"):
                    if (server.root / name).stat().st_size != payload.stat().st_size:
                        raise RuntimeError(f"workers={workers}: {name} has the wrong size")
                print(f"round {round_ + 1} workers={workers}: "
                      + ", ".join(f"{k[1]} {v[-1]:.0f}" for k, v in results.items() if k[0] == workers),
                      file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    metrics = list(dict.fromkeys(metric for _, metric in results))
    print(f"{platform.node()}: {os.cpu_count()} CPUs, data on {'disk' if base is None else 'tmpfs'}, "
          f"{args.clients} clients for {args.seconds:.0f} s, medians of {args.repeat} alternating rounds\n")
    print("| metric | workers = 1 | workers = 2 | ratio |")
    print("|---|---|---|---|")
    for metric in metrics:
        one, two = (statistics.median(results[(w, metric)]) for w in (1, 2))
        print(f"| {metric} | {one:.0f} | {two:.0f} | {two / one:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
