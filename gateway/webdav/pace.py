"""A minimum transfer rate for request bodies and responses, so a client that drips holds no thread for long.

A worker thread serves one request at a time; a client that sends its body
one byte every few seconds, or never reads its response, used to keep the
thread for as long as it kept the connection alive (the socket timeout only
catches a client that sends nothing at all). `Pace` measures the time a
request's worker spends *waiting for the client* (blocked in recv or send)
and the bytes that moved meanwhile: once `window` seconds of waiting add up
and fewer than `min_rate * window` bytes moved, the request is ended with
`TooSlow`. Time the server spends itself (a slow backend, wsgidav's own
work) is not counted against the client.

`PacedSocket` stands in for the connection's socket below cheroot's reader
and writer, so every body read and response write goes through `Pace`.
"""
from __future__ import annotations

import socket
import time
from typing import Any


class TooSlow(TimeoutError):
    """The client moved fewer bytes than the minimum rate over a whole window.

    To cheroot it is a socket timeout (it reads `args[0]`): the connection is
    closed, after a `408 Request Timeout` when no response has started.
    """

    def __init__(self, detail: str) -> None:
        super().__init__("timed out")
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class Pace:
    """The transfer-rate check of one connection; armed only while a request is being served.

    `min_rate` bytes per second over `window` seconds of waiting; 0 turns it
    off. While armed, the socket's timeout is the window (or `timeout`, the
    connection's own, if shorter), so no single wait outlasts it: a request
    below the rate ends within about two windows.
    """

    def __init__(self, sock: socket.socket, min_rate: int, window: float, timeout: float | None) -> None:
        self._sock = sock
        self.min_rate = min_rate
        self.window = window
        self.timeout = timeout
        self.armed = False
        self._waited = 0.0
        self._moved = 0

    def arm(self) -> None:
        """A request begins: a fresh window (no-op when the rate check is off)."""
        if self.min_rate <= 0 or self.window <= 0:
            return
        self._waited, self._moved = 0.0, 0
        self._sock.settimeout(self.window if self.timeout is None else min(self.window, self.timeout))
        self.armed = True

    def disarm(self) -> None:
        """The request is done: the connection's own timeout again."""
        if self.armed:
            self.armed = False
            try:
                self._sock.settimeout(self.timeout)
            except OSError:
                pass   # closed meanwhile

    def account(self, waited: float, moved: int) -> None:
        """Add one call's waiting time and bytes; raises TooSlow when a whole window fell short."""
        self._waited += waited
        self._moved += moved
        if self._waited < self.window:
            return
        short = self._moved < self.min_rate * self._waited
        # A fresh window either way: after TooSlow, the error answer gets one to go out in.
        self._waited, self._moved = 0.0, 0
        if short:
            raise TooSlow(f"under {self.min_rate} bytes/s over {self.window:g} s of waiting for the client")

    def call(self, operation, *args) -> int:
        """Run `operation(*args)` (a recv_into or send of the socket), counting its wait; its byte count."""
        while True:
            started = time.monotonic()
            try:
                count = operation(*args)
            except TimeoutError:
                # A whole socket timeout with nothing moved: TooSlow, unless the
                # bytes earlier in the window were enough; then wait on.
                self.account(time.monotonic() - started, 0)
                continue
            self.account(time.monotonic() - started, count or 0)
            return count


class PacedSocket:
    """A connection's socket as cheroot's reader and writer see it: recv_into and send go through `pace`.

    Everything else is the wrapped socket's.
    """

    def __init__(self, sock: socket.socket, pace: Pace) -> None:
        self._sock = sock
        self._pace = pace

    def recv_into(self, *args) -> int:
        if not self._pace.armed:
            return self._sock.recv_into(*args)
        return self._pace.call(self._sock.recv_into, *args)

    def send(self, *args) -> int:
        if not self._pace.armed:
            return self._sock.send(*args)
        return self._pace.call(self._sock.send, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
