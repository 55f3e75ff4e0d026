"""One step (op invocation): an attempt, the retry decision after it, and its events.

Executors differ only in where an attempt runs (in the run worker, or in a child
process) and how its output is captured; what an attempt does and when a failed one is
retried is shared, so both executors emit the same events with the same data.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from agent.sdk import Failure, JobDefinition, Node, OpContext, RetryPolicy, RetryRequested
from protocol.messages import LaunchRun


class EventSink(Protocol):
    def event(
        self,
        event_type: str,
        message: str = "",
        step: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...


@dataclass
class StepAttempt:
    """How one attempt of a step ended. `error` holds strings only (always picklable)."""

    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None
    max_retries: int | None = None  # set by RetryRequested, or 0 by Failure(allow_retries=False)
    wait: float | None = None  # set by RetryRequested(seconds_to_wait)
    duration: float = 0.0


class _EventLogHandler(logging.Handler):
    """Turns `context.log` records into LOG events of the step."""

    def __init__(self, sink: EventSink, step: str) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.step = step

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self.sink.event("LOG", message, self.step, {"level": record.levelname})


def _step_logger(sink: EventSink, step: str) -> logging.Logger:
    logger = logging.Logger(f"fleetrun.step.{step}", logging.DEBUG)
    logger.addHandler(_EventLogHandler(sink, step))
    return logger


def error_data(exc: BaseException) -> dict[str, Any]:
    return {
        "error_type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def attempt_step(
    node: Node,
    inputs: list[Any],
    launch: LaunchRun,
    sink: EventSink,
    retry_number: int,
    capture: Callable[[str], ContextManager[object]] = lambda step: contextlib.nullcontext(),
) -> StepAttempt:
    """Call the op once; user errors become a failed StepAttempt, never an exception."""
    context = OpContext(
        run_id=launch.run_id,
        job_name=launch.job,
        tags=launch.tags,
        run_config=launch.config,
        step=node.name,
        retry_number=retry_number,
        log=_step_logger(sink, node.name),
        lease=launch.lease,
    )
    args = ([context] if node.op.takes_context else []) + inputs
    started = time.monotonic()
    try:
        with capture(node.name):
            value = node.op.fn(*args)
    except RetryRequested as exc:
        return StepAttempt(
            False, error=error_data(exc), max_retries=exc.max_retries, wait=exc.seconds_to_wait
        )
    except Failure as exc:
        return StepAttempt(
            False, error=error_data(exc), max_retries=None if exc.allow_retries else 0
        )
    except Exception as exc:
        return StepAttempt(False, error=error_data(exc))
    return StepAttempt(True, value=value, duration=time.monotonic() - started)


def retry_wait(policy: RetryPolicy | None, attempt: StepAttempt, retry_number: int) -> float | None:
    """Seconds before the next attempt of a failed step; None when it has failed for good."""
    if attempt.max_retries is not None:
        max_retries = attempt.max_retries
    else:
        max_retries = policy.max_retries if policy is not None else 0
    if retry_number >= max_retries:
        return None
    if attempt.wait is not None:
        return attempt.wait
    return policy.calculate_delay(retry_number + 1) if policy is not None else 0.0


def emit_start(sink: EventSink, step: str, retry_number: int) -> None:
    if retry_number == 0:
        sink.event("STEP_START", f"started step {step}", step)
    else:
        sink.event(
            "STEP_RESTARTED",
            f"retry {retry_number} of step {step}",
            step,
            {"retry_number": retry_number},
        )


def emit_success(sink: EventSink, step: str, attempt: StepAttempt) -> None:
    kind = type(attempt.value).__name__
    sink.event("STEP_OUTPUT", f"output of type {kind}", step, {"type": kind})
    sink.event(
        "STEP_SUCCESS",
        f"finished step {step} in {attempt.duration:.3f} s",
        step,
        {"duration_seconds": attempt.duration},
    )


def emit_failure(
    sink: EventSink, step: str, attempt: StepAttempt, retry_number: int, wait: float | None
) -> None:
    """STEP_UP_FOR_RETRY (with the wait) if `wait` is set, else STEP_FAILURE."""
    data = attempt.error or {}
    summary = f"{data.get('error_type')}: {data.get('message')}"
    if wait is None:
        sink.event("STEP_FAILURE", summary, step, data)
        return
    sink.event(
        "STEP_UP_FOR_RETRY",
        f"{summary}; retry {retry_number + 1} in {wait:.2f} s",
        step,
        {**data, "retry_number": retry_number + 1, "wait_seconds": wait},
    )


def run_step(
    node: Node,
    inputs: list[Any],
    job: JobDefinition,
    launch: LaunchRun,
    sink: EventSink,
    capture: Callable[[str], ContextManager[object]],
    acquire: Callable[[str, int], None] = lambda step, attempt: None,
) -> StepAttempt:
    """StepAttempt `node` in this process until it succeeds or its retries run out; each
    attempt first takes its pool slot (`acquire`), which its end gives back."""
    policy = job.retry_policy_for(node.name)
    retry_number = 0
    while True:
        acquire(node.name, retry_number)
        emit_start(sink, node.name, retry_number)
        attempt = attempt_step(node, inputs, launch, sink, retry_number, capture)
        if attempt.ok:
            return attempt
        wait = retry_wait(policy, attempt, retry_number)
        emit_failure(sink, node.name, attempt, retry_number, wait)
        if wait is None:
            return attempt
        time.sleep(wait)
        retry_number += 1
