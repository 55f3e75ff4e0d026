"""The storage port: what the control plane asks of its database, one protocol per
aggregate, each method with its guarantee.

`Storage` is all of them; a component that needs one aggregate takes that protocol
(the heartbeat recorder an `AgentStore`, the evaluation broker an `EvaluationStore`),
so what it can touch is visible in its signature. SQLite (`sqlite.py`) and PostgreSQL
(`postgres.py`) implement every one with the same queries (`sql/`), and one suite
(tests/unit/test_storage.py) runs against both.

Guarantees common to every write: it is one transaction, all or nothing; a status
change happens only where the state machine allows it and is guarded in the write
itself (`sql/transitions.py`); StorageFull (the disk is full: nothing was written) and
StorageUnavailable (the database cannot be reached) mean "retry later".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from control_plane.model.agents import Agent
from control_plane.model.alerts import AlertDelivery, Occurrence
from control_plane.model.catalog import CodeCatalog, CodeLocation
from control_plane.model.instigators import InstigatorState, Tick
from control_plane.model.pools import Claim, GrantPlan
from control_plane.model.retention import Purge, PurgeResult, RetentionSnapshot
from control_plane.model.runs import (
    NO_RESUMES,
    Event,
    LogChunk,
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
from control_plane.model.statuses import RunStatus
from control_plane.model.steptasks import StepTask, StepTaskLost
from control_plane.model.tokens import TokenRecord
from protocol.messages import CodeLocationInfo, Evaluate, EvaluationResult, RunRecord


@dataclass
class AppendResult:
    """What storing a batch of an attempt's records did."""

    acked_seq: int  # every record up to this one is stored (or was skipped on purpose)
    status: RunStatus
    status_changed: bool
    stored: dict[str, int] = field(default_factory=dict)  # records stored now, by kind
    launch_acked: bool = True  # whether the agent's hold of the launch was known before
    refused: str | None = None  # the record the batch stopped at, and why
    pools_changed: bool = False  # a step claimed a pool slot or gave one back
    step_tasks_changed: bool = False  # a step task was asked for (the run queue places it)
    step_task_ended: str | None = None  # the agent owed a step task's result (its run's)


class Database(Protocol):
    """The connection to the database itself."""

    shared: bool  # True: several control-plane replicas may use it at once
    auto_migrate: bool  # open() applies pending migrations

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def schema_version(self) -> int: ...
    async def migrate(self) -> tuple[int, int]:
        """Apply pending schema migrations (one process at a time); the versions before
        and after. Refuses a database newer than this fleetrun."""
        ...

    def full_reason(self) -> str | None:
        """Why the last write failed for lack of space (None once a write succeeds)."""
        ...

    async def probe_write(self) -> None:
        """A tiny write: StorageFull while the disk is still full, else clears it."""
        ...

    async def continue_ids(self, columns: dict[str, str]) -> None:
        """After rows were copied in with their ids: new ones continue after them."""
        ...

    async def notify(self, payloads: list[str]) -> None:
        """Send wake-ups to the other processes sharing the database (best effort)."""
        ...

    async def listen(
        self, on_message: Callable[[str], None], on_reconnect: Callable[[], None]
    ) -> None:
        """Deliver other processes' wake-ups until cancelled; `on_reconnect` after the
        connection was lost (what was sent meanwhile is lost). Returns at once when no
        other process can share the database."""
        ...


