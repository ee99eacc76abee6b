"""The `backend` fixture: every backend the contract suite holds to the same answers."""
from __future__ import annotations

import secrets

import pytest

from gateway.storage.local import LocalBackend, LocalConfig
from gateway.storage.memory import MemoryBackend
from gateway.storage.s3 import S3Backend, S3Config

# Small pages make every S3 listing in the suite go through pagination.
S3_PAGE_SIZE = 25


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path, s3_server):
    # s3_server is requested for every backend so the session-wide server
    # starts before the per-test leak check takes its snapshot.
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        instance = LocalBackend(LocalConfig(root=str(root)))
    elif request.param == "memory":
        instance = MemoryBackend()
    else:
        table = s3_server.backend_table(prefix=f"contract-{secrets.token_hex(6)}")
        del table["type"]
        instance = S3Backend(S3Config(**table, list_page_size=S3_PAGE_SIZE, spool_dir=tmp_path / "spool"))
    yield instance
    instance.close()
