"""What every query module shares: the transaction a backend hands out (`Tx`), the base of
the query classes (`SqlBase`), how rows become model values, and small SQL helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from control_plane.model.agents import Agent
from control_plane.model.instigators import Tick
from control_plane.model.runs import Run
from control_plane.model.statuses import RunStatus
from control_plane.model.tokens import TokenRecord


class Tx(Protocol):
    """One connection inside a transaction (or, for reads, outside one).

    `status_changes` collects the run-status changes a write transaction makes; the
    backend appends them to the history (`record_status_changes`) as it commits, in
    commit order."""

    status_changes: list[tuple[str, str, float]]

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class SqlBase:
    """What a backend provides to the query classes: a reader, and write transactions.

    Write transactions come in three sizes: by default one at a time across the whole
    instance (every backend serialises them, as SQLite must); scoped to one run
    (`_write(run_id)`), for the hot path of that run's records and outputs, so that
    different runs' batches commit in parallel on PostgreSQL while anything that spans
    runs still goes alone; and a one-row write that needs no ordering (`_write_row`).
    """

    shared = False  # several control-plane processes may use this database at once
    auto_migrate = True  # open() applies pending migrations (`fleetrun migrate` does not)

    @property
    def _reader(self) -> Tx:
        raise NotImplementedError

    def _write(self, run_id: str | None = None) -> AbstractAsyncContextManager[Tx]:
        raise NotImplementedError

    def _write_row(self) -> AbstractAsyncContextManager[Tx]:
        return self._write()

    async def continue_ids(self, columns: dict[str, str]) -> None:
        """After rows were copied in with their ids: new ones continue after them."""

    async def notify(self, payloads: list[str]) -> None:
        """Tell the other processes sharing this database (none for an embedded one)."""

    async def listen(
        self, on_message: Callable[[str], None], on_reconnect: Callable[[], None]
    ) -> None:
        """Deliver other processes' notifications until cancelled (returns at once when
        no other process can share the database)."""


async def record_status_changes(db: Tx) -> None:
    """Append the transaction's status changes to `run_status_changes`: called by the
    backend just before it commits, once nothing else can make it wait (on PostgreSQL,
    under a lock held to the commit, so that ids ascend in commit order)."""
    if db.status_changes:
        await db.executemany(
            "INSERT INTO run_status_changes (run_id, status, time) VALUES (?, ?, ?)",
            db.status_changes,
        )
        db.status_changes = []


T = TypeVar("T")
IN_CHUNK = 500  # ids per `IN (...)` list: well under both databases' parameter limits


def in_chunks(ids: Sequence[T]) -> Iterator[tuple[tuple[T, ...], str]]:
    """`ids` in slices for `IN (...)`, each with its placeholders."""
    for start in range(0, len(ids), IN_CHUNK):
        chunk = tuple(ids[start : start + IN_CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def marks(values: Collection[object]) -> str:
    """The placeholders of an `IN (...)` list of `values`."""
    return ",".join("?" * len(values))


RUN_COLUMNS = (
    "run_id, job, location, status, status_reason, tags, config, agent_id, lease, "
    "create_time, start_time, end_time, priority, queue, status_time, not_before, "
    "failure_kind, parent_run_id, root_run_id, resume_count, reuse_outputs, launch_acked, "
    "code_retries, code_version, wanted_code_version, id"
)


def run_from_row(row: Iterable[Any]) -> Run:
    (
        run_id,
        job,
        location,
        status,
        reason,
        tags,
        config,
        agent_id,
        lease,
        create,
        start,
        end,
        priority,
        queue,
        status_time,
        not_before,
        failure_kind,
        parent,
        root,
        resumes,
        reuse,
        acked,
        code_retries,
        code_version,
        wanted_code_version,
        _id,
    ) = row
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
        code_retries=code_retries,
        code_version=code_version,
        wanted_code_version=wanted_code_version,
    )


TICK_COLUMNS = (
    "id, location, name, kind, scheduled_time, status, skip_reason, error, run_ids, cursor,"
    " start_time, end_time, failure_count"
)


def tick_from_row(row: Iterable[Any]) -> Tick:
    (
        tick_id,
        location,
        name,
        kind,
        scheduled,
        status,
        skip,
        error,
        run_ids,
        cursor,
        start,
        end,
        failures,
    ) = row
    return Tick(
        tick_id,
        location,
        name,
        kind,
        scheduled,
        status,
        skip,
        error,
        json.loads(run_ids),
        cursor,
        start,
        end,
        failures,
    )


AGENT_COLUMNS = (
    "agent_id, name, hostname, status, queues, max_concurrent_runs, version, "
    "last_heartbeat, registered_time, capabilities, token_name, operator_drain, labels, "
    "resources"
)


def agent_from_row(row: Iterable[Any]) -> Agent:
    (
        agent_id,
        name,
        hostname,
        status,
        queues,
        cap,
        version,
        hb,
        registered,
        caps,
        token,
        held,
        labels,
        resources,
    ) = row
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
        capabilities=json.loads(caps),
        token_name=token,
        operator_drain=bool(held),
        labels=json.loads(labels),
        resources=json.loads(resources),
    )


TOKEN_COLUMNS = "token_id, name, kind, role, salt, hash, create_time, last_used, revoked_time"


def token_from_row(row: Iterable[Any]) -> TokenRecord:
    return TokenRecord(*row)


def _not_json(value: object) -> str:
    """Event data is JSON; anything else an agent sends is kept as a short placeholder."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"


_EVENT_JSON = json.JSONEncoder(default=_not_json)  # built once: json.dumps(default=) is not
_RECENT_JSON: dict[tuple[tuple[str, Any], ...], str] = {}  # a LOG's {"level": "INFO"} repeats


def event_json(data: dict[str, Any] | None) -> str:
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
