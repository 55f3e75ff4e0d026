"""What SQLite and PostgreSQL storage share: every query and every state transition.

The backends (sqlite.py, postgres.py) supply only connections, transactions and their
schema migrations. Queries are written once, with `?` placeholders, in the SQL both
databases speak; a backend's `Tx` translates what it must. So the run state machine,
fencing, dispatch and ticks behave the same on both, and one test suite covers both.

Write transactions come in two sizes (`_write`): by default one at a time across the
whole instance (every backend serialises them, as SQLite must), or - for the hot path of
one run's records and outputs - scoped to that run, so that different runs' batches
commit in parallel on PostgreSQL while anything that spans runs still goes alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import msgpack

from control_plane.records import Take, output_problem, screen_record
from control_plane.statuses import (
    ACTIVE_STATUSES,
    AGENT_RESTARTED,
    EVENT_STATUS,
    FAILURE_KINDS,
    OP_FAILURE,
    REFUSED_RECORD,
    RESUMABLE_KINDS,
    TERMINAL_STATUSES,
    RunStatus,
    can_transition,
)
from control_plane.storage import (
    Agent,
    AppendResult,
    CodeCatalog,
    CodeLocation,
    Event,
    InstigatorState,
    LogChunk,
    NameTaken,
    NewRun,
    NotYourRun,
    QueueSnapshot,
    RecordRefused,
    Run,
    RunFilter,
    StaleLease,
    StopOrder,
    Tick,
    TokenRecord,
    UnknownRun,
    Verdict,
)
from protocol.events import AGENT_FAILURE_KINDS
from protocol.messages import CodeLocationInfo, Evaluate, EvaluationResult, RunRecord
from protocol.schema import from_plain, to_plain

log = logging.getLogger("fleetrun.storage")


class Tx(Protocol):
    """One connection inside a transaction (or, for reads, outside one)."""

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


DISPATCH_BATCH = 1000
INLINE_OUTPUT_KEY = "output_bytes"  # a STEP_OUTPUT's data may carry the output itself


def _not_json(value: object) -> str:
    """Event data is JSON; anything else an agent sends is kept as a short placeholder."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"


_EVENT_JSON = json.JSONEncoder(default=_not_json)  # built once: json.dumps(default=) is not
_RECENT_JSON: dict[tuple, str] = {}  # most events' data repeats (a LOG's {"level": "INFO"})


def _event_json(data: dict[str, Any] | None) -> str:
    if not data:
        return "{}"
    if not all(type(v) is str for v in data.values()):  # (True and 1 would share a key)
        return _EVENT_JSON.encode(data)
    key = tuple(data.items())
    text = _RECENT_JSON.get(key)
    if text is None:
        if len(_RECENT_JSON) >= 1024:
            _RECENT_JSON.clear()
        text = _RECENT_JSON[key] = _EVENT_JSON.encode(data)
    return text


IN_CHUNK = 500  # ids per `IN (...)` list: well under both databases' parameter limits


