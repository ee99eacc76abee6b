"""Peak RSS of a large streamed upload and download through S3Backend, moto in a child process.

    python bench/s3_backend_rss.py [GiB]

Upload and download each run in a fresh process, which prints its RSS at the
start, the peak growth (sampled every 10 ms from /proc) and the throughput.
moto keeps the objects in its own process.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.storage.s3 import MiB, S3Backend, S3Config  # noqa: E402
from tests.s3_server import start_s3_server_process  # noqa: E402


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    def __init__(self) -> None:
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(phase: str, endpoint: str, size: int) -> None:
    """Run one phase in this (fresh) process and print its peak RSS growth."""
    table = {"bucket": "gateway-test", "prefix": "bench", "endpoint_url": endpoint, "region": "us-east-1",
             "access_key_id": "testing-key", "secret_access_key": "testing-secret"}
    backend = S3Backend(S3Config(**table))
    chunk = bytes(range(256)) * 128  # 32 KiB, an SFTP write
    try:
        base = rss()
        with PeakRSS() as peak:
            start = time.monotonic()
            if phase == "upload":
                with backend.open_write("/big.bin") as upload:
                    for _ in range(size // len(chunk)):
                        upload.write(chunk)
            else:
                read = 0
                with backend.open_read("/big.bin") as stream:
                    while data := stream.read(32 * 1024):
                        read += len(data)
                assert read == size
            seconds = time.monotonic() - start
        print(f"{phase}: {size / MiB:.0f} MiB, part_size {backend.config.part_size / MiB:.0f} MiB x "
              f"{backend.config.parts_in_flight} in flight: RSS {base / MiB:.1f} MiB, peak growth "
              f"+{(peak.peak - base) / MiB:.1f} MiB, {size / MiB / seconds:.0f} MiB/s", flush=True)
    finally:
        backend.close()


def main() -> None:
    if len(sys.argv) == 4:
        measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))
        return
    size = int(float(sys.argv[1] if len(sys.argv) > 1 else 1) * 1024 * MiB)
    server = start_s3_server_process()
    try:
        for phase in ("upload", "download"):
            subprocess.run([sys.executable, __file__, phase, server.endpoint_url, str(size)], check=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
