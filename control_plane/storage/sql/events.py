"""Ingest: an attempt's records (events and compute logs) and step outputs, and reading
them back. The hot path of a busy instance: a batch of 500 records costs a handful of
statements, in a transaction scoped to its run."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection
from typing import Any

from control_plane.model.records import Take, output_problem, screen_record, slot_claim
from control_plane.model.runs import NO_RESUMES, Event, LogChunk, ResumeRules, Run
from control_plane.model.statuses import (
    ACTIVE_STATUSES,
    EVENT_STATUS,
    REFUSED_RECORD,
    TERMINAL_STATUSES,
    RunStatus,
)
from control_plane.model.steptasks import RUNNING
from control_plane.storage.errors import NotYourRun, RecordRefused, StaleLease, UnknownRun
from control_plane.storage.logstore import LOG_COLUMNS, LogRow, LogStore
from control_plane.storage.port import AppendResult
from control_plane.storage.sql.base import SqlBase, Tx, event_json, marks
from control_plane.storage.sql.catalog import CatalogCache
from control_plane.storage.sql.pools import claim_step_slot, release_step
from control_plane.storage.sql.steptasks import (
    append_step_records,
    check_task_agent,
    put_output_row,
    request_task,
    task_by_lease,
)
from control_plane.storage.sql.transitions import (
    append_event,
    fail,
    get_run,
    known_kind,
)
from protocol.events import (
    AGENT_FAILURE_KINDS,
    RUN_FAILURE,
    STEP_ATTEMPT_ENDS,
    STEP_SLOT_REQUESTED,
    STEP_TASK_REQUESTED,
)
from protocol.messages import RunRecord

log = logging.getLogger("fleetrun.storage")

INLINE_OUTPUT_KEY = "output_bytes"  # a STEP_OUTPUT's data may carry the output itself


class EventQueries(SqlBase):
    _catalogs: CatalogCache
    logs: LogStore  # where compute-log text lives (storage/logstore.py)

    async def append_records(
        self,
        run_id: str,
        lease: int,
        records: list[RunRecord],
        now: float,
        resume: ResumeRules = NO_RESUMES,
        agent_id: str | None = None,
    ) -> AppendResult:
        async with self._write(run_id) as db:
            run = await get_run(db, run_id)
            if run is not None and run.lease != lease:
                task = await task_by_lease(db, lease)
                if task is not None and task.run_id == run_id:
                    check_task_agent(task, agent_id)
                    return await append_step_records(
                        db, self._catalogs, self._append_plain, run, task, records, now
                    )
            run = await _leased(db, run_id, lease, agent_id)
            ((acked,),) = await db.fetch(
                "SELECT acked_seq FROM run_attempts WHERE attempt_id = ?", (lease,)
            )
            steps = await self._job_steps(db, run)
            status, end_time = run.status, run.end_time
            changed = False
            refused: str | None = None
            stored: dict[str, int] = {}
            pools_changed = False
            tasks_changed = False
            plain: list[RunRecord] = []  # stored together, in as few statements as can be
            for record in sorted(records, key=lambda r: r.seq):
                if record.seq <= acked:
                    continue
                if record.seq != acked + 1:
                    break
                take, why = screen_record(record, status, steps, end_time, now)
                if take is Take.REFUSE:
                    refused = f"record {record.seq} ({record.kind} {record.type[:64]}): {why}"
                    break
                acked = record.seq
                if take is Take.SKIP:
                    continue
                if record.step is not None and record.kind == "event":
                    pools_changed |= await _claim_or_release(db, run, lease, record, status, now)
                if record.type == STEP_TASK_REQUESTED and record.kind == "event":
                    problem = await self._request_task(db, run, lease, record, status, now)
                    if problem is not None:
                        refused = f"record {record.seq} ({record.type}): {problem}"
                        break
                    tasks_changed = True
                if take is Take.STORE_UNATTRIBUTED:
                    record = dataclasses.replace(record, step=None)
                stored_as = "log" if record.kind == "log" else "event"
                stored[stored_as] = stored.get(stored_as, 0) + 1
                if record.kind == "log" or (
                    record.type not in EVENT_STATUS and INLINE_OUTPUT_KEY not in record.data
                ):
                    plain.append(record)
                    continue
                await self._append_plain(db, run_id, lease, now, plain)
                plain = []
                if record.type == RUN_FAILURE and status in (RunStatus.STARTING, RunStatus.STARTED):
                    kind = known_kind(record.data.get("failure_kind"), AGENT_FAILURE_KINDS)
                    run = dataclasses.replace(run, status=status)
                    status = await fail(
                        db,
                        run,
                        kind,
                        record.message,
                        now,
                        resume,
                        record.data,
                        event_time=record.time,
                    )
                    changed, end_time = True, now
                    if status == RunStatus.QUEUED:
                        break  # this attempt is over; its lease is no longer current
                    continue
                data = dict(record.data)
                inline = data.pop(INLINE_OUTPUT_KEY, None)
                if isinstance(inline, bytes) and record.step is not None:
                    await _put_output(db, run_id, lease, record.step, inline, now)
                status, did_change = await append_event(
                    db,
                    run_id,
                    now,
                    record.type,
                    record.message,
                    data,
                    record.step,
                    lease,
                    event_time=record.time,
                    lease=lease,
                )
                changed = changed or did_change
                if did_change and status in TERMINAL_STATUSES:
                    end_time = now
            await self._append_plain(db, run_id, lease, now, plain)
            await db.execute(
                "UPDATE run_attempts SET acked_seq = ? WHERE attempt_id = ?", (acked, lease)
            )
            if refused is not None and status in ACTIVE_STATUSES:
                log.warning(
                    "run %s: refused a record from agent %s: %s",
                    run_id,
                    run.agent_id,
                    refused,
                    extra={"run_id": run_id},
                )
                run = dataclasses.replace(run, status=status)
                status = await _refuse(
                    db, run, f"a record the control plane refuses: {refused}", now
                )
                changed = True
            return AppendResult(
                acked_seq=acked,
                status=status,
                status_changed=changed,
                stored=stored,
                launch_acked=run.launch_acked,
                refused=refused,
                pools_changed=pools_changed,
                step_tasks_changed=tasks_changed,
            )

    async def _request_task(
        self, db: Tx, run: Run, lease: int, record: RunRecord, status: RunStatus, now: float
    ) -> str | None:
        """A STEP_TASK_REQUESTED: the step task it asks for (not once the run is being
        canceled: it starts no step)."""
        if status != RunStatus.STARTED:
            return None
        assert record.step is not None
        info = (await self._catalogs.read(db)).job_info(run.location, run.job, run.agent_id)
        ops = {op.name: op for op in info.ops} if info is not None else {}
        return await request_task(db, run, lease, record, ops.get(record.step), now)

    async def _job_steps(self, db: Tx, run: Run) -> frozenset[str] | None:
        """The steps of the run's job, as its agent's copy of the location defines them
        (any copy, if that agent no longer lists the job); None if no copy does."""
        info = (await self._catalogs.read(db)).job_info(run.location, run.job, run.agent_id)
        return None if info is None else frozenset(op.name for op in info.ops)

    async def put_output(self, run_id: str, lease: int, step: str, data: bytes, now: float) -> None:
        async with self._write(run_id) as db:
            task = await task_by_lease(db, lease)
            if task is not None and task.run_id == run_id:  # a step task's own step only
                run = await get_run(db, run_id)
                if (
                    run is None
                    or run.status != RunStatus.STARTED
                    or run.lease != task.run_lease
                    or task.status != RUNNING
                ):
                    raise StaleLease(f"lease {lease} of step task {task.task_id} is over")
                if step != task.step:
                    raise RecordRefused(f"step task {task.task_id} runs step {task.step}")
                await _put_output(db, run_id, lease, step, data, now)
                return
            run = await _leased(db, run_id, lease)
            why = output_problem(step, run.status, await self._job_steps(db, run))
            if why is None:
                await _put_output(db, run_id, lease, step, data, now)
                return
            refused = f"output of step {step[:64]!r}: {why}"
            if run.status in ACTIVE_STATUSES:  # committed before the refusal is raised
                await _refuse(db, run, f"an output the control plane refuses: {refused}", now)
        raise RecordRefused(refused)

    async def get_output(self, run_id: str, step: str) -> bytes | None:
        rows = await self._reader.fetch(
            "SELECT data FROM step_outputs WHERE run_id = ? AND step = ?", (run_id, step)
        )
        return bytes(rows[0][0]) if rows else None

    async def get_events(
        self, run_id: str, after: int, limit: int, types: Collection[str] = ()
    ) -> list[Event]:
        of_types = f" AND type IN ({marks(types)})" if types else ""
        rows = await self._reader.fetch(
            "SELECT seq, time, type, step, message, data FROM events"
            f" WHERE run_id = ? AND seq > ?{of_types} ORDER BY seq LIMIT ?",
            (run_id, after, *types, limit),
        )
        return [
            Event(seq=s, time=t, type=ty, step=st, message=m, data=json.loads(d))
            for s, t, ty, st, m, d in rows
        ]

    async def get_logs(self, run_id: str, step: str | None, after: int) -> list[LogChunk]:
        sql = f"SELECT {LOG_COLUMNS} FROM compute_logs WHERE run_id = ? AND id > ?"
        args: list[Any] = [run_id, after]
        if step is not None:
            sql += " AND step = ?"
            args.append(step)
        rows = await self._reader.fetch(sql + " ORDER BY id", args)
        return await self.logs.read(run_id, [LogRow(*row) for row in rows])

    async def _append_plain(
        self, db: Tx, run_id: str, lease: int, now: float, records: list[RunRecord]
    ) -> None:
        """Store records that change no status (logs, step events) in one statement per
        table: a batch of 500 costs three statements, not a thousand."""
        logs = [r for r in records if r.kind == "log"]
        if logs:
            await self.logs.append(db, run_id, lease, logs)
        await _append_events(db, run_id, lease, now, [r for r in records if r.kind != "log"])


async def _claim_or_release(
    db: Tx, run: Run, lease: int, record: RunRecord, status: RunStatus, now: float
) -> bool:
    """A step's claim on a pool slot, or the end of the attempt that held one, stored in
    the transaction that stores its record; whether a pool's line changed. A run being
    canceled starts no step, so it claims nothing."""
    assert record.step is not None
    if record.type == STEP_SLOT_REQUESTED and status == RunStatus.STARTED:
        pool, attempt = slot_claim(record.data)
        await claim_step_slot(db, run, lease, record.step, attempt, pool, now)
        return True
    if record.type in STEP_ATTEMPT_ENDS:
        return await release_step(db, run.run_id, record.step) > 0
    return False


async def _leased(db: Tx, run_id: str, lease: int, agent_id: str | None = None) -> Run:
    """The run, if `lease` is its current lease (and, with `agent_id`, that agent's)."""
    run = await get_run(db, run_id)
    if run is None:
        raise UnknownRun(run_id)
    if agent_id is not None and run.agent_id != agent_id:
        raise NotYourRun(f"run {run_id} is not leased to this agent")
    if run.lease != lease:
        raise StaleLease(f"lease {lease} of run {run_id} is stale (current: {run.lease})")
    return run


async def _refuse(db: Tx, run: Run, what: str, now: float) -> RunStatus:
    """A running run whose agent sent what it may not: it fails, and its lease ends."""
    status = await fail(db, run, REFUSED_RECORD, f"the agent sent {what}", now)
    await db.execute("UPDATE runs SET lease = NULL WHERE run_id = ?", (run.run_id,))
    return status


async def _put_output(db: Tx, run_id: str, lease: int, step: str, data: bytes, now: float) -> None:
    await put_output_row(db, run_id, lease, step, data, now)


async def _append_events(
    db: Tx, run_id: str, lease: int, now: float, events: list[RunRecord]
) -> None:
    if not events:
        return
    ((last,),) = await db.fetch(
        "UPDATE runs SET last_event_seq = last_event_seq + ?, update_time = ?"
        " WHERE run_id = ? RETURNING last_event_seq",
        (len(events), now, run_id),
    )
    first = last - len(events) + 1
    await db.executemany(
        "INSERT INTO events (run_id, seq, time, type, step, message, data, attempt)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (run_id, first + i, r.time or now, r.type, r.step, r.message, event_json(r.data), lease)
            for i, r in enumerate(events)
        ],
    )
