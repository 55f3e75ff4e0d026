"""Every change of a run's status, written once for every query module and both databases.

A status write is one conditional UPDATE: it names the statuses the transition may start
from (`model/statuses.py`) and, where an agent's attempt is concerned, the lease, and
its row count says whether it happened. A run that stops running frees its pool slots
(`sql/pools.py`) in that same transaction. The event that records the change takes the
sequence number that same statement reserved, so the event log holds a status event
only with its transition: the log and the status tell one story, whatever races. Locks
(the backends' write transactions) only order writes; they are not the guard.
"""

from __future__ import annotations

import json
from typing import Any

from control_plane.model.runs import NO_RESUMES, NewRun, ResumeRules, Run
from control_plane.model.statuses import (
    ACTIVE_STATUSES,
    EVENT_STATUS,
    FAILURE_KINDS,
    OP_FAILURE,
    RESUMABLE_KINDS,
    TERMINAL_STATUSES,
    RunStatus,
    sources_of,
)
from control_plane.storage.sql.base import RUN_COLUMNS, Tx, event_json, marks, run_from_row
from protocol.events import CODE_UNREACHABLE
from protocol.tags import code_version_ok


async def get_run(db: Tx, run_id: str) -> Run | None:
    rows = await db.fetch(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
    return run_from_row(rows[0]) if rows else None


def code_version_of(data: dict[str, Any]) -> str | None:
    """The code version an agent's RUN_START names (any msgpack value: kept only if it
    is one)."""
    claimed = data.get("code_version")
    return claimed if isinstance(claimed, str) and code_version_ok(claimed) else None


def known_kind(claimed: object, allowed: frozenset[str] = FAILURE_KINDS) -> str:
    """A failure kind from event data (an agent's: any msgpack value), or op_failure."""
    return claimed if isinstance(claimed, str) and claimed in allowed else OP_FAILURE


async def transition(
    db: Tx,
    run_id: str,
    new: RunStatus,
    reason: str,
    now: float,
    lease: int | None = None,
    failure_kind: str | None = None,
    code_version: str | None = None,
) -> int | None:
    """Move the run to `new` if it is in a status that may go there (and, with `lease`,
    still under that lease), reserving the next event seq; the seq, or None if the run
    was not where the transition may start (nothing changed). A start records the code
    version its agent said it runs."""
    sources = sources_of(new)
    sets = [
        "status = ?",
        "status_reason = ?",
        "status_time = ?",
        "update_time = ?",
        "last_event_seq = last_event_seq + 1",
    ]
    args: list[Any] = [new, reason, now, now]
    if new == RunStatus.STARTED:
        sets.append("start_time = ?")
        args.append(now)
        if code_version is not None:
            sets.append("code_version = ?")
            args.append(code_version)
    if new in TERMINAL_STATUSES:
        sets.append("end_time = ?")
        args.append(now)
    if new == RunStatus.FAILURE:
        # A run that failed while being canceled is not retried: the user wanted it gone.
        sets += ["failure_kind = ?", "retry_pending = CASE WHEN status = ? THEN 0 ELSE 1 END"]
        args += [known_kind(failure_kind), RunStatus.CANCELING]
    where = f"run_id = ? AND status IN ({marks(sources)})"
    args += [run_id, *sources]
    if lease is not None:
        where += " AND lease = ?"
        args.append(lease)
    rows = await db.fetch(
        f"UPDATE runs SET {', '.join(sets)} WHERE {where} RETURNING last_event_seq", args
    )
    if not rows:
        return None
    if new not in ACTIVE_STATUSES:
        # The attempt is over (ended, or back in the queue): every slot it held or waited
        # for is free, in this same transaction, whatever ended it.
        await db.execute("DELETE FROM pool_slots WHERE run_id = ?", (run_id,))
    elif new == RunStatus.CANCELING:
        # Canceled: no step of it starts again, so its places in line go at once; the
        # slots of steps still running go when the run ends.
        await db.execute(
            "DELETE FROM pool_slots WHERE run_id = ? AND granted_time IS NULL", (run_id,)
        )
    db.status_changes.append((run_id, str(new), now))
    seq: int = rows[0][0]
    return seq


async def _insert_event(
    db: Tx,
    run_id: str,
    seq: int,
    time: float,
    event_type: str,
    message: str,
    data: dict[str, Any] | None,
    step: str | None,
    attempt: int | None,
) -> None:
    await db.execute(
        "INSERT INTO events (run_id, seq, time, type, step, message, data, attempt)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, seq, time, event_type, step, message, event_json(data), attempt),
    )


async def append_event(
    db: Tx,
    run_id: str,
    now: float,
    event_type: str,
    message: str,
    data: dict[str, Any] | None = None,
    step: str | None = None,
    attempt: int | None = None,
    event_time: float | None = None,
    lease: int | None = None,
) -> tuple[RunStatus, bool]:
    """Append one event; a status event only with its transition (see `transition`).
    The run's status after it, and whether it changed.

    The event keeps the time its source stamped (`event_time`); the run's start and end
    times are the control plane's (`now`), the moment the change took effect.
    """
    new = EVENT_STATUS.get(event_type)
    if new is not None:
        kind = (data or {}).get("failure_kind")
        seq = await transition(
            db, run_id, new, message, now, lease, kind, code_version_of(data or {})
        )
        if seq is None:
            ((status,),) = await db.fetch("SELECT status FROM runs WHERE run_id = ?", (run_id,))
            return RunStatus(status), False
        await _insert_event(
            db, run_id, seq, event_time or now, event_type, message, data, step, attempt
        )
        return new, True
    ((seq, status),) = await db.fetch(
        "UPDATE runs SET last_event_seq = last_event_seq + 1, update_time = ?"
        " WHERE run_id = ? RETURNING last_event_seq, status",
        (now, run_id),
    )
    await _insert_event(
        db, run_id, seq, event_time or now, event_type, message, data, step, attempt
    )
    return RunStatus(status), False


async def insert_run(db: Tx, run: NewRun, now: float, message: str = "run queued") -> Run:
    """Create `run` (once per idempotency key) and queue it."""
    if run.idempotency_key is not None:
        rows = await db.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE idempotency_key = ?", (run.idempotency_key,)
        )
        if rows:
            return run_from_row(rows[0])  # made before (a retried tick): not again
    ((run_pk,),) = await db.fetch(
        "INSERT INTO runs (run_id, job, location, status, tags, config, priority, queue,"
        " create_time, update_time, status_time, not_before, parent_run_id, root_run_id,"
        " reuse_outputs, idempotency_key, wanted_code_version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            run.run_id,
            run.job,
            run.location,
            RunStatus.NOT_STARTED,
            json.dumps(run.tags),
            json.dumps(run.config),
            run.priority,
            run.queue,
            now,
            now,
            now,
            run.not_before,
            run.parent_run_id,
            run.root_run_id,
            json.dumps(run.reuse_outputs),
            run.idempotency_key,
            run.wanted_code_version,
        ),
    )
    await db.executemany(
        "INSERT INTO run_tags (run_id, key, value, run_pk) VALUES (?, ?, ?, ?)",
        [(run.run_id, k, v, run_pk) for k, v in run.tags.items()],
    )
    await append_event(db, run.run_id, now, "RUN_ENQUEUED", message)
    created = await get_run(db, run.run_id)
    assert created is not None
    return created


