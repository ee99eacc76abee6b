"""Store fixtures: a `store` over each dialect (PostgreSQL from the tests.postgres plugin)."""
from __future__ import annotations

import pytest

from gateway.store import open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str:
    """A URL for an empty store of each dialect (SQLite relative to the test's tmp_path)."""
    if request.param == "sqlite":
        return "sqlite:///gateway.db"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def store(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    yield store
    store.close()


@pytest.fixture
def open_another(store_url, tmp_path):
    """Factory for a second Store on the same database, as another process would hold."""
    opened = []

    def factory():
        opened.append(open_store(store_url, tmp_path))
        return opened[-1]

    yield factory
    for store in opened:
        store.close()