class RunStore(Protocol):
    """Runs, the queue, leases, and what the control plane decides for an attempt."""

    async def create_run(self, run: NewRun, now: float) -> Run:
        """A QUEUED run (RUN_ENQUEUED); with an idempotency key, the run made before
        under that key if there is one (never a second)."""
        ...

    async def get_run(self, run_id: str) -> Run | None: ...

    async def run_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` ids of runs that start with `prefix`, in id order: what a short
        run id (the UI's first 8 characters) resolves to. An indexed range, not a scan."""

    async def list_runs(
        self, filt: RunFilter, limit: int, cursor: int | None
    ) -> tuple[list[Run], int | None]:
        """Newest first; the cursor of the next page, or None after the last."""
        ...

    async def active_runs(self) -> list[Run]:
        """Runs in STARTING, STARTED or CANCELING."""
        ...

    async def count_runs_by_status(self) -> dict[RunStatus, int]: ...

    async def queue_snapshot(self) -> QueueSnapshot:
        """The queue (highest priority first, then oldest), the active runs and every
        agent, read together: what `GET /queue` explains."""
        ...

    async def assign_queued(
        self, now: float, decide: Callable[[QueueSnapshot], Sequence[Placement]]
    ) -> list[Run | StepTask]:
        """Decide on a snapshot and record the assignments (QUEUED -> STARTING under a
        new lease each, holding a slot of each pool a placement names) in one
        transaction: no two passes, on any replica, can both admit a run into the last
        slot of a limit or a pool. A run no longer QUEUED is skipped."""
        ...

    async def set_priority(self, run_id: str, priority: int, now: float) -> Run | None:
        """Change a queued run's priority (and its `fleetrun/priority` tag); a run in
        any other status is returned unchanged."""
        ...

    async def request_cancel(self, run_id: str, now: float) -> Run | None:
        """QUEUED -> CANCELED at once; STARTING/STARTED -> CANCELING (its agent stops
        the worker); anything else unchanged."""
        ...

    async def pending_launches(self, agent_id: str) -> list[Run]:
        """The agent's STARTING runs: launches owed to it until it holds them."""
        ...

    async def ack_launches(self, agent_id: str, leases: list[int]) -> list[int]:
        """The agent holds these launches (a poll or a record batch said so); the leases
        not acknowledged before, so that each launch is counted received once."""
        ...

    async def stop_orders(
        self, agent_id: str, held_leases: list[int], now: float
    ) -> tuple[list[StopOrder], list[Run]]:
        """Workers the agent must stop (canceled runs, attempts no longer current), and
        the runs canceled here because their launch never reached the agent."""
        ...

    async def apply_verdicts(
        self, verdicts: list[Verdict], now: float, resume_limit: int
    ) -> list[Run]:
        """End (or resume, or re-queue) each run still in the verdict's status under the
        verdict's lease, and fence that lease; the runs changed. A report the agent made
        first wins."""
        ...

    async def reconcile_agent(
        self, agent_id: str, held_leases: list[int], now: float, resume_limit: int
    ) -> list[Run]:
        """After an agent (re)registers: its started runs it no longer holds are lost
        (FAILURE, or CANCELED if canceling); its STARTING runs go back to the queue under
        a new lease (a previous agent process may have forked the worker)."""
        ...

    async def reusable_outputs(self, run: Run) -> dict[str, str]:
        """Each step whose output `run` has (made or reused), with the run storing it."""
        ...

    async def status_changes(
        self, after: int, limit: int, statuses: Collection[RunStatus] = ()
    ) -> list[tuple[StatusChange, Run]]:
        """Run-status changes numbered above `after` (only to `statuses`, if given),
        oldest first, each with its run as it is now. Numbers ascend in commit order:
        once a reader has seen change N, no change numbered below N appears later, so a
        cursor (the last number read) misses nothing and sees nothing twice."""
        ...

    async def last_status_change(self) -> int:
        """The number of the latest status change (0: none yet): where a reader that
        starts now begins."""
        ...

    async def pending_retries(self, limit: int) -> list[Run]:
        """Failed runs whose retry decision has not been recorded yet, oldest first."""
        ...

    async def settle_retry(
        self, run_id: str, retry: NewRun | None, message: str, data: dict[str, Any], now: float
    ) -> Run | None:
        """Record the retry decision for a failed run and queue its retry: exactly once
        per failure (the pending mark is cleared in the same transaction)."""
        ...


class EventLog(Protocol):
    """Ingest: what agents report of their runs, and reading it back."""

    async def append_records(
        self,
        run_id: str,
        lease: int,
        records: list[RunRecord],
        now: float,
        resume: ResumeRules = NO_RESUMES,
        agent_id: str | None = None,
    ) -> AppendResult:
        """Store an attempt's records in seq order, each once (a resent seq is skipped,
        a gap ends the batch). UnknownRun, NotYourRun (`agent_id` is not the holder),
        StaleLease. Each record is screened (model/records.py): at the first refused
        one the batch stops, what came before is stored, a run still going fails
        (`refused_record`) and its lease ends. A worker crash, or code that could not be
        loaded, may put the run back in the queue instead (`resume`)."""
        ...

    async def put_output(self, run_id: str, lease: int, step: str, data: bytes, now: float) -> None:
        """Store a step's output under the current lease (one per run and step, the
        last one wins). StaleLease, UnknownRun, RecordRefused (a step the job lacks, a
        run that ended; a run still going fails)."""
        ...

    async def get_output(self, run_id: str, step: str) -> bytes | None: ...

    async def get_events(
        self, run_id: str, after: int, limit: int, types: Collection[str] = ()
    ) -> list[Event]:
        """Events with seq > `after`, in seq order (gapless per run); only of `types`,
        if given."""
        ...

    async def get_logs(self, run_id: str, step: str | None, after: int) -> list[LogChunk]:
        """Compute-log chunks with id > `after`, in the order they were stored."""
        ...


class AgentStore(Protocol):
    """Agents, their heartbeats, and the code locations they host."""

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
        labels: dict[str, str] | None = None,
        resources: dict[str, int] | None = None,
    ) -> Agent:
        """Create or refresh the agent called `name` (it keeps its id across restarts),
        ONLINE (DRAINING while an operator's drain holds), with its locations, labels
        and resources replacing the ones it had; moves the catalog version.
        With auth, NameTaken if the name is bound to another valid token while ONLINE."""
        ...

    async def record_heartbeats(self, agent_ids: Iterable[str], now: float) -> dict[str, float]:
        """A heartbeat from each agent, in one transaction (an OFFLINE one is ONLINE
        again, or DRAINING while an operator's drain holds); each known agent's previous
        heartbeat time (unknown ones left out)."""
        ...

    async def set_agent_status(self, agent_id: str, status: str) -> Agent | None:
        """DRAINING (no new launches; its runs go on) or back to ONLINE: the agent's own
        drain as it shuts down, which its next registration ends."""

    async def set_operator_drain(self, agent_id: str, drained: bool) -> Agent | None:
        """An operator's drain (DRAINING) or undrain (ONLINE). A drained agent stays
        DRAINING when it registers again or comes back from OFFLINE, until undrained."""
        ...

    async def update_code_locations(self, agent_id: str, locations: list[CodeLocationInfo]) -> bool:
        """Replace the agent's locations (a reload on the agent) and move the catalog
        version, in one transaction; False if no agent has that id."""
        ...

    async def request_reload(self, agent_id: str, locations: list[str]) -> bool:
        """Ask the agent to reload these locations (empty: all), merged with a request
        not yet taken; False if no agent has that id."""
        ...

    async def take_reload(self, agent_id: str) -> list[str] | None:
        """The agent's pending reload request, cleared in the same statement (only one
        poll, on any replica, takes it); None if there is none."""
        ...

    async def get_agent(self, agent_id: str) -> Agent | None: ...
    async def get_agents(self, agent_ids: Iterable[str]) -> dict[str, Agent]: ...
    async def list_agents(self) -> list[Agent]: ...
    async def list_code_locations(self) -> list[CodeLocation]: ...

    async def code_catalog(self) -> CodeCatalog:
        """Every agent's locations as of the latest registration (on any replica)."""
        ...


class TokenStore(Protocol):
    """Tokens, by salted hash only."""

    async def create_token(self, token: TokenRecord) -> None:
        """NameTaken if a token was ever called so (names are never reused)."""
        ...

    async def get_token(self, token_id: str) -> TokenRecord | None: ...
    async def list_tokens(self) -> list[TokenRecord]: ...

    async def revoke_token(self, name: str, now: float) -> TokenRecord | None:
        """Revoke the live token called `name`; None if there is none."""
        ...

    async def touch_token(self, token_id: str, now: float) -> None: ...


class InstigatorStore(Protocol):
    """Schedules' and sensors' state, and their ticks."""

    async def instigator_states(self) -> dict[tuple[str, str, str], InstigatorState]: ...

    async def set_instigator(
        self,
        location: str,
        name: str,
        kind: str,
        *,
        status: str | None = None,
        last_tick_time: float | None = None,
    ) -> None:
        """Record a start/stop (status) or where ticking resumes from."""
        ...

    async def start_tick(
        self, location: str, name: str, kind: str, scheduled_time: float | None, now: float
    ) -> Tick | None:
        """A STARTED tick; for a schedule, the existing one for that time if it has not
        finished (a retry after a crash), or None if it has."""
        ...

    async def finish_tick(
        self,
        tick_id: int,
        status: str,
        runs: list[NewRun],
        now: float,
        skip_reason: str | None = None,
        error: str | None = None,
        cursor: str | None = None,
        failure_count: int = 0,
    ) -> tuple[Tick, list[Run]]:
        """End a tick: create its runs (each once, by idempotency key), record the outcome
        and move the schedule's position or the sensor's cursor, in one transaction."""
        ...

    async def list_ticks(self, location: str, name: str, kind: str, limit: int) -> list[Tick]: ...
    async def unfinished_ticks(self) -> list[Tick]: ...


class LeaderStore(Protocol):
    """Leases on the daemon loops: exactly one replica runs each."""

    async def try_lead(self, name: str, holder: str, ttl: float, now: float) -> bool:
        """Take or renew the lease on loop `name` for `ttl` s: True while `holder` has
        it. An unexpired lease stays with its holder; an expired one goes to the first
        replica that asks."""
        ...

    async def release_lead(self, name: str, holder: str) -> None:
        """Give a lease up (a clean shutdown), so another replica takes over at once."""
        ...

    async def leaders(self) -> dict[str, tuple[str, float]]: ...


class EvaluationStore(Protocol):
    """Schedule and sensor evaluations in flight, whichever replica an agent polls."""

    async def create_evaluation(self, request: Evaluate, now: float) -> None: ...

    async def take_evaluations(
        self, agent_id: str, locations: set[str], now: float
    ) -> list[Evaluate]:
        """The untaken requests for these locations: each goes to exactly one agent."""
        ...

    async def finish_evaluation(self, result: EvaluationResult) -> bool:
        """Store the answer of the agent that took it; False if none such is waiting."""
        ...

    async def evaluation_state(
        self, eval_id: str
    ) -> tuple[str | None, EvaluationResult | None] | None:
        """(the agent that took it, its result), or None once it is gone."""
        ...

    async def untaken_evaluations(self) -> int: ...
    async def drop_evaluation(self, eval_id: str) -> None: ...


class AlertStore(Protocol):
    """The alerts outbox, and what alert detection reads besides the run history."""

    async def record_alerts(
        self, occurrences: list[Occurrence], cursors: dict[str, float], now: float
    ) -> list[Occurrence]:
        """Store each occurrence its rule has not stored before, pending and due now, and
        move the named cursors forward (never back), in one transaction; the ones that
        were new. (rule, key) is unique: however often, and on however many replicas, an
        occurrence is detected, its rule gets one delivery."""
        ...

    async def alert_cursors(self) -> dict[str, float]:
        """Where detection resumes, by cursor name (none yet: detection never ran)."""
        ...

    async def claim_deliveries(self, now: float, hold: float, limit: int) -> list[AlertDelivery]:
        """Pending deliveries due by `now`, oldest due first, each claimed for one attempt:
        `attempts` counted, the next attempt put `hold` s away, so that no other pass on
        any replica takes it while it is in flight; a claim never settled (its process
        died) falls due again after `hold`. The deliveries as claimed."""
        ...

    async def settle_delivery(
        self,
        delivery: AlertDelivery,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> bool:
        """The outcome of the attempt `delivery` was claimed for: sent (no `error`),
        pending again from `retry_at`, or failed for good. False, and nothing written, if
        the claim is no longer the latest."""
        ...

    async def next_delivery_due(self) -> float | None:
        """When the earliest pending delivery falls due (None: none pending)."""
        ...

    async def recent_deliveries(self, limit: int) -> list[AlertDelivery]:
        """Newest first."""
        ...

    async def tick_horizon(self) -> int:
        """The highest tick id at and below which every tick has finished: a cursor up
        to it misses no failure of a tick still running."""
        ...

    async def failed_ticks(
        self, after: int, upto: int, limit: int
    ) -> list[tuple[Tick, str | None]]:
        """FAILURE ticks with `after` < id <= `upto`, oldest first, each with the status
        of its schedule's or sensor's tick before it (None: it is the first)."""
        ...

    async def queued_before(self, since: float, limit: int) -> list[Run]:
        """QUEUED runs waiting since `since` or earlier (a delayed retry waits from the
        end of its delay), oldest first."""
        ...


class RetentionStore(Protocol):
    """Deleting finished runs, and purging what aged out (docs/operations.md)."""

    async def delete_run(self, run_id: str) -> Run:
        """Delete a finished run with its events, compute logs, outputs, attempts, tags
        and status history, in one transaction; the run as it was. UnknownRun; RunActive
        (it has not ended: the delete is guarded on its status in the statement itself);
        RunHasLiveChildren (a retry or re-execution of it has not ended). Its ended
        children keep their parent and root ids, which then name a deleted run."""
        ...

    async def retention_snapshot(self) -> RetentionSnapshot:
        """The oldest candidate time of each purge target (indexed reads only)."""
        ...

    async def purge(self, purge: Purge, max_runs: int, max_rows: int) -> PurgeResult:
        """One batch of `purge`, one short transaction: at most `max_runs` runs (fewer
        if their events pass `max_rows`), or `max_rows` log chunks, outputs or ticks.
        Only finished runs are touched (guarded in the delete), never a run with a live
        retry or re-execution; logs and outputs only of finished runs. `more`: the batch
        was full, so another may find more."""
        ...

    async def reclaim_space(self, pages: int) -> None:
        """Hand up to `pages` free pages back to the file system where the database can
        do it in place (SQLite with auto_vacuum=INCREMENTAL); else nothing."""
        ...


class PoolStore(Protocol):
    """Concurrency pools: limits set through the API, and the slots runs hold or wait
    for (model/pools.py). A claim lives under its run's lease: the transaction that ends
    the step's attempt, or moves the run out of STARTING/STARTED/CANCELING (ended,
    fenced, back in the queue, its agent declared dead), deletes it; cancelling drops
    the run's waiting claims at once."""

    async def pool_limits(self) -> dict[str, int]:
        """The limits set through the API, by pool."""
        ...

    async def set_pool_limit(self, name: str, limit: int, now: float) -> None:
        """Set (or change) a pool's limit; it wins over the config's."""
        ...

    async def delete_pool_limit(self, name: str) -> bool:
        """Forget the limit set through the API (the config's or the default applies
        again); False if none was set."""
        ...

    async def pool_claims(self) -> list[Claim]:
        """Every live claim (held or waiting), oldest first, with its run's agent."""
        ...

    async def grant_slots(
        self, now: float, decide: Callable[[list[Claim], dict[str, int]], GrantPlan]
    ) -> list[Claim]:
        """Decide over the live claims and the limits set through the API, and record
        the grants, in one instance-wide transaction (so no two passes anywhere can both
        fill a pool's last slot); the claims granted. Each claim that now waits gets a
        STEP_SLOT_WAITING event in its run's log, once; a claim granted after waiting, a
        STEP_SLOT_GRANTED."""
        ...

    async def owed_grants(self, agent_id: str, held: Collection[int]) -> list[Claim]:
        """Granted step claims of the runs this agent holds, but those it already has."""
        ...


class StepTaskStore(Protocol):
    """Step tasks (the fleet executor): asked for and ended through the run's records
    (`append_records`), placed by `assign_queued`; these read and end them otherwise."""

    async def step_task_by_lease(self, lease: int) -> StepTask | None: ...
    async def step_tasks_of(self, run_id: str) -> list[StepTask]:
        """Every step task of a run, oldest first (the run page's "which agent")."""
        ...

    async def step_task_agents(self, run_id: str) -> set[str]:
        """The agents running a step task of this run (owed a stop order when it ends)."""
        ...

    async def running_step_tasks(self) -> list[StepTask]: ...
    async def pending_step_launches(self, agent_id: str) -> list[tuple[StepTask, Run]]:
        """RUNNING step tasks placed on this agent, of runs still STARTED under the
        lease that asked (offered until the agent holds their lease)."""
        ...

    async def owed_step_results(
        self, agent_id: str, run_leases: Collection[int], held: Collection[int]
    ) -> list[StepTask]:
        """Ended step tasks of the run attempts this agent holds (`run_leases`), but
        those it already has (task ids in `held`)."""
        ...

    async def end_lost_step_tasks(self, verdicts: list[StepTaskLost], now: float) -> list[str]:
        """Fail each step task still RUNNING under the verdict's lease; the agents (of
        their runs) owed the result."""
        ...

    async def reconcile_step_tasks(
        self, agent_id: str, held_leases: Collection[int], now: float
    ) -> list[str]:
        """An agent registered holding `held_leases`: its RUNNING step tasks not among
        them failed; the agents owed the result."""
        ...


class QueueStore(RunStore, PoolStore, Protocol):
    """What the run queue works with: runs, and pools (run granularity, the queue view)."""


class Storage(
    Database,
    PoolStore,
    RunStore,
    EventLog,
    AgentStore,
    TokenStore,
    InstigatorStore,
    LeaderStore,
    EvaluationStore,
    AlertStore,
    RetentionStore,
    StepTaskStore,
    Protocol,
):
    """Everything the control plane remembers."""
