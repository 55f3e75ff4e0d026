"""Evaluating a schedule tick or a sensor, inside a run-worker process (never the agent).

The function's result is normalised to an `EvaluationResult`: run requests, a skip
reason, or the error it raised (with its traceback); the sensor's cursor travels back so
the control plane can keep it (only for a successful or skipped tick).
"""

from __future__ import annotations

import traceback
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

from agent.sdk import (
    Definitions,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
)
from agent.worker.code_location import LocationLoadError, load_definitions
from protocol.messages import EvaluateSpec, EvaluationResult, RequestedRun


def _requests(result: object, default_job: str) -> tuple[list[RequestedRun], str | None]:
    """Run requests and a skip reason from whatever the function returned."""
    if result is None:
        return [], "the function returned nothing"
    if isinstance(result, SkipReason):
        return [], result.skip_message or "skipped"
    items = [result] if isinstance(result, RunRequest) else result
    if not isinstance(items, list | tuple) or not all(isinstance(r, RunRequest) for r in items):
        raise TypeError(
            "a schedule or sensor must return a RunRequest, a list of them or a SkipReason, "
            f"got {type(result).__name__}"
        )
    runs = [
        RequestedRun(
            job=r.job_name or default_job,
            run_key=r.run_key,
            tags=dict(r.tags),
            config=dict(r.run_config),
        )
        for r in items
    ]
    return runs, None if runs else "the function returned no run requests"


def evaluate(spec: EvaluateSpec) -> EvaluationResult:
    request = spec.evaluate
    try:
        runs, skip_reason, cursor = _run_function(spec)
    except LocationLoadError as exc:
        return EvaluationResult(eval_id=request.eval_id, cursor=request.cursor, error=str(exc))
    except KeyError:
        error = f"code location {spec.location.name} has no {request.kind} {request.name!r}"
        return EvaluationResult(eval_id=request.eval_id, cursor=request.cursor, error=error)
    except Exception as exc:
        error = "".join(traceback.format_exception(exc))
        return EvaluationResult(eval_id=request.eval_id, cursor=request.cursor, error=error)
    return EvaluationResult(
        eval_id=request.eval_id, runs=runs, skip_reason=skip_reason, cursor=cursor
    )


def _run_function(spec: EvaluateSpec) -> tuple[list[RequestedRun], str | None, str | None]:
    """Call the schedule or sensor function: its run requests, skip reason and cursor."""
    request = spec.evaluate
    defs: Definitions = load_definitions(spec.location)
    if request.kind == "schedule":
        schedule = defs.schedules[request.name]
        assert request.scheduled_time is not None
        when = datetime.fromtimestamp(request.scheduled_time, ZoneInfo(schedule.timezone))
        returned = schedule.fn(ScheduleEvaluationContext(when))
        runs, skip_reason = _requests(returned, schedule.job.name)
        runs = [replace(run, tags={**schedule.tags, **run.tags}) for run in runs]
        return runs, skip_reason, request.cursor
    sensor = defs.sensors[request.name]
    context = SensorEvaluationContext(request.cursor, request.last_run_key)
    runs, skip_reason = _requests(sensor.fn(context), sensor.job.name)
    return runs, skip_reason, context.cursor
