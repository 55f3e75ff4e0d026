"""Every message the control plane, agents and run workers exchange, one dataclass each.

Agent <-> control plane (HTTP POST under /agent/v1, msgpack bodies):
    Register -> Registered, Poll -> PollReply, Heartbeat -> HeartbeatReply,
    EventBatch -> EventAck; any failure -> ErrorReply.
Agent <-> run worker (length-prefixed frames over pipes):
    WorkerSpec (agent -> worker, on stdin), RunRecord (worker -> agent, on the record fd);
    DescribeLocation (agent -> worker) -> CodeLocationInfo, to list a location's jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RetryPolicyInfo:
    """A step's retry policy as its job applies it (invocation, op or job default)."""

    max_retries: int
    delay: float | None = None
    backoff: str | None = None  # LINEAR | EXPONENTIAL
    jitter: str | None = None  # FULL | PLUS_MINUS


@dataclass(frozen=True)
class OpInfo:
    name: str
    upstream: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    retry_policy: RetryPolicyInfo | None = None  # None: a failure is not retried
    pool: str | None = None  # the concurrency pool its attempts take a slot in


@dataclass(frozen=True)
class JobInfo:
    name: str
    ops: list[OpInfo] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    executor: str = "in_process"


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    job: str
    cron: str
    timezone: str = "UTC"
    default_status: str = "STOPPED"
    catchup: int = 0
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SensorInfo:
    """A sensor; with `run_status`, a run status sensor: evaluated once per run of its
    monitored jobs that reached that status (`job` is "" if it requests no job)."""

    name: str
    job: str
    minimum_interval_seconds: float = 30.0
    default_status: str = "STOPPED"
    run_status: str | None = None
    monitored_jobs: list[str] = field(default_factory=list)  # empty: its location's jobs
    monitor_all_locations: bool = False


@dataclass(frozen=True)
class CodeLocationInfo:
    """What an agent found when it loaded one code location: its jobs, or the load error."""

    name: str
    jobs: list[JobInfo] = field(default_factory=list)
    error: str | None = None
    schedules: list[ScheduleInfo] = field(default_factory=list)
    sensors: list[SensorInfo] = field(default_factory=list)
    # The version serving new runs (a git commit, or a hash of the location's files);
    # every version the agent still has (newest first: re-executions, pinned runs); and
    # why the last reload failed while `version` goes on serving.
    version: str = ""
    versions: list[str] = field(default_factory=list)
    reload_error: str | None = None


@dataclass(frozen=True)
class FailedStep:
    step: str
    error: str


@dataclass(frozen=True)
class RunChange:
    """A run that reached the status a run status sensor watches, as it is now."""

    run_id: str
    job: str
    location: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    status_reason: str | None = None
    failure_kind: str | None = None
    failure_steps: list[FailedStep] = field(default_factory=list)


@dataclass(frozen=True)
class Evaluate:
    """Evaluate a schedule tick or a sensor in the agent (user code never runs in the
    control plane). `scheduled_time`: the tick's instant (schedules); `run_changes`: the
    runs a run status sensor is evaluated for, one call each."""

    eval_id: str
    location: str
    kind: str  # "schedule" | "sensor"
    name: str
    scheduled_time: float | None = None
    cursor: str | None = None
    last_run_key: str | None = None
    timeout_seconds: float = 60.0
    run_changes: list[RunChange] = field(default_factory=list)


@dataclass(frozen=True)
class RequestedRun:
    job: str
    run_key: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationResult:
    """What a schedule or sensor function returned (or the error it raised)."""

    eval_id: str
    agent_id: str = ""
    runs: list[RequestedRun] = field(default_factory=list)
    skip_reason: str | None = None
    error: str | None = None
    cursor: str | None = None


@dataclass(frozen=True)
class EvaluationAck:
    ok: bool = True


