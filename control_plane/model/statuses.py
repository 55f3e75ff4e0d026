"""Run statuses (Dagster's names) and the guarded state machine between them.

Dagster writes whatever status the latest event implies, so a late event can flip a
FAILURE back to SUCCESS. Here every change goes through `can_transition`: a terminal
run never changes status again.
"""

from __future__ import annotations

from enum import StrEnum

from protocol.events import (
    AGENT_LOST,
    AGENT_RESTARTED,
    CODE_UNREACHABLE,
    UNDELIVERABLE,
    WORKER_CRASH,
)


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
    "RUN_WORKER_RESTARTED": RunStatus.QUEUED,  # a lost worker's run, back to the queue
    "RUN_REQUEUED": RunStatus.QUEUED,  # its code could not be loaded: it waits to try again
}

# Why a run failed, as `Run.failure_kind`. Retries of op failures can be turned off;
# the worker/agent kinds can also be resumed in place (max_resume_run_attempts).
OP_FAILURE = "op_failure"
START_TIMEOUT = "start_timeout"
MAX_RUNTIME = "max_runtime"
REFUSED_RECORD = "refused_record"  # its agent sent a record the event log does not take
FAILURE_KINDS = frozenset(
    {
        OP_FAILURE,
        WORKER_CRASH,
        AGENT_LOST,
        AGENT_RESTARTED,
        START_TIMEOUT,
        MAX_RUNTIME,
        REFUSED_RECORD,
        UNDELIVERABLE,
        CODE_UNREACHABLE,
    }
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


def sources_of(new: RunStatus) -> tuple[RunStatus, ...]:
    """The statuses a run may move to `new` from (what a status write is guarded by)."""
    return _SOURCES[new]


_SOURCES = {new: tuple(s for s in RunStatus if new in _ALLOWED[s]) for new in RunStatus}
