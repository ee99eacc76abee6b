"""Fixtures for the S3-specific tests: the moto server and backends on fresh prefixes."""
from __future__ import annotations

import secrets

import pytest

from gateway.storage.s3 import S3Backend, S3Config


@pytest.fixture
def make_s3(s3_server, tmp_path):
    """Factory: an S3Backend on a fresh prefix with option overrides; closed after the test."""
    made: list[S3Backend] = []

    def factory(**options) -> S3Backend:
        table = s3_server.backend_table(prefix=f"s3-{secrets.token_hex(6)}")
        del table["type"]
        table.update({"spool_dir": tmp_path / "spool", **options})
        backend = S3Backend(S3Config(**table))
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        backend.close()
        s3_server.empty(backend.prefix)


@pytest.fixture
def raw(s3_server):
    """A plain boto3 client on the test bucket, to look behind the backend."""
    client = s3_server.client()
    yield client
    client.close()
