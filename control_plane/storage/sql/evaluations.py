"""Evaluations of schedules and sensors in flight, handed to agents and answered by them,
whichever replica their polls reach."""

from __future__ import annotations

import msgpack

from control_plane.storage.sql.base import SqlBase
from protocol.messages import Evaluate, EvaluationResult
from protocol.schema import from_plain, to_plain


class EvaluationQueries(SqlBase):
    async def create_evaluation(self, request: Evaluate, now: float) -> None:
        async with self._write_row() as db:
            await db.execute(
                "INSERT INTO evaluations (eval_id, location, request, create_time)"
                " VALUES (?, ?, ?, ?)",
                (request.eval_id, request.location, _pack(request), now),
            )

    async def take_evaluations(
        self, agent_id: str, locations: set[str], now: float
    ) -> list[Evaluate]:
        """Hand this agent the requests for its locations that nobody has taken; each
        request goes to exactly one agent, whichever replica its poll reached."""
        if not locations:
            return []
        marks = ",".join("?" * len(locations))
        async with self._write_row() as db:
            rows = await db.fetch(
                "UPDATE evaluations SET agent_id = ?, take_time = ?"
                f" WHERE agent_id IS NULL AND location IN ({marks}) RETURNING request",
                (agent_id, now, *sorted(locations)),
            )
        return [from_plain(Evaluate, msgpack.unpackb(bytes(r))) for (r,) in rows]

    async def finish_evaluation(self, result: EvaluationResult) -> bool:
        """Store the answer of the agent that took it; False if none such is waiting."""
        async with self._write_row() as db:
            changed = await db.execute(
                "UPDATE evaluations SET result = ? WHERE eval_id = ? AND agent_id = ?"
                " AND result IS NULL",
                (_pack(result), result.eval_id, result.agent_id),
            )
        return changed > 0

    async def evaluation_state(
        self, eval_id: str
    ) -> tuple[str | None, EvaluationResult | None] | None:
        """(the agent that took it, its result), or None once it is gone."""
        rows = await self._reader.fetch(
            "SELECT agent_id, result FROM evaluations WHERE eval_id = ?", (eval_id,)
        )
        if not rows:
            return None
        agent_id, result = rows[0]
        if result is None:
            return agent_id, None
        return agent_id, from_plain(EvaluationResult, msgpack.unpackb(bytes(result)))

    async def untaken_evaluations(self) -> int:
        rows = await self._reader.fetch("SELECT COUNT(*) FROM evaluations WHERE agent_id IS NULL")
        return int(rows[0][0])

    async def drop_evaluation(self, eval_id: str) -> None:
        async with self._write_row() as db:
            await db.execute("DELETE FROM evaluations WHERE eval_id = ?", (eval_id,))


def _pack(message: object) -> bytes:
    return msgpack.packb(to_plain(message), use_bin_type=True)
