"""Running one step (op invocation) with its retry policy, events and captured output."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

from agent.capture import capture_step_output
from agent.records import RecordSink
from agent.sdk import Failure, JobDefinition, Node, OpContext, RetryRequested
from protocol.messages import LaunchRun


@dataclass
class StepResult:
    ok: bool
    value: Any = None


class _EventLogHandler(logging.Handler):
    """Turns `context.log` records into LOG events of the step."""

    def __init__(self, sink: RecordSink, step: str) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.step = step

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self.sink.event("LOG", message, self.step, {"level": record.levelname})


def _step_logger(sink: RecordSink, step: str) -> logging.Logger:
    logger = logging.Logger(f"fleetrun.step.{step}", logging.DEBUG)
    logger.addHandler(_EventLogHandler(sink, step))
    return logger


def _error_data(exc: BaseException) -> dict[str, Any]:
    return {
        "error_type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def run_step(
    node: Node, inputs: list[Any], job: JobDefinition, launch: LaunchRun, sink: RecordSink
) -> StepResult:
    """Run `node` until it succeeds or its retries run out; emits every step event."""
    policy = job.retry_policy_for(node.name)
    logger = _step_logger(sink, node.name)
    retry_number = 0
    while True:
        if retry_number == 0:
            sink.event("STEP_START", f"started step {node.name}", node.name)
        else:
            sink.event(
                "STEP_RESTARTED",
                f"retry {retry_number} of step {node.name}",
                node.name,
                {"retry_number": retry_number},
            )
        context = OpContext(
            run_id=launch.run_id,
            job_name=launch.job,
            tags=launch.tags,
            run_config=launch.config,
            step=node.name,
            retry_number=retry_number,
            log=logger,
            lease=launch.lease,
        )
        args = ([context] if node.op.takes_context else []) + inputs
        started = time.monotonic()
        max_retries = policy.max_retries if policy is not None else 0
        wait: float | None = None
        try:
            with capture_step_output(node.name):
                value = node.op.fn(*args)
        except RetryRequested as exc:
            error: Exception = exc
            max_retries, wait = exc.max_retries, exc.seconds_to_wait
        except Failure as exc:
            error = exc
            if not exc.allow_retries:
                max_retries = 0
        except Exception as exc:
            error = exc
        else:
            duration = time.monotonic() - started
            sink.event(
                "STEP_OUTPUT",
                f"output of type {type(value).__name__}",
                node.name,
                {"type": type(value).__name__},
            )
            sink.event(
                "STEP_SUCCESS",
                f"finished step {node.name} in {duration:.3f} s",
                node.name,
                {"duration_seconds": duration},
            )
            return StepResult(ok=True, value=value)
        data = _error_data(error)
        if retry_number < max_retries:
            retry_number += 1
            if wait is None:
                wait = policy.calculate_delay(retry_number) if policy is not None else 0.0
            sink.event(
                "STEP_UP_FOR_RETRY",
                f"{data['error_type']}: {data['message']}; retry {retry_number} of "
                f"{max_retries} in {wait:.2f} s",
                node.name,
                {**data, "retry_number": retry_number, "wait_seconds": wait},
            )
            time.sleep(wait)
            continue
        sink.event("STEP_FAILURE", f"{data['error_type']}: {data['message']}", node.name, data)
        return StepResult(ok=False)
