"""Run statuses (Dagster's names) and the guarded state machine between them.

Dagster writes whatever status the latest event implies, so a late event can flip a
FAILURE back to SUCCESS. Here every change goes through `can_transition`: a terminal
run never changes status again.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    NOT_STARTED = "NOT_STARTED"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"


TERMINAL_STATUSES = frozenset({RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED})
ACTIVE_STATUSES = frozenset({RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING})

EVENT_STATUS: dict[str, RunStatus] = {
    "RUN_ENQUEUED": RunStatus.QUEUED,
    "RUN_STARTING": RunStatus.STARTING,
    "RUN_START": RunStatus.STARTED,
    "RUN_SUCCESS": RunStatus.SUCCESS,
    "RUN_FAILURE": RunStatus.FAILURE,
    "RUN_CANCELING": RunStatus.CANCELING,
    "RUN_CANCELED": RunStatus.CANCELED,
}

# The run-status events an agent may report; the others (ENQUEUED, STARTING, CANCELING,
# WORKER_RESTARTED) are the control plane's own decisions. RUN_CANCELED from an agent
# only confirms a cancel the control plane asked for.
AGENT_STATUS_EVENTS = frozenset({"RUN_START", "RUN_SUCCESS", "RUN_FAILURE", "RUN_CANCELED"})

# Why a run failed, as `Run.failure_kind`. Retries of op failures can be turned off;
# the worker/agent kinds can also be resumed in place (max_resume_run_attempts).
OP_FAILURE = "op_failure"
WORKER_CRASH = "worker_crash"
AGENT_LOST = "agent_lost"
AGENT_RESTARTED = "agent_restarted"
START_TIMEOUT = "start_timeout"
MAX_RUNTIME = "max_runtime"
FAILURE_KINDS = frozenset(
    {OP_FAILURE, WORKER_CRASH, AGENT_LOST, AGENT_RESTARTED, START_TIMEOUT, MAX_RUNTIME}
)
RESUMABLE_KINDS = frozenset({WORKER_CRASH, AGENT_LOST, AGENT_RESTARTED})

_ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.NOT_STARTED: frozenset(
        {RunStatus.QUEUED, RunStatus.STARTING, RunStatus.FAILURE, RunStatus.CANCELED}
    ),
    RunStatus.QUEUED: frozenset(
        {RunStatus.STARTING, RunStatus.CANCELING, RunStatus.CANCELED, RunStatus.FAILURE}
    ),
    RunStatus.STARTING: frozenset(
        {
            RunStatus.QUEUED,
            RunStatus.STARTED,
            RunStatus.FAILURE,
            RunStatus.CANCELING,
            RunStatus.CANCELED,
        }
    ),
    RunStatus.STARTED: frozenset(
        {RunStatus.QUEUED, RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELING}
    ),
    RunStatus.CANCELING: frozenset({RunStatus.CANCELED, RunStatus.FAILURE, RunStatus.SUCCESS}),
    RunStatus.SUCCESS: frozenset(),
    RunStatus.FAILURE: frozenset(),
    RunStatus.CANCELED: frozenset(),
}


def can_transition(current: RunStatus, new: RunStatus) -> bool:
    return new in _ALLOWED[current]
