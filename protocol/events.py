"""The records of a run's stream, and which of them an agent may write.

A run's event log is written by two parties: the control plane (its own decisions:
queued, launching, canceling, retried, restarted) and the agent holding the run's lease
(what the worker did). The control plane takes from an agent only the types listed
here, for steps of the run's job, while the lease lasts; the agent applies the same list
to what its run workers send, so a worker's bad record fails its own run at the agent.
"""

from __future__ import annotations

from protocol.validation import name_problem

RUN_START = "RUN_START"
RUN_SUCCESS = "RUN_SUCCESS"
RUN_FAILURE = "RUN_FAILURE"
RUN_CANCELED = "RUN_CANCELED"
LOG = "LOG"
ENGINE_EVENT = "ENGINE_EVENT"  # the agent's own notes on a run (processes it ended, ...)

AGENT_RUN_EVENTS = frozenset({RUN_START, RUN_SUCCESS, RUN_FAILURE, RUN_CANCELED})
TERMINAL_EVENTS = frozenset({RUN_SUCCESS, RUN_FAILURE, RUN_CANCELED})
STEP_EVENTS = frozenset(
    {
        "STEP_START",
        "STEP_OUTPUT",
        "STEP_SUCCESS",
        "STEP_FAILURE",
        "STEP_UP_FOR_RETRY",
        "STEP_RESTARTED",
        "STEP_SKIPPED",
        "STEP_REUSED",
    }
)
# A step of an op with a pool asks for a slot before it starts (the claim), and the
# control plane says when it waits and when it got one; its attempt's end releases it.
STEP_SLOT_REQUESTED = "STEP_SLOT_REQUESTED"
STEP_SLOT_WAITING = "STEP_SLOT_WAITING"
STEP_SLOT_GRANTED = "STEP_SLOT_GRANTED"
STEP_ATTEMPT_ENDS = frozenset({"STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY"})
# The fleet executor: the run worker asks for a step attempt to be run on the fleet (a
# step task, data: attempt and inputs); the control plane notes which agent started it
# and how it ended (under the step task's lease the worker's RUN_START and result
# become these two).
STEP_TASK_REQUESTED = "STEP_TASK_REQUESTED"
STEP_TASK_STARTED = "STEP_TASK_STARTED"
STEP_TASK_ENDED = "STEP_TASK_ENDED"
AGENT_EVENTS = (
    AGENT_RUN_EVENTS
    | STEP_EVENTS
    | {
        LOG,
        ENGINE_EVENT,
        STEP_SLOT_REQUESTED,
        STEP_TASK_REQUESTED,
    }
)
CONTROL_PLANE_EVENTS = frozenset(
    {
        "RUN_ENQUEUED",
        "RUN_STARTING",
        "RUN_CANCELING",
        "RUN_RETRY",
        "RUN_WORKER_RESTARTED",
        "RUN_REQUEUED",
        STEP_SLOT_WAITING,
        STEP_SLOT_GRANTED,
        STEP_TASK_STARTED,
        STEP_TASK_ENDED,
    }
)
LOG_STREAMS = frozenset({"stdout", "stderr"})

# Why a run failed, as an agent may say in a RUN_FAILURE's `failure_kind` (the control
# plane has more of its own; anything else an agent claims counts as an op failure).
WORKER_CRASH = "worker_crash"  # the worker exited without a result
AGENT_LOST = "agent_lost"  # stopped because its agent lost the control plane or shut down
UNDELIVERABLE = "undeliverable"  # the agent could not read or start the launch
CODE_UNREACHABLE = "code_unreachable"  # the run's code location could not be loaded
AGENT_RESTARTED = "agent_restarted"  # its worker was gone when its agent started again
AGENT_FAILURE_KINDS = frozenset(
    {WORKER_CRASH, AGENT_LOST, UNDELIVERABLE, CODE_UNREACHABLE, AGENT_RESTARTED}
)
RECORD_KINDS = frozenset({"event", "log"})
STEPPED_REQUESTS = frozenset({STEP_SLOT_REQUESTED, STEP_TASK_REQUESTED})


def record_shape_problem(kind: str, record_type: str, step: str | None) -> str | None:
    """What makes a record one no agent may send, whatever the run's state; None if
    nothing. (Whether its step belongs to the run's job is the control plane's check.)"""
    if kind == "log":
        if record_type not in LOG_STREAMS:
            return f"a log record's stream must be stdout or stderr, not {record_type[:64]!r}"
    elif kind == "event":
        if record_type in CONTROL_PLANE_EVENTS:
            return f"{record_type} is written by the control plane only"
        if record_type not in AGENT_EVENTS:
            return f"{record_type[:64]!r} is not an event type an agent may send"
        if (record_type in STEP_EVENTS or record_type in STEPPED_REQUESTS) and step is None:
            return f"{record_type} needs a step"
    else:
        return f"record kind must be event or log, not {kind[:64]!r}"
    if step is not None and name_problem(step):
        return f"step name {step[:64]!r} {name_problem(step)}"
    return None
