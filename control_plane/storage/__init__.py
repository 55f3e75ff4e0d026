"""The instance's storage: one narrow async interface, one implementation per database.

Everything the control plane remembers goes through `Storage`: runs and their leases,
event logs, compute logs, agents and the code locations they host. Implementations
(`SqliteStorage`, later PostgreSQL) pass the same test suite (tests/unit/test_storage.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from control_plane.statuses import RunStatus
from protocol.logs import redact
from protocol.messages import CodeLocationInfo, Evaluate, EvaluationResult, JobInfo, RunRecord


class StorageError(Exception):
    """Base class of the errors storage reports to its callers."""


class UnknownRun(StorageError):
    pass


class StaleLease(StorageError):
    """A write came with a lease that is no longer the run's current one."""


class NotYourRun(StorageError):
    """A write came from an agent the run is not leased to."""


class RecordRefused(StorageError):
    """An agent's record or output that the run may not take (control_plane/records.py)."""


class NameTaken(StorageError):
    """A token name, or an agent name held by another live agent token, is in use."""


class StorageUnavailable(StorageError):
    """The database cannot be reached (a PostgreSQL server down or restarting). Callers
    answer 503 (retryable), as for a full disk."""


class StorageFull(StorageError):
    """The database's disk is full: the write was rolled back, nothing changed. Callers
    answer 503 (retryable) and carry on; writes work again once space is freed."""


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Run:
    run_id: str
    job: str
    location: str
    status: RunStatus
    tags: dict[str, str]
    config: dict[str, Any]
    create_time: float
    status_reason: str | None = None
    agent_id: str | None = None
    lease: int | None = None
    start_time: float | None = None
    end_time: float | None = None
    priority: int = 0
    queue: str = "default"
    status_time: float | None = None
    not_before: float | None = None
    failure_kind: str | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None
    resume_count: int = 0
    reuse_outputs: dict[str, str] = field(default_factory=dict)
    launch_acked: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job": self.job,
            "location": self.location,
            "status": str(self.status),
            "status_reason": self.status_reason,
            "tags": self.tags,
            "config": self.config,
            "agent": self.agent_id,
            "create_time": iso(self.create_time),
            "start_time": iso(self.start_time),
            "end_time": iso(self.end_time),
            "lease": self.lease,
            "failure_kind": self.failure_kind,
            "parent_run_id": self.parent_run_id,
            "root_run_id": self.root_run_id,
            "not_before": iso(self.not_before),
            "reuse_outputs": self.reuse_outputs,
        }


@dataclass
class NewRun:
    run_id: str
    job: str
    location: str
    tags: dict[str, str]
    config: dict[str, Any]
    priority: int = 0
    queue: str = "default"
    not_before: float | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None
    reuse_outputs: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None  # a second run with the same key is not created
    run_key: str | None = None  # a sensor's run key (part of its idempotency key)


@dataclass
class InstigatorState:
    """What the control plane remembers of a schedule or sensor (status None: default)."""

    location: str
    name: str
    kind: str
    status: str | None = None
    cursor: str | None = None
    last_run_key: str | None = None
    last_tick_time: float | None = None


@dataclass
class Tick:
    id: int
    location: str
    name: str
    kind: str
    scheduled_time: float | None
    status: str  # STARTED | SUCCESS | SKIPPED | FAILURE
    skip_reason: str | None
    error: str | None
    run_ids: list[str]
    cursor: str | None
    start_time: float
    end_time: float | None

    def to_json(self) -> dict[str, Any]:
        return {"tick_id": self.id, "scheduled_time": iso(self.scheduled_time),
                "status": self.status, "skip_reason": self.skip_reason, "error": self.error,
                "run_ids": self.run_ids, "cursor": self.cursor,
                "start_time": iso(self.start_time), "end_time": iso(self.end_time)}  # fmt: skip


@dataclass
class Verdict:
    """The control plane's decision to end (or resume) a run its worker cannot finish.

    Applied only if the run is still in `status` under `lease`: a terminal status the
    agent reported first wins.
    """

    run_id: str
    lease: int | None
    status: RunStatus
    outcome: RunStatus  # FAILURE or CANCELED; QUEUED for a launch no agent acknowledged
    kind: str
    message: str
    offline_agent: str | None = None


@dataclass
class StopOrder:
    """Tells an agent to stop the worker of one attempt it holds."""

    run_id: str
    lease: int
    cancel: bool
    reason: str


@dataclass
class Event:
    seq: int
    time: float
    type: str
    step: str | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": iso(self.time),
            "type": self.type,
            "step": self.step,
            "message": self.message,
            "data": self.data,
        }


@dataclass
class LogChunk:
    id: int
    step: str | None
    stream: str
    time: float
    text: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "stream": self.stream,
            "time": iso(self.time),
            "text": self.text,
        }


@dataclass
class Agent:
    agent_id: str
    name: str
    hostname: str
    status: str
    queues: list[str]
    max_concurrent_runs: int
    version: str
    last_heartbeat: float
    registered_time: float
    capabilities: list[str] = field(default_factory=list)
    token_name: str | None = None  # the agent token it registered with (auth on)


