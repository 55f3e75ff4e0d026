"""Fixtures of the unit tests: a `storage` of each backend, opened and migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.storage import Storage, open_storage


@pytest.fixture(params=["sqlite", "postgresql"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """Every test that takes it runs on an SQLite file and on a PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/fleetrun.db"
    else:
        url = request.getfixturevalue("postgres_url")
    store = open_storage(url)
    await store.open()
    yield store
    await store.close()