@dataclass(frozen=True)
class Register:
    name: str
    hostname: str
    version: str
    queues: list[str]
    max_concurrent_runs: int
    code_locations: list[CodeLocationInfo] = field(default_factory=list)
    runs: list[RunState] = field(default_factory=list)
    # What this agent can do beyond protocol 1; the control plane only assigns a run to
    # an agent with every capability the run needs ("reuse_outputs": re-executions).
    capabilities: list[str] = field(default_factory=list)
    # Placement: what a run's `fleetrun/requires` selects on, and what this agent offers
    # to runs' `fleetrun/cpus`, `fleetrun/memory_mb`, `fleetrun/gpus` (0: not offered).
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Registered:
    agent_id: str
    heartbeat_interval_seconds: float
    poll_timeout_seconds: float
    heartbeat_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class Poll:
    """A long-poll for commands; `held_leases` are the launches the agent already has."""

    agent_id: str
    held_leases: list[int] = field(default_factory=list)
    stopping_leases: list[int] = field(default_factory=list)  # stop orders being carried out
    held_grants: list[int] = field(default_factory=list)  # slot grants passed to workers
    held_results: list[int] = field(default_factory=list)  # step results passed to workers


@dataclass(frozen=True)
class LaunchRun:
    run_id: str
    job: str
    location: str
    lease: int
    tags: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # Steps not to run again, each with the run whose stored output to use instead.
    reuse_outputs: dict[str, str] = field(default_factory=dict)
    # Steps of an op with a pool ask for a slot (STEP_SLOT_REQUESTED) and start once it
    # is granted (`SlotGrant`); False from a control plane without pools, or one that
    # limits pools by run (the run holds its slots from its launch).
    claim_pool_slots: bool = False
    # The code version to run: the parent's for a re-execution (used if the agent still
    # has it), the `fleetrun/code_version` tag's (required); "": the current one.
    code_version: str = ""
    # A step task (the fleet executor): run only attempt `step_attempt` (from 0) of step
    # `step` of this run, under `lease` (the step task's own, fenced with the run's);
    # its inputs are the outputs `reuse_outputs` names. "": the whole run.
    step: str = ""
    step_attempt: int = 0


@dataclass(frozen=True)
class StepResult:
    """How a step task of run attempt `lease` ended, for the agent holding that attempt
    (its worker orchestrates the run). Offered on every poll until the agent lists
    `task_id` in `Poll.held_results`. `outcome`: ok, and on failure error_type, message,
    traceback, max_retries, wait_seconds (what the step's retry decision needs)."""

    run_id: str
    lease: int
    task_id: int
    step: str
    attempt: int
    agent: str
    outcome: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StopRun:
    """Stop the worker of attempt `lease`: SIGTERM, then SIGKILL after `grace_seconds`.

    `cancel`: the run was canceled (the agent reports RUN_CANCELED once it is stopped);
    otherwise the attempt is no longer current and whatever it sends is refused.
    """

    run_id: str
    lease: int
    cancel: bool
    reason: str
    grace_seconds: float = 10.0
    failure_kind: str = ""  # reported with the run's FAILURE once the worker is stopped


@dataclass(frozen=True)
class SlotGrant:
    """A pool slot granted to one attempt (`attempt`, from 0) of a step of run attempt
    `lease`: the step may start. Offered on every poll until the agent lists `claim_id`
    in `Poll.held_grants`."""

    run_id: str
    lease: int
    claim_id: int
    step: str
    attempt: int
    pool: str


@dataclass(frozen=True)
class ReloadLocations:
    """Reload code locations now (`fleetrun agents reload`): these, or all if empty."""

    locations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PollReply:
    launches: list[LaunchRun] = field(default_factory=list)
    stops: list[StopRun] = field(default_factory=list)
    evaluations: list[Evaluate] = field(default_factory=list)
    grants: list[SlotGrant] = field(default_factory=list)
    reload: ReloadLocations | None = None
    step_results: list[StepResult] = field(default_factory=list)


@dataclass(frozen=True)
class RunState:
    """One run as its agent sees it: the worker is `starting`, `running` or `exited`."""

    run_id: str
    lease: int
    state: str


@dataclass(frozen=True)
class Heartbeat:
    agent_id: str
    runs: list[RunState] = field(default_factory=list)


