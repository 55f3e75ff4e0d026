"""Agents: registration (with the code locations they host), heartbeats, drain state."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

from control_plane.model.agents import DRAINING, ONLINE, Agent
from control_plane.model.catalog import CodeCatalog, CodeLocation
from control_plane.storage.errors import AgentNameTaken
from control_plane.storage.sql.base import AGENT_COLUMNS, SqlBase, Tx, agent_from_row, in_chunks
from control_plane.storage.sql.catalog import CatalogCache, agents_by_id
from protocol.messages import CodeLocationInfo
from protocol.schema import to_plain

# What an agent that registers again, or heartbeats again after OFFLINE, becomes: ONLINE,
# unless an operator drained it.
STATUS_ON_RETURN = "CASE WHEN agents.operator_drain = 1 THEN 'DRAINING' ELSE 'ONLINE' END"


class AgentQueries(SqlBase):
    _catalogs: CatalogCache

    async def register_agent(
        self,
        name: str,
        hostname: str,
        version: str,
        queues: list[str],
        max_concurrent_runs: int,
        locations: list[CodeLocationInfo],
        now: float,
        capabilities: list[str] | None = None,
        token_name: str | None = None,
        labels: dict[str, str] | None = None,
        resources: dict[str, int] | None = None,
    ) -> Agent:
        async with self._write() as db:
            rows = await db.fetch(
                "SELECT a.agent_id, a.token_name, a.status, t.revoked_time IS NULL"
                " AND t.token_id IS NOT NULL FROM agents a"
                " LEFT JOIN tokens t ON t.name = a.token_name WHERE a.name = ?",
                (name,),
            )
            agent_id = rows[0][0] if rows else uuid.uuid4().hex
            if rows and token_name is not None:
                _, bound, status, bound_valid = rows[0]
                if bound not in (None, token_name) and status != "OFFLINE" and bound_valid:
                    raise AgentNameTaken(
                        f"agent {name!r} is online under another agent token; stop it, "
                        "or revoke that token, before registering this name with a new one"
                    )
            await db.execute(
                "INSERT INTO agents (agent_id, name, hostname, status, queues,"
                " max_concurrent_runs, version, last_heartbeat, registered_time, capabilities,"
                " token_name, labels, resources)"
                " VALUES (?, ?, ?, 'ONLINE', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (agent_id) DO UPDATE SET hostname = excluded.hostname,"
                f" status = {STATUS_ON_RETURN}, queues = excluded.queues,"
                " max_concurrent_runs = excluded.max_concurrent_runs,"
                " version = excluded.version, last_heartbeat = excluded.last_heartbeat,"
                " registered_time = excluded.registered_time,"
                " capabilities = excluded.capabilities, token_name = excluded.token_name,"
                " labels = excluded.labels, resources = excluded.resources",
                (
                    agent_id,
                    name,
                    hostname,
                    json.dumps(queues),
                    max_concurrent_runs,
                    version,
                    now,
                    now,
                    json.dumps(capabilities or []),
                    token_name,
                    json.dumps(labels or {}),
                    json.dumps(resources or {}),
                ),
            )
            await _replace_locations(db, agent_id, locations)
            rows = await db.fetch(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
            )
            return agent_from_row(rows[0])

    async def record_heartbeats(self, agent_ids: Iterable[str], now: float) -> dict[str, float]:
        ids = sorted(set(agent_ids))
        previous: dict[str, float] = {}
        async with self._write_row() as db:
            for chunk, marks in in_chunks(ids):
                rows = await db.fetch(
                    f"SELECT agent_id, last_heartbeat FROM agents WHERE agent_id IN ({marks})",
                    chunk,
                )
                previous.update((agent_id, float(hb)) for agent_id, hb in rows)
                await db.execute(
                    "UPDATE agents SET last_heartbeat = ?, status = CASE status"
                    f" WHEN 'OFFLINE' THEN {STATUS_ON_RETURN} ELSE status END"
                    f" WHERE agent_id IN ({marks})",
                    (now, *chunk),
                )
        return previous

    async def set_agent_status(self, agent_id: str, status: str) -> Agent | None:
        async with self._write() as db:
            await db.execute("UPDATE agents SET status = ? WHERE agent_id = ?", (status, agent_id))
            rows = await db.fetch(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
            )
            return agent_from_row(rows[0]) if rows else None

    async def update_code_locations(self, agent_id: str, locations: list[CodeLocationInfo]) -> bool:
        async with self._write() as db:
            rows = await db.fetch("SELECT 1 FROM agents WHERE agent_id = ?", (agent_id,))
            if not rows:
                return False
            await _replace_locations(db, agent_id, locations)
            return True

    async def request_reload(self, agent_id: str, locations: list[str]) -> bool:
        async with self._write() as db:
            rows = await db.fetch(
                "SELECT reload_request FROM agents WHERE agent_id = ?", (agent_id,)
            )
            if not rows:
                return False
            pending = None if rows[0][0] is None else json.loads(rows[0][0])
            merged = merged_reload(pending, locations)
            await db.execute(
                "UPDATE agents SET reload_request = ? WHERE agent_id = ?",
                (json.dumps(merged), agent_id),
            )
            return True

    async def take_reload(self, agent_id: str) -> list[str] | None:
        rows = await self._reader.fetch(
            "SELECT reload_request FROM agents WHERE agent_id = ?", (agent_id,)
        )
        if not rows or rows[0][0] is None:
            return None
        async with self._write_row() as db:  # only if it is still the request read
            taken = await db.fetch(
                "UPDATE agents SET reload_request = NULL"
                " WHERE agent_id = ? AND reload_request = ? RETURNING agent_id",
                (agent_id, rows[0][0]),
            )
        return json.loads(rows[0][0]) if taken else None

    async def set_operator_drain(self, agent_id: str, drained: bool) -> Agent | None:
        async with self._write() as db:
            await db.execute(
                "UPDATE agents SET operator_drain = ?, status = ? WHERE agent_id = ?",
                (int(drained), DRAINING if drained else ONLINE, agent_id),
            )
            rows = await db.fetch(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
            )
            return agent_from_row(rows[0]) if rows else None

    async def get_agent(self, agent_id: str) -> Agent | None:
        rows = await self._reader.fetch(
            f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
        )
        return agent_from_row(rows[0]) if rows else None

    async def get_agents(self, agent_ids: Iterable[str]) -> dict[str, Agent]:
        return await agents_by_id(self._reader, set(agent_ids))

    async def list_agents(self) -> list[Agent]:
        rows = await self._reader.fetch(f"SELECT {AGENT_COLUMNS} FROM agents ORDER BY name")
        return [agent_from_row(r) for r in rows]

    async def list_code_locations(self) -> list[CodeLocation]:
        return (await self.code_catalog()).locations

    async def code_catalog(self) -> CodeCatalog:
        return await self._catalogs.read(self._reader)


def merged_reload(pending: list[str] | None, wanted: list[str]) -> list[str]:
    """One reload request from a pending one and a new one ([]: every location)."""
    if pending is None:
        return sorted(set(wanted))
    if not pending or not wanted:
        return []
    return sorted(set(pending) | set(wanted))


async def _replace_locations(db: Tx, agent_id: str, locations: list[CodeLocationInfo]) -> None:
    """The agent's locations, replaced; the catalog version moves (every replica's
    cached catalog reads this agent's again)."""
    await db.execute("DELETE FROM code_locations WHERE agent_id = ?", (agent_id,))
    await db.executemany(
        "INSERT INTO code_locations (agent_id, name, info) VALUES (?, ?, ?)",
        [(agent_id, loc.name, json.dumps(to_plain(loc))) for loc in locations],
    )
    ((catalog_version,),) = await db.fetch(
        "UPDATE catalog SET version = version + 1 RETURNING version"
    )
    await db.execute(
        "UPDATE agents SET catalog_version = ? WHERE agent_id = ?", (catalog_version, agent_id)
    )
