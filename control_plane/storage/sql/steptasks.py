"""Step tasks (the fleet executor): asked for under the run's lease, placed by the run
queue, leased to an agent under a lease of their own, ended by their worker's result,
the agent's report or the monitor, and their outcome offered to the orchestrating agent.

A step task's lease is a `run_attempts` row of its run (so records are numbered, acked
and attributed like any attempt's), and it is fenced with the run's: its records are
taken only while the run is STARTED under the lease that asked for the task.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from control_plane.model.records import Take, screen_record
from control_plane.model.runs import Run
from control_plane.model.statuses import RunStatus
from control_plane.model.steptasks import (
    DONE,
    RUNNING,
    STEP_TASK_LOST,
    TASK_COLUMNS,
    WAITING,
    StepTask,
    StepTaskLost,
    outcome_of,
    step_queue,
    task_from_row,
    task_inputs_problem,
)
from control_plane.storage.errors import NotYourRun, StaleLease
from control_plane.storage.port import AppendResult
from control_plane.storage.sql.base import SqlBase, Tx, marks
from control_plane.storage.sql.catalog import CatalogCache
from control_plane.storage.sql.transitions import append_event
from protocol.events import (
    ENGINE_EVENT,
    LOG,
    RUN_START,
    RUN_SUCCESS,
    STEP_TASK_ENDED,
    STEP_TASK_STARTED,
    TERMINAL_EVENTS,
)
from protocol.messages import OpInfo, RunRecord

INLINE_OUTPUT_KEY = "output_bytes"  # a STEP_OUTPUT's data may carry the output itself
FROM_TASKS = "FROM step_tasks t JOIN runs r ON r.run_id = t.run_id"
# What a step task's worker may send besides its start and result: its op's events
# and output (its step's STEP_START, retries and end are the orchestrator's).
STEP_WORKER_EVENTS = frozenset({LOG, ENGINE_EVENT, "STEP_OUTPUT"})


async def task_by_lease(db: Tx, lease: int) -> StepTask | None:
    rows = await db.fetch(f"SELECT {TASK_COLUMNS} {FROM_TASKS} WHERE t.lease = ?", (lease,))
    return task_from_row(rows[0]) if rows else None


async def request_task(
    db: Tx, run: Run, lease: int, record: RunRecord, op: OpInfo | None, now: float
) -> str | None:
    """The run's worker asks for a step attempt on the fleet (once: an ask sent again is
    the same ask); why it may not, or None."""
    assert record.step is not None
    if op is None:
        return f"step {record.step!r} is not a step of the run's job"
    attempt = record.data.get("attempt")
    if type(attempt) is not int or attempt < 0:
        return "a step task's attempt must be an integer >= 0"
    inputs = record.data.get("inputs")
    problem = task_inputs_problem(inputs, op.upstream, run.run_id, run.reuse_outputs)
    if problem is not None:
        return problem
    await db.execute(
        "INSERT INTO step_tasks (run_id, run_lease, step, attempt, queue, tags, inputs,"
        " status, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (run_id, run_lease, step, attempt) DO NOTHING",
        (
            run.run_id,
            lease,
            record.step,
            attempt,
            step_queue(run.queue, op.tags),
            json.dumps(op.tags),
            json.dumps(inputs),
            WAITING,
            now,
        ),
    )
    return None


async def waiting_tasks(db: Tx, limit: int) -> list[StepTask]:
    """Step tasks to place: of runs still STARTED under the lease that asked for them."""
    rows = await db.fetch(
        f"SELECT {TASK_COLUMNS} {FROM_TASKS} WHERE t.status = ? AND r.status = ?"
        " AND r.lease = t.run_lease ORDER BY r.priority DESC, t.task_id LIMIT ?",
        (WAITING, RunStatus.STARTED, limit),
    )
    return [task_from_row(row) for row in rows]


async def running_tasks(db: Tx) -> list[StepTask]:
    """RUNNING step tasks of run attempts still going (a fenced one is being stopped:
    it holds no slot and is judged by no monitor)."""
    rows = await db.fetch(
        f"SELECT {TASK_COLUMNS} {FROM_TASKS} WHERE t.status = ? AND r.lease = t.run_lease"
        " AND r.status IN (?, ?) ORDER BY t.task_id",
        (RUNNING, RunStatus.STARTED, RunStatus.CANCELING),
    )
    return [task_from_row(row) for row in rows]


async def assign_task(db: Tx, task_id: int, agent_id: str, now: float) -> StepTask | None:
    """WAITING -> RUNNING on `agent_id` under a new lease; None if it no longer waits."""
    rows = await db.fetch("SELECT run_id FROM step_tasks WHERE task_id = ?", (task_id,))
    if not rows:
        return None
    ((lease,),) = await db.fetch(
        "INSERT INTO run_attempts (run_id, agent_id, create_time) VALUES (?, ?, ?)"
        " RETURNING attempt_id",
        (rows[0][0], agent_id, now),
    )
    placed = await db.execute(
        "UPDATE step_tasks SET status = ?, agent_id = ?, lease = ?, start_time = ?"
        " WHERE task_id = ? AND status = ?",
        (RUNNING, agent_id, lease, now, task_id, WAITING),
    )
    if not placed:
        await db.execute("DELETE FROM run_attempts WHERE attempt_id = ?", (lease,))
        return None
    return await task_by_lease(db, lease)


async def end_task(db: Tx, task: StepTask, outcome: dict[str, Any], now: float) -> bool:
    """RUNNING -> DONE with `outcome` (guarded: only the task's current lease ends it)."""
    changed = await db.execute(
        "UPDATE step_tasks SET status = ?, outcome = ?, end_time = ?"
        " WHERE task_id = ? AND status = ? AND lease = ?",
        (DONE, json.dumps(outcome), now, task.task_id, RUNNING, task.lease),
    )
    if changed:
        ok = "succeeded" if outcome.get("ok") else f"failed: {outcome.get('message', '')}"
        await append_event(
            db,
            task.run_id,
            now,
            STEP_TASK_ENDED,
            f"step task {task.task_id} (attempt {task.attempt}) on agent"
            f" {await _agent_name(db, task.agent_id)} {ok}",
            {
                "task_id": task.task_id,
                "agent_id": task.agent_id,
                "lease": task.lease,
                "attempt": task.attempt,
                "ok": bool(outcome.get("ok")),
            },
            task.step,
            task.lease,
        )
    return changed > 0


async def _agent_name(db: Tx, agent_id: str | None) -> str:
    rows = await db.fetch("SELECT name FROM agents WHERE agent_id = ?", (agent_id,))
    return str(rows[0][0]) if rows else str(agent_id)


async def stale_task_orders(
    db: Tx, agent_id: str, held: Collection[int]
) -> tuple[set[int], list[tuple[str, int, bool, str]]]:
    """Of the leases an agent holds, those of step tasks (live or not), and the stop
    orders owed for the ones that are over: (run id, lease, cancel, reason)."""
    if not held:
        return set(), []
    rows = await db.fetch(
        "SELECT t.lease, t.run_id, t.status, t.run_lease, r.lease, r.status"
        f" {FROM_TASKS} WHERE t.lease IN ({marks(held)}) AND t.agent_id = ?",
        (*held, agent_id),
    )
    leases: set[int] = set()
    orders = []
    for lease, run_id, status, run_lease, current, run_status in rows:
        leases.add(lease)
        if run_status == RunStatus.CANCELING and current == run_lease:
            orders.append((run_id, lease, True, "run canceled"))
        elif run_status != RunStatus.STARTED or current != run_lease:
            why = f"its run attempt {run_lease} is over (run {run_status})"
            orders.append((run_id, lease, False, f"step task fenced: {why}"))
        elif status == DONE:
            orders.append((run_id, lease, False, "step task already ended"))
    return leases, orders


class StepTaskQueries(SqlBase):
    _catalogs: CatalogCache

    async def step_task_by_lease(self, lease: int) -> StepTask | None:
        return await task_by_lease(self._reader, lease)

    async def step_tasks_of(self, run_id: str) -> list[StepTask]:
        rows = await self._reader.fetch(
            f"SELECT {TASK_COLUMNS} {FROM_TASKS} WHERE t.run_id = ? ORDER BY t.task_id",
            (run_id,),
        )
        return [task_from_row(row) for row in rows]

    async def step_task_agents(self, run_id: str) -> set[str]:
        rows = await self._reader.fetch(
            "SELECT DISTINCT agent_id FROM step_tasks WHERE run_id = ? AND status = ?",
            (run_id, RUNNING),
        )
        return {str(agent_id) for (agent_id,) in rows if agent_id}

    async def running_step_tasks(self) -> list[StepTask]:
        return await running_tasks(self._reader)

    async def pending_step_launches(self, agent_id: str) -> list[tuple[StepTask, Run]]:
        from control_plane.storage.sql.transitions import get_run

        rows = await self._reader.fetch(
            f"SELECT {TASK_COLUMNS} {FROM_TASKS} WHERE t.agent_id = ? AND t.status = ?"
            " AND r.status = ? AND r.lease = t.run_lease ORDER BY t.task_id",
            (agent_id, RUNNING, RunStatus.STARTED),
        )
        launches = []
        for row in rows:
            task = task_from_row(row)
            run = await get_run(self._reader, task.run_id)
            if run is not None:
                launches.append((task, run))
        return launches

    async def owed_step_results(
        self, agent_id: str, run_leases: Collection[int], held: Collection[int]
    ) -> list[StepTask]:
        """Ended step tasks of the run attempts this agent holds, but those it has."""
        if not run_leases:
            return []
        rows = await self._reader.fetch(
            f"SELECT {TASK_COLUMNS} {FROM_TASKS} WHERE t.status = ? AND r.agent_id = ?"
            f" AND r.lease = t.run_lease AND t.run_lease IN ({marks(run_leases)})"
            " ORDER BY t.task_id",
            (DONE, agent_id, *run_leases),
        )
        return [task for task in map(task_from_row, rows) if task.task_id not in held]

    async def reconcile_step_tasks(
        self, agent_id: str, held_leases: Collection[int], now: float
    ) -> list[str]:
        """An agent registered: its RUNNING step tasks it no longer holds failed (their
        worker went with its previous life); the agents owed their results."""
        lost = [
            StepTaskLost(t.task_id, t.lease, "agent restarted and no longer holds this step task")
            for t in await running_tasks(self._reader)
            if t.agent_id == agent_id and t.lease is not None and t.lease not in held_leases
        ]
        return await self.end_lost_step_tasks(lost, now) if lost else []

    async def end_lost_step_tasks(self, verdicts: list[StepTaskLost], now: float) -> list[str]:
        """Fail the attempts of step tasks whose agent went away; the agents of the runs
        whose orchestrator is owed the news."""
        owed = []
        async with self._write() as db:
            for verdict in verdicts:
                task = await task_by_lease(db, verdict.lease)
                if task is None or task.task_id != verdict.task_id:
                    continue
                if verdict.offline_agent is not None:
                    await db.execute(
                        "UPDATE agents SET status = 'OFFLINE' WHERE agent_id = ?"
                        " AND status = 'ONLINE'",
                        (verdict.offline_agent,),
                    )
                outcome = {
                    "ok": False,
                    "error_type": STEP_TASK_LOST,
                    "message": verdict.message,
                    "traceback": "",
                }
                if await end_task(db, task, outcome, now):
                    rows = await db.fetch(
                        "SELECT agent_id FROM runs WHERE run_id = ?", (task.run_id,)
                    )
                    if rows and rows[0][0]:
                        owed.append(str(rows[0][0]))
        return owed


AppendPlain = Callable[[Tx, str, int, float, list[RunRecord]], Awaitable[None]]


async def append_step_records(
    db: Tx,
    catalogs: CatalogCache,
    append_plain: AppendPlain,
    run: Run,
    task: StepTask,
    records: list[RunRecord],
    now: float,
) -> AppendResult:
    """A step task's records, under its own lease: stored as the run's, attributed to
    its step and attempt; its start and result become STEP_TASK_STARTED and the task's
    end (what follows its end is skipped). Fenced with the run's lease."""
    assert task.lease is not None
    lease = task.lease
    if run.status != RunStatus.STARTED or run.lease != task.run_lease:
        raise StaleLease(
            f"lease {lease} of step task {task.task_id} is fenced: its run attempt"
            f" {task.run_lease} is over (run {run.status})"
        )
    ((acked,),) = await db.fetch(
        "SELECT acked_seq FROM run_attempts WHERE attempt_id = ?", (lease,)
    )
    info = (await catalogs.read(db)).job_info(run.location, run.job, task.agent_id)
    steps = None if info is None else frozenset(op.name for op in info.ops)
    stored: dict[str, int] = {}
    plain: list[RunRecord] = []
    over = task.status != RUNNING
    ended: dict[str, Any] | None = None
    refused = None
    for record in sorted(records, key=lambda r: r.seq):
        if record.seq <= acked:
            continue
        if record.seq != acked + 1:
            break
        acked = record.seq
        if over:
            continue
        record = dataclasses.replace(record, step=task.step)
        if record.kind == "event" and record.type in TERMINAL_EVENTS:
            ended = outcome_of(record.data, record.type == RUN_SUCCESS, record.message)
            over = True
            continue
        if record.kind == "event" and record.type == RUN_START:
            name = await _agent_name(db, task.agent_id)
            record = dataclasses.replace(
                record,
                type=STEP_TASK_STARTED,
                message=f"step {task.step} (attempt {task.attempt}) started on agent {name}",
                data={
                    "task_id": task.task_id,
                    "agent_id": task.agent_id,
                    "agent": name,
                    "lease": lease,
                    "attempt": task.attempt,
                    "pid": record.data.get("pid"),
                },
            )
        elif record.kind == "event" and record.type not in STEP_WORKER_EVENTS:
            refused = f"record {record.seq}: a step task may not send {record.type[:64]}"
        elif screen_record(record, run.status, steps, run.end_time, now)[0] is Take.REFUSE:
            refused = f"record {record.seq}: {record.type[:64]} is not one of the step's"
        if refused is not None:
            ended = {"ok": False, "error_type": "RecordRefused", "message": refused}
            break
        inline = record.data.get(INLINE_OUTPUT_KEY) if record.kind == "event" else None
        if isinstance(inline, bytes):
            await put_output_row(db, run.run_id, lease, task.step, inline, now)
            data = {k: v for k, v in record.data.items() if k != INLINE_OUTPUT_KEY}
            record = dataclasses.replace(record, data=data)
        stored[record.kind] = stored.get(record.kind, 0) + 1
        plain.append(record)
    await append_plain(db, run.run_id, lease, now, plain)
    await db.execute("UPDATE run_attempts SET acked_seq = ? WHERE attempt_id = ?", (acked, lease))
    ends = ended is not None and await end_task(db, task, ended, now)
    return AppendResult(
        acked_seq=acked,
        status=run.status,
        status_changed=False,
        stored=stored,
        refused=refused,
        step_task_ended=run.agent_id if ends else None,
    )


async def put_output_row(
    db: Tx, run_id: str, lease: int, step: str, data: bytes, now: float
) -> None:
    await db.execute(
        "INSERT INTO step_outputs (run_id, step, attempt, size, data, create_time)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step) DO UPDATE SET"
        " attempt = excluded.attempt, size = excluded.size, data = excluded.data,"
        " create_time = excluded.create_time",
        (run_id, step, lease, len(data), data, now),
    )


def check_task_agent(task: StepTask, agent_id: str | None) -> None:
    if agent_id is not None and task.agent_id != agent_id:
        raise NotYourRun(f"step task {task.task_id} is not leased to this agent")
