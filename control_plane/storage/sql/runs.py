"""Runs and the run queue: creating, listing, assigning (the lease), cancelling, and what
the control plane decides for an attempt (verdicts, retries)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from typing import Any

from control_plane.model.runs import (
    NewRun,
    Placement,
    QueueSnapshot,
    ResumeRules,
    Run,
    RunFilter,
    StatusChange,
    StopOrder,
    Verdict,
)
from control_plane.model.statuses import ACTIVE_STATUSES, RunStatus
from control_plane.model.steptasks import StepPlacement, StepTask
from control_plane.storage.sql.base import (
    AGENT_COLUMNS,
    RUN_COLUMNS,
    SqlBase,
    Tx,
    agent_from_row,
    marks,
    run_from_row,
)
from control_plane.storage.sql.catalog import CatalogCache, agents_by_id
from control_plane.storage.sql.pools import hold_run_slots, live_claims, set_limits
from control_plane.storage.sql.steptasks import (
    assign_task,
    running_tasks,
    stale_task_orders,
    waiting_tasks,
)
from control_plane.storage.sql.transitions import append_event, fail, get_run, insert_run, reusable
from protocol.events import AGENT_RESTARTED
from protocol.tags import PRIORITY_TAG

DISPATCH_BATCH = 1000
QUALIFIED_RUN_COLUMNS = ", ".join(f"runs.{name.strip()}" for name in RUN_COLUMNS.split(","))


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix` (its last character
    moved up by one), so a prefix is a range on an index; None for no bound."""
    if not prefix or ord(prefix[-1]) >= 0x10FFFF:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def runs_page_query(filt: RunFilter, limit: int, cursor: int | None) -> tuple[str, list[Any]]:
    """A page of runs (one more row than `limit`: is there a next page?), newest first,
    after `cursor` (a run's numeric id). With a tag filter the first tag drives the read
    from `run_tags_by_key_value_run`, in run order, and joins each run by its id: a page
    costs its own rows, not the table's, however rare or common the tag."""
    where: list[str] = []
    args: list[Any] = []
    source, order = "runs", "runs.id"
    if filt.tags:
        source = "run_tags t CROSS JOIN runs"  # CROSS: SQLite keeps run_tags outermost
        order = "t.run_pk"
        where.append("t.key = ? AND t.value = ? AND runs.id = t.run_pk")
        args.extend(filt.tags[0])
    if filt.statuses:
        where.append(f"runs.status IN ({marks(filt.statuses)})")
        args.extend(str(s) for s in filt.statuses)
    if filt.job:
        where.append("runs.job = ?")
        args.append(filt.job)
    if filt.agent_id:
        where.append("runs.agent_id = ?")
        args.append(filt.agent_id)
    if filt.root_run_id:
        where.append("runs.root_run_id = ?")
        args.append(filt.root_run_id)
    for key, value in filt.tags[1:]:
        where.append(
            "EXISTS (SELECT 1 FROM run_tags o WHERE o.run_id = runs.run_id"
            " AND o.key = ? AND o.value = ?)"
        )
        args.extend((key, value))
    if cursor is not None:
        where.append(f"{order} < ?")
        args.append(cursor)
    sql = f"SELECT {QUALIFIED_RUN_COLUMNS} FROM {source}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + f" ORDER BY {order} DESC LIMIT ?", [*args, limit + 1]


