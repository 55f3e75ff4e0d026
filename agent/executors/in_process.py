"""The in-process executor: steps one after another in the run worker, in graph order."""

from __future__ import annotations

from typing import Any

from agent.executors.step import run_step
from agent.records import RecordSink
from agent.sdk import JobDefinition
from protocol.messages import LaunchRun


def execute_in_process(job: JobDefinition, launch: LaunchRun, sink: RecordSink) -> list[str]:
    """Run every step; returns the names of the steps that failed.

    A step whose upstream failed (or was skipped) is skipped; independent steps still run.
    """
    outputs: dict[str, Any] = {}
    failed: list[str] = []
    blocked: set[str] = set()
    for name, node in job.nodes.items():
        bad = [u for u in node.upstream if u in blocked]
        if bad:
            sink.event(
                "STEP_SKIPPED",
                f"skipped step {name}: upstream {', '.join(dict.fromkeys(bad))} did not succeed",
                name,
                {"upstream": list(dict.fromkeys(bad))},
            )
            blocked.add(name)
            continue
        result = run_step(node, [outputs[u] for u in node.upstream], job, launch, sink)
        if result.ok:
            outputs[name] = result.value
        else:
            failed.append(name)
            blocked.add(name)
    return failed
