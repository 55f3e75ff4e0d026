"""What an executor is given: one run as it sees it (`Execution`)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.sdk import JobDefinition
from agent.worker.outputs import OutputStore, encode_output
from agent.worker.records import RecordSink
from agent.worker.slots import SlotGate
from protocol.messages import LaunchRun, WorkerSpec


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
    spec: WorkerSpec | None = None  # the worker's whole spec (its location, step containers)
    slots: SlotGate | None = None  # pool slots (None: every step starts at once)
    channel: str = ""  # the worker's channel folder (the fleet executor reads results there)

    def acquire_slot(self, step: str, attempt: int) -> None:
        """Block until attempt `attempt` (from 0) of `step` holds a slot of its pool."""
        if self.slots is not None:
            self.slots.acquire(step, self.job.pool_for(step), attempt)

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
            self.sink.event(
                "STEP_REUSED",
                f"reused the output of step {step} from run {source}",
                step,
                {"source_run_id": source},
            )
        return values

    def save_output(self, step: str, data: bytes) -> None:
        self.store.put(self.launch.run_id, step, data)

    def encode(self, step: str, value: Any) -> bytes:
        return encode_output(step, value, self.max_output_bytes)


Executor = Callable[[Execution], list[str]]
