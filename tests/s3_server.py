"""A real S3-compatible server for tests: moto's server mode over HTTP on 127.0.0.1, port 0.

Import `s3_server` (session fixture) or `s3_backend_table` (per test: a fresh
prefix in the shared bucket, as a [backends.NAME] table for make_gateway).
`s3_server_process` runs moto in a child process, for memory measurements.
Every thread the server runs is named "moto-..." so the no_leaks fixture
ignores it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"
THREAD_PREFIX = "moto-"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:
        pass

    def connection_dropped(self, error: BaseException, environ: dict | None = None) -> None:
        """Close the selector werkzeug leaves open when a client resets mid-response.

        After a response, werkzeug (serving.py, execute) drains the socket
        through a DefaultSelector it closes only when the drain ends quietly;
        a reset there skips the close. A selector and its key map refer to
        each other, so its epoll descriptor lived until the next garbage
        collection and the leak check blamed whichever test ran then (an S3
        reader that jumps drops its GET with data unread).
        """
        traceback = error.__traceback__
        while traceback is not None:
            selector = traceback.tb_frame.f_locals.get("selector")
            if isinstance(selector, selectors.BaseSelector):
                selector.close()
            traceback = traceback.tb_next


class _NamedThreadedServer(ThreadedWSGIServer):
    """werkzeug's threaded server with request threads the leak check can recognise."""

    def process_request_thread(self, request, client_address) -> None:
        threading.current_thread().name = f"{THREAD_PREFIX}request"
        super().process_request_thread(request, client_address)

    def process_request(self, request, client_address) -> None:
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"{THREAD_PREFIX}request", daemon=True)
        thread.start()


@dataclass
class S3Server:
    """A moto server, in this process or (for memory measurements) in a child process."""

    endpoint_url: str
    bucket: str
    _stop: Callable[[], None]
    pid: int = 0

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def backend_table(self, prefix: str = "", **options) -> dict:
        """A [backends.NAME] table (type included) pointing at this server's bucket."""
        return {"type": "s3", "bucket": self.bucket, "prefix": prefix,
                "endpoint_url": self.endpoint_url, "region": REGION,
                "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, **options}

    def empty(self, prefix: str) -> None:
        """Delete every object and abort every multipart upload under `prefix`."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            uploads = client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
            for upload in uploads:
                client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        finally:
            client.close()

    def stop(self) -> None:
        self._stop()


def _create_bucket(server: S3Server) -> S3Server:
    client = server.client()
    try:
        client.create_bucket(Bucket=server.bucket)
    finally:
        client.close()
    return server


def start_s3_server(bucket: str = "gateway-test") -> S3Server:
    """Start moto on an ephemeral port and create `bucket`."""
    # moto spools objects above ~5 MiB to temp files it holds open for the
    # object's life; the leak check would count them. Keep them in memory.
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(2 * 1024 ** 3))
    app = DomainDispatcherApplication(create_backend_app)
    server = _NamedThreadedServer("127.0.0.1", 0, app, handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name=f"{THREAD_PREFIX}server", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return _create_bucket(S3Server(f"http://127.0.0.1:{server.server_address[1]}", bucket, stop, os.getpid()))


_CHILD = "from tests.s3_server import _serve_forever; _serve_forever()"


def _serve_forever() -> None:
    """Child process body: serve on port 0, print the port, run until stdin closes."""
    app = DomainDispatcherApplication(create_backend_app)
    server = _NamedThreadedServer("127.0.0.1", 0, app, handler=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"{THREAD_PREFIX}server", daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()


def start_s3_server_process(bucket: str = "gateway-test", *, setup: str = "") -> S3Server:
    """Start moto in a child process, so this process's memory holds none of the objects.

    `setup` is Python the child runs before it serves (a benchmark's patches to moto).
    """
    env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": "65536"}
    child = subprocess.Popen([sys.executable, "-c", f"{setup}\n{_CHILD}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parent.parent, env=env, text=True)
    port = int(child.stdout.readline())

    def stop() -> None:
        child.stdin.close()
        child.wait()
        child.stdout.close()

    return _create_bucket(S3Server(f"http://127.0.0.1:{port}", bucket, stop, child.pid))


class TcpForwarder:
    """A TCP path from 127.0.0.1:`port` to `target` that a test or the soak cuts, restores and slows.

    `cut()` closes the listener and resets every connection through it, as a
    network failure between the gateway and S3 or PostgreSQL would (new
    connections are refused); `restore()` listens on the same port again;
    `delay` seconds are slept before each chunk forwarded (a slow link). Its
    threads are named "moto-..." like the server's.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.delay = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._start(self._accept, listener)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            with contextlib.suppress(OSError):
                # Linger 0: the close resets. The shutdown wakes the pump blocked in recv on it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = [t for t in self._threads if t.is_alive()]

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"{THREAD_PREFIX}forward", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:   # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
            ended: list[socket.socket] = []
            self._start(self._pump, client, server, ended)
            self._start(self._pump, server, client, ended)

    def _pump(self, source: socket.socket, sink: socket.socket, ended: list[socket.socket]) -> None:
        try:
            while data := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            # Both directions done: the pair is closed, so a long soak holds no dead sockets.
            ended.append(source)
            done = len(ended) == 2
            if done:
                self._sockets -= {source, sink}
        if done:
            source.close()
            sink.close()


@contextlib.contextmanager
def forwarded(server: S3Server) -> Iterator[TcpForwarder]:
    """A TcpForwarder to `server`'s endpoint, cut at the end."""
    host, _, port = server.endpoint_url.removeprefix("http://").partition(":")
    forwarder = TcpForwarder((host, int(port)))
    try:
        yield forwarder
    finally:
        forwarder.cut()


@pytest.fixture
def s3_path(s3_server: S3Server) -> Iterator[TcpForwarder]:
    """A TCP path to the session's S3 server that the test cuts and restores (see TcpForwarder)."""
    with forwarded(s3_server) as forwarder:
        yield forwarder


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server_process() -> Iterator[S3Server]:
    server = start_s3_server_process()
    yield server
    server.stop()


@pytest.fixture
def s3_backend_table(s3_server: S3Server) -> Iterator[dict]:
    """A backend table with a prefix of its own, so tests never see each other's keys; emptied after."""
    prefix = f"t-{secrets.token_hex(6)}/"
    yield s3_server.backend_table(prefix=prefix)
    s3_server.empty(prefix)


def count_calls(backend, operation: str) -> list[int]:
    """Count the S3 API calls of one operation (e.g. "UploadPartCopy") an S3Backend makes."""
    counter = [0]

    def handler(**kwargs) -> None:
        counter[0] += 1

    for client in (backend.client, backend.transfer_client, backend.slow_client):
        client.meta.events.register(f"before-call.s3.{operation}", handler)
    return counter


def multipart_uploads(s3, server: "S3Server", table: dict) -> list[str]:
    """Keys with a multipart upload still open under a backend table's prefix."""
    page = s3.list_multipart_uploads(Bucket=server.bucket, Prefix=table["prefix"])
    return [upload["Key"] for upload in page.get("Uploads", [])]
