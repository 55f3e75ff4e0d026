"""Runs as the control plane keeps them: the run, a run to create, the filter to list them
by, its event log and compute log, and the two decisions made about a running attempt
(a verdict that ends it, a stop order its agent carries out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from control_plane.model.agents import Agent
from control_plane.model.statuses import RunStatus
from control_plane.model.steptasks import StepPlacement, StepTask
from control_plane.model.times import iso

if TYPE_CHECKING:
    from control_plane.model.pools import Claim


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
    code_retries: int = 0  # re-queued this many times because its code could not be loaded
    code_version: str | None = None  # of its code location, as its agent ran it
    wanted_code_version: str | None = None  # a re-execution's parent's: used if still there

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
            "code_version": self.code_version,
        }


@dataclass(frozen=True)
class ResumeRules:
    """When an attempt that failed puts its run back in the queue instead of failing it:
    a lost worker resumes in place (`[run_monitoring] max_resume_run_attempts`); a run
    whose code location could not be loaded waits and tries again
    (`[run_coordinator] max_user_code_failure_retries`, Dagster's name)."""

    worker_restarts: int = 0
    code_retries: int = 0
    code_retry_delay: float = 60.0


NO_RESUMES = ResumeRules()


@dataclass(frozen=True)
class StatusChange:
    """One change of a run's status, as the run-status history numbers it (`id`)."""

    id: int
    run_id: str
    status: RunStatus
    time: float


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
    wanted_code_version: str | None = None  # a re-execution runs its parent's code version


@dataclass
class RunFilter:
    statuses: list[RunStatus] = field(default_factory=list)
    job: str | None = None
    tags: list[tuple[str, str]] = field(default_factory=list)
    agent_id: str | None = None
    root_run_id: str | None = None  # the retries and re-executions of this run


TAG_FILTER_SEPARATORS = "=:"


def tag_filter_pair(raw: str) -> tuple[str, str] | None:
    """`key=value` as the UI, the API and the CLI take a tag filter, or the older
    `key:value`: the key ends at the first `=` or `:`. None when there is no key."""
    cut = next((i for i, ch in enumerate(raw) if ch in TAG_FILTER_SEPARATORS), -1)
    if cut <= 0:
        return None
    return raw[:cut], raw[cut + 1 :]


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
class QueueSnapshot:
    """What a dispatch decision needs, read in one transaction."""

    queued: list[Run]
    active: list[Run]
    agents: list[Agent]
    hosted: dict[str, set[str]]
    claims: list[Claim] = field(default_factory=list)  # live pool-slot claims
    pool_limits: dict[str, int] = field(default_factory=dict)  # set through the API
    # The pools each queued run's job uses, by (location, job): run granularity.
    job_pools: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    # (agent id, location) -> the code versions that agent has of it
    code_versions: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    # The executor of each queued run's job, by (location, job) (a fleet run needs an
    # agent that can run step tasks); step tasks waiting to be placed, and those running
    # (each holds one of its agent's slots and the resources its op asks for).
    job_executors: dict[tuple[str, str], str] = field(default_factory=dict)
    waiting_steps: list[StepTask] = field(default_factory=list)
    running_steps: list[StepTask] = field(default_factory=list)


# What a dispatch decides for a run: (run id, agent id), or with the pools it holds a slot
# of from its launch to its end, (run id, agent id, pools); for a step task, the agent.
Placement = tuple[str, str] | tuple[str, str, tuple[str, ...]] | StepPlacement