@dataclass
class TokenRecord:
    """An API or agent token as stored: its secret only as a salted hash."""

    token_id: str
    name: str
    kind: str  # "agent" | "user"
    role: str | None  # viewer | operator | admin, for user tokens
    salt: bytes
    hash: bytes
    create_time: float
    last_used: float | None = None
    revoked_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        """What `tokens list` shows: never the hash or salt."""
        return {
            "name": self.name,
            "kind": self.kind,
            "role": self.role,
            "create_time": iso(self.create_time),
            "last_used": iso(self.last_used),
            "revoked": self.revoked_time is not None,
            "revoked_time": iso(self.revoked_time),
        }


@dataclass
class CodeLocation:
    agent_id: str
    info: CodeLocationInfo


@dataclass(frozen=True)
class CodeCatalog:
    """Every agent's code locations as of one catalog version (it moves with each
    registration), so they are parsed once per change, not on every submit and poll."""

    version: int
    by_agent: dict[str, list[CodeLocation]]
    locations: list[CodeLocation]  # by name, then agent id
    hosted: dict[str, set[str]]  # agent id -> the names of its locations that loaded
    by_name: dict[str, list[CodeLocation]]
    jobs: dict[str, set[str]]  # location name -> the jobs any agent's copy defines

    def job_info(self, location: str, job: str, agent_id: str | None = None) -> JobInfo | None:
        """Job `job` of `location`: as agent `agent_id` has it, else as any agent does."""
        copies = self.by_name.get(location, ())
        preferred = sorted(copies, key=lambda loc: loc.agent_id != agent_id)
        for loc in preferred:
            for info in loc.info.jobs:
                if info.name == job:
                    return info
        return None

    @classmethod
    def of(cls, version: int, by_agent: dict[str, list[CodeLocation]]) -> CodeCatalog:
        locations = sorted((loc for locs in by_agent.values() for loc in locs),
                           key=lambda loc: (loc.info.name, loc.agent_id))  # fmt: skip
        hosted: dict[str, set[str]] = {}
        by_name: dict[str, list[CodeLocation]] = {}
        jobs: dict[str, set[str]] = {}
        seen: set[int] = set()  # agents share parsed infos: look at each one once
        for loc in locations:
            by_name.setdefault(loc.info.name, []).append(loc)
            if loc.info.error is None:
                hosted.setdefault(loc.agent_id, set()).add(loc.info.name)
            if id(loc.info) not in seen:
                seen.add(id(loc.info))
                jobs.setdefault(loc.info.name, set()).update(j.name for j in loc.info.jobs)
        return cls(version, by_agent, locations, hosted, by_name, jobs)


@dataclass
class RunFilter:
    statuses: list[RunStatus] = field(default_factory=list)
    job: str | None = None
    tags: list[tuple[str, str]] = field(default_factory=list)
    agent_id: str | None = None


@dataclass
class QueueSnapshot:
    """What a dispatch decision needs, read in one transaction."""

    queued: list[Run]
    active: list[Run]
    agents: list[Agent]
    hosted: dict[str, set[str]]


@dataclass
class AppendResult:
    acked_seq: int
    status: RunStatus
    status_changed: bool
    stored: dict[str, int] = field(default_factory=dict)  # records stored now, by kind
    launch_acked: bool = True  # whether the agent's hold of the launch was known before
    refused: str | None = None  # the record the batch stopped at, and why


