"""Executors run the steps of one run inside its run worker; chosen by name, pluggable.

An executor is a function `Execution -> list of failed step names`. Register your own
with `register_executor("name", fn)` in a module your code location imports, and select
it with `@job(executor="name")` or per run with the run config key `execution`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.outputs import OutputStore, encode_output
from agent.records import RecordSink
from agent.sdk import JobDefinition
from protocol.messages import LaunchRun


@dataclass
class Execution:
    """One run as an executor sees it: the graph, where events and outputs go, options."""

    job: JobDefinition
    launch: LaunchRun
    sink: RecordSink
    options: dict[str, Any]  # the executor config: {"name": ..., other options}
    store: OutputStore
    max_output_bytes: int
    reuse: dict[str, str] = field(default_factory=dict)  # step -> run whose output to reuse

    def load_reused(self) -> dict[str, Any]:
        """The steps this run does not run again, each with its output from the run that
        made it. Only outputs a step that will run takes as input are loaded (the others
        map to None), so an output that no longer unpickles only matters if it is used."""
        nodes = self.job.nodes
        reused = {step: source for step, source in self.reuse.items() if step in nodes}
        needed = {u for name, node in nodes.items() if name not in reused for u in node.upstream}
        values = {}
        for step, source in reused.items():
            values[step] = pickle.loads(self.store.get(source, step)) if step in needed else None
            self.sink.event("STEP_REUSED", f"reused the output of step {step} from run {source}",
                            step, {"source_run_id": source})  # fmt: skip
        return values

    def save_output(self, step: str, data: bytes) -> None:
        self.store.put(self.launch.run_id, step, data)

    def encode(self, step: str, value: Any) -> bytes:
        return encode_output(step, value, self.max_output_bytes)


Executor = Callable[[Execution], list[str]]

EXECUTORS: dict[str, Executor] = {}


def register_executor(name: str, executor: Executor) -> None:
    EXECUTORS[name] = executor


def get_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]
    except KeyError:
        known = ", ".join(sorted(EXECUTORS))
        raise ValueError(f"unknown executor {name!r} (available: {known})") from None


def _register_builtins() -> None:
    from agent.executors.in_process import execute_in_process
    from agent.executors.multiprocess import execute_multiprocess

    register_executor("in_process", execute_in_process)
    register_executor("multiprocess", execute_multiprocess)


_register_builtins()