class RunQueries(SqlBase):
    _catalogs: CatalogCache

    async def create_run(self, run: NewRun, now: float) -> Run:
        async with self._write() as db:
            return await insert_run(db, run, now)

    async def get_run(self, run_id: str) -> Run | None:
        return await get_run(self._reader, run_id)

    async def run_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        # A range on the unique index of run_id, in byte order on SQLite and on PostgreSQL
        # databases with a C collation; the second test keeps it exact under any other.
        where, args = "run_id >= ? AND substr(run_id, 1, ?) = ?", [prefix, len(prefix), prefix]
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            where += " AND run_id < ?"
            args.append(upper)
        rows = await self._reader.fetch(
            f"SELECT run_id FROM runs WHERE {where} ORDER BY run_id LIMIT ?", (*args, limit)
        )
        return [row[0] for row in rows]

    async def list_runs(
        self, filt: RunFilter, limit: int, cursor: int | None
    ) -> tuple[list[Run], int | None]:
        rows = list(await self._reader.fetch(*runs_page_query(filt, limit, cursor)))
        next_cursor = rows[limit - 1][-1] if len(rows) > limit else None
        return [run_from_row(r) for r in rows[:limit]], next_cursor

    async def active_runs(self) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN (?, ?, ?)", tuple(ACTIVE_STATUSES)
        )
        return [run_from_row(r) for r in rows]

    async def count_runs_by_status(self) -> dict[RunStatus, int]:
        rows = await self._reader.fetch("SELECT status, COUNT(*) FROM runs GROUP BY status")
        return {RunStatus(status): count for status, count in rows}

    async def _snapshot(self, db: Tx, every_agent: bool = False) -> QueueSnapshot:
        """The queue, the active runs, and the agents that host a queued run's location
        (`every_agent`: all of them, so that a reason can say which queue nobody serves):
        a fleet of thousands of agents serving other locations costs a dispatch nothing."""
        queued = [
            run_from_row(r)
            for r in await db.fetch(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE status = ?"
                " ORDER BY priority DESC, id LIMIT ?",
                (RunStatus.QUEUED, DISPATCH_BATCH),
            )
        ]
        active = await db.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN (?, ?, ?)", tuple(ACTIVE_STATUSES)
        )
        waiting = await waiting_tasks(db, DISPATCH_BATCH)
        if not queued and not waiting and not every_agent:  # nothing to decide
            return QueueSnapshot(queued=[], active=[], agents=[], hosted={})
        catalog = await self._catalogs.read(db)
        if every_agent:
            agents = [
                agent_from_row(r) for r in await db.fetch(f"SELECT {AGENT_COLUMNS} FROM agents")
            ]
        else:
            wanted = {run.location for run in queued} | {t.location for t in waiting}
            hosting = {loc.agent_id for name in wanted for loc in catalog.by_name.get(name, ())}
            agents = list((await agents_by_id(db, hosting)).values())
        job_pools = {}
        job_executors = {}
        for run in queued:
            info = catalog.job_info(run.location, run.job)
            if info is not None:
                job_pools[(run.location, run.job)] = frozenset(o.pool for o in info.ops if o.pool)
                job_executors[(run.location, run.job)] = info.executor
        pooled = every_agent or any(job_pools.values())  # a run's pools may hold it back
        return QueueSnapshot(
            queued=queued,
            active=[run_from_row(r) for r in active],
            agents=agents,
            hosted=catalog.hosted,
            claims=await live_claims(db) if pooled else [],
            pool_limits=await set_limits(db) if pooled else {},
            job_pools=job_pools,
            code_versions=catalog.code_versions,
            job_executors=job_executors,
            waiting_steps=waiting,
            running_steps=await running_tasks(db),
        )

    async def queue_snapshot(self) -> QueueSnapshot:
        return await self._snapshot(self._reader, every_agent=True)

    async def assign_queued(
        self, now: float, decide: Callable[[QueueSnapshot], Sequence[Placement]]
    ) -> list[Run | StepTask]:
        async with self._write() as db:
            snapshot = await self._snapshot(db)
            if not snapshot.queued and not snapshot.waiting_steps:
                return []
            assigned: list[Run | StepTask] = []
            for placement in decide(snapshot):
                if isinstance(placement, StepPlacement):
                    task = await assign_task(db, placement.task_id, placement.agent_id, now)
                    if task is not None:
                        assigned.append(task)
                    continue
                run_id, agent_id, *pools = placement
                run = await _assign(db, run_id, agent_id, now)
                if run is not None:
                    if pools and pools[0]:
                        await hold_run_slots(db, run, pools[0], now)
                    assigned.append(run)
            return assigned

    async def set_priority(self, run_id: str, priority: int, now: float) -> Run | None:
        async with self._write() as db:
            run = await get_run(db, run_id)
            if run is None or run.status != RunStatus.QUEUED:
                return run
            tags = {**run.tags, PRIORITY_TAG: str(priority)}
            changed = await db.execute(
                "UPDATE runs SET priority = ?, tags = ?, update_time = ?"
                " WHERE run_id = ? AND status = ?",
                (priority, json.dumps(tags), now, run_id, RunStatus.QUEUED),
            )
            if changed:
                await db.execute(
                    "INSERT INTO run_tags (run_id, key, value, run_pk)"
                    " SELECT run_id, ?, ?, id FROM runs WHERE run_id = ?"
                    " ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
                    (PRIORITY_TAG, str(priority), run_id),
                )
            return await get_run(db, run_id)

    async def request_cancel(self, run_id: str, now: float) -> Run | None:
        async with self._write() as db:
            run = await get_run(db, run_id)
            if run is None:
                return None
            if run.status in (RunStatus.QUEUED, RunStatus.NOT_STARTED):
                await append_event(db, run_id, now, "RUN_CANCELED", "canceled while queued")
            elif run.status in (RunStatus.STARTING, RunStatus.STARTED):
                await append_event(
                    db,
                    run_id,
                    now,
                    "RUN_CANCELING",
                    "cancel requested",
                    attempt=run.lease,
                    lease=run.lease,
                )
            return await get_run(db, run_id)

    async def pending_launches(self, agent_id: str) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE agent_id = ? AND status = ? ORDER BY id",
            (agent_id, RunStatus.STARTING),
        )
        return [run_from_row(r) for r in rows]

    async def ack_launches(self, agent_id: str, leases: list[int]) -> list[int]:
        if not leases:
            return []
        async with self._write_row() as db:
            rows = await db.fetch(
                "UPDATE runs SET launch_acked = 1 WHERE agent_id = ?"
                f" AND lease IN ({marks(leases)}) AND launch_acked = 0 RETURNING lease",
                (agent_id, *leases),
            )
            return [lease for (lease,) in rows]

    async def stop_orders(
        self, agent_id: str, held_leases: list[int], now: float
    ) -> tuple[list[StopOrder], list[Run]]:
        rows = await self._reader.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE agent_id = ? AND status = ?",
            (agent_id, RunStatus.CANCELING),
        )
        held = set(held_leases)
        canceling = [run_from_row(r) for r in rows]
        orders = [
            StopOrder(run.run_id, run.lease, cancel=True, reason="run canceled")
            for run in canceling
            if run.lease is not None and run.lease in held
        ]
        never_started = [r for r in canceling if r.lease is not None and r.lease not in held]
        canceled: list[Run] = []
        if never_started:
            async with self._write() as db:
                for run in never_started:
                    _, changed = await append_event(
                        db,
                        run.run_id,
                        now,
                        "RUN_CANCELED",
                        "canceled before its worker started",
                        lease=run.lease,
                    )
                    if changed:
                        await db.execute(
                            "UPDATE runs SET lease = NULL WHERE run_id = ?", (run.run_id,)
                        )
                        canceled.append(await get_run(db, run.run_id))  # type: ignore[arg-type]
        step_leases, step_orders = await stale_task_orders(self._reader, agent_id, held)
        orders += [StopOrder(*order) for order in step_orders]
        held -= step_leases
        if held:
            stale = await self._reader.fetch(
                "SELECT a.attempt_id, a.run_id, r.lease, r.status, r.status_reason"
                " FROM run_attempts a JOIN runs r ON r.run_id = a.run_id"
                f" WHERE a.attempt_id IN ({marks(held)}) AND a.agent_id = ?",
                (*held, agent_id),
            )
            for lease, run_id, current, status, reason in stale:
                if current != lease:
                    why = f"attempt {lease} is no longer current (run {status}: {reason})"
                    orders.append(StopOrder(run_id, lease, cancel=False, reason=why))
        return orders, canceled

    async def apply_verdicts(
        self, verdicts: list[Verdict], now: float, resume_limit: int
    ) -> list[Run]:
        changed = []
        async with self._write() as db:
            for verdict in verdicts:
                run = await get_run(db, verdict.run_id)
                if run is None or run.status != verdict.status or run.lease != verdict.lease:
                    continue  # something else (e.g. the agent's own report) got there first
                if verdict.offline_agent is not None:
                    await db.execute(
                        "UPDATE agents SET status = 'OFFLINE' WHERE agent_id = ?"
                        " AND status = 'ONLINE'",
                        (verdict.offline_agent,),
                    )
                if verdict.outcome == RunStatus.QUEUED:  # never started: back to the queue
                    _, done = await append_event(
                        db,
                        run.run_id,
                        now,
                        "RUN_ENQUEUED",
                        verdict.message,
                        attempt=run.lease,
                        lease=run.lease,
                    )
                    if done:
                        await db.execute(
                            "UPDATE runs SET agent_id = NULL WHERE run_id = ?", (run.run_id,)
                        )
                elif verdict.outcome == RunStatus.CANCELED:
                    await append_event(
                        db,
                        run.run_id,
                        now,
                        "RUN_CANCELED",
                        verdict.message,
                        {"warning": True},
                        attempt=run.lease,
                        lease=run.lease,
                    )
                else:
                    resume = ResumeRules(worker_restarts=resume_limit)
                    await fail(db, run, verdict.kind, verdict.message, now, resume)
                await db.execute("UPDATE runs SET lease = NULL WHERE run_id = ?", (run.run_id,))
                changed.append(await get_run(db, run.run_id))
        return [r for r in changed if r is not None]

    async def reconcile_agent(
        self, agent_id: str, held_leases: list[int], now: float, resume_limit: int
    ) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE agent_id = ? AND status IN (?, ?, ?)",
            (agent_id, RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING),
        )
        held = set(held_leases)
        verdicts = []
        for run in map(run_from_row, rows):
            if run.lease in held:
                continue
            if run.status == RunStatus.STARTING:
                message = (
                    "agent restarted before it reported this launch; launched again "
                    "under a new lease"
                )
                verdicts.append(
                    Verdict(
                        run.run_id,
                        run.lease,
                        run.status,
                        RunStatus.QUEUED,
                        AGENT_RESTARTED,
                        message,
                    )
                )
                continue
            canceling = run.status == RunStatus.CANCELING
            verdicts.append(
                Verdict(
                    run_id=run.run_id,
                    lease=run.lease,
                    status=run.status,
                    outcome=RunStatus.CANCELED if canceling else RunStatus.FAILURE,
                    kind=AGENT_RESTARTED,
                    message="agent restarted and no longer holds this run's worker"
                    + ("; canceled" if canceling else ""),
                )
            )
        return await self.apply_verdicts(verdicts, now, resume_limit) if verdicts else []

    async def reusable_outputs(self, run: Run) -> dict[str, str]:
        return await reusable(self._reader, run)

    async def status_changes(
        self, after: int, limit: int, statuses: Collection[RunStatus] = ()
    ) -> list[tuple[StatusChange, Run]]:
        where = "c.id > ?"
        args: list[object] = [after]
        if statuses:
            where += f" AND c.status IN ({marks(statuses)})"
            args.extend(str(s) for s in statuses)
        columns = ", ".join(f"r.{c.strip()}" for c in RUN_COLUMNS.split(","))
        rows = await self._reader.fetch(
            f"SELECT c.id, c.run_id, c.status, c.time, {columns} FROM run_status_changes c"
            f" JOIN runs r ON r.run_id = c.run_id WHERE {where} ORDER BY c.id LIMIT ?",
            [*args, limit],
        )
        return [
            (StatusChange(row[0], row[1], RunStatus(row[2]), row[3]), run_from_row(row[4:]))
            for row in rows
        ]

    async def last_status_change(self) -> int:
        rows = await self._reader.fetch("SELECT MAX(id) FROM run_status_changes")
        return int(rows[0][0] or 0)

    async def pending_retries(self, limit: int) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE retry_pending = 1 ORDER BY id LIMIT ?",
            (limit,),
        )
        return [run_from_row(r) for r in rows]

    async def settle_retry(
        self, run_id: str, retry: NewRun | None, message: str, data: dict[str, Any], now: float
    ) -> Run | None:
        async with self._write() as db:
            cleared = await db.execute(
                "UPDATE runs SET retry_pending = 0 WHERE run_id = ? AND retry_pending = 1",
                (run_id,),
            )
            if not cleared:
                return None
            created = None
            if retry is not None:
                created = await insert_run(db, retry, now, f"run queued as a retry of run {run_id}")
            if message:
                await append_event(db, run_id, now, "RUN_RETRY", message, data)
            return created


async def _assign(db: Tx, run_id: str, agent_id: str, now: float) -> Run | None:
    """QUEUED -> STARTING on `agent_id` under a new lease (the attempt's id); None if the
    run is no longer QUEUED. The lease is written only if the run is still queued."""
    ((lease,),) = await db.fetch(
        "INSERT INTO run_attempts (run_id, agent_id, create_time) VALUES (?, ?, ?)"
        " RETURNING attempt_id",
        (run_id, agent_id, now),
    )
    placed = await db.execute(
        "UPDATE runs SET agent_id = ?, lease = ?, launch_acked = 0 WHERE run_id = ? AND status = ?",
        (agent_id, lease, run_id, RunStatus.QUEUED),
    )
    if not placed:
        await db.execute("DELETE FROM run_attempts WHERE attempt_id = ?", (lease,))
        return None
    names = await db.fetch("SELECT name FROM agents WHERE agent_id = ?", (agent_id,))
    await append_event(
        db,
        run_id,
        now,
        "RUN_STARTING",
        f"launching on agent {names[0][0] if names else agent_id}",
        {"agent_id": agent_id, "lease": lease},
        attempt=lease,
        lease=lease,
    )
    return await get_run(db, run_id)
