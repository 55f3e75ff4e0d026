"""The code catalog as read from storage: cached per storage object, re-read only for the
agents that registered since (on any replica)."""

from __future__ import annotations

import json

from control_plane.model.agents import Agent
from control_plane.model.catalog import CodeCatalog, CodeLocation
from control_plane.storage.sql.base import AGENT_COLUMNS, Tx, agent_from_row, in_chunks
from protocol.messages import CodeLocationInfo
from protocol.schema import from_plain


class CatalogCache:
    """The last catalog read, and each distinct location text parsed once: a fleet's
    agents mostly share their locations' text."""

    def __init__(self) -> None:
        self.catalog: CodeCatalog | None = None
        self.parsed: dict[str, CodeLocationInfo] = {}

    async def read(self, db: Tx) -> CodeCatalog:
        """The catalog, brought up to date with the registrations made since it was read.

        The version is read first: registrations commit in version order (each holds the
        catalog row until it commits), so every one up to it is visible, and one that
        lands in between is merely read again next time."""
        ((version,),) = await db.fetch("SELECT version FROM catalog")
        cached = self.catalog
        if cached is not None and cached.version == version:
            return cached
        since = cached.version if cached is not None else -1  # -1: every agent
        by_agent = dict(cached.by_agent) if cached is not None else {}
        changed = [
            agent_id
            for (agent_id,) in await db.fetch(
                "SELECT agent_id FROM agents WHERE catalog_version > ?", (since,)
            )
        ]
        parsed = self.parsed
        for chunk, marks in in_chunks(changed):
            by_agent.update((agent_id, []) for agent_id in chunk)
            for agent_id, text in await db.fetch(
                f"SELECT agent_id, info FROM code_locations WHERE agent_id IN ({marks})", chunk
            ):
                info = parsed.get(text)
                if info is None:
                    info = parsed[text] = from_plain(CodeLocationInfo, json.loads(text))
                by_agent[agent_id].append(CodeLocation(agent_id=agent_id, info=info))
        if len(parsed) > 4 * len(by_agent) + 100:  # mostly texts no agent has any more
            parsed.clear()
        self.catalog = CodeCatalog.of(version, by_agent)
        return self.catalog


async def agents_by_id(db: Tx, agent_ids: set[str]) -> dict[str, Agent]:
    found: dict[str, Agent] = {}
    for chunk, marks in in_chunks(sorted(agent_ids)):
        rows = await db.fetch(
            f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id IN ({marks})", chunk
        )
        found.update((agent.agent_id, agent) for agent in map(agent_from_row, rows))
    return found
