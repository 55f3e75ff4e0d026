"""The in-process executor: steps one after another in the run worker (by priority tag,
then graph order)."""

from __future__ import annotations

from typing import Any

from agent.worker.capture import capture_step_output
from agent.worker.executors.execution import Execution
from agent.worker.executors.step import (
    StepAttempt,
    emit_failure,
    emit_success,
    error_data,
    run_step,
)
from protocol.tags import PRIORITY_TAG


def step_priority(execution: Execution, step: str) -> int:
    """The step's `fleetrun/priority` tag, its invocation's over its op's (higher runs
    first among ready steps); 0 if unset."""
    try:
        return int(execution.job.nodes[step].tags.get(PRIORITY_TAG, "0"))
    except ValueError:
        return 0


def next_ready(
    execution: Execution, pending: list[str], done: dict[str, Any], blocked: set[str]
) -> str:
    """The pending step to run (or skip) next: the highest priority whose upstream is
    settled, ties in graph order. The graph is acyclic, so one always exists."""
    nodes = execution.job.nodes
    ready = [n for n in pending if all(u in done or u in blocked for u in nodes[n].upstream)]
    return max(ready, key=lambda n: step_priority(execution, n), default=pending[0])


def skip(execution: Execution, step: str, upstream: list[str]) -> None:
    bad = list(dict.fromkeys(upstream))
    execution.sink.event(
        "STEP_SKIPPED",
        f"skipped step {step}: upstream {', '.join(bad)} did not succeed",
        step,
        {"upstream": bad},
    )


def store_output(execution: Execution, step: str, attempt: StepAttempt) -> StepAttempt:
    """Persist a successful attempt's output; a failure to do so fails the step."""
    try:
        execution.save_output(step, execution.encode(step, attempt.value))
    except Exception as exc:
        failed = StepAttempt(False, error=error_data(exc))
        emit_failure(execution.sink, step, failed, 0, None)
        return failed
    emit_success(execution.sink, step, attempt)
    return attempt


def execute_in_process(execution: Execution) -> list[str]:
    """Run every step; returns the names of the steps that failed.

    A step whose upstream failed (or was skipped) is skipped; independent steps still run.
    Step output is attributed by in-band markers on the worker's own stdout/stderr.
    """
    outputs: dict[str, Any] = execution.load_reused()
    failed: list[str] = []
    blocked: set[str] = set()
    pending = [name for name in execution.job.nodes if name not in outputs]
    while pending:
        name = next_ready(execution, pending, outputs, blocked)
        pending.remove(name)
        node = execution.job.nodes[name]
        bad = [u for u in node.upstream if u in blocked]
        if bad:
            skip(execution, name, bad)
            blocked.add(name)
            continue
        inputs = [outputs[u] for u in node.upstream]
        attempt = run_step(
            node,
            inputs,
            execution.job,
            execution.launch,
            execution.sink,
            capture_step_output,
            execution.acquire_slot,
        )
        if attempt.ok:
            attempt = store_output(execution, name, attempt)
        if attempt.ok:
            outputs[name] = attempt.value
        else:
            failed.append(name)
            blocked.add(name)
    return failed
