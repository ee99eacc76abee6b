"""Sharing one process between bulk SFTP transfers and interactive requests.

One gateway process runs both protocols on one interpreter lock. An SFTP
upload is a stream of packets that each want the lock for a moment, and
sixteen of them kept it busy enough that WebDAV requests, which take and
release it around every system call, got a tenth of their solo rate.

`Fairness` is a duty cycle for bulk work: while interactive requests are
coming in (one in flight, and one started within the last `RECENT` seconds),
SFTP read and write packets of bulk transfers (a handle past `BULK_AFTER`
bytes) pass one at a time, and after each one the gate
stays shut for as long as the packet took, scaled so bulk work holds at most
about `share` of the time. A lone long request (a WebDAV upload trickling in for an
hour) stops counting after `RECENT`, so it cannot slow SFTP for its lifetime.
With no interactive demand the gate costs two reads per packet, so SFTP alone
runs at full speed.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


# Seconds since the last interactive request began during which bulk work is rationed.
RECENT = 1.0
# Bytes one SFTP handle moves before its reads and writes count as bulk: a
# small file's few packets are as interactive as a WebDAV request.
BULK_AFTER = 1 << 20
# Longest rest one rationed packet imposes (seconds).
MAX_REST = 0.02


class Fairness:
    """A process's gate between bulk packets and interactive requests (0 < share <= 1; 1: off)."""

    def __init__(self, share: float = 0.5) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"bulk share must be in (0, 1], got {share}")
        self.share = share
        self._interactive = 0
        self._last_begin = 0.0
        self._count_lock = threading.Lock()
        self._gate = threading.Lock()

    @property
    def interactive(self) -> int:
        """Interactive requests in flight."""
        return self._interactive

    def begin_interactive(self) -> None:
        with self._count_lock:
            self._interactive += 1
            self._last_begin = time.monotonic()

    def end_interactive(self) -> None:
        with self._count_lock:
            self._interactive -= 1

    def contended(self) -> bool:
        """Interactive requests are in flight and still arriving."""
        return self._interactive > 0 and time.monotonic() - self._last_begin < RECENT

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Around one bulk packet: free while nobody interactive waits, rationed while they do.

        Rationed, packets pass one at a time and each holds the gate, after it is
        done, for its own duration times (1 - share) / share. Wall time, not the
        thread's CPU time: what the packet costs the others is its time on the
        interpreter lock plus the paramiko transport thread's decryption behind
        it, and the CPU clock sees neither (measured: with it, WebDAV kept 0.10
        of its solo rate instead of 0.56). A packet that blocks (a slow disk, S3)
        earns at most MAX_REST of rest.
        """
        if self.share >= 1 or not self.contended():
            yield
            return
        with self._gate:
            start = time.perf_counter()
            try:
                yield
            finally:
                if self.contended():
                    # Holding the gate while we rest keeps every other bulk packet out too:
                    # the rest is what the interactive requests get.
                    rest = (time.perf_counter() - start) * (1 - self.share) / self.share
                    time.sleep(min(rest, MAX_REST))
