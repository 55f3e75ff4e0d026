"""Step tasks (the fleet executor): one step attempt of a run, placed on any agent.

A run whose executor is `fleet` keeps its run worker as the orchestrator: it walks the
graph and decides retries, and asks for each ready step attempt to run on the fleet
(a STEP_TASK_REQUESTED record, stored under the run's lease). The control plane keeps
the ask as a step task: WAITING until the run queue places it on an agent, RUNNING
under a lease of its own (fenced with the run's: it holds only while the run is
STARTED under the lease that asked), DONE with an outcome that goes back to the
orchestrating agent through its long-poll.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from control_plane.model.times import iso
from protocol.tags import QUEUE_TAG

WAITING, RUNNING, DONE = "WAITING", "RUNNING", "DONE"
FLEET_EXECUTOR = "fleet"
STEP_TASKS_CAPABILITY = "step_tasks"  # an agent that can run step tasks and fleet runs
STEP_TASK_LOST = "step_task_lost"  # the error type of an attempt whose agent went away


@dataclass(frozen=True)
class StepTask:
    task_id: int
    run_id: str
    run_lease: int  # the lease of the run attempt that asked for it
    step: str
    attempt: int  # the step's retry number, from 0
    queue: str
    tags: dict[str, str]  # the op's tags: its placement (labels, resources, queue)
    inputs: dict[str, str]  # upstream step -> the run whose stored output it takes
    status: str
    create_time: float
    location: str = ""
    job: str = ""
    agent_id: str | None = None
    lease: int | None = None
    start_time: float | None = None
    end_time: float | None = None
    outcome: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "run_id": self.run_id,
            "step": self.step,
            "attempt": self.attempt,
            "queue": self.queue,
            "status": self.status,
            "agent": self.agent_id,
            "lease": self.lease,
            "create_time": iso(self.create_time),
            "start_time": iso(self.start_time),
            "end_time": iso(self.end_time),
            "outcome": self.outcome,
        }


@dataclass(frozen=True)
class StepPlacement:
    """What a dispatch decides for a step task: the agent it runs on."""

    task_id: int
    agent_id: str


@dataclass(frozen=True)
class StepTaskLost:
    """The monitor's verdict on a RUNNING step task whose agent went silent: the attempt
    fails (the orchestrator's retry policy decides what follows); applied only if the
    task still runs under `lease`."""

    task_id: int
    lease: int
    message: str
    offline_agent: str | None = None


def step_queue(run_queue: str, op_tags: dict[str, str]) -> str:
    """The queue a step task waits in: its op's `fleetrun/queue` tag, else its run's."""
    return op_tags.get(QUEUE_TAG) or run_queue


def task_inputs_problem(
    inputs: object, upstream: list[str], run_id: str, reuse: dict[str, str]
) -> str | None:
    """Why a STEP_TASK_REQUESTED's inputs are not the step's upstream outputs of this
    run (or of the run a re-execution reuses them from); None if they are."""
    if not isinstance(inputs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()
    ):
        return "inputs must map each upstream step to a run id"
    if sorted(inputs) != sorted(upstream):
        return f"inputs name {sorted(inputs)!r}, the step's upstream is {sorted(upstream)!r}"
    for step, source in inputs.items():
        if source != run_id and reuse.get(step) != source:
            return f"input {step!r} comes from run {source!r}, which this run does not reuse"
    return None


def outcome_of(data: dict[str, Any], ok: bool, message: str) -> dict[str, Any]:
    """A step task's outcome from its worker's result record (or the agent's report of
    a worker that died): what the orchestrator's retry decision reads."""
    if ok:
        return {"ok": True, "duration_seconds": _number(data.get("duration_seconds"))}
    error = data.get("step_error")
    if not isinstance(error, dict):  # the worker died, or was stopped: the agent's report
        error = {"error_type": "StepWorkerFailed", "message": message, "traceback": ""}
    outcome: dict[str, Any] = {
        "ok": False,
        "error_type": str(error.get("error_type", "")),
        "message": str(error.get("message", "")),
        "traceback": str(error.get("traceback", "")),
    }
    for key in ("max_retries", "wait_seconds"):
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            outcome[key] = value
    return outcome


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def task_from_row(row: Any) -> StepTask:
    (
        task_id,
        run_id,
        run_lease,
        step,
        attempt,
        queue,
        tags,
        inputs,
        status,
        create_time,
        location,
        job,
        agent_id,
        lease,
        start_time,
        end_time,
        outcome,
    ) = row
    return StepTask(
        task_id=task_id,
        run_id=run_id,
        run_lease=run_lease,
        step=step,
        attempt=attempt,
        queue=queue,
        tags=json.loads(tags),
        inputs=json.loads(inputs),
        status=status,
        create_time=create_time,
        location=location,
        job=job,
        agent_id=agent_id,
        lease=lease,
        start_time=start_time,
        end_time=end_time,
        outcome=json.loads(outcome) if outcome else {},
    )


TASK_COLUMNS = (
    "t.task_id, t.run_id, t.run_lease, t.step, t.attempt, t.queue, t.tags, t.inputs,"
    " t.status, t.create_time, r.location, r.job, t.agent_id, t.lease, t.start_time,"
    " t.end_time, t.outcome"
)
