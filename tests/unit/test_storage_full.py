"""A full disk is a retryable refusal, not a crash: StorageFull, 503 `storage_full`.

SQLite answers SQLITE_FULL ("database or disk is full") when the database may not grow;
`PRAGMA max_page_count` produces exactly that error without root or a tmpfs (the e2e
test tests/e2e/test_disk_full.py fills a real filesystem).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from control_plane.config import ControlPlaneConfig
from control_plane.http.keys import STORAGE
from control_plane.model.runs import NewRun, RunFilter
from control_plane.storage.errors import StorageFull
from control_plane.storage.sqlite import SqliteStorage
from protocol.codec import decode, encode
from protocol.messages import ErrorReply, EventBatch, Poll, PollReply, RunRecord
from tests.conftest import app_for
from tests.unit.test_api import agent_call, register, submit


async def cap_growth(storage: SqliteStorage, extra_pages: int = 0) -> None:
    """Let the database grow by at most `extra_pages` from now on."""
    assert storage._writer is not None
    row = await (await storage._writer.execute("PRAGMA page_count")).fetchone()
    assert row is not None
    (pages,) = row
    await storage._writer.execute(f"PRAGMA max_page_count = {pages + extra_pages}")


def new_run(**tags: str) -> NewRun:
    return NewRun(run_id=str(uuid.uuid4()), job="etl", location="loc", tags=tags, config={})


async def fill_with_runs(storage: SqliteStorage) -> int:
    """Create runs until even one without tags no longer fits (a smaller row may fit in
    a page a bigger one did not); returns how many fitted."""
    created = 0
    for size in (500, 50, 0):
        tags = {"k": "v" * size} if size else {}
        for _ in range(5000):
            try:
                await storage.create_run(new_run(**tags), now=1.0)
            except StorageFull:
                break
            created += 1
        else:
            raise AssertionError("the database never filled up")
    return created


async def test_a_full_database_raises_storage_full_and_recovers(tmp_path: Path) -> None:
    storage = SqliteStorage(str(tmp_path / "fleetrun.db"))
    await storage.open()
    try:
        first = await storage.create_run(new_run(), now=1.0)
        await cap_growth(storage, extra_pages=20)
        fitted = await fill_with_runs(storage)
        assert fitted > 0
        assert "database or disk is full" in (storage.full_reason() or "")
        with pytest.raises(StorageFull):  # every write, not only the first
            await storage.create_run(new_run(), now=1.0)
        assert (await storage.get_run(first.run_id)) is not None  # reads go on
        assert await storage.set_agent_status("nobody", "DRAINING") is None  # wrote nothing:
        assert storage.full_reason() is not None  # so it proves nothing about space
        # Space again: the writer is not left inside a transaction, and the flag clears
        await cap_growth(storage, extra_pages=10_000)
        await storage.create_run(new_run(), now=1.0)
        assert storage.full_reason() is None
        runs, _ = await storage.list_runs(RunFilter(), limit=10_000, cursor=None)
        assert len(runs) == fitted + 2  # nothing half-written by the refused ones
    finally:
        await storage.close()


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> TestClient:
    config = ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{tmp_path}/fleetrun.db"}, server={"poll_timeout_seconds": 0.5}
    )
    return await aiohttp_client(app_for(config))


async def test_writes_answer_503_storage_full_and_readyz_names_it(client: TestClient) -> None:
    storage = client.app[STORAGE]
    assert isinstance(storage, SqliteStorage)
    agent_id = await register(client)
    status, body = await submit(client, job="etl")
    assert status == 201
    run_id = body["run_id"]
    reply = await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)
    (launch,) = reply.launches
    assert (await client.get("/readyz")).status == 200
    await cap_growth(storage)
    await fill_with_runs(storage)
    # The JSON API: 503 storage_full, never 500
    status, body = await submit(client, job="etl")
    assert (status, body["error"]["code"]) == (503, "storage_full"), body
    resp = await client.get(f"/api/v1/runs/{run_id}")
    assert resp.status == 200  # reads go on
    resp = await client.get("/readyz")
    body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (503, "storage_full")
    assert "database or disk is full" in body["error"]["message"]
    # The agent API: a msgpack 503 (the agent keeps its records and retries)
    records = [RunRecord(seq=1, time=1.0, kind="log", type="stdout", message="x" * 20_000)]
    batch = EventBatch(agent_id=agent_id, run_id=run_id, lease=launch.lease, records=records)
    resp = await client.post("/agent/v1/events", data=encode(batch))
    error = decode(await resp.read(), ErrorReply)
    assert (resp.status, error.code) == (503, "storage_full")
    # Space again: the same batch is stored, and the control plane is ready again
    await cap_growth(storage, extra_pages=10_000)
    resp = await client.post("/agent/v1/events", data=encode(batch))
    assert resp.status == 200
    assert (await client.get("/readyz")).status == 200