def _in_chunks(ids: Sequence[str]) -> Iterator[tuple[tuple[str, ...], str]]:
    """`ids` in slices for `IN (...)`, each with its placeholders."""
    for start in range(0, len(ids), IN_CHUNK):
        chunk = tuple(ids[start : start + IN_CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def _known_kind(claimed: object, allowed: frozenset[str]) -> str:
    """A failure kind from event data (an agent's: any msgpack value), or op_failure."""
    return claimed if isinstance(claimed, str) and claimed in allowed else OP_FAILURE


_RUN_COLUMNS = (
    "run_id, job, location, status, status_reason, tags, config, agent_id, lease, "
    "create_time, start_time, end_time, priority, queue, status_time, not_before, "
    "failure_kind, parent_run_id, root_run_id, resume_count, reuse_outputs, launch_acked, id"
)


def _run_from_row(row: Iterable[Any]) -> Run:
    (run_id, job, location, status, reason, tags, config, agent_id, lease, create, start, end,
     priority, queue, status_time, not_before, failure_kind, parent, root, resumes, reuse,
     acked, _id) = row  # fmt: skip
    return Run(
        run_id=run_id,
        job=job,
        location=location,
        status=RunStatus(status),
        status_reason=reason,
        tags=json.loads(tags),
        config=json.loads(config),
        agent_id=agent_id,
        lease=lease,
        create_time=create,
        start_time=start,
        end_time=end,
        priority=priority,
        queue=queue,
        status_time=status_time,
        not_before=not_before,
        failure_kind=failure_kind,
        parent_run_id=parent,
        root_run_id=root,
        resume_count=resumes,
        reuse_outputs=json.loads(reuse),
        launch_acked=bool(acked),
    )


_TICK_COLUMNS = (
    "id, location, name, kind, scheduled_time, status, skip_reason, error, run_ids, cursor,"
    " start_time, end_time"
)


def _tick_from_row(row: Iterable[Any]) -> Tick:
    (tick_id, location, name, kind, scheduled, status, skip, error, run_ids, cursor, start,
     end) = row  # fmt: skip
    return Tick(tick_id, location, name, kind, scheduled, status, skip, error,
                json.loads(run_ids), cursor, start, end)  # fmt: skip


def _agent_from_row(row: Iterable[Any]) -> Agent:
    (agent_id, name, hostname, status, queues, cap, version, hb, registered, capabilities,
     token_name) = row  # fmt: skip
    return Agent(
        agent_id=agent_id,
        name=name,
        hostname=hostname,
        status=status,
        queues=json.loads(queues),
        max_concurrent_runs=cap,
        version=version,
        last_heartbeat=hb,
        registered_time=registered,
        capabilities=json.loads(capabilities),
        token_name=token_name,
    )


_AGENT_COLUMNS = (
    "agent_id, name, hostname, status, queues, max_concurrent_runs, version, "
    "last_heartbeat, registered_time, capabilities, token_name"
)

_TOKEN_COLUMNS = "token_id, name, kind, role, salt, hash, create_time, last_used, revoked_time"


class SqlStorage:
    """The `Storage` interface over any `Tx`; subclasses open connections and migrate."""

    shared = False  # several control-plane processes may use this database at once
    auto_migrate = True  # open() applies pending migrations (`fleetrun migrate` does not)
    _catalog: CodeCatalog | None = None  # the code locations as last read (_code_catalog)
    _parsed_infos: dict[str, CodeLocationInfo]  # location text -> parsed, shared by agents

    def __init__(self) -> None:
        self._parsed_infos = {}

    async def continue_ids(self, columns: dict[str, str]) -> None:
        """After rows were copied in with their ids: new ones continue after them."""

    @property
    def _reader(self) -> Tx:
        raise NotImplementedError

    def _write(self, run_id: str | None = None) -> AbstractAsyncContextManager[Tx]:
        """A write transaction: alone, or (`run_id`) alone among writes to that run."""
        raise NotImplementedError

    def _write_row(self) -> AbstractAsyncContextManager[Tx]:
        """A one-statement write to a single row that needs no ordering with others."""
        return self._write()

    async def notify(self, payloads: list[str]) -> None:
        """Tell the other processes sharing this database (none for an embedded one)."""

    async def listen(
        self, on_message: Callable[[str], None], on_reconnect: Callable[[], None]
    ) -> None:
        """Deliver other processes' notifications until cancelled (returns at once when
        no other process can share the database)."""

    # --- runs -------------------------------------------------------------------------

    async def create_run(self, run: NewRun, now: float) -> Run:
        async with self._write() as db:
            return await self._insert_run(db, run, now)

    async def _insert_run(
        self, db: Tx, run: NewRun, now: float, message: str = "run queued"
    ) -> Run:
        if run.idempotency_key is not None:
            rows = await db.fetch(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE idempotency_key = ?",
                (run.idempotency_key,),
            )
            if rows:
                return _run_from_row(rows[0])  # made before (a retried tick): not again
        await db.execute(
            "INSERT INTO runs (run_id, job, location, status, tags, config, priority, queue,"
            " create_time, update_time, status_time, not_before, parent_run_id, root_run_id,"
            " reuse_outputs, idempotency_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )
        await db.executemany(
            "INSERT INTO run_tags (run_id, key, value) VALUES (?, ?, ?)",
            [(run.run_id, k, v) for k, v in run.tags.items()],
        )
        await self._append_event(db, run.run_id, now, "RUN_ENQUEUED", message)
        return await self._get_run(db, run.run_id)  # type: ignore[return-value]

    async def _get_run(self, db: Tx, run_id: str) -> Run | None:
        rows = await db.fetch(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return _run_from_row(rows[0]) if rows else None

    async def get_run(self, run_id: str) -> Run | None:
        return await self._get_run(self._reader, run_id)

    async def list_runs(
        self, filt: RunFilter, limit: int, cursor: int | None
    ) -> tuple[list[Run], int | None]:
        where, args = [], []
        if filt.statuses:
            where.append(f"status IN ({','.join('?' * len(filt.statuses))})")
            args.extend(str(s) for s in filt.statuses)
        if filt.job:
            where.append("job = ?")
            args.append(filt.job)
        if filt.agent_id:
            where.append("agent_id = ?")
            args.append(filt.agent_id)
        for key, value in filt.tags:
            where.append(
                "EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = runs.run_id"
                " AND t.key = ? AND t.value = ?)"
            )
            args.extend((key, value))
        if cursor is not None:
            where.append("id < ?")
            args.append(cursor)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit + 1)
        rows = list(await self._reader.fetch(sql, args))
        next_cursor = rows[limit - 1][-1] if len(rows) > limit else None
        return [_run_from_row(r) for r in rows[:limit]], next_cursor

    async def queued_runs(self, limit: int) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = ? ORDER BY priority DESC, id LIMIT ?",
            (RunStatus.QUEUED, limit),
        )
        return [_run_from_row(r) for r in rows]

    async def active_runs(self) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN (?, ?, ?)",
            tuple(ACTIVE_STATUSES),
        )
        return [_run_from_row(r) for r in rows]

    async def count_runs_by_status(self) -> dict[RunStatus, int]:
        """For the metrics gauges: one scan of the status index."""
        rows = await self._reader.fetch("SELECT status, COUNT(*) FROM runs GROUP BY status")
        return {RunStatus(status): count for status, count in rows}

    async def _snapshot(self, db: Tx, every_agent: bool = False) -> QueueSnapshot:
        """The queue, the active runs, and the agents that host a queued run's location
        (`every_agent`: all of them, so that a reason can say which queue nobody serves):
        a fleet of thousands of agents serving other locations costs a dispatch nothing."""
        queued = [_run_from_row(r) for r in await db.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = ? ORDER BY priority DESC, id LIMIT ?",
            (RunStatus.QUEUED, DISPATCH_BATCH),
        )]  # fmt: skip
        active = await db.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN (?, ?, ?)",
            tuple(ACTIVE_STATUSES),
        )
        if not queued and not every_agent:  # nothing to decide (an agent registered, say)
            return QueueSnapshot(queued=[], active=[], agents=[], hosted={})
        catalog = await self._code_catalog(db)
        if every_agent:
            agents = [_agent_from_row(r) for r in await db.fetch(
                f"SELECT {_AGENT_COLUMNS} FROM agents"
            )]  # fmt: skip
        else:
            wanted = {run.location for run in queued}
            hosting = {loc.agent_id for name in wanted for loc in catalog.by_name.get(name, ())}
            agents = list((await self._agents_by_id(db, hosting)).values())
        return QueueSnapshot(
            queued=queued,
            active=[_run_from_row(r) for r in active],
            agents=agents,
            hosted=catalog.hosted,
        )

    async def queue_snapshot(self) -> QueueSnapshot:
        return await self._snapshot(self._reader, every_agent=True)

    async def assign_queued(
        self, now: float, decide: Callable[[QueueSnapshot], list[tuple[str, str]]]
    ) -> list[Run]:
        """Decide on a snapshot and record the assignments, all in one transaction."""
        async with self._write() as db:
            snapshot = await self._snapshot(db)
            if not snapshot.queued:
                return []
            assigned = []
            for run_id, agent_id in decide(snapshot):
                run = await self._assign(db, run_id, agent_id, now)
                if run is not None:
                    assigned.append(run)
            return assigned

    async def _assign(self, db: Tx, run_id: str, agent_id: str, now: float) -> Run | None:
        """QUEUED -> STARTING on `agent_id` under a new lease; None if no longer QUEUED."""
        run = await self._get_run(db, run_id)
        if run is None or run.status != RunStatus.QUEUED:
            return None
        ((lease,),) = await db.fetch(
            "INSERT INTO run_attempts (run_id, agent_id, create_time) VALUES (?, ?, ?)"
            " RETURNING attempt_id",
            (run_id, agent_id, now),
        )
        await db.execute(
            "UPDATE runs SET agent_id = ?, lease = ?, launch_acked = 0 WHERE run_id = ?",
            (agent_id, lease, run_id),
        )
        names = await db.fetch("SELECT name FROM agents WHERE agent_id = ?", (agent_id,))
        await self._append_event(
            db,
            run_id,
            now,
            "RUN_STARTING",
            f"launching on agent {names[0][0] if names else agent_id}",
            {"agent_id": agent_id, "lease": lease},
            attempt=lease,
        )
        return await self._get_run(db, run_id)

    async def set_priority(self, run_id: str, priority: int, now: float) -> Run | None:
        """Change a queued run's priority (and its fleetrun/priority tag); else no-op."""
        async with self._write() as db:
            run = await self._get_run(db, run_id)
            if run is None or run.status != RunStatus.QUEUED:
                return run
            run.tags["fleetrun/priority"] = str(priority)
            await db.execute(
                "UPDATE runs SET priority = ?, tags = ?, update_time = ? WHERE run_id = ?",
                (priority, json.dumps(run.tags), now, run_id),
            )
            await db.execute(
                "INSERT INTO run_tags (run_id, key, value) VALUES (?, 'fleetrun/priority', ?)"
                " ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
                (run_id, str(priority)),
            )
            return await self._get_run(db, run_id)

    async def request_cancel(self, run_id: str, now: float) -> Run | None:
        """QUEUED -> CANCELED at once; STARTING/STARTED -> CANCELING (the agent stops it)."""
        async with self._write() as db:
            run = await self._get_run(db, run_id)
            if run is None:
                return None
            if run.status in (RunStatus.QUEUED, RunStatus.NOT_STARTED):
                await self._append_event(db, run_id, now, "RUN_CANCELED", "canceled while queued")
            elif run.status in (RunStatus.STARTING, RunStatus.STARTED):
                await self._append_event(
                    db, run_id, now, "RUN_CANCELING", "cancel requested", attempt=run.lease
                )
            return await self._get_run(db, run_id)

    async def pending_launches(self, agent_id: str) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE agent_id = ? AND status = ? ORDER BY id",
            (agent_id, RunStatus.STARTING),
        )
        return [_run_from_row(r) for r in rows]

    async def ack_launches(self, agent_id: str, leases: list[int]) -> list[int]:
        """The agent holds these launches (a poll or a record batch said so); returns the
        leases not acknowledged before, so that each launch is counted received once."""
        if not leases:
            return []
        marks = ",".join("?" * len(leases))
        async with self._write_row() as db:
            rows = await db.fetch(
                f"UPDATE runs SET launch_acked = 1 WHERE agent_id = ? AND lease IN ({marks})"
                " AND launch_acked = 0 RETURNING lease",
                (agent_id, *leases),
            )
            return [lease for (lease,) in rows]

    async def stop_orders(
        self, agent_id: str, held_leases: list[int], now: float
    ) -> tuple[list[StopOrder], list[Run]]:
        """Workers the agent must stop: canceled runs, and attempts no longer current.

        A CANCELING run whose launch the agent does not hold was never started there: it
        becomes CANCELED here (and its lease is fenced) rather than waiting for a worker;
        those runs are returned second.
        """
        rows = await self._reader.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE agent_id = ? AND status = ?",
            (agent_id, RunStatus.CANCELING),
        )
        held = set(held_leases)
        orders = [
            StopOrder(run.run_id, run.lease, cancel=True, reason="run canceled")
            for run in map(_run_from_row, rows)
            if run.lease is not None and run.lease in held
        ]
        never_started = [
            r for r in map(_run_from_row, rows) if r.lease is not None and r.lease not in held
        ]
        canceled: list[Run] = []
        if never_started:
            async with self._write() as db:
                for run in never_started:
                    current = await self._get_run(db, run.run_id)
                    if current is None or current.status != RunStatus.CANCELING:
                        continue
                    if current.lease != run.lease:
                        continue
                    await self._append_event(
                        db, run.run_id, now, "RUN_CANCELED", "canceled before its worker started"
                    )
                    await db.execute("UPDATE runs SET lease = NULL WHERE run_id = ?", (run.run_id,))
                    canceled.append(await self._get_run(db, run.run_id))  # type: ignore[arg-type]
        if held:
            marks = ",".join("?" * len(held))
            stale = await self._reader.fetch(
                "SELECT a.attempt_id, a.run_id, r.lease, r.status, r.status_reason"
                " FROM run_attempts a JOIN runs r ON r.run_id = a.run_id"
                f" WHERE a.attempt_id IN ({marks}) AND a.agent_id = ?",
                (*held, agent_id),
            )
            for lease, run_id, current, status, reason in stale:
                if current != lease:
                    why = f"attempt {lease} is no longer current (run {status}: {reason})"
                    orders.append(StopOrder(run_id, lease, cancel=False, reason=why))
        return orders, canceled

    # --- events and compute logs ------------------------------------------------------

    async def _append_event(
        self,
        db: Tx,
        run_id: str,
        now: float,
        event_type: str,
        message: str,
        data: dict[str, Any] | None = None,
        step: str | None = None,
        attempt: int | None = None,
        event_time: float | None = None,
    ) -> tuple[RunStatus, bool]:
        """Insert one event with the run's next seq and apply the status it implies.

        A status event is stored only with its transition: the seq is taken by an
        UPDATE guarded on the statuses the transition may start from, so an event the
        state machine refuses is never in the log. The event keeps the time its source
        stamped (`event_time`); the run's start and end times are the control plane's
        (`now`), the moment the change took effect.
        """
        new = EVENT_STATUS.get(event_type)
        guard, sources = "", ()
        if new is not None:
            sources = tuple(s for s in RunStatus if can_transition(s, new))
            guard = f" AND status IN ({','.join('?' * len(sources))})"
        rows = await db.fetch(
            "UPDATE runs SET last_event_seq = last_event_seq + 1, update_time = ?"
            f" WHERE run_id = ?{guard} RETURNING last_event_seq, status",
            (now, run_id, *sources),
        )
        if not rows:
            ((status,),) = await db.fetch("SELECT status FROM runs WHERE run_id = ?", (run_id,))
            return RunStatus(status), False
        seq, status = rows[0]
        await db.execute(
            "INSERT INTO events (run_id, seq, time, type, step, message, data, attempt)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                seq,
                event_time or now,
                event_type,
                step,
                message,
                _event_json(data),
                attempt,
            ),
        )
        current = RunStatus(status)
        if new is None:
            return current, False
        kind = (data or {}).get("failure_kind")
        # A run that failed while being canceled is not retried: the user wanted it gone.
        retry = current != RunStatus.CANCELING
        await self._set_status(db, run_id, new, message, now, kind, retry)
        return new, True

    async def _set_status(
        self,
        db: Tx,
        run_id: str,
        new: RunStatus,
        reason: str,
        now: float,
        failure_kind: str | None = None,
        retry: bool = True,
    ) -> None:
        sets = ["status = ?", "status_reason = ?", "status_time = ?"]
        args: list[Any] = [new, reason, now]
        if new == RunStatus.STARTED:
            sets.append("start_time = ?")
            args.append(now)
        if new in TERMINAL_STATUSES:
            sets.append("end_time = ?")
            args.append(now)
        if new == RunStatus.FAILURE:
            sets += ["failure_kind = ?", "retry_pending = ?"]
            args += [_known_kind(failure_kind, FAILURE_KINDS), int(retry)]
        await db.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", (*args, run_id))

    async def _fail(
        self,
        db: Tx,
        run: Run,
        kind: str,
        message: str,
        now: float,
        resume_limit: int,
        data: dict[str, Any] | None = None,
        event_time: float | None = None,
    ) -> RunStatus:
        """FAILURE, or - for a lost worker with resume attempts left - back to the queue.

        A resumed run gets a new lease when it is dispatched again, so anything the lost
        attempt still sends is refused.
        """
        data = {**(data or {}), "failure_kind": kind}
        if (
            kind in RESUMABLE_KINDS
            and run.resume_count < resume_limit
            and can_transition(run.status, RunStatus.QUEUED)
        ):
            attempt = run.resume_count + 2
            await self._append_event(
                db, run.run_id, now, "RUN_WORKER_RESTARTED",
                f"{message}; restarting the run worker (attempt {attempt} of {resume_limit + 1})",
                {**data, "attempt": attempt}, attempt=run.lease, event_time=event_time,
            )  # fmt: skip
            await self._set_status(db, run.run_id, RunStatus.QUEUED, message, now)
            reuse = await self._reusable(db, run)  # the new worker skips finished steps
            await db.execute(
                "UPDATE runs SET agent_id = NULL, lease = NULL, reuse_outputs = ?,"
                " resume_count = resume_count + 1 WHERE run_id = ?",
                (json.dumps(reuse), run.run_id),
            )
            return RunStatus.QUEUED
        status, _ = await self._append_event(
            db, run.run_id, now, "RUN_FAILURE", message, data, attempt=run.lease,
            event_time=event_time,
        )  # fmt: skip
        return status

    async def append_records(
        self,
        run_id: str,
        lease: int,
        records: list[RunRecord],
        now: float,
        resume_limit: int = 0,
        agent_id: str | None = None,
    ) -> AppendResult:
        """Store an attempt's records in seq order, once each; refuse a stale lease, and
        with `agent_id`, an agent the run is not leased to.

        Each record is screened (control_plane/records.py) against the run as it stands
        after the records before it. At the first refused one the batch stops: what
        came before is stored, a run still active fails with the reason and its lease is
        fenced, and the result names the refusal. A worker crash the agent reports may
        resume the run instead of failing it (`resume_limit`).
        """
        async with self._write(run_id) as db:
            run = await self._get_run(db, run_id)
            if run is None:
                raise UnknownRun(run_id)
            if agent_id is not None and run.agent_id != agent_id:
                raise NotYourRun(f"run {run_id} is not leased to this agent")
            launch_acked = run.launch_acked
            if run.lease != lease:
                raise StaleLease(f"lease {lease} of run {run_id} is stale (current: {run.lease})")
            rows = await db.fetch(
                "SELECT acked_seq FROM run_attempts WHERE attempt_id = ?", (lease,)
            )
            acked = rows[0][0]
            steps = await self._job_steps(db, run)
            status, end_time = run.status, run.end_time
            changed = False
            refused: str | None = None
            stored: dict[str, int] = {}
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
                if record.type == "RUN_FAILURE" and status in (
                    RunStatus.STARTING, RunStatus.STARTED,
                ):  # fmt: skip
                    kind = _known_kind(record.data.get("failure_kind"), AGENT_FAILURE_KINDS)
                    run.status = status
                    status = await self._fail(
                        db, run, kind, record.message, now, resume_limit, record.data,
                        event_time=record.time,
                    )  # fmt: skip
                    changed = True
                    end_time = now
                    if status == RunStatus.QUEUED:
                        break  # this attempt is over; its lease is no longer current
                    continue
                data = dict(record.data)
                inline = data.pop(INLINE_OUTPUT_KEY, None)
                if isinstance(inline, bytes) and record.step is not None:
                    await self._put_output(db, run_id, lease, record.step, inline, now)
                status, did_change = await self._append_event(
                    db, run_id, now, record.type, record.message, data, record.step,
                    lease, event_time=record.time,
                )  # fmt: skip
                changed = changed or did_change
                if did_change and status in TERMINAL_STATUSES:
                    end_time = now
            await self._append_plain(db, run_id, lease, now, plain)
            await db.execute(
                "UPDATE run_attempts SET acked_seq = ? WHERE attempt_id = ?", (acked, lease)
            )
            if refused is not None and status in ACTIVE_STATUSES:
                run.status = status
                log.warning("run %s: refused a record from agent %s: %s", run_id,
                            run.agent_id, refused, extra={"run_id": run_id})  # fmt: skip
                status = await self._fail(
                    db, run, REFUSED_RECORD,
                    f"the agent sent a record the control plane refuses: {refused}", now, 0,
                )  # fmt: skip
                await db.execute("UPDATE runs SET lease = NULL WHERE run_id = ?", (run_id,))
                changed = True
            return AppendResult(acked_seq=acked, status=status, status_changed=changed,
                                stored=stored, launch_acked=launch_acked,
                                refused=refused)  # fmt: skip

    async def _job_steps(self, db: Tx, run: Run) -> frozenset[str] | None:
        """The steps of the run's job, as its agent's copy of the location defines them
        (any copy, if that agent no longer lists the job); None if no copy does."""
        info = (await self._code_catalog(db)).job_info(run.location, run.job, run.agent_id)
        return None if info is None else frozenset(op.name for op in info.ops)

    async def _append_plain(
        self, db: Tx, run_id: str, lease: int, now: float, records: list[RunRecord]
    ) -> None:
        """Store records that change no status (logs, step events) in one statement per
        table: a batch of 500 costs three statements, not a thousand."""
        logs = [(run_id, lease, r.step, r.type, r.time, r.message)
                for r in records if r.kind == "log"]  # fmt: skip
        events = [r for r in records if r.kind != "log"]
        if logs:
            await db.executemany(
                "INSERT INTO compute_logs (run_id, attempt, step, stream, time, text)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                logs,
            )
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
            [(run_id, first + i, r.time or now, r.type, r.step, r.message,
              _event_json(r.data), lease) for i, r in enumerate(events)],
        )  # fmt: skip

    async def apply_verdicts(
        self, verdicts: list[Verdict], now: float, resume_limit: int
    ) -> list[Run]:
        """End (or resume) runs whose worker cannot finish them; fence their leases."""
        changed = []
        async with self._write() as db:
            for verdict in verdicts:
                run = await self._get_run(db, verdict.run_id)
                if run is None or run.status != verdict.status or run.lease != verdict.lease:
                    continue  # something else (e.g. the agent's own report) got there first
                if verdict.offline_agent is not None:
                    await db.execute(
                        "UPDATE agents SET status = 'OFFLINE' WHERE agent_id = ?"
                        " AND status = 'ONLINE'",
                        (verdict.offline_agent,),
                    )
                if verdict.outcome == RunStatus.QUEUED:  # never started: back to the queue
                    await self._append_event(db, run.run_id, now, "RUN_ENQUEUED",
                                             verdict.message, attempt=run.lease)  # fmt: skip
                    await db.execute(
                        "UPDATE runs SET agent_id = NULL WHERE run_id = ?", (run.run_id,)
                    )
                elif verdict.outcome == RunStatus.CANCELED:
                    await self._append_event(db, run.run_id, now, "RUN_CANCELED", verdict.message,
                                             {"warning": True}, attempt=run.lease)  # fmt: skip
                else:
                    await self._fail(db, run, verdict.kind, verdict.message, now, resume_limit)
                await db.execute("UPDATE runs SET lease = NULL WHERE run_id = ?", (run.run_id,))
                changed.append(await self._get_run(db, run.run_id))
        return [r for r in changed if r is not None]

    async def reconcile_agent(
        self, agent_id: str, held_leases: list[int], now: float, resume_limit: int
    ) -> list[Run]:
        """After an agent (re)registers: its started runs that it no longer holds are lost.

        A STARTING run it does not hold goes back to the queue under a new lease: the
        previous agent process may have forked its worker just before it died (the
        launch is not acknowledged until the next poll), and offering the same lease
        again would let two workers run one attempt unfenced.
        """
        rows = await self._reader.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE agent_id = ? AND status IN (?, ?, ?)",
            (agent_id, RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING),
        )
        held = set(held_leases)
        verdicts = []
        for columns in rows:
            run = _run_from_row(columns)
            if run.lease in held:
                continue
            if run.status == RunStatus.STARTING:
                message = ("agent restarted before it reported this launch; launched again "
                           "under a new lease")  # fmt: skip
                verdicts.append(Verdict(run.run_id, run.lease, run.status, RunStatus.QUEUED,
                                        AGENT_RESTARTED, message))  # fmt: skip
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

    async def _reusable(self, db: Tx, run: Run) -> dict[str, str]:
        rows = await db.fetch(
            "SELECT DISTINCT step FROM events WHERE run_id = ? AND type = 'STEP_SUCCESS'",
            (run.run_id,),
        )
        return {**run.reuse_outputs, **{step: run.run_id for (step,) in rows}}

    async def reusable_outputs(self, run: Run) -> dict[str, str]:
        """Each step whose output `run` has (made or reused), with the run that stored it."""
        return await self._reusable(self._reader, run)

    async def put_output(self, run_id: str, lease: int, step: str, data: bytes, now: float) -> None:
        """Store a step's output for the attempt holding `lease`; RecordRefused (and the
        run failed, if it was still going) when the run may not take it: the step is not
        one of its job's, or the run is not running."""
        async with self._write(run_id) as db:
            run = await self._get_run(db, run_id)
            if run is None:
                raise UnknownRun(run_id)
            if run.lease != lease:
                raise StaleLease(f"lease {lease} of run {run_id} is stale (current: {run.lease})")
            why = output_problem(step, run.status, await self._job_steps(db, run))
            if why is None:
                await self._put_output(db, run_id, lease, step, data, now)
                return
            refused = f"output of step {step[:64]!r}: {why}"
            if run.status in ACTIVE_STATUSES:  # committed before the refusal is raised
                await self._fail(db, run, REFUSED_RECORD, "the agent sent an output the "
                                 f"control plane refuses: {refused}", now, 0)  # fmt: skip
                await db.execute("UPDATE runs SET lease = NULL WHERE run_id = ?", (run_id,))
        raise RecordRefused(refused)

    async def _put_output(
        self, db: Tx, run_id: str, lease: int, step: str, data: bytes, now: float
    ) -> None:
        await db.execute(
            "INSERT INTO step_outputs (run_id, step, attempt, size, data, create_time)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step) DO UPDATE SET"
            " attempt = excluded.attempt, size = excluded.size, data = excluded.data,"
            " create_time = excluded.create_time",
            (run_id, step, lease, len(data), data, now),
        )

    async def get_output(self, run_id: str, step: str) -> bytes | None:
        rows = await self._reader.fetch(
            "SELECT data FROM step_outputs WHERE run_id = ? AND step = ?", (run_id, step)
        )
        return bytes(rows[0][0]) if rows else None

    async def pending_retries(self, limit: int) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE retry_pending = 1 ORDER BY id LIMIT ?",
            (limit,),
        )
        return [_run_from_row(r) for r in rows]

    async def settle_retry(
        self, run_id: str, retry: NewRun | None, message: str, data: dict[str, Any], now: float
    ) -> Run | None:
        """Record the retry decision for a failed run and queue its retry, exactly once."""
        async with self._write() as db:
            rows = await db.fetch("SELECT retry_pending FROM runs WHERE run_id = ?", (run_id,))
            if not rows or not rows[0][0]:
                return None
            await db.execute("UPDATE runs SET retry_pending = 0 WHERE run_id = ?", (run_id,))
            created = None
            if retry is not None:
                created = await self._insert_run(
                    db, retry, now, f"run queued as a retry of run {run_id}"
                )
            if message:
                await self._append_event(db, run_id, now, "RUN_RETRY", message, data)
            return created

    async def get_events(self, run_id: str, after: int, limit: int) -> list[Event]:
        rows = await self._reader.fetch(
            "SELECT seq, time, type, step, message, data FROM events"
            " WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (run_id, after, limit),
        )
        return [
            Event(seq=s, time=t, type=ty, step=st, message=m, data=json.loads(d))
            for s, t, ty, st, m, d in rows
        ]

    async def get_logs(self, run_id: str, step: str | None, after: int) -> list[LogChunk]:
        sql = "SELECT id, step, stream, time, text FROM compute_logs WHERE run_id = ? AND id > ?"
        args: list[Any] = [run_id, after]
        if step is not None:
            sql += " AND step = ?"
            args.append(step)
        rows = await self._reader.fetch(sql + " ORDER BY id", args)
        return [LogChunk(id=i, step=s, stream=st, time=t, text=x) for i, s, st, t, x in rows]

    # --- agents and code locations ----------------------------------------------------

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
    ) -> Agent:
        """Create or refresh the agent called `name`; it keeps its id across restarts.

        With auth on, `token_name` is the agent token registering. An agent bound to
        another token can be taken over only when that token is revoked or the agent is
        OFFLINE; otherwise NameTaken (one agent token cannot pose as another's agent).
        """
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
                    raise NameTaken(
                        f"agent {name!r} is online under another agent token; stop it, "
                        "or revoke that token, before registering this name with a new one"
                    )
            await db.execute(
                "INSERT INTO agents (agent_id, name, hostname, status, queues,"
                " max_concurrent_runs, version, last_heartbeat, registered_time, capabilities,"
                " token_name)"
                " VALUES (?, ?, ?, 'ONLINE', ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (agent_id) DO UPDATE SET hostname = excluded.hostname,"
                " status = 'ONLINE', queues = excluded.queues,"
                " max_concurrent_runs = excluded.max_concurrent_runs,"
                " version = excluded.version, last_heartbeat = excluded.last_heartbeat,"
                " registered_time = excluded.registered_time,"
                " capabilities = excluded.capabilities, token_name = excluded.token_name",
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
                ),
            )
            await db.execute("DELETE FROM code_locations WHERE agent_id = ?", (agent_id,))
            await db.executemany(
                "INSERT INTO code_locations (agent_id, name, info) VALUES (?, ?, ?)",
                [(agent_id, loc.name, json.dumps(to_plain(loc))) for loc in locations],
            )
            ((version,),) = await db.fetch(
                "UPDATE catalog SET version = version + 1 RETURNING version"
            )
            await db.execute(
                "UPDATE agents SET catalog_version = ? WHERE agent_id = ?", (version, agent_id)
            )
            rows = await db.fetch(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
            )
            return _agent_from_row(rows[0])

    async def record_heartbeats(self, agent_ids: Iterable[str], now: float) -> dict[str, float]:
        """Store a heartbeat from each agent, in one transaction; returns each known
        agent's previous heartbeat time (an unknown agent is left out)."""
        ids = sorted(set(agent_ids))
        previous: dict[str, float] = {}
        async with self._write_row() as db:
            for chunk, marks in _in_chunks(ids):
                rows = await db.fetch(
                    f"SELECT agent_id, last_heartbeat FROM agents WHERE agent_id IN ({marks})",
                    chunk,
                )
                previous.update((agent_id, float(hb)) for agent_id, hb in rows)
                await db.execute(
                    "UPDATE agents SET last_heartbeat = ?, status = CASE status"
                    f" WHEN 'OFFLINE' THEN 'ONLINE' ELSE status END WHERE agent_id IN ({marks})",
                    (now, *chunk),
                )
        return previous

    async def set_agent_status(self, agent_id: str, status: str) -> Agent | None:
        """DRAINING (no new launches; its runs go on) or back to ONLINE."""
        async with self._write() as db:
            await db.execute("UPDATE agents SET status = ? WHERE agent_id = ?", (status, agent_id))
            rows = await db.fetch(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
            )
            return _agent_from_row(rows[0]) if rows else None

    async def get_agent(self, agent_id: str) -> Agent | None:
        rows = await self._reader.fetch(
            f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
        )
        return _agent_from_row(rows[0]) if rows else None

    async def list_agents(self) -> list[Agent]:
        rows = await self._reader.fetch(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY name")
        return [_agent_from_row(r) for r in rows]

    # --- tokens --------------------------------------------------------------------------

    async def create_token(self, token: TokenRecord) -> None:
        async with self._write() as db:
            rows = await db.fetch("SELECT 1 FROM tokens WHERE name = ?", (token.name,))
            if rows:
                raise NameTaken(f"a token named {token.name!r} exists (names are never reused)")
            await db.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(token),
            )

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._reader.fetch(
            f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
        )
        return TokenRecord(*rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._reader.fetch(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY name")
        return [TokenRecord(*row) for row in rows]

    async def revoke_token(self, name: str, now: float) -> TokenRecord | None:
        """Revoke the live token called `name`; None if there is none."""
        async with self._write() as db:
            changed = await db.execute(
                "UPDATE tokens SET revoked_time = ? WHERE name = ? AND revoked_time IS NULL",
                (now, name),
            )
            if changed == 0:
                return None
            rows = await db.fetch(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE name = ?", (name,))
            return TokenRecord(*rows[0])

    async def touch_token(self, token_id: str, now: float) -> None:
        async with self._write_row() as db:
            await db.execute("UPDATE tokens SET last_used = ? WHERE token_id = ?", (now, token_id))

    # --- schedules and sensors -------------------------------------------------------

    async def instigator_states(self) -> dict[tuple[str, str, str], InstigatorState]:
        rows = await self._reader.fetch(
            "SELECT location, name, kind, status, cursor, last_run_key, last_tick_time"
            " FROM instigators"
        )
        return {
            (loc, name, kind): InstigatorState(loc, name, kind, status, cursor, key, last)
            for loc, name, kind, status, cursor, key, last in rows
        }

    async def set_instigator(
        self,
        location: str,
        name: str,
        kind: str,
        *,
        status: str | None = None,
        last_tick_time: float | None = None,
    ) -> None:
        """Record a start/stop (status) or where ticking resumes from (last_tick_time)."""
        async with self._write() as db:
            await db.execute(
                "INSERT INTO instigators (location, name, kind, status, last_tick_time)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (location, name, kind) DO UPDATE SET"
                " status = COALESCE(excluded.status, instigators.status),"
                " last_tick_time = COALESCE(excluded.last_tick_time, instigators.last_tick_time)",
                (location, name, kind, status, last_tick_time),
            )

    async def start_tick(
        self, location: str, name: str, kind: str, scheduled_time: float | None, now: float
    ) -> Tick | None:
        """A STARTED tick; for a schedule, the existing one for that time if it has not
        finished (a retry after a crash), or None if it has."""
        async with self._write() as db:
            if scheduled_time is not None:
                rows = await db.fetch(
                    f"SELECT {_TICK_COLUMNS} FROM ticks WHERE location = ? AND name = ?"
                    " AND kind = ? AND scheduled_time = ?",
                    (location, name, kind, scheduled_time),
                )
                if rows:
                    tick = _tick_from_row(rows[0])
                    return tick if tick.status == "STARTED" else None
            ((tick_id,),) = await db.fetch(
                "INSERT INTO ticks (location, name, kind, scheduled_time, status, start_time)"
                " VALUES (?, ?, ?, ?, 'STARTED', ?) RETURNING id",
                (location, name, kind, scheduled_time, now),
            )
            if kind == "sensor":  # sensors tick start-to-start
                await db.execute(
                    "INSERT INTO instigators (location, name, kind, last_tick_time)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (location, name, kind) DO UPDATE SET"
                    " last_tick_time = excluded.last_tick_time",
                    (location, name, kind, now),
                )
            rows = await db.fetch(f"SELECT {_TICK_COLUMNS} FROM ticks WHERE id = ?", (tick_id,))
            return _tick_from_row(rows[0])

    async def finish_tick(
        self,
        tick_id: int,
        status: str,
        runs: list[NewRun],
        now: float,
        skip_reason: str | None = None,
        error: str | None = None,
        cursor: str | None = None,
    ) -> tuple[Tick, list[Run]]:
        """End a tick: create its runs (each once, by idempotency key), record the outcome
        and move the schedule's position or the sensor's cursor, in one transaction."""
        async with self._write() as db:
            rows = await db.fetch(f"SELECT {_TICK_COLUMNS} FROM ticks WHERE id = ?", (tick_id,))
            tick = _tick_from_row(rows[0])
            created, repeated = [], []
            for run in runs:
                if run.idempotency_key is not None and await db.fetch(
                    "SELECT 1 FROM runs WHERE idempotency_key = ?", (run.idempotency_key,)
                ):
                    repeated.append(run.run_key or run.idempotency_key)
                    continue
                created.append(await self._insert_run(db, run, now))
            if status == "SUCCESS" and not created:
                status = "SKIPPED"
                skip_reason = f"runs already requested: {', '.join(repeated)}"
            run_ids = [r.run_id for r in created]
            await db.execute(
                "UPDATE ticks SET status = ?, skip_reason = ?, error = ?, run_ids = ?,"
                " cursor = ?, end_time = ? WHERE id = ?",
                (status, skip_reason, error, json.dumps(run_ids), cursor, now, tick_id),
            )
            key = (tick.location, tick.name, tick.kind)
            if tick.kind == "schedule" and tick.scheduled_time is not None:
                await db.execute(
                    "INSERT INTO instigators (location, name, kind, last_tick_time)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (location, name, kind) DO UPDATE SET"
                    " last_tick_time = CASE WHEN instigators.last_tick_time"
                    " > excluded.last_tick_time THEN instigators.last_tick_time"
                    " ELSE excluded.last_tick_time END",
                    (*key, tick.scheduled_time),
                )
            if tick.kind == "sensor" and status in ("SUCCESS", "SKIPPED"):
                last_key = next((r.run_key for r in reversed(runs) if r.run_key), None)
                await db.execute(
                    "UPDATE instigators SET cursor = ?,"
                    " last_run_key = COALESCE(?, last_run_key)"
                    " WHERE location = ? AND name = ? AND kind = ?",
                    (cursor, last_key, *key),
                )
            rows = await db.fetch(f"SELECT {_TICK_COLUMNS} FROM ticks WHERE id = ?", (tick_id,))
            return _tick_from_row(rows[0]), created

    async def list_ticks(self, location: str, name: str, kind: str, limit: int) -> list[Tick]:
        rows = await self._reader.fetch(
            f"SELECT {_TICK_COLUMNS} FROM ticks WHERE location = ? AND name = ? AND kind = ?"
            " ORDER BY id DESC LIMIT ?",
            (location, name, kind, limit),
        )
        return [_tick_from_row(r) for r in rows]

    async def unfinished_ticks(self) -> list[Tick]:
        rows = await self._reader.fetch(
            f"SELECT {_TICK_COLUMNS} FROM ticks WHERE status = 'STARTED' ORDER BY id"
        )
        return [_tick_from_row(r) for r in rows]

    async def list_code_locations(self) -> list[CodeLocation]:
        return (await self.code_catalog()).locations

    async def code_catalog(self) -> CodeCatalog:
        return await self._code_catalog(self._reader)

    async def _code_catalog(self, db: Tx) -> CodeCatalog:
        """The catalog, brought up to date with the registrations made since it was read
        (on any replica): only the agents that registered since are read again.

        The version is read first: registrations commit in version order (each holds the
        catalog row until it commits), so every one up to it is visible, and one that
        lands in between is merely read again next time. Agents of a fleet mostly share
        their locations' text, so each distinct text is parsed once."""
        ((version,),) = await db.fetch("SELECT version FROM catalog")
        cached = self._catalog
        if cached is not None and cached.version == version:
            return cached
        since = cached.version if cached is not None else -1  # -1: every agent
        by_agent = dict(cached.by_agent) if cached is not None else {}
        changed = [a for (a,) in await db.fetch(
            "SELECT agent_id FROM agents WHERE catalog_version > ?", (since,)
        )]  # fmt: skip
        parsed = self._parsed_infos
        for chunk, marks in _in_chunks(changed):
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
        self._catalog = CodeCatalog.of(version, by_agent)
        return self._catalog

    async def get_agents(self, agent_ids: Iterable[str]) -> dict[str, Agent]:
        return await self._agents_by_id(self._reader, set(agent_ids))

    async def _agents_by_id(self, db: Tx, agent_ids: set[str]) -> dict[str, Agent]:
        found: dict[str, Agent] = {}
        for chunk, marks in _in_chunks(sorted(agent_ids)):
            rows = await db.fetch(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id IN ({marks})", chunk
            )
            found.update((agent.agent_id, agent) for agent in map(_agent_from_row, rows))
        return found

    # --- leadership of the daemon loops ----------------------------------------------

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

    # --- evaluations in flight (schedule ticks and sensors, answered by agents) -------

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