async def reusable(db: Tx, run: Run) -> dict[str, str]:
    """Each step whose output `run` has (made or reused), with the run that stored it."""
    rows = await db.fetch(
        "SELECT DISTINCT step FROM events WHERE run_id = ? AND type = 'STEP_SUCCESS'",
        (run.run_id,),
    )
    return {**run.reuse_outputs, **{step: run.run_id for (step,) in rows}}


async def fail(
    db: Tx,
    run: Run,
    kind: str,
    message: str,
    now: float,
    resume: ResumeRules = NO_RESUMES,
    data: dict[str, Any] | None = None,
    event_time: float | None = None,
) -> RunStatus:
    """FAILURE, or back to the queue: a lost worker with resume attempts left restarts
    (`RUN_WORKER_RESTARTED`); a run whose code could not be loaded, with code retries
    left, waits and tries again (`RUN_REQUEUED`). A run back in the queue gets a new
    lease when it is dispatched again, so anything the old attempt still sends is
    refused."""
    data = {**(data or {}), "failure_kind": kind}

    async def record(event_type: str, text: str, **extra: Any) -> tuple[RunStatus, bool]:
        return await append_event(
            db,
            run.run_id,
            now,
            event_type,
            text,
            {**data, **extra},
            attempt=run.lease,
            event_time=event_time,
            lease=run.lease,
        )

    if kind == CODE_UNREACHABLE and run.code_retries < resume.code_retries:
        number, delay = run.code_retries + 1, resume.code_retry_delay
        waiting = (
            f"{message}; the run waits for its code location {run.location} and tries "
            f"again after {delay:g} s (retry {number} of {resume.code_retries})"
        )
        status, changed = await record(
            "RUN_REQUEUED", waiting, code_retry=number, delay_seconds=delay
        )
        if changed:
            await db.execute(
                "UPDATE runs SET agent_id = NULL, lease = NULL, not_before = ?,"
                " code_retries = code_retries + 1 WHERE run_id = ?",
                (now + delay, run.run_id),
            )
            return status
    if kind in RESUMABLE_KINDS and run.resume_count < resume.worker_restarts:
        attempt = run.resume_count + 2
        restarted = (
            f"{message}; restarting the run worker "
            f"(attempt {attempt} of {resume.worker_restarts + 1})"
        )
        status, changed = await record("RUN_WORKER_RESTARTED", restarted, attempt=attempt)
        if changed:
            await db.execute(
                "UPDATE runs SET agent_id = NULL, lease = NULL, reuse_outputs = ?,"
                " resume_count = resume_count + 1, status_reason = ? WHERE run_id = ?",
                (json.dumps(await reusable(db, run)), message, run.run_id),
            )
            return status
    status, _ = await record("RUN_FAILURE", message)
    return status
