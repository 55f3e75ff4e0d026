"""`fleetrun migrate`: schema migrations, and moving an instance from SQLite to PostgreSQL
(the real CLI, a real SQLite file and the machine's PostgreSQL server)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from control_plane.model.runs import NewRun, RunFilter
from control_plane.model.statuses import RunStatus
from control_plane.model.tokens import TokenRecord
from control_plane.storage import open_storage, transfer
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord
from tests.conftest import FLEETRUN


def fleetrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETRUN, *args], capture_output=True, text=True, timeout=120)


async def fill(url: str) -> dict[str, object]:
    """An instance with a finished run (events, logs, an output), a queued run, an agent,
    a token and a schedule tick; returns what must survive the move."""
    store = open_storage(url)
    await store.open()
    etl = JobInfo(name="etl", ops=[OpInfo(name="s")])
    agent = await store.register_agent(
        "w1", "host", "0.1", ["default"], 4, [CodeLocationInfo(name="loc", jobs=[etl])], now=10.0
    )
    await store.create_run(NewRun("r1", "etl", "loc", {"team": "a"}, {"k": 1}), now=11.0)
    [run] = await store.assign_queued(12.0, lambda _s: [("r1", agent.agent_id)])
    records = [
        RunRecord(seq=1, time=13.0, kind="event", type="RUN_START", message="go"),
        RunRecord(seq=2, time=13.5, kind="log", type="stdout", step="s", message="hi\n"),
        RunRecord(seq=3, time=14.0, kind="event", type="RUN_SUCCESS", message="ok"),
    ]
    await store.put_output("r1", run.lease, "s", b"\x00pickled", now=13.0)  # type: ignore[arg-type]
    await store.append_records("r1", run.lease, records, now=14.0)  # type: ignore[arg-type]
    await store.create_run(NewRun("r2", "etl", "loc", {}, {}), now=15.0)
    await store.create_token(TokenRecord("t1", "ops", "user", "admin", b"salt", b"hash", 1.0))
    tick = await store.start_tick("loc", "nightly", "schedule", 60.0, now=61.0)
    assert tick is not None
    await store.finish_tick(tick.id, "SKIPPED", [], now=62.0, skip_reason="night")
    expected: dict[str, object] = {
        "runs": [r.to_json() for r in (await store.list_runs(RunFilter(), 10, None))[0]],
        "events": [e.to_json() for e in await store.get_events("r1", 0, 100)],
        "logs": [c.to_json() for c in await store.get_logs("r1", None, 0)],
        "output": await store.get_output("r1", "s"),
        "tokens": [t.to_json() for t in await store.list_tokens()],
        "ticks": [t.to_json() for t in await store.list_ticks("loc", "nightly", "schedule", 5)],
        "agents": [a.name for a in await store.list_agents()],
        "lease": run.lease,
    }
    await store.close()
    return expected


async def test_an_instance_moves_from_sqlite_to_postgresql_whole(
    tmp_path: Path, postgres_url: str
) -> None:
    source = f"sqlite:///{tmp_path}/fleetrun.db"
    expected = await fill(source)
    # When the instance is copied with the CLI
    result = fleetrun("--json", "migrate", "--from", source, "--to", postgres_url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert rows["runs"] == 2 and rows["events"] >= 4 and rows["compute_logs"] == 1
    # Then the destination holds the same instance, ids and leases included
    dest = open_storage(postgres_url)
    await dest.open()
    try:
        runs = [r.to_json() for r in (await dest.list_runs(RunFilter(), 10, None))[0]]
        assert runs == expected["runs"]
        assert [e.to_json() for e in await dest.get_events("r1", 0, 100)] == expected["events"]
        assert [c.to_json() for c in await dest.get_logs("r1", None, 0)] == expected["logs"]
        assert await dest.get_output("r1", "s") == expected["output"]
        assert [t.to_json() for t in await dest.list_tokens()] == expected["tokens"]
        ticks = await dest.list_ticks("loc", "nightly", "schedule", 5)
        assert [t.to_json() for t in ticks] == expected["ticks"]
        assert [a.name for a in await dest.list_agents()] == expected["agents"]
        # And new ids continue after the copied ones: a new lease is fresh, the newest
        # run lists first
        agent = (await dest.list_agents())[0]
        [run] = await dest.assign_queued(20.0, lambda _s: [("r2", agent.agent_id)])
        assert run.lease is not None and run.lease > expected["lease"]  # type: ignore[operator]
        await dest.create_run(NewRun("r3", "etl", "loc", {}, {}), now=21.0)
        newest = (await dest.list_runs(RunFilter(), 1, None))[0][0]
        assert newest.run_id == "r3" and newest.status == RunStatus.QUEUED
    finally:
        await dest.close()
    # And copying again into the now non-empty destination is refused, naming why
    again = fleetrun("migrate", "--from", source, "--to", postgres_url)
    assert again.returncode == 1 and "already holds an instance" in again.stderr


def test_migrate_applies_the_schema_and_reports_versions(tmp_path: Path, postgres_url: str) -> None:
    from control_plane.storage import postgres, sqlite

    pg_version, sqlite_version = len(postgres.MIGRATIONS), len(sqlite.MIGRATIONS)
    config = tmp_path / "control-plane.toml"
    config.write_text(f'[storage]\nurl = "{postgres_url}"\n')
    first = fleetrun("migrate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert f"schema version 0 -> {pg_version}" in first.stdout and "postgres@" in first.stdout
    second = fleetrun("migrate", "--config", str(config))
    assert f"schema version {pg_version} (up to date)" in second.stdout
    new_sqlite = fleetrun("migrate", "--to", f"sqlite:///{tmp_path}/new.db")
    assert new_sqlite.returncode == 0
    assert f"schema version 0 -> {sqlite_version}" in new_sqlite.stdout
    down = fleetrun("migrate", "--to", "postgresql://postgres@127.0.0.1:1/none")
    assert down.returncode == 1 and "cannot connect" in down.stderr


async def test_every_table_and_column_is_copied_or_said_not_to_be(tmp_path: Path) -> None:
    """A migration that adds a table or a column must say how `fleetrun migrate --from`
    moves it (transfer.TABLES) or why it does not (transfer.NOT_COPIED)."""
    store = open_storage(f"sqlite:///{tmp_path}/fleetrun.db")
    await store.open()
    try:
        reader = store._reader  # type: ignore[attr-defined]
        tables = [
            name
            for (name,) in await reader.fetch(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        schema = {
            table: {row[1] for row in await reader.fetch(f"PRAGMA table_info({table})")}
            for table in tables
        }
    finally:
        await store.close()
    copied = {
        table: {c.strip() for c in f"{key}, {columns}".split(",")}
        for table, key, columns in transfer.TABLES
    }
    missing = sorted(
        f"{table}.{column}"
        for table, columns in schema.items()
        if table not in transfer.NOT_COPIED
        for column in columns - copied.get(table, set())
        if f"{table}.{column}" not in transfer.NOT_COPIED
    )
    assert missing == []
