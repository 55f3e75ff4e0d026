"""Fixtures of the unit tests: a `storage` of each backend, opened and migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.storage import Storage, open_storage


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fleetrun.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[Storage]:
    """Every test that takes it runs on an SQLite file and on a PostgreSQL schema."""
    store = open_storage(storage_url)
    await store.open()
    yield store
    await store.close()
