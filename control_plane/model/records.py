"""Which of an agent's records a run's event log takes: one pure decision per record.

An agent holding a run's lease reports what its worker did. It may send only the event
types of `protocol/events.py`, only for steps of the run's job, and only while the run
lasts: a status event must be a transition the state machine allows from where the run
is, step events need a started run, and once the run has ended nothing is taken but the
compute-log text a worker's pipes still held (for `TRAILING_LOG_SECONDS`). So the event
log and the run's status always tell the same story.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from control_plane.model.statuses import ACTIVE_STATUSES, TERMINAL_STATUSES, RunStatus
from protocol.events import (
    RUN_CANCELED,
    RUN_FAILURE,
    RUN_START,
    RUN_SUCCESS,
    STEP_EVENTS,
    STEP_SLOT_REQUESTED,
    record_shape_problem,
)
from protocol.messages import RunRecord
from protocol.validation import name_problem

TRAILING_LOG_SECONDS = 60.0


class Take(Enum):
    STORE = "store"
    STORE_UNATTRIBUTED = "store without its step"  # log text under a step the job lacks
    SKIP = "acknowledge without storing"  # a worker's start racing its cancel
    REFUSE = "refuse"


# The statuses in which each run event from an agent is a transition the run may make.
_RUN_EVENT_FROM: dict[str, frozenset[RunStatus]] = {
    RUN_START: frozenset({RunStatus.STARTING}),
    RUN_SUCCESS: frozenset({RunStatus.STARTED, RunStatus.CANCELING}),
    RUN_FAILURE: frozenset({RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING}),
    RUN_CANCELED: frozenset({RunStatus.CANCELING}),
}
_STEPS_FROM = frozenset({RunStatus.STARTED, RunStatus.CANCELING})


def screen_record(
    record: RunRecord,
    status: RunStatus,
    steps: frozenset[str] | None,
    end_time: float | None,
    now: float,
) -> tuple[Take, str]:
    """What to do with `record` for a run in `status` whose job has `steps` (None: the
    job is no longer known, so only the names' form is checked), and why."""
    problem = record_shape_problem(record.kind, record.type, record.step)
    if problem is not None:
        return Take.REFUSE, problem
    unknown = record.step is not None and steps is not None and record.step not in steps
    if unknown and record.kind != "log":
        return Take.REFUSE, f"step {record.step!r} is not a step of the run's job"
    take = Take.STORE_UNATTRIBUTED if unknown else Take.STORE
    if status in TERMINAL_STATUSES:
        ended_ago = now - (end_time if end_time is not None else now)
        if record.kind == "log" and ended_ago <= TRAILING_LOG_SECONDS:
            return take, "compute log of an ended run, within the trailing-log grace"
        return Take.REFUSE, f"the run ended ({status}); its lease no longer takes records"
    if status not in ACTIVE_STATUSES:
        return Take.REFUSE, f"the run is {status}, not running"
    if record.kind == "log":
        return take, "compute log"
    allowed_from = _RUN_EVENT_FROM.get(record.type)
    if allowed_from is not None:
        if status in allowed_from:
            return take, "a status transition the run may make"
        if record.type == RUN_START and status == RunStatus.CANCELING:
            return Take.SKIP, "the worker started after the run was canceled"
        return Take.REFUSE, f"{record.type} cannot follow status {status}"
    if record.type in STEP_EVENTS and status not in _STEPS_FROM:
        return Take.REFUSE, f"{record.type} before the run started"
    if record.type == STEP_SLOT_REQUESTED:
        if status not in _STEPS_FROM:
            return Take.REFUSE, f"{record.type} before the run started"
        try:
            slot_claim(record.data)
        except ValueError as exc:
            return Take.REFUSE, str(exc)
    return take, "an event of a running run"


def slot_claim(data: dict[str, Any]) -> tuple[str, int]:
    """The pool and step attempt (from 0) of a STEP_SLOT_REQUESTED's data; ValueError
    naming what is wrong."""
    pool, attempt = data.get("pool"), data.get("attempt", 0)
    if not isinstance(pool, str) or (problem := name_problem(pool)) is not None:
        raise ValueError(f"a slot request's pool {str(pool)[:64]!r} {problem or 'is not text'}")
    if type(attempt) is not int or not 0 <= attempt <= 1_000_000:
        raise ValueError(f"a slot request's attempt must be an integer >= 0, not {attempt!r}")
    return pool, attempt


def output_problem(step: str, status: RunStatus, steps: frozenset[str] | None) -> str | None:
    """Why a step output upload is refused; None if it is taken. An agent uploads a
    large output before the batch that announces it, which may also hold the RUN_START,
    so a STARTING run takes outputs too."""
    if (problem := name_problem(step)) is not None:
        return f"step name {step[:64]!r} {problem}"
    if steps is not None and step not in steps:
        return f"step {step!r} is not a step of the run's job"
    if status not in ACTIVE_STATUSES:
        return f"the run is {status}; its lease no longer takes outputs"
    return None
