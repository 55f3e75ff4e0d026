"""Evaluating a schedule tick or a sensor, inside a run-worker process (never the agent).

The function's result is normalised to an `EvaluationResult`: run requests, a skip
reason, or the error it raised (with its traceback); the sensor's cursor travels back so
the control plane can keep it (only for a successful or skipped tick). A run status
sensor's function is called once per run the control plane sent; its requests are
gathered, and one that raises fails the whole tick (the control plane sends the same
runs again next time).
"""

from __future__ import annotations

import traceback
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

from agent.sdk import (
    Definitions,
    RunRequest,
    RunStatusSensorContext,
    RunStatusSensorDefinition,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    StepFailure,
    WatchedRun,
)
from agent.worker.code_location import LocationLoadError, load_definitions
from protocol.messages import EvaluateSpec, EvaluationResult, RequestedRun, RunChange


def _requests(result: object, default_job: str | None) -> tuple[list[RequestedRun], str | None]:
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
    if default_job is None and any(r.job_name is None for r in items):
        raise TypeError("this sensor has no request_job: each RunRequest must name job_name")
    runs = [
        RequestedRun(
            job=r.job_name or default_job or "",
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
    default_job = None if sensor.job is None else sensor.job.name
    if isinstance(sensor, RunStatusSensorDefinition):
        runs = []
        for change in request.run_changes:
            returned = sensor.fn(_run_status_context(change))
            if returned is not None:
                runs += _requests(returned, default_job)[0]
        handled = f"handled {len(request.run_changes)} run(s) that reached {sensor.run_status}"
        return runs, None if runs else f"{handled}; requested no runs", request.cursor
    context = SensorEvaluationContext(request.cursor, request.last_run_key)
    runs, skip_reason = _requests(sensor.fn(context), default_job)
    return runs, skip_reason, context.cursor


def _run_status_context(change: RunChange) -> RunStatusSensorContext:
    run = WatchedRun(
        run_id=change.run_id,
        job=change.job,
        status=change.status,
        tags=dict(change.tags),
        status_reason=change.status_reason,
        failure_kind=change.failure_kind,
    )
    failed = [StepFailure(step.step, step.error) for step in change.failure_steps]
    return RunStatusSensorContext(run, failed)
