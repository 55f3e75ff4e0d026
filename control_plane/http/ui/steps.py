"""The run page's per-step table: each step of the job with its status, attempts and
times (and, for a fleet run, the agent that ran it), read from the run's events. Steps
the job defines but that have not started are listed as not started; a step still open
when the run was canceled is canceled, not failed. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.model.runs import Event, Run
from control_plane.model.statuses import TERMINAL_STATUSES, RunStatus
from protocol.events import STEP_TASK_STARTED

NOT_STARTED = "not started"
OPEN = {"running", "up for retry"}
OUTCOMES = {
    "STEP_SUCCESS": "success",
    "STEP_FAILURE": "failure",
    "STEP_UP_FOR_RETRY": "up for retry",
    "STEP_SKIPPED": "skipped",
    "STEP_REUSED": "reused",
}
STARTS = {"STEP_START", "STEP_RESTARTED"}


@dataclass
class StepRow:
    step: str
    status: str = NOT_STARTED
    attempts: int = 0
    start: float | None = None
    end: float | None = None
    agent: str = ""  # the agent that ran its last attempt (a fleet run's step tasks)

    def duration(self, now: float) -> float | None:
        """Seconds from the first attempt's start to the end, or to now while open."""
        if self.start is None:
            return None
        return (self.end if self.end is not None else now) - self.start


def step_rows(job_steps: list[str], run: Run, events: list[Event]) -> list[StepRow]:
    """A row per step: the job's steps in its order, then any step only the events
    name (a job changed since the run was made)."""
    rows = {step: StepRow(step) for step in job_steps}
    for event in events:
        if not event.step:
            continue
        row = rows.setdefault(event.step, StepRow(event.step))
        _apply(row, event)
    if run.status in TERMINAL_STATUSES:
        for row in rows.values():
            if row.status in OPEN:
                row.status = "canceled" if run.status == RunStatus.CANCELED else "failure"
                row.end = run.end_time
    return list(rows.values())


def _apply(row: StepRow, event: Event) -> None:
    if event.type == STEP_TASK_STARTED:
        row.agent = str(event.data.get("agent") or event.data.get("agent_id") or "")
    elif event.type in STARTS:
        row.attempts += 1
        row.start = event.time if row.start is None else row.start
        row.status, row.end = "running", None
    elif event.type in OUTCOMES:
        row.status = OUTCOMES[event.type]
        if event.type != "STEP_UP_FOR_RETRY":
            row.end = event.time
            row.start = event.time if row.start is None else row.start
