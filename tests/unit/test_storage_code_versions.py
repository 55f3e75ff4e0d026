"""Code versions in storage, on every backend: the version a run started with, the one
a re-execution asks for, locations replaced by a reload, and reload requests."""

from __future__ import annotations

import dataclasses

from control_plane.storage import Storage
from protocol.messages import CodeLocationInfo, RunRecord
from tests.unit.test_storage import ETL, agent_id, assign_lease, new_run


def start(version: object) -> RunRecord:
    return RunRecord(
        seq=1, time=101.0, kind="event", type="RUN_START", data={"code_version": version}
    )


async def test_a_run_records_the_code_version_it_started_with(storage: Storage) -> None:
    agent = await agent_id(storage)
    wanted = dataclasses.replace(new_run("r1"), wanted_code_version="abc123")
    await storage.create_run(wanted, now=1.0)
    assert (await storage.get_run("r1")).wanted_code_version == "abc123"  # type: ignore[union-attr]
    lease = await assign_lease(storage, "r1", agent, 2.0)
    await storage.append_records("r1", lease, [start("def456")], now=3.0, agent_id=agent)
    run = await storage.get_run("r1")
    assert run is not None and run.code_version == "def456"
    assert run.to_json()["code_version"] == "def456"
    await storage.create_run(new_run("r2"), now=4.0)
    lease = await assign_lease(storage, "r2", agent, 5.0)
    await storage.append_records(
        "r2", lease, [start(["not", "a", "version"])], now=6.0, agent_id=agent
    )
    assert (await storage.get_run("r2")).code_version is None  # type: ignore[union-attr]


async def test_a_reload_replaces_the_agents_locations(storage: Storage) -> None:
    agent = await agent_id(storage)
    before = (await storage.code_catalog()).version
    reloaded = CodeLocationInfo(
        name="loc", jobs=[ETL], version="v2", versions=["v2", "v1"], reload_error=None
    )
    assert await storage.update_code_locations(agent, [reloaded])
    catalog = await storage.code_catalog()
    assert catalog.version > before
    assert catalog.code_versions[(agent, "loc")] == {"v1", "v2"}
    assert [loc.info for loc in catalog.by_agent[agent]] == [reloaded]
    assert not await storage.update_code_locations("nobody", [reloaded])


async def test_reload_requests_merge_and_are_taken_once(storage: Storage) -> None:
    agent = await agent_id(storage)
    assert await storage.take_reload(agent) is None
    assert await storage.request_reload(agent, ["b"])
    assert await storage.request_reload(agent, ["a"])
    assert await storage.take_reload(agent) == ["a", "b"]
    assert await storage.take_reload(agent) is None
    await storage.request_reload(agent, ["a"])
    await storage.request_reload(agent, [])  # every location
    assert await storage.take_reload(agent) == []
    assert not await storage.request_reload("nobody", [])