class Storage(Protocol):
    """The narrow interface every storage backend implements."""

    shared: bool  # True: several control-plane replicas may use it at once

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...
    async def migrate(self) -> tuple[int, int]:
        """Apply pending schema migrations (open does too); the versions before and after."""
        ...

    def full_reason(self) -> str | None:
        """Why the last write failed for lack of space (None once a write succeeds)."""
        ...

    async def probe_write(self) -> None:
        """A tiny write: StorageFull while the disk is still full, else clears it."""
        ...

    async def create_run(self, run: NewRun, now: float) -> Run: ...
    async def get_run(self, run_id: str) -> Run | None: ...
    async def list_runs(
        self, filt: RunFilter, limit: int, cursor: int | None
    ) -> tuple[list[Run], int | None]: ...
    async def active_runs(self) -> list[Run]: ...
    async def count_runs_by_status(self) -> dict[RunStatus, int]: ...
    async def queue_snapshot(self) -> QueueSnapshot: ...
    async def assign_queued(
        self, now: float, decide: Callable[[QueueSnapshot], list[tuple[str, str]]]
    ) -> list[Run]: ...
    async def set_priority(self, run_id: str, priority: int, now: float) -> Run | None: ...
    async def request_cancel(self, run_id: str, now: float) -> Run | None: ...
    async def pending_launches(self, agent_id: str) -> list[Run]: ...
    async def ack_launches(self, agent_id: str, leases: list[int]) -> list[int]: ...
    async def stop_orders(
        self, agent_id: str, held_leases: list[int], now: float
    ) -> tuple[list[StopOrder], list[Run]]: ...
    async def append_records(
        self,
        run_id: str,
        lease: int,
        records: list[RunRecord],
        now: float,
        resume_limit: int = 0,
        agent_id: str | None = None,
    ) -> AppendResult: ...
    async def apply_verdicts(
        self, verdicts: list[Verdict], now: float, resume_limit: int
    ) -> list[Run]: ...
    async def reconcile_agent(
        self, agent_id: str, held_leases: list[int], now: float, resume_limit: int
    ) -> list[Run]: ...
    async def pending_retries(self, limit: int) -> list[Run]: ...
    async def reusable_outputs(self, run: Run) -> dict[str, str]: ...
    async def put_output(
        self, run_id: str, lease: int, step: str, data: bytes, now: float
    ) -> None: ...
    async def get_output(self, run_id: str, step: str) -> bytes | None: ...
    async def settle_retry(
        self, run_id: str, retry: NewRun | None, message: str, data: dict[str, Any], now: float
    ) -> Run | None: ...
    async def get_events(self, run_id: str, after: int, limit: int) -> list[Event]: ...
    async def get_logs(self, run_id: str, step: str | None, after: int) -> list[LogChunk]: ...

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
    ) -> Agent: ...
    async def record_heartbeats(self, agent_ids: Iterable[str], now: float) -> dict[str, float]: ...
    async def set_agent_status(self, agent_id: str, status: str) -> Agent | None: ...
    async def get_agent(self, agent_id: str) -> Agent | None: ...
    async def list_agents(self) -> list[Agent]: ...
    async def list_code_locations(self) -> list[CodeLocation]: ...
    async def code_catalog(self) -> CodeCatalog: ...
    async def get_agents(self, agent_ids: Iterable[str]) -> dict[str, Agent]: ...

    async def create_token(self, token: TokenRecord) -> None: ...
    async def get_token(self, token_id: str) -> TokenRecord | None: ...
    async def list_tokens(self) -> list[TokenRecord]: ...
    async def revoke_token(self, name: str, now: float) -> TokenRecord | None: ...
    async def touch_token(self, token_id: str, now: float) -> None: ...

    async def instigator_states(self) -> dict[tuple[str, str, str], InstigatorState]: ...
    async def set_instigator(
        self,
        location: str,
        name: str,
        kind: str,
        *,
        status: str | None = None,
        last_tick_time: float | None = None,
    ) -> None: ...
    async def start_tick(
        self, location: str, name: str, kind: str, scheduled_time: float | None, now: float
    ) -> Tick | None: ...
    async def finish_tick(
        self,
        tick_id: int,
        status: str,
        runs: list[NewRun],
        now: float,
        skip_reason: str | None = None,
        error: str | None = None,
        cursor: str | None = None,
    ) -> tuple[Tick, list[Run]]: ...
    async def list_ticks(self, location: str, name: str, kind: str, limit: int) -> list[Tick]: ...
    async def unfinished_ticks(self) -> list[Tick]: ...

    async def try_lead(self, name: str, holder: str, ttl: float, now: float) -> bool: ...
    async def release_lead(self, name: str, holder: str) -> None: ...
    async def leaders(self) -> dict[str, tuple[str, float]]: ...

    async def create_evaluation(self, request: Evaluate, now: float) -> None: ...
    async def take_evaluations(
        self, agent_id: str, locations: set[str], now: float
    ) -> list[Evaluate]: ...
    async def finish_evaluation(self, result: EvaluationResult) -> bool: ...
    async def evaluation_state(
        self, eval_id: str
    ) -> tuple[str | None, EvaluationResult | None] | None: ...
    async def untaken_evaluations(self) -> int: ...
    async def drop_evaluation(self, eval_id: str) -> None: ...

    async def notify(self, payloads: list[str]) -> None:
        """Send wake-ups to the other processes sharing the database."""
        ...

    async def listen(
        self, on_message: Callable[[str], None], on_reconnect: Callable[[], None]
    ) -> None: ...


def url_problem(url: str) -> str | None:
    """Why a database URL's user name or password cannot be used as written, or None.
    A space, a control character or an unescaped / ? # @ in them makes parsers cut the
    URL elsewhere than meant: a piece of the password then passes for a host or a port,
    is quoted in their errors, and no mask can find it. The answer never quotes the URL."""
    if url.startswith("sqlite:"):
        return None  # a path, no credentials: spaces and @ are fine
    credentials, at, _ = url.partition("://")[2].rpartition("@")
    if at and any(ch.isspace() or not ch.isprintable() or ch in "/?#@" for ch in credentials):
        return ("percent-encode the user name and password of the storage url: a space, a "
                "control character or one of / ? # @ in them is ambiguous (%20 for a space, "
                "%2F for /, %3F for ?, %23 for #, %40 for @)")  # fmt: skip
    return None


def open_storage(url: str, pool_size: int = 10) -> Storage:
    """Create the storage backend a `[storage] url` names (not yet opened)."""
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    if url.startswith("sqlite:///"):
        from control_plane.storage.sqlite import SqliteStorage

        return SqliteStorage(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from control_plane.storage.postgres import PostgresStorage

        return PostgresStorage(url, pool_size)
    raise ValueError(
        f"unsupported storage url {redact(url)!r}: expected sqlite:///PATH or postgresql://…"
    )
