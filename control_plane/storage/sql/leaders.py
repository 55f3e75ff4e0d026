"""Leases on the daemon loops: which replica runs each."""

from __future__ import annotations

from control_plane.storage.sql.base import SqlBase


class LeaderQueries(SqlBase):
    async def try_lead(self, name: str, holder: str, ttl: float, now: float) -> bool:
        """Take or renew the lease on loop `name` for `ttl` s: True while `holder` has it.

        Whoever holds an unexpired lease keeps it; an expired one goes to the first
        replica that asks, so a loop whose replica died moves within `ttl` s.
        """
        async with self._write_row() as db:
            rows = await db.fetch(
                "INSERT INTO leader_leases (name, holder, term, acquired_time, expires)"
                " VALUES (?, ?, 1, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " holder = excluded.holder, expires = excluded.expires,"
                " term = CASE WHEN leader_leases.holder = excluded.holder"
                " THEN leader_leases.term ELSE leader_leases.term + 1 END,"
                " acquired_time = CASE WHEN leader_leases.holder = excluded.holder"
                " THEN leader_leases.acquired_time ELSE excluded.acquired_time END"
                " WHERE leader_leases.holder = excluded.holder OR leader_leases.expires < ?"
                " RETURNING term",
                (name, holder, now, now + ttl, now),
            )
            return bool(rows)

    async def release_lead(self, name: str, holder: str) -> None:
        """Give a lease up (a clean shutdown), so another replica takes over at once."""
        async with self._write_row() as db:
            await db.execute(
                "UPDATE leader_leases SET expires = 0 WHERE name = ? AND holder = ?",
                (name, holder),
            )

    async def leaders(self) -> dict[str, tuple[str, float]]:
        """Each loop's lease: its holder and when it expires."""
        rows = await self._reader.fetch("SELECT name, holder, expires FROM leader_leases")
        return {name: (holder, expires) for name, holder, expires in rows}
