"""Concurrency pools: the limits set through the API, and slot claims.

A claim (`pool_slots` row) is written in the transaction that stores the step's
STEP_SLOT_REQUESTED record (or, at run granularity, that launches the run), under the
run's lease, and deleted in the transaction that stores the end of the step's attempt
(`release_step`) or moves the run out of its running statuses (`transitions.py`
`transition`): no path ends an attempt without freeing its slots. Only grant passes
(`grant_slots`, one instance-wide write transaction) turn a waiting claim into a held
one, so two passes on two replicas can never both fill a pool's last slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from control_plane.model.pools import RUN_SLOT, Claim, GrantPlan
from control_plane.model.runs import Run
from control_plane.model.statuses import RunStatus
from control_plane.storage.sql.base import SqlBase, Tx, marks
from control_plane.storage.sql.transitions import append_event
from protocol.events import STEP_SLOT_GRANTED, STEP_SLOT_WAITING

CLAIM_COLUMNS = (
    "s.id, s.pool, s.run_id, s.lease, s.step, s.attempt, s.priority, s.create_time,"
    " s.granted_time, s.noted, r.agent_id"
)
# A claim counts while its run is running under the claim's lease (a claim of any other
# attempt was deleted with the transition that ended it; the join makes sure of it).
LIVE_CLAIMS = (
    f"SELECT {CLAIM_COLUMNS} FROM pool_slots s JOIN runs r ON r.run_id = s.run_id"
    " AND r.lease = s.lease WHERE r.status IN (?, ?, ?)"
)
LIVE_STATUSES = (RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING)


def claim_from_row(row: tuple[Any, ...]) -> Claim:
    claim_id, pool, run_id, lease, step, attempt, priority, created, granted, noted, agent = row
    return Claim(
        claim_id=claim_id,
        pool=pool,
        run_id=run_id,
        lease=lease,
        step=step,
        attempt=attempt,
        priority=priority,
        create_time=created,
        granted_time=granted,
        noted=bool(noted),
        agent_id=agent,
    )


async def live_claims(db: Tx) -> list[Claim]:
    rows = await db.fetch(f"{LIVE_CLAIMS} ORDER BY s.id", LIVE_STATUSES)
    return [claim_from_row(row) for row in rows]


async def set_limits(db: Tx) -> dict[str, int]:
    rows = await db.fetch("SELECT name, slot_limit FROM pool_limits")
    return {name: int(limit) for name, limit in rows}


async def claim_step_slot(
    db: Tx, run: Run, lease: int, step: str, attempt: int, pool: str, now: float
) -> None:
    """Step `step`'s attempt `attempt` waits for a slot of `pool` (once: a claim sent
    again is the same claim)."""
    await db.execute(
        "INSERT INTO pool_slots (pool, run_id, lease, step, attempt, priority, create_time)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step, attempt, pool) DO NOTHING",
        (pool, run.run_id, lease, step, attempt, run.priority, now),
    )


async def release_step(db: Tx, run_id: str, step: str) -> int:
    """The step's attempt ended: its slot (or its place in line) is free."""
    return await db.execute("DELETE FROM pool_slots WHERE run_id = ? AND step = ?", (run_id, step))


async def hold_run_slots(db: Tx, run: Run, pools: Collection[str], now: float) -> None:
    """Run granularity: the run, just launched under its lease, holds a slot of each
    pool its job uses until it ends."""
    assert run.lease is not None
    await db.executemany(
        "INSERT INTO pool_slots (pool, run_id, lease, step, attempt, priority, create_time,"
        " granted_time) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
        [(pool, run.run_id, run.lease, RUN_SLOT, run.priority, now, now) for pool in sorted(pools)],
    )


class PoolQueries(SqlBase):
    async def pool_limits(self) -> dict[str, int]:
        return await set_limits(self._reader)

    async def set_pool_limit(self, name: str, limit: int, now: float) -> None:
        async with self._write() as db:
            await db.execute(
                "INSERT INTO pool_limits (name, slot_limit, update_time) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET slot_limit = excluded.slot_limit,"
                " update_time = excluded.update_time",
                (name, limit, now),
            )

    async def delete_pool_limit(self, name: str) -> bool:
        async with self._write() as db:
            return bool(await db.execute("DELETE FROM pool_limits WHERE name = ?", (name,)))

    async def pool_claims(self) -> list[Claim]:
        return await live_claims(self._reader)

    async def grant_slots(
        self, now: float, decide: Callable[[list[Claim], dict[str, int]], GrantPlan]
    ) -> list[Claim]:
        async with self._write() as db:
            claims = await live_claims(db)
            if not any(not claim.granted for claim in claims):
                return []
            plan = decide(claims, await set_limits(db))
            granted = []
            for claim in plan.granted:
                done = await db.execute(
                    "UPDATE pool_slots SET granted_time = ? WHERE id = ? AND granted_time IS NULL",
                    (now, claim.claim_id),
                )
                if not done:
                    continue
                granted.append(claim)
                if claim.noted:
                    waited = now - claim.create_time
                    await append_event(
                        db,
                        claim.run_id,
                        now,
                        STEP_SLOT_GRANTED,
                        f"got a slot in pool {claim.pool} after waiting {waited:.1f} s",
                        {"pool": claim.pool, "waited_seconds": round(waited, 3)},
                        step=claim.step or None,
                        attempt=claim.lease,
                    )
            if plan.waiting:
                await db.execute(
                    f"UPDATE pool_slots SET noted = 1 WHERE id IN ({marks(plan.waiting)})",
                    [claim.claim_id for claim, _ in plan.waiting],
                )
            for claim, reason in plan.waiting:
                await append_event(
                    db,
                    claim.run_id,
                    now,
                    STEP_SLOT_WAITING,
                    f"step {claim.step} waits for a slot: {reason}",
                    {"pool": claim.pool},
                    step=claim.step or None,
                    attempt=claim.lease,
                )
            return granted

    async def owed_grants(self, agent_id: str, held: Collection[int]) -> list[Claim]:
        rows = await self._reader.fetch(
            f"{LIVE_CLAIMS} AND r.agent_id = ? AND s.granted_time IS NOT NULL AND s.step <> ?"
            " ORDER BY s.id",
            (*LIVE_STATUSES, agent_id, RUN_SLOT),
        )
        return [claim for claim in map(claim_from_row, rows) if claim.claim_id not in held]