@dataclass(frozen=True)
class HeartbeatReply:
    ok: bool = True


@dataclass(frozen=True)
class UpdateLocations:
    """The agent's code locations changed (a reload): what it now serves, in full."""

    agent_id: str
    code_locations: list[CodeLocationInfo] = field(default_factory=list)


@dataclass(frozen=True)
class LocationsUpdated:
    ok: bool = True


@dataclass(frozen=True)
class Drain:
    """The agent is shutting down: no new launches for it; its runs may finish."""

    agent_id: str


@dataclass(frozen=True)
class Drained:
    status: str


@dataclass(frozen=True)
class RunRecord:
    """One entry of a run attempt's record stream, numbered by the agent from 1.

    kind "event": `type` is the event type (RUN_START, STEP_SUCCESS, LOG, ...).
    kind "log": compute-log text; `type` is the stream ("stdout" or "stderr").
    """

    seq: int
    time: float
    kind: str
    type: str
    step: str | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventBatch:
    agent_id: str
    run_id: str
    lease: int
    records: list[RunRecord]


@dataclass(frozen=True)
class EventAck:
    """Everything up to and including `acked_seq` is stored; resend from `acked_seq + 1`."""

    acked_seq: int


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str


@dataclass(frozen=True)
class LocationSpec:
    """How a run worker loads a code location (resolved from agent.toml by the agent)."""

    name: str
    python_file: str | None = None
    module: str | None = None
    working_directory: str | None = None
    # One version's files (the agent's copy): first on sys.path, so that the run
    # imports that version whatever happens to the location's own folder meanwhile.
    code_directory: str | None = None
    version: str = ""


@dataclass(frozen=True)
class WorkerSpec:
    launch: LaunchRun
    location: LocationSpec
    output_store: str = "control_plane"  # or "filesystem"
    output_path: str = ""  # the attempt's scratch folder, or the filesystem store's root
    max_output_bytes: int = 16 * 1024 * 1024
    # How the docker executor starts a step's container (agent/containers.py
    # step_container_settings); the agent and its worker share a version.
    docker: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateSpec:
    """Asks a short-lived worker to evaluate a schedule tick or a sensor."""

    evaluate: Evaluate
    location: LocationSpec


@dataclass(frozen=True)
class DescribeLocation:
    """Asks a short-lived worker to load a location and reply with its CodeLocationInfo."""

    location: LocationSpec


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Register,
        Registered,
        Poll,
        PollReply,
        Heartbeat,
        HeartbeatReply,
        Drain,
        Drained,
        EventBatch,
        EventAck,
        ErrorReply,
        RunRecord,
        WorkerSpec,
        DescribeLocation,
        CodeLocationInfo,
        Evaluate,
        EvaluateSpec,
        EvaluationResult,
        EvaluationAck,
        UpdateLocations,
        LocationsUpdated,
    )
}


# Fields added after protocol version 1, by message: left out when talking to a peer of an
# older version (which would refuse unknown keys). A version-1 agent sends none of them.
FIELDS_SINCE: dict[str, dict[str, int]] = {
    "Registered": {"heartbeat_timeout_seconds": 2},
    "CodeLocationInfo": {
        "schedules": 2,
        "sensors": 2,
        "version": 4,
        "versions": 4,
        "reload_error": 4,
    },
    "SensorInfo": {"run_status": 3, "monitored_jobs": 3, "monitor_all_locations": 3},
    "Evaluate": {"run_changes": 3},
    "OpInfo": {"retry_policy": 3, "pool": 4},
    "Register": {"runs": 2, "capabilities": 2, "labels": 4, "resources": 4},
    "Poll": {"stopping_leases": 2, "held_grants": 4, "held_results": 5},
    "PollReply": {"stops": 2, "evaluations": 2, "grants": 4, "reload": 4, "step_results": 5},
    "LaunchRun": {
        "reuse_outputs": 2,
        "claim_pool_slots": 4,
        "code_version": 4,
        "step": 5,
        "step_attempt": 5,
    },
    "LocationSpec": {"code_directory": 4, "version": 4},
}
