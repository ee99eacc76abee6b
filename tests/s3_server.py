"""A real S3-compatible server for tests: moto's server mode over HTTP on 127.0.0.1, port 0.

Import `s3_server` (session fixture) or `s3_backend_table` (per test: a fresh
prefix in the shared bucket, as a [backends.NAME] table for make_gateway).
Every thread the server runs is named "moto-..." so the no_leaks fixture
ignores it.
"""
from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass

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
    """A moto server running in this process."""

    endpoint_url: str
    bucket: str
    _server: ThreadedWSGIServer
    _thread: threading.Thread

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def backend_table(self, prefix: str = "", **options) -> dict:
        """A [backends.NAME] table (type included) pointing at this server's bucket."""
        return {"type": "s3", "bucket": self.bucket, "prefix": prefix,
                "endpoint_url": self.endpoint_url, "region": REGION,
                "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, **options}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_s3_server(bucket: str = "gateway-test") -> S3Server:
    """Start moto on an ephemeral port and create `bucket`."""
    app = DomainDispatcherApplication(create_backend_app)
    server = _NamedThreadedServer("127.0.0.1", 0, app, handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name=f"{THREAD_PREFIX}server", daemon=True)
    thread.start()
    running = S3Server(f"http://127.0.0.1:{server.server_address[1]}", bucket, server, thread)
    client = running.client()
    try:
        client.create_bucket(Bucket=bucket)
    finally:
        client.close()
    return running


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_backend_table(s3_server: S3Server) -> dict:
    """A backend table with a prefix of its own, so tests never see each other's keys."""
    return s3_server.backend_table(prefix=f"t-{secrets.token_hex(6)}/")
